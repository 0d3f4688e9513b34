"""Dispatching ``petsage-grpc COMMAND ...`` to ``serve``, ``smoke``, ``probe`` or ``fleet``.

``main(argv, environ)`` returns the exit code.  It reads the environment
(handing it to each subcommand) and leaves logging and signal handling to
:func:`petsage_grpc.server.run`.  Each subcommand is imported only when it
runs (or when ``--help`` lists them): the probe, an exec probe timed as a
whole process, imports nothing the others need.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence

from petsage_grpc import __version__
from petsage_grpc.cli import dial, output
from petsage_grpc.codes import ExitCode

# Not typing.TYPE_CHECKING: the probe, timed as a whole process, starts here and would pay for importing typing.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NoReturn


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors exit with :attr:`ExitCode.USAGE`."""

    def error(self, message: str) -> NoReturn:
        """Print ``message`` as one line, then exit with :attr:`ExitCode.USAGE` (``--help`` shows the usage)."""
        self.exit(ExitCode.USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    from petsage_grpc.cli import serve, smoke

    parser = _Parser(
        prog="petsage-grpc",
        description="PetSage health and smoke-test service over gRPC.",
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve.add_parser(commands)
    smoke.add_parser(commands)
    # Listed for --help only: main() hands "probe" to its own parser first.
    commands.add_parser("probe", add_help=False,
                        help="check health as grpc_health_probe does (same flags, exit codes and messages)")
    # Listed for --help only, as the probe: main() hands "fleet" to its own parser.
    commands.add_parser("fleet", add_help=False,
                        help="check every instance behind DNS names (A/AAAA or SRV records) at once")
    parser.set_defaults(subparsers=commands.choices)
    return parser


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); return the exit code."""
    try:
        return _main(argv, environ)
    finally:
        output.flush()  # e.g. ``--help | head -1``: no traceback for a reader that left early


def _main(argv: Sequence[str] | None, environ: Mapping[str, str] | None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["probe"]:
        # The probe parses its own flags (grpc_health_probe's one-line errors),
        # skips building the other subcommands and ends the process itself:
        # it runs as an exec probe, timed as a whole process.
        from petsage_grpc.cli.probe import main as probe

        return probe.main(argv[1:], exit_process=True)
    if argv[:1] == ["fleet"]:
        # Targets and flags may come in any order, which the Go-style flags need read by the fleet itself.
        from petsage_grpc.cli.fleet import main as fleet

        return fleet.main(argv[1:])
    parser = build_parser()
    try:
        if argv[:1] == ["smoke"]:  # the probe's flags, read as the probe reads them
            smoke_parser = parser.get_default("subparsers")["smoke"]
            try:
                argv = ["smoke", *dial.go_flags(smoke_parser, argv[1:])]
            except ValueError as exc:
                smoke_parser.error(str(exc))
        args, extra = parser.parse_known_args(argv)
        if extra:  # reported by the subcommand, whose usage says what it takes
            args.subparsers[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as exc:  # --help, --version and usage errors
        return exc.code if isinstance(exc.code, int) else ExitCode.USAGE
    environ = os.environ if environ is None else environ
    if args.command == "serve":
        from petsage_grpc.cli import serve

        return serve.run(args, environ)
    from petsage_grpc.cli import smoke

    return smoke.run(args)
