"""The probe once its arguments are valid: connect, check, retry under ``--wait``, report.

Imported only then, because it imports grpc.  Every wait here is a wait on
one event that grpc's callbacks set, checked against a deadline and the
:class:`~petsage_grpc.cli.probe.stop.Stop` flag, so a signal ends the probe at once
and nothing blocks past its timeout.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import grpc

from petsage_grpc.cli import dial
from petsage_grpc.cli.probe import wire
from petsage_grpc.cli.probe.stop import SIGNAL_LATENCY, Stop
from petsage_grpc.codes import ExitCode, go_name
from petsage_grpc.tls import TLSError

#: ``--wait`` retries after 0.1 s, then twice as long each time, up to 1 s.
_FIRST_RETRY, _MAX_RETRY = 0.1, 1.0
_CANCELLED = "context canceled"  # what grpc_health_probe's Go runtime says


@dataclass
class ServiceResult:
    """One service's answer: its status name, or the error line, and the call's duration."""

    service: str
    status: str | None = None
    error: str | None = None
    exit_code: int = 0
    rpc_seconds: float | None = None


@dataclass
class Attempt:
    """One connect-and-check round."""

    exit_code: int = 0
    error: str | None = None  # a failure before any service was checked
    connect_seconds: float | None = None
    services: list[ServiceResult] = field(default_factory=list)


class _Runner:
    def __init__(self, args: argparse.Namespace, stop: Stop) -> None:
        self.args = args
        self.stop = stop

    def log(self, line: str) -> None:
        if self.args.verbose:
            print(line, file=sys.stderr)

    def wait(self, futures: list[grpc.Future], deadline: float) -> bool:
        """Until every future is done (True), the deadline passes or a signal arrives (False)."""
        for future in futures:
            future.add_done_callback(lambda _: self.stop.wake.set())
        while not all(future.done() for future in futures):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.stop.requested:
                return False
            self.stop.wake.wait(min(remaining, SIGNAL_LATENCY))
            self.stop.wake.clear()
        return True

    def attempt(self, channel: grpc.Channel) -> Attempt:
        args, result = self.args, Attempt()
        self.log("establishing connection")
        started = time.monotonic()
        ready = grpc.channel_ready_future(channel)
        if not self.wait([ready], started + args.connect_timeout):
            ready.cancel()
            result.exit_code = ExitCode.CONNECTION
            result.error = (f'error: failed to connect service at "{args.addr}": {_CANCELLED}' if self.stop.requested
                            else f'timeout: failed to connect service "{args.addr}" within '
                                 f"{dial.format_duration(args.connect_timeout)}")
            return result
        result.connect_seconds = time.monotonic() - started
        self.log(f"connection established (took {dial.format_duration(result.connect_seconds)})")
        if args.all:
            self.list_all(channel, result)
        else:
            self.check_each(channel, result, args.service or [""])
        failed = [service.exit_code for service in result.services if service.exit_code]
        result.exit_code = result.exit_code or (failed[0] if failed else 0)
        return result

    def calls(self, method: Any, requests: list[Any]) -> list[tuple[Any, grpc.RpcError | None, float]]:
        """Call one unary method once per request, all at once; each answer or error, and its duration."""
        started = time.monotonic()
        finished: dict[int, float] = {}
        futures = [method.future(request, timeout=self.args.rpc_timeout, metadata=dial.metadata(self.args))
                   for request in requests]
        for index, future in enumerate(futures):
            future.add_done_callback(lambda _, index=index: finished.setdefault(index, time.monotonic()))
        if not self.wait(futures, started + self.args.rpc_timeout + 1):
            for future in futures:  # on a signal (each call's own deadline ends it otherwise)
                future.cancel()
        results: list[tuple[Any, grpc.RpcError | None, float]] = []
        for index, future in enumerate(futures):
            seconds = finished.get(index, time.monotonic()) - started
            try:
                results.append((future.result(), None, seconds))
            except grpc.RpcError as exc:
                results.append((None, exc, seconds))
            except grpc.FutureCancelledError:
                results.append((None, _Cancelled(), seconds))
        return results

    def describe(self, error: grpc.RpcError, what: str) -> str:
        code, details = error.code(), error.details()
        if self.stop.requested or isinstance(error, _Cancelled):
            return f"error: health {what} failed: rpc error: code = Canceled desc = {_CANCELLED}"
        if code is grpc.StatusCode.UNIMPLEMENTED:
            method = "" if what == "rpc" else "/List"
            return ("error: this server does not implement the grpc health protocol "
                    f"(grpc.health.v1.Health{method}): {details}")
        if code is grpc.StatusCode.DEADLINE_EXCEEDED:
            return f"timeout: health {what} did not complete within {dial.format_duration(self.args.rpc_timeout)}"
        return f"error: health {what} failed: rpc error: code = {go_name(code)} desc = {details}"

    def check_each(self, channel: grpc.Channel, result: Attempt, services: list[str]) -> None:
        check = channel.unary_unary(wire.CHECK, request_serializer=wire.encode_check_request,
                                    response_deserializer=wire.decode_check_response)
        for service, (status, error, seconds) in zip(services, self.calls(check, services), strict=True):
            entry = ServiceResult(service, rpc_seconds=seconds)
            if error is not None:
                entry.error, entry.exit_code = self.describe(error, "rpc"), ExitCode.RPC_FAILED
            else:
                entry.status = wire.status_name(status)
                entry.exit_code = ExitCode.OK if status == wire.SERVING else ExitCode.UNHEALTHY
            result.services.append(entry)

    def list_all(self, channel: grpc.Channel, result: Attempt) -> None:
        method = channel.unary_unary(wire.LIST, request_serializer=wire.encode_list_request,
                                     response_deserializer=wire.decode_list_response)
        [(statuses, error, seconds)] = self.calls(method, [None])
        if error is not None:
            result.exit_code, result.error = ExitCode.RPC_FAILED, self.describe(error, "list")
            return
        for service, status in sorted(statuses.items()):
            code = ExitCode.OK if status == wire.SERVING else ExitCode.UNHEALTHY
            result.services.append(ServiceResult(service, wire.status_name(status), None, code, seconds))
        if not result.services:
            result.exit_code, result.error = ExitCode.UNHEALTHY, "service unhealthy (List named no services)"


class _Cancelled(grpc.RpcError):
    """A call we cancelled on a signal."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.CANCELLED

    def details(self) -> str:
        return _CANCELLED


def _lines(args: argparse.Namespace, attempt: Attempt) -> list[str]:
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


def run(args: argparse.Namespace, stop: Stop, *, close_channel: bool = True) -> int:
    """Probe as ``args`` say, print the outcome and return the exit code.

    ``close_channel=False`` leaves the channel to the end of the process.
    """
    runner, started = _Runner(args, stop), time.monotonic()
    runner.log("parsed options:")
    runner.log(f"> addr={args.addr} conn_timeout={dial.format_duration(args.connect_timeout)} "
               f"rpc_timeout={dial.format_duration(args.rpc_timeout)}")
    runner.log(f"> tls={str(args.tls).lower()}")
    attempts, pause, channel = 0, _FIRST_RETRY, None
    with contextlib.ExitStack() as cleanup:
        while True:
            attempts += 1
            try:
                if channel is None:
                    channel = dial.open_channel(args)
                    if close_channel:
                        cleanup.callback(channel.close)
                attempt = runner.attempt(channel)
            except TLSError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return ExitCode.USAGE
            except TimeoutError:  # -tls-no-verify found no certificate to trust
                attempt = Attempt(ExitCode.CONNECTION, f'timeout: failed to connect service "{args.addr}" '
                                                          f"within {dial.format_duration(args.connect_timeout)}")
            remaining = started + args.wait - time.monotonic()
            if attempt.exit_code == 0 or stop.requested or remaining <= 0:
                break
            for line in _lines(args, attempt):
                runner.log(f"attempt {attempts}: {line}")
            if not stop.sleep(min(pause, remaining)):
                break
            pause = min(pause * 2, _MAX_RETRY)
    if stop.requested:
        print("cancellation received", file=sys.stderr)
    if attempt.exit_code == 0 and attempt.connect_seconds is not None:
        rpc = max((s.rpc_seconds or 0.0 for s in attempt.services), default=0.0)
        runner.log(f"time elapsed: connect={dial.format_duration(attempt.connect_seconds)} "
                   f"rpc={dial.format_duration(rpc)}")
    return _report(args, attempt, attempts, started)


def _report(args: argparse.Namespace, attempt: Attempt, attempts: int, started: float) -> int:
    for line in _lines(args, attempt):
        print(line, file=sys.stderr)
    if args.json:
        import json

        document: dict[str, Any] = {"address": args.addr, **asdict(attempt), "attempts": attempts,
                                    "elapsed_seconds": time.monotonic() - started}
        print(json.dumps(document))
    return attempt.exit_code
