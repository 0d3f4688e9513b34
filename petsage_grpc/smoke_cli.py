"""``petsage-grpc smoke``: call SmokeTest once and report the result.

Exit codes (the grpc_health_probe convention): 0 status OK, 1 bad
arguments, 2 cannot connect, 3 the RPC failed (deadline included), 4 the
smoke test answered but not OK.  Each failure prints its own one line on
stderr; the result itself goes to stdout (one JSON object with ``--json``).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import grpc
from google.protobuf import json_format

from petsage_grpc._proto.smoke.v1 import smoke_pb2 as _smoke_pb2
from petsage_grpc._proto.smoke.v1 import smoke_pb2_grpc as _smoke_pb2_grpc

EXIT_OK = 0
EXIT_CONNECTION_FAILED = 2
EXIT_RPC_FAILED = 3
EXIT_NOT_OK = 4
DEFAULT_ADDRESS = "localhost:50051"


def _positive_seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {value!r}") from None
    if not 0 < seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"should be > 0 seconds, got {value!r}")
    return seconds


def add_parser(commands: Any) -> None:
    """Add the ``smoke`` subcommand to ``commands`` (an argparse subparsers object)."""
    parser = commands.add_parser(
        "smoke", help="call SmokeTest on a server and report the result",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--address", default=DEFAULT_ADDRESS, metavar="HOST:PORT",
                        help=f"server to call [default {DEFAULT_ADDRESS}]")
    parser.add_argument("--connect-timeout", type=_positive_seconds, default=5.0, metavar="SECONDS",
                        help="how long to try to connect [default 5]")
    parser.add_argument("--timeout", type=_positive_seconds, default=5.0, metavar="SECONDS",
                        help="deadline of the SmokeTest call [default 5]")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")


def _as_dict(response: _smoke_pb2.SmokeTestResponse) -> dict[str, Any]:
    return json_format.MessageToDict(
        response, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def _as_text(response: _smoke_pb2.SmokeTestResponse) -> str:
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
    server = response.server
    lines.append(f"server: version {server.version}, instance {server.instance_id}, "
                 f"started {server.start_time.ToJsonString()}")
    return "\n".join(lines)


def _fail(message: str, code: int) -> int:
    print(f"petsage-grpc smoke: {message}", file=sys.stderr)
    return code


def run(args: argparse.Namespace) -> int:
    """Call SmokeTest as ``args`` say; print the result and return the exit code."""
    with grpc.insecure_channel(args.address) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=args.connect_timeout)
        except grpc.FutureTimeoutError:
            return _fail(f"cannot connect to {args.address} within {args.connect_timeout:g}s",
                         EXIT_CONNECTION_FAILED)
        stub = _smoke_pb2_grpc.SmokeTestServiceStub(channel)
        try:
            response = stub.SmokeTest(_smoke_pb2.SmokeTestRequest(), timeout=args.timeout)
        except grpc.RpcError as exc:
            code: grpc.StatusCode = exc.code()
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                return _fail(f"deadline exceeded: no answer from {args.address} within {args.timeout:g}s",
                             EXIT_RPC_FAILED)
            return _fail(f"RPC failed: {code.name}: {exc.details()}", EXIT_RPC_FAILED)
    print(json.dumps(_as_dict(response)) if args.json else _as_text(response))
    if response.status != _smoke_pb2.STATUS_OK:
        return _fail(f"not OK: {_smoke_pb2.Status.Name(response.status)}: {response.message}",
                     EXIT_NOT_OK)
    return EXIT_OK
