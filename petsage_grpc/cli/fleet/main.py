"""``petsage-grpc fleet``: its arguments, read and checked before anything is looked up.

Flags are the probe's (one dash or two, ``-flag=value``, spelled in full, as
Go reads them) plus the fleet's own, before, between or after the targets.
A usage error is one line, ``petsage-grpc fleet: error: ...``, and exit code
1.  :mod:`.run` does the rest: the results go to stdout (the table, or the
JSON document with ``--json``), and stderr carries one line per problem.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from petsage_grpc import __version__
from petsage_grpc.cli import dial, output
from petsage_grpc.cli.fleet import PROG
from petsage_grpc.codes import ExitCode

#: ``fleet --help``, in plain words (the module docstrings are for the API reference).
DESCRIPTION = """\
Check every instance behind the targets at once, each with its own deadline:
the health names asked for (-service, repeatable; default the server's overall
status) or every name the server's List gives (--all), and with --smoke the
SmokeTest. A target is NAME:PORT (every A and AAAA record of NAME), srv:NAME
(SRV records give the hosts and ports) or IP:PORT ([IPv6]:PORT); one argument
may list several, comma-separated. Connection and TLS flags are the probe's.
Prints a table (or --json) on stdout and one line per problem on stderr."""
EPILOG = """\
exit codes (when several apply, the first of this list):
  1  bad arguments, or a target gave more than --max-instances
  2  a DNS server did not answer
  5  a target resolved to nothing, or fewer instances answered than
     --min-instances
  2  an instance could not be reached, retries included
  3  a call failed on an instance that was reached (error status, deadline)
  4  an instance answered, but not SERVING (or SmokeTest not OK)
  0  every instance passed"""
DEFAULT_CONNECT_TIMEOUT, DEFAULT_RPC_TIMEOUT, DEFAULT_TIMEOUT, DEFAULT_DNS_TIMEOUT = 2.0, 5.0, 60.0, 5.0
DEFAULT_CONCURRENCY, DEFAULT_RETRIES = 16, 2
#: Upper limits that catch a typo before it opens thousands of channels or waits for hours.
MAX_CONCURRENCY, MAX_RETRIES = 1024, 10
#: Instances one target may give (each costs a few KiB while the run lasts): a DNS answer can carry
#: thousands of addresses, and an SRV name's hosts multiply them.
DEFAULT_MAX_INSTANCES, MAX_MAX_INSTANCES = 1000, 100_000


class _Parser(argparse.ArgumentParser):
    """Usage errors as one ``petsage-grpc fleet: error: ...`` line and exit code 1."""

    def error(self, message: str) -> NoReturn:
        """Print ``message`` on one line and exit with :attr:`ExitCode.USAGE`."""
        self.exit(ExitCode.USAGE, f"{PROG}: error: {message}\n")


def _count(minimum: int, maximum: int) -> Callable[[str], int]:
    """A parser of a whole number in ``minimum..maximum``, for argparse."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if not minimum <= value <= maximum:
            raise argparse.ArgumentTypeError(f"should be in {minimum}..{maximum} (specified: {value})")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    """The fleet's argument parser: targets, the probe's connection and TLS flags, and its own."""
    parser = _Parser(prog=PROG, description=DESCRIPTION, epilog=EPILOG, allow_abbrev=False,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("targets", nargs="*", metavar="TARGET", help="NAME:PORT, srv:NAME or IP:PORT (or a list)")
    dial.add_arguments(parser, connect_timeout=DEFAULT_CONNECT_TIMEOUT, rpc_timeout=DEFAULT_RPC_TIMEOUT,
                       user_agent=f"petsage-grpc-fleet/{__version__}")
    addr = parser._option_string_actions["-addr"]  # argparse's own table, as dial.go_flags reads it
    addr.metavar, addr.help = "TARGET", "one more target, as probe's -addr takes an address"
    parser.add_argument("-service", "--service", action="append", metavar="NAME",
                        help='health name to check [default ""]; repeat for several, all must be SERVING')
    parser.add_argument("--all", action="store_true", help="check every health name the server's List gives")
    parser.add_argument("--smoke", action="store_true", help="also call SmokeTest; it must answer STATUS_OK")
    parser.add_argument("--concurrency", type=_count(1, MAX_CONCURRENCY), default=DEFAULT_CONCURRENCY, metavar="N",
                        help=f"instances checked at once [default {DEFAULT_CONCURRENCY}]")
    parser.add_argument("--retries", type=_count(0, MAX_RETRIES), default=DEFAULT_RETRIES, metavar="N",
                        help="connection attempts after a failed one, with backoff (0.2s doubling to 2s, "
                             f"jittered); never after an answer [default {DEFAULT_RETRIES}]")
    parser.add_argument("--timeout", type=dial.parse_duration, default=DEFAULT_TIMEOUT, metavar="DURATION",
                        help=f"deadline of the whole run [default {dial.format_duration(DEFAULT_TIMEOUT)}]")
    parser.add_argument("--min-instances", type=_count(0, 1_000_000), default=0, metavar="N",
                        help="fail (exit 5) when fewer than N instances answer [default 0: any number, though "
                             "each target must resolve to one at least]")
    parser.add_argument("--max-instances", type=_count(1, MAX_MAX_INSTANCES), default=DEFAULT_MAX_INSTANCES,
                        metavar="N", help="refuse a target that gives more instances (or SRV records) than N, "
                                          f"checking none (exit 1) [default {DEFAULT_MAX_INSTANCES}]")
    parser.add_argument("--dns-server", metavar="IP[:PORT]",
                        help="DNS server to ask [default: those of /etc/resolv.conf, with its search domains]")
    parser.add_argument("--dns-timeout", type=dial.parse_duration, default=DEFAULT_DNS_TIMEOUT, metavar="DURATION",
                        help=f"time allowed for each DNS lookup [default {dial.format_duration(DEFAULT_DNS_TIMEOUT)}]")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--junit", metavar="FILE", help="also write a JUnit XML report to FILE")
    return parser


def split_arguments(parser: argparse.ArgumentParser, argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """``argv`` as ``(flags, targets)``: each flag rewritten as :func:`dial.go_flags` does, wherever it stands.

    Go stops reading flags at the first argument that is none; here flags
    may follow the targets too (``fleet srv:NAME --smoke``).  ``ValueError``
    carries Go's message for an unknown flag or a missing value.
    """
    actions = parser._option_string_actions
    flags: list[str] = []
    targets: list[str] = []
    rest = list(argv)
    while rest:
        arg = rest[0]
        if arg == "--":
            return flags, targets + rest[1:]
        if not arg.startswith("-") or arg == "-":
            targets.append(rest.pop(0))
            continue
        name, equals, _ = arg.partition("=")
        action = actions.get(name)
        # A flag that takes a value takes the next argument, whatever it is (dial.go_flags reads it).
        width = 2 if action is not None and action.nargs in (None, 1) and not equals else 1
        flags += dial.go_flags(parser, rest[:width])
        del rest[:width]
    return flags, targets


def _usage_problem(args: argparse.Namespace) -> str | None:
    """The first argument rule broken, in one line; None if there is none."""
    if not args.targets:
        return "no target given: expected NAME:PORT, srv:NAME or IP:PORT"
    # The probe's rules, -addr aside (the targets stand for it).
    problem = dial.check(argparse.Namespace(**{**vars(args), "addr": args.targets[0]}))
    unwritable = None if args.junit is None else _unwritable(args.junit)
    # grpc refuses such a value on every call, with a traceback of its own: refused once, here.
    header = next((f"{key}: {value}" for key, value in args.rpc_header or ()
                   if not key.endswith("-bin") and not all(" " <= char <= "~" for char in value)), None)
    rules = (
        (problem is not None, problem),
        (args.all and args.service, "cannot specify -service with --all (--all checks every service)"),
        (header is not None, f"invalid RPC header {header!r}: a value must be printable ASCII "
                             "(a key ending in -bin carries any bytes)"),
        (args.timeout <= 0, f"--timeout must be greater than zero (specified: {dial.format_duration(args.timeout)})"),
        (args.dns_timeout <= 0,
         f"--dns-timeout must be greater than zero (specified: {dial.format_duration(args.dns_timeout)})"),
        (unwritable is not None, f"cannot write --junit {args.junit!r}: {unwritable}"),
    )
    return next((message for broken, message in rules if broken), None)


def _unwritable(path: str) -> str | None:
    """Why a report could not be written at ``path`` (checked before the run, so the run is not wasted)."""
    file = Path(path)
    if file.is_dir():
        return "it is a directory"
    folder = file.parent
    if not folder.is_dir():
        return f"no such directory: {str(folder)!r}"
    if not os.access(folder, os.W_OK) or (file.exists() and not os.access(file, os.W_OK)):
        return "permission denied"
    return None


def _fail(message: str, code: int = ExitCode.USAGE) -> int:
    output.line(f"{PROG}: {message}")
    return code


def main(argv: Sequence[str]) -> int:
    """Run ``petsage-grpc fleet ARGV`` and return its exit code."""
    from petsage_grpc.cli.fleet import targets as targeting

    parser = build_parser()
    try:
        flags, positional = split_arguments(parser, argv)
        # Every flag is -flag=value or a bare switch by now; after "--" nothing is read as a flag.
        args = parser.parse_args([*flags, "--", *positional] if positional else flags)
    except ValueError as exc:
        return _fail(f"error: {exc}")
    except SystemExit as exc:  # --help, or a usage error already printed
        return exc.code if isinstance(exc.code, int) else ExitCode.USAGE
    args.targets += [args.addr] if args.addr else []
    problem = _usage_problem(args)
    if problem is not None:
        return _fail(f"error: {problem}")
    try:
        targets = targeting.parse_targets(args.targets)
        dns_server = targeting.parse_dns_server(args.dns_server) if args.dns_server else None
    except ValueError as exc:
        return _fail(f"error: {exc}")
    dial.quiet_grpc()  # before grpc is first imported
    from petsage_grpc.cli.fleet import run  # grpc and dnspython: only once the arguments are valid
    from petsage_grpc.tls import TLSError

    try:
        plan = run.plan(args)
    except TLSError as exc:
        return _fail(f"error: {exc}")
    return run.run(args, plan, targets, dns_server)
