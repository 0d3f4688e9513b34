"""The unary methods under load, and real gRPC calls that check what a server answers.

h2load sees HTTP/2, not gRPC: it counts a call that failed with grpc-status 12
as a success.  :mod:`bench.h2load` catches failures from what h2load does see;
this module adds what only a gRPC client sees: a burst of real calls after
each run (every answer must decode and say SERVING / STATUS_OK), and a Watch
stream held open during the run (the smoke service must stay SERVING
throughout, which catches a SmokeTest answered STATUS_FAILING with
grpc-status 0, e.g. a log line not confirmed in time).
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2 as _health_pb2
from grpc_health.v1 import health_pb2_grpc as _health_pb2_grpc

from petsage_grpc._proto.smoke.v1 import smoke_pb2 as _smoke_pb2

#: Deadline of every call the harness makes, unless a figure needs its own.
CALL_TIMEOUT = 5.0
_HEALTH = _health_pb2.DESCRIPTOR.services_by_name["Health"]
_SMOKE = _smoke_pb2.DESCRIPTOR.services_by_name["SmokeTestService"]
SMOKE_SERVICE = _SMOKE.full_name
READINESS = "readiness"
SERVING = _health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = _health_pb2.HealthCheckResponse.NOT_SERVING


def grpc_frame(message: bytes) -> bytes:
    """One gRPC length-prefixed message: flag 0 (not compressed), 4-byte big-endian length, the bytes."""
    return struct.pack(">BI", 0, len(message)) + message


@dataclass(frozen=True)
class Method:
    """A unary method as the load generator calls it."""

    name: str
    path: str
    request: bytes
    #: None when a serialized answer is what a healthy server says, else why not.
    judge: Callable[[bytes], str | None]
    #: How many bytes two good answers may differ by (varint timestamps and durations).
    size_slack: int


def _path(service: ServiceDescriptor, method: str) -> str:
    """The HTTP/2 path of a method, from its descriptor (a method it lacks is a KeyError at import)."""
    return f"/{service.full_name}/{service.methods_by_name[method].name}"


def _judge_check(raw: bytes) -> str | None:
    try:
        answer = _health_pb2.HealthCheckResponse.FromString(raw)
    except DecodeError:
        return "undecodable HealthCheckResponse"
    if answer.status != SERVING:
        return f"status {_health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)}"
    return None


def _judge_smoke(raw: bytes) -> str | None:
    try:
        answer = _smoke_pb2.SmokeTestResponse.FromString(raw)
    except DecodeError:
        return "undecodable SmokeTestResponse"
    if answer.status != _smoke_pb2.STATUS_OK:
        return f"status {_smoke_pb2.Status.Name(answer.status)}: {answer.message}"
    return None


#: What Kubernetes probes: readiness.  A constant answer, so its size is exact.
CHECK = Method("Check", _path(_HEALTH, "Check"),
               _health_pb2.HealthCheckRequest(service=READINESS).SerializeToString(), _judge_check, 0)
SMOKE = Method("SmokeTest", _path(_SMOKE, "SmokeTest"), _smoke_pb2.SmokeTestRequest().SerializeToString(),
               _judge_smoke, 16)


@dataclass
class Burst:
    """Real gRPC calls of one method: the size of each good answer, and every failure."""

    sizes: list[int] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


def burst(address: str, method: Method, count: int, timeout: float = CALL_TIMEOUT) -> Burst:
    """Call ``method`` ``count`` times over one channel and judge every answer."""
    result = Burst()
    with grpc.insecure_channel(address) as channel:
        # No serializers: the request goes out as the very bytes h2load sends.
        call = channel.unary_unary(method.path)
        for _ in range(count):
            try:
                raw: bytes = call(method.request, timeout=timeout)
            except grpc.RpcError as exc:
                result.failures.append(f"{method.name}: {exc.code().name} {exc.details()}")
                continue
            why = method.judge(raw)
            if why is None:
                result.sizes.append(len(raw))
            else:
                result.failures.append(f"{method.name}: {why}")
    return result


def check_status(address: str, service: str, timeout: float) -> int | None:
    """One Check over a new connection: the status, or None when the call fails."""
    with grpc.insecure_channel(address) as channel:
        try:
            answer = _health_pb2_grpc.HealthStub(channel).Check(
                _health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError:
            return None
    status: int = answer.status
    return status


class StatusWatch:
    """A Watch stream held open across a load run, recording every status published for one name."""

    def __init__(self, address: str, service: str, timeout: float) -> None:
        self.service = service
        self.statuses: list[int] = []
        self.error: str | None = None
        self._first = threading.Event()
        self._channel = grpc.insecure_channel(address)
        self._call = _health_pb2_grpc.HealthStub(self._channel).Watch(
            _health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        self._thread = threading.Thread(target=self._pump, name="status-watch", daemon=True)
        self._thread.start()
        # The run must start with the stream in place, or a drop early in it goes unseen.
        if not self._first.wait(CALL_TIMEOUT):
            self.close()
            raise RuntimeError(f"Watch of {service!r} sent nothing within {CALL_TIMEOUT}s")

    def _pump(self) -> None:
        try:
            for answer in self._call:
                self.statuses.append(answer.status)
                self._first.set()
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                self.error = f"Watch of {self.service!r} ended: {exc.code().name} {exc.details()}"
        finally:
            self._first.set()

    def close(self) -> list[str]:
        """End the stream; return what went wrong (a status other than SERVING, or an early end)."""
        self._call.cancel()
        self._thread.join(CALL_TIMEOUT)
        self._channel.close()
        problems = [self.error] if self.error else []
        if not self.statuses:
            problems.append(f"Watch of {self.service!r} sent no status")
        dropped = [_health_pb2.HealthCheckResponse.ServingStatus.Name(s) for s in self.statuses if s != SERVING]
        if dropped:
            problems.append(f"{self.service!r} went {', '.join(dropped)} during the run")
        return problems
