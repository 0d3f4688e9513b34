"""``petsage-grpc probe``: a drop-in for grpc_health_probe, in Python.

Same flags (one dash or two), defaults, argument rules, exit codes and stderr
lines as grpc_health_probe 0.4: 0 SERVING, 1 bad arguments, 2 cannot connect
within ``-connect-timeout``, 3 the RPC failed (NOT_FOUND, UNIMPLEMENTED and
the deadline included), 4 answered but not SERVING.  Beyond it: several
``-service`` flags (all must be SERVING), ``--all`` (every service ``List``
names), ``--wait DURATION`` (retry with backoff until SERVING or time is up),
``--json`` (one object on stdout) and a clean end on SIGTERM as on SIGINT.

It runs as a Kubernetes exec probe, so it imports grpc only once the
arguments are valid, and nothing it does not use.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from petsage_grpc import __version__
from petsage_grpc.cli import dial, output
from petsage_grpc.cli.probe.stop import Stop
from petsage_grpc.codes import ExitCode

# Not typing.TYPE_CHECKING: the probe is timed as a whole process, and importing typing takes milliseconds.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NoReturn

#: ``probe --help``, in plain words (the module docstring is for the API reference).
DESCRIPTION = """\
Check health as grpc_health_probe does: the same flags (one dash or two,
spelled in full), defaults, argument rules, exit codes and stderr lines.
Beyond it: several -service flags (all must be SERVING), --all, --wait, --json."""
EPILOG = """\
exit codes:
  0  SERVING
  1  bad arguments
  2  cannot connect within -connect-timeout
  3  the call failed (NOT_FOUND, UNIMPLEMENTED and the deadline included)
  4  answered, but not SERVING"""
#: grpc_health_probe's defaults: one second each, and its user agent.
DEFAULT_TIMEOUT = 1.0
DEFAULT_USER_AGENT = "grpc_health_probe"


class _Parser(argparse.ArgumentParser):
    """Usage errors as one ``error: ...`` line and exit code 1, as grpc_health_probe."""

    def error(self, message: str) -> NoReturn:
        """Print ``message`` on one line and exit with :attr:`ExitCode.USAGE`."""
        self.exit(ExitCode.USAGE, f"error: {message}\n")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """argparse's formatter, told the width instead of asking shutil.

    argparse makes a formatter on every add_argument; asking shutil for the
    width cost the probe 3 ms of imports (shutil, bz2, lzma) on every run,
    for help it seldom prints.
    """

    def __init__(self, prog: str) -> None:
        try:
            columns = int(os.environ.get("COLUMNS", "")) or os.get_terminal_size(sys.stdout.fileno()).columns
        except (ValueError, OSError, AttributeError):
            columns = 80
        super().__init__(prog, width=max(columns - 2, 40))


def build_parser(prog: str = "petsage-grpc probe") -> argparse.ArgumentParser:
    """The probe's own argument parser (grpc_health_probe's flags, then ours)."""
    parser = _Parser(prog=prog, description=DESCRIPTION, epilog=EPILOG, allow_abbrev=False,
                     formatter_class=_Formatter)
    dial.add_arguments(parser, connect_timeout=DEFAULT_TIMEOUT, rpc_timeout=DEFAULT_TIMEOUT,
                       user_agent=DEFAULT_USER_AGENT)
    parser.add_argument("-service", "--service", action="append", metavar="NAME",
                        help='service to check [default ""]; repeat for several, all must be SERVING')
    parser.add_argument("-v", "--verbose", dest="verbose", type=dial.parse_bool, nargs="?", const=True,
                        default=False, metavar="BOOL", help="verbose logs")
    parser.add_argument("-version", "--version", dest="version", type=dial.parse_bool, nargs="?", const=True,
                        default=False, metavar="BOOL", help="print the version and exit")
    parser.add_argument("--all", action="store_true", help="check every service the server's List names")
    parser.add_argument("--wait", type=dial.parse_duration, default=0.0, metavar="DURATION",
                        help="retry with backoff (0.1s doubling to 1s) until SERVING or this much time has passed, "
                             "e.g. 30s [default 0s: one attempt]")
    parser.add_argument("--json", action="store_true", help="print one JSON object with every result and timing")
    return parser


def _check_extras(args: argparse.Namespace) -> str | None:
    if args.all and args.service:
        return "cannot specify -service with --all (--all checks every service)"
    if args.wait < 0:
        return f"--wait must not be negative (specified: {dial.format_duration(args.wait)})"
    return None


def main(argv: Sequence[str] | None = None, *, exit_process: bool = False) -> int:
    """Run the probe with ``argv`` (default ``sys.argv[1:]``) and return its exit code.

    With ``exit_process`` the process ends as soon as the outcome is printed
    (:func:`exit_now`), without closing the channel first: closing waits for
    grpc's polling thread, 200 ms, as long as the rest of the probe.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(dial.go_flags(parser, sys.argv[1:] if argv is None else argv))
    except ValueError as exc:  # a flag it does not define, or one without its value
        output.line(f"error: {exc}")
        return ExitCode.USAGE
    except SystemExit as exc:  # --help, or a usage error already printed
        return exc.code if isinstance(exc.code, int) else ExitCode.USAGE
    if args.version:
        output.result(f"petsage-grpc probe {__version__}", "petsage-grpc probe")
        return ExitCode.OK
    problem = dial.check(args) or _check_extras(args)
    if problem is not None:
        output.line(f"error: {problem}")
        return ExitCode.USAGE
    from petsage_grpc.cli.probe.run import run  # the transport: only once the arguments are valid

    stop = Stop()
    stop.install()
    code = run(args, stop)
    if exit_process:
        exit_now(code)
    return code


def exit_now(code: int) -> NoReturn:
    """End the process with ``code`` at once, once stdout and stderr are flushed.

    An exec probe is timed as a whole process: interpreter teardown (module
    cleanup, a resolver thread still waiting) is time the kubelet counts, and
    the kernel closes the probe's socket just as well.
    """
    output.flush()
    os._exit(code)
