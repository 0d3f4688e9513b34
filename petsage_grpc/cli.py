"""The ``petsage-grpc`` command: ``serve``, ``smoke`` and ``probe``.

``main(argv, environ)`` returns the exit code.  It reads the environment
(handing it to each subcommand) and leaves logging and signal handling to
:func:`petsage_grpc.process.run`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from typing import NoReturn

from petsage_grpc import __version__, config

#: Exit code for bad flags or settings, in every subcommand (as grpc_health_probe).
EXIT_USAGE = config.EXIT_BAD_SETTING


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors exit with :data:`EXIT_USAGE`."""

    def error(self, message: str) -> NoReturn:
        """Print the usage and ``message``, then exit with :data:`EXIT_USAGE`."""
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    from petsage_grpc import smoke_cli

    parser = _Parser(
        prog="petsage-grpc",
        description="PetSage health and smoke-test service over gRPC.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="run the server",
        description="Serve SmokeTestService, grpc.health.v1.Health and reflection. "
        f"Every flag may also be set by its {config.ENV_PREFIX}<FLAG> variable; flags win.",
    )
    config.add_arguments(serve)
    smoke_cli.add_parser(commands)
    # Listed for --help only: main() hands "probe" to its own parser first.
    commands.add_parser("probe", add_help=False,
                        help="check health as grpc_health_probe does (same flags, exit codes and messages)")
    parser.set_defaults(subparsers=commands.choices)
    return parser


def _serve(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    """Validate settings, then run the server until a signal."""
    from petsage_grpc import process, server

    try:
        settings = config.resolve(args, environ)
    except config.SettingError as exc:
        print(f"petsage-grpc serve: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return process.run(server.PetSageServer(settings))


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); return the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["probe"]:
        # The probe parses its own flags (grpc_health_probe's one-line errors),
        # skips building the other subcommands and ends the process itself:
        # it runs as an exec probe, timed as a whole process.
        from petsage_grpc import probe

        return probe.main(argv[1:], exit_process=True)
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:  # reported by the subcommand, whose usage says what it takes
            args.subparsers[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as exc:  # --help, --version and usage errors
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    environ = os.environ if environ is None else environ
    if args.command == "serve":
        return _serve(args, environ)
    from petsage_grpc import smoke_cli

    return smoke_cli.run(args)
