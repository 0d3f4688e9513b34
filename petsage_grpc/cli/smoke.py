"""``petsage-grpc smoke``: call SmokeTest once and report the result.

Exit codes (:class:`~petsage_grpc.codes.ExitCode`, grpc_health_probe's
convention): 0 status OK, 1 bad arguments, 2 cannot connect, 3 the RPC
failed (deadline included), 4 the smoke test answered but not OK.  Each failure prints its own one line on
stderr; the result itself goes to stdout (one JSON object with ``--json``).
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

from petsage_grpc import __version__
from petsage_grpc.cli import dial, output
from petsage_grpc.codes import ExitCode

if TYPE_CHECKING:
    from petsage_grpc._proto.smoke.v1 import smoke_pb2 as _smoke_pb2

#: ``smoke --help``, in plain words (the module docstring is for the API reference).
DESCRIPTION = """\
Call SmokeTest once and report the result on stdout (one JSON object with
--json), each failure as one line on stderr. The flags are the probe's,
spelled in full."""
EPILOG = """\
exit codes:
  0  status OK
  1  bad arguments
  2  cannot connect (a refused connection or an unknown host at once, with
     the reason; a server that does not answer after -connect-timeout)
  3  the call failed, deadline included
  4  the smoke test answered, but not OK"""
DEFAULT_ADDRESS = "localhost:50051"
DEFAULT_TIMEOUT = 5.0


def add_parser(commands: Any) -> None:
    """Add the ``smoke`` subcommand to ``commands`` (an argparse subparsers object).

    It takes the probe's connection and TLS flags; ``--address`` and
    ``--timeout`` remain as other spellings of ``-addr`` and ``-rpc-timeout``.
    """
    parser = commands.add_parser(
        "smoke", help="call SmokeTest on a server and report the result", allow_abbrev=False,
        description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    dial.add_arguments(parser, connect_timeout=DEFAULT_TIMEOUT, rpc_timeout=DEFAULT_TIMEOUT,
                       user_agent=f"petsage-grpc/{__version__}", address=DEFAULT_ADDRESS,
                       aliases={"addr": ["--address"], "rpc-timeout": ["--timeout"]})
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")


def _as_dict(response: _smoke_pb2.SmokeTestResponse) -> dict[str, Any]:
    """The answer as JSON: every field, absent ones (``--smoke-details status``: checks, server) left out."""
    from google.protobuf import json_format

    document: dict[str, Any] = json_format.MessageToDict(
        response, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    if not response.checks:
        document.pop("checks", None)
    return document


def _as_text(response: _smoke_pb2.SmokeTestResponse) -> str:
    from petsage_grpc._proto.smoke.v1 import smoke_pb2 as _smoke_pb2

    lines = [
        f"status: {_smoke_pb2.Status.Name(response.status)}",
        f"message: {response.message}",
        f"timestamp: {response.timestamp.ToJsonString()}",
    ]
    for check in response.checks:
        kind = "critical" if check.critical else "non-critical"
        millis = check.duration.ToNanoseconds() / 1e6
        lines.append(f"check {check.name}: {_smoke_pb2.Status.Name(check.status)} "
                     f"({kind}, {millis:.1f} ms): {check.detail}")
    if response.HasField("server"):  # absent from a server run with --smoke-details status
        server = response.server
        lines.append(f"server: version {server.version}, instance {server.instance_id}, "
                     f"started {server.start_time.ToJsonString()}")
    return "\n".join(lines)


def _check_address(address: str) -> str | None:
    """The address rule of ``serve --address`` (a host without a port would silently mean port 443)."""
    from petsage_grpc.values import parse_address

    try:
        parse_address(address)
    except ValueError as exc:
        return f"invalid --address={address!r}: {exc}"
    return None


def _fail(message: str, code: int) -> int:
    output.line(f"petsage-grpc smoke: {message}")
    return code


def run(args: argparse.Namespace) -> int:
    """Call SmokeTest as ``args`` say; print the result and return the exit code."""
    problem = dial.check(args) or _check_address(args.addr)
    if problem is not None:
        return _fail(f"error: {problem}", ExitCode.USAGE)
    dial.quiet_grpc()
    import grpc

    from petsage_grpc._proto.smoke.v1 import smoke_pb2 as _smoke_pb2
    from petsage_grpc._proto.smoke.v1 import smoke_pb2_grpc as _smoke_pb2_grpc
    from petsage_grpc.tls import TLSError

    cannot_connect = f"cannot connect to {args.addr} within {args.connect_timeout:g}s"
    try:
        channel = dial.open_channel(args, dial.FIRST_FAILURE_OPTIONS)
    except TLSError as exc:
        return _fail(f"error: {exc}", ExitCode.USAGE)
    except TimeoutError:
        return _fail(cannot_connect, ExitCode.CONNECTION)
    with channel:
        connected = dial.wait_for_connection(channel, args.connect_timeout)
        if connected is None:
            return _fail(cannot_connect, ExitCode.CONNECTION)
        stub = _smoke_pb2_grpc.SmokeTestServiceStub(channel)
        try:
            # Not waiting for ready: after a failed connection attempt, the call fails at once with the reason.
            response = stub.SmokeTest(_smoke_pb2.SmokeTestRequest(), timeout=args.rpc_timeout,
                                      metadata=dial.metadata(args))
        except grpc.RpcError as exc:
            code: grpc.StatusCode = exc.code()
            if code == grpc.StatusCode.UNAVAILABLE and not connected:
                return _fail(f"cannot connect to {args.addr}: {dial.connection_error(exc.details() or '')}",
                             ExitCode.CONNECTION)
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                return _fail(f"deadline exceeded: no answer from {args.addr} within {args.rpc_timeout:g}s",
                             ExitCode.RPC_FAILED)
            return _fail(f"RPC failed: {code.name}: {exc.details()}", ExitCode.RPC_FAILED)
    output.result(json.dumps(_as_dict(response)) if args.json else _as_text(response), "petsage-grpc smoke")
    if response.status != _smoke_pb2.STATUS_OK:
        return _fail(f"not OK: {_smoke_pb2.Status.Name(response.status)}: {response.message}",
                     ExitCode.UNHEALTHY)
    return ExitCode.OK
