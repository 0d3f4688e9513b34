"""The probe once its arguments are valid: connect, check, retry under ``--wait``, report.

It calls the server through :mod:`petsage_grpc.cli.probe.transport` (HTTP/2
with the standard library; grpc is never imported).  Connecting behaves as
grpc_health_probe's blocking dial: a refused or failed attempt is retried
with backoff until ``-connect-timeout``, then reported as a timeout.  Every
wait is sliced to look at the :class:`~petsage_grpc.cli.probe.stop.Stop` flag,
so a signal ends the probe at once and nothing blocks past its timeout.
"""

from __future__ import annotations

import time
from argparse import Namespace

from petsage_grpc import __version__
from petsage_grpc.cli import dial, output
from petsage_grpc.cli.probe import transport, wire
from petsage_grpc.cli.probe.stop import Stop
from petsage_grpc.codes import ExitCode, go_code_name

TYPE_CHECKING = False  # not typing's: importing typing costs the probe, timed as a process, milliseconds
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import TypeVar

    _T = TypeVar("_T")

#: ``--wait`` retries after 0.1 s, then twice as long each time, up to 1 s; so do connection attempts.
_FIRST_RETRY, _MAX_RETRY = 0.1, 1.0
_CANCELLED = "context canceled"  # what grpc_health_probe's Go runtime says


class ServiceResult:
    """One service's answer: its status name, or the error line, and the call's duration."""

    __slots__ = ("error", "exit_code", "rpc_seconds", "service", "status")

    def __init__(self, service: str, status: str | None = None, error: str | None = None, exit_code: int = 0,
                 rpc_seconds: float | None = None) -> None:
        self.service, self.status, self.error = service, status, error
        self.exit_code, self.rpc_seconds = exit_code, rpc_seconds

    def as_dict(self) -> dict[str, object]:
        """The JSON object of ``--json``."""
        return {name: getattr(self, name) for name in self.__slots__}


class Attempt:
    """One connect-and-check round."""

    __slots__ = ("connect_seconds", "error", "exit_code", "services")

    def __init__(self, exit_code: int = 0, error: str | None = None) -> None:
        self.exit_code = exit_code
        self.error = error  # a failure before any service was checked
        self.connect_seconds: float | None = None
        self.services: list[ServiceResult] = []

    def as_dict(self) -> dict[str, object]:
        """The JSON object of ``--json``, its services included."""
        return {"exit_code": self.exit_code, "error": self.error, "connect_seconds": self.connect_seconds,
                "services": [service.as_dict() for service in self.services]}


class _Runner:
    def __init__(self, args: Namespace, stop: Stop, tls: object | None) -> None:
        self.args = args
        self.stop = stop
        self.tls = tls  # an ssl.SSLContext with -tls
        self.target = transport.parse_target(args.addr)

    def log(self, line: str) -> None:
        if self.args.verbose:
            output.line(line)

    def connect(self, result: Attempt) -> transport.Connection | None:
        """A connection within -connect-timeout, attempts retried as grpc does; None (and ``result`` says why)."""
        args = self.args
        self.log("establishing connection")
        started = time.monotonic()
        deadline = started + args.connect_timeout
        pause = _FIRST_RETRY
        while True:
            try:
                connection = transport.connect(self.target, timeout=deadline - time.monotonic(), stop=self.stop,
                                               tls=self.tls, server_name=args.tls_server_name)  # type: ignore[arg-type]
                break
            except transport.Cancelled:
                result.exit_code = ExitCode.CONNECTION
                result.error = f'error: failed to connect service at "{args.addr}": {_CANCELLED}'
                return None
            except transport.ConnectError as exc:
                self.log(f"connection attempt failed: {exc}")
                if time.monotonic() + pause >= deadline or not self.stop.sleep(pause):
                    result.exit_code = ExitCode.CONNECTION
                    result.error = (f'error: failed to connect service at "{args.addr}": {_CANCELLED}'
                                    if self.stop.requested else
                                    f'timeout: failed to connect service "{args.addr}" within '
                                    f"{dial.format_duration(args.connect_timeout)}")
                    return None
                pause = min(pause * 1.6, _MAX_RETRY)
        result.connect_seconds = time.monotonic() - started
        self.log(f"connection established (took {dial.format_duration(result.connect_seconds)})")
        return connection

    def attempt(self) -> Attempt:
        result = Attempt()
        connection = self.connect(result)
        if connection is None:
            return result
        try:
            if self.args.all:
                self.list_all(connection, result)
            else:
                self.check_each(connection, result, self.args.service or [""])
        finally:
            connection.close()
        failed = [service.exit_code for service in result.services if service.exit_code]
        result.exit_code = result.exit_code or (failed[0] if failed else 0)
        return result

    def calls(self, connection: transport.Connection, path: str,
              requests: list[bytes]) -> list[tuple[transport.CallResult, float]]:
        # As grpc does, the library's own name after the caller's (grpc_health_probe sends "... grpc-go/1.x").
        return connection.unary(path, requests, timeout=self.args.rpc_timeout, metadata=dial.metadata(self.args),
                                user_agent=f"{self.args.user_agent} petsage-grpc/{__version__}", gzip=self.args.gzip)

    def describe(self, answer: transport.CallResult, what: str) -> str:
        code, details = answer.code, answer.message
        if self.stop.requested or code == transport.CANCELLED:
            return f"error: health {what} failed: rpc error: code = Canceled desc = {_CANCELLED}"
        if code == transport.UNIMPLEMENTED:
            method = "" if what == "rpc" else "/List"
            return ("error: this server does not implement the grpc health protocol "
                    f"(grpc.health.v1.Health{method}): {details}")
        if code == transport.DEADLINE_EXCEEDED:
            return f"timeout: health {what} did not complete within {dial.format_duration(self.args.rpc_timeout)}"
        return f"error: health {what} failed: rpc error: code = {go_code_name(code)} desc = {details}"

    def check_each(self, connection: transport.Connection, result: Attempt, services: list[str]) -> None:
        answers = self.calls(connection, wire.CHECK, [wire.encode_check_request(s) for s in services])
        for service, (answer, seconds) in zip(services, answers, strict=True):
            entry = ServiceResult(service, rpc_seconds=seconds)
            status = _decoded(answer, wire.decode_check_response)
            if answer.code != transport.OK or status is None:
                entry.error, entry.exit_code = self.describe(answer, "rpc"), ExitCode.RPC_FAILED
            else:
                entry.status = wire.status_name(status)
                entry.exit_code = ExitCode.OK if status == wire.SERVING else ExitCode.UNHEALTHY
            result.services.append(entry)

    def list_all(self, connection: transport.Connection, result: Attempt) -> None:
        [(answer, seconds)] = self.calls(connection, wire.LIST, [wire.encode_list_request()])
        statuses = _decoded(answer, wire.decode_list_response)
        if answer.code != transport.OK or statuses is None:
            result.exit_code, result.error = ExitCode.RPC_FAILED, self.describe(answer, "list")
            return
        for service, status in sorted(statuses.items()):
            code = ExitCode.OK if status == wire.SERVING else ExitCode.UNHEALTHY
            result.services.append(ServiceResult(service, wire.status_name(status), None, code, seconds))
        if not result.services:
            result.exit_code, result.error = ExitCode.UNHEALTHY, "service unhealthy (List named no services)"


def _decoded(answer: transport.CallResult, decode: Callable[[bytes], _T]) -> _T | None:
    """The decoded response message; a message that does not parse turns ``answer`` into INTERNAL."""
    if answer.code != transport.OK or answer.payload is None:
        return None
    try:
        return decode(answer.payload)
    except ValueError as exc:
        answer.code, answer.message = transport.INTERNAL, f"cannot parse the response: {exc}"
        return None


def _lines(args: Namespace, attempt: Attempt) -> list[str]:
    """The stderr lines of an attempt, grpc_health_probe's own when one service is checked."""
    if attempt.error is not None:
        return [attempt.error]
    named = len(attempt.services) > 1 or args.all
    lines = []
    for entry in attempt.services:
        line = entry.error or (f"status: {entry.status}" if entry.exit_code == 0
                               else f'service unhealthy (responded with "{entry.status}")')
        lines.append(f'service "{entry.service}": {line}' if named else line)
    return lines


def run(args: Namespace, stop: Stop) -> int:
    """Probe as ``args`` say, print the outcome and return the exit code."""
    started = time.monotonic()
    try:
        tls = dial.ssl_context(args) if args.tls else None
        runner = _Runner(args, stop, tls)
    except (ValueError, transport.ConnectError) as exc:  # an unusable TLS file (TLSError), or a bad port
        output.line(f"error: {exc}")
        return ExitCode.USAGE
    runner.log("parsed options:")
    runner.log(f"> addr={args.addr} conn_timeout={dial.format_duration(args.connect_timeout)} "
               f"rpc_timeout={dial.format_duration(args.rpc_timeout)}")
    runner.log(f"> tls={str(args.tls).lower()}")
    attempts, pause = 0, _FIRST_RETRY
    while True:
        attempts += 1
        attempt = runner.attempt()
        remaining = started + args.wait - time.monotonic()
        if attempt.exit_code == 0 or stop.requested or remaining <= 0:
            break
        for line in _lines(args, attempt):
            runner.log(f"attempt {attempts}: {line}")
        if not stop.sleep(min(pause, remaining)):
            break
        pause = min(pause * 2, _MAX_RETRY)
    if stop.requested:
        output.line("cancellation received")
    if attempt.exit_code == 0 and attempt.connect_seconds is not None:
        rpc = max((s.rpc_seconds or 0.0 for s in attempt.services), default=0.0)
        runner.log(f"time elapsed: connect={dial.format_duration(attempt.connect_seconds)} "
                   f"rpc={dial.format_duration(rpc)}")
    return _report(args, attempt, attempts, started)


def _report(args: Namespace, attempt: Attempt, attempts: int, started: float) -> int:
    lines = _lines(args, attempt)
    if args.wait and attempt.exit_code and lines:
        # The last attempt's words alone ("within 1s") would hide the --wait the probe spent.
        spent = dial.format_duration(round(time.monotonic() - started, 3))
        lines[-1] += f" (gave up after {attempts} attempt(s) in {spent} of --wait {dial.format_duration(args.wait)})"
    for line in lines:
        output.line(line)
    if args.json:
        import json

        document = {"address": args.addr, **attempt.as_dict(), "attempts": attempts,
                    "elapsed_seconds": time.monotonic() - started}
        output.result(json.dumps(document), "petsage-grpc probe")
    return attempt.exit_code
