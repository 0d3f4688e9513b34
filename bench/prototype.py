"""The smallest PetSage health service on grpcio's sync server: the benchmark's measured answer on the design.

Not the product: a prototype, measured beside ``petsage-grpc serve`` (which
runs on ``grpc.aio``) to say whether a sync server would serve us better.
What it keeps of ours is what the comparison needs to be fair:

- ``Check`` answers from a status table (no lock: a dict read is atomic);
- ``Watch`` holds no thread: the handler is marked ``experimental_non_blocking``
  and keeps grpc's ``send_response_callback``.  A change is sent to each
  watcher on a thread of the pool, never while holding the lock that a
  cancelled watcher takes to leave the table (grpcio-health-checking's sync
  ``HealthServicer`` sends under its lock, and deadlocks when many watchers
  cancel during a change);
- ``SmokeTest`` writes its record through the project's own log pipeline and
  waits, on its pool thread, for every sink to confirm it (the pipeline runs
  its asyncio side on a thread of its own), and every call writes an access
  record to the same pipeline, as the project's server does.

On SIGTERM every status but liveness turns NOT_SERVING at once, the server
keeps serving for ``--drain`` seconds, then ends the Watch streams and stops.
``python -m bench.prototype --address 127.0.0.1:0``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent import futures
from datetime import UTC, datetime
from types import FrameType
from typing import Any

import grpc
from grpc_health.v1 import health_pb2 as _health_pb2

from petsage_grpc._proto.smoke.v1 import smoke_pb2 as _smoke_pb2
from petsage_grpc.logs.records import light_record
from petsage_grpc.logs.setup import configure
from petsage_grpc.logs.sinks import StdoutSink

_LOGGER = logging.getLogger("bench.prototype")
SMOKE_SERVICE = _smoke_pb2.DESCRIPTOR.services_by_name["SmokeTestService"].full_name
HEALTH_SERVICE = _health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
NAMES = ("", "readiness", "liveness", SMOKE_SERVICE)
OK_MESSAGE = "PetSage services are running and logging is active."
#: Pool threads: Check and Watch never block one; a SmokeTest holds one while its record is confirmed.
DEFAULT_WORKERS = 16
#: How long a SmokeTest waits for the sinks, as ``serve --log-timeout``.
LOG_TIMEOUT = 1.0
_ANSWERS = {status: _health_pb2.HealthCheckResponse(status=status)
            for status in _health_pb2.HealthCheckResponse.ServingStatus.values()}
Send = Callable[[Any], None]


class Health:
    """The status table and the Watch callbacks; ``set`` fans a change out on ``pool``."""

    def __init__(self, pool: futures.ThreadPoolExecutor) -> None:
        self.statuses = dict.fromkeys(NAMES, _health_pb2.HealthCheckResponse.SERVING)
        self._pool = pool
        self._lock = threading.Lock()  # guards the watcher sets only, never held across a send
        self._watchers: dict[str, set[Send]] = {}

    def check(self, request: _health_pb2.HealthCheckRequest, context: grpc.ServicerContext) -> Any:
        """The cached status, or NOT_FOUND."""
        status = self.statuses.get(request.service)
        if status is None:
            context.abort(grpc.StatusCode.NOT_FOUND, "unknown service")
        return _ANSWERS[status]

    def watch(self, request: _health_pb2.HealthCheckRequest, context: grpc.ServicerContext, send: Send) -> None:
        """Send the status now, then on each change, from callbacks: no thread is held."""
        service = request.service
        with self._lock:
            self._watchers.setdefault(service, set()).add(send)
        context.add_callback(lambda: self._leave(service, send))
        send(_ANSWERS[self.statuses.get(service, _health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)])

    def _leave(self, service: str, send: Send) -> None:
        with self._lock:
            self._watchers.get(service, set()).discard(send)

    def set(self, service: str, status: int) -> None:
        """Publish ``status`` and send it to each watcher, on the pool, outside the lock."""
        self.statuses[service] = status
        with self._lock:
            senders = list(self._watchers.get(service, ()))
        answer = _ANSWERS[status]
        for send in senders:
            self._pool.submit(_send, send, answer)

    def end_watches(self) -> None:
        """End every open Watch stream (status OK, as grpcio-health-checking's shutdown does)."""
        with self._lock:
            senders = [send for group in self._watchers.values() for send in group]
            self._watchers.clear()
        for send in senders:
            self._pool.submit(_send, send, None)


def _send(send: Send, answer: Any) -> None:
    try:
        send(answer)  # blocks this pool thread until grpc has sent it
    except Exception:  # the stream ended meanwhile
        pass


class Smoke:
    """SmokeTest: a record through the project's pipeline, confirmed by every sink, on this pool thread."""

    def __init__(self, confirm: Callable[[], Any], instance_id: str) -> None:
        self._confirm = confirm
        self._server = _smoke_pb2.ServerInfo(version="prototype", instance_id=instance_id)
        self._server.start_time.FromDatetime(datetime.now(UTC))

    def smoke(self, request: _smoke_pb2.SmokeTestRequest, context: grpc.ServicerContext) -> Any:
        """Confirm one record, then answer as the project's server does."""
        began = time.perf_counter()
        try:
            delivery = self._confirm()
            ok, detail = delivery.ok, f"record {delivery.probe_id} delivered to {', '.join(delivery.sinks)}"
        except Exception as exc:  # timed out, or the pipeline is gone
            ok, detail = False, str(exc)
        check = _smoke_pb2.CheckResult(name="logging", detail=detail, critical=True,
                                       status=_smoke_pb2.STATUS_OK if ok else _smoke_pb2.STATUS_FAILING)
        check.duration.FromNanoseconds(int((time.perf_counter() - began) * 1e9))
        response = _smoke_pb2.SmokeTestResponse(
            status=_smoke_pb2.STATUS_OK if ok else _smoke_pb2.STATUS_FAILING,
            message=OK_MESSAGE if ok else "PetSage services are failing: logging.", checks=[check],
            server=self._server)
        response.timestamp.GetCurrentTime()
        return response


class _Handlers(grpc.GenericRpcHandler):
    """The two services, each call followed by an access record (the project's server writes one too)."""

    def __init__(self, health: Health, smoke: Smoke, access: Callable[[str, float], None]) -> None:
        def logged(path: str, behaviour: Callable[..., Any]) -> Callable[..., Any]:
            def handler(request: Any, context: grpc.ServicerContext) -> Any:
                began = time.perf_counter()
                try:
                    return behaviour(request, context)
                finally:
                    access(path, began)
            return handler

        watch = grpc.unary_stream_rpc_method_handler(
            health.watch, request_deserializer=_health_pb2.HealthCheckRequest.FromString,
            response_serializer=_health_pb2.HealthCheckResponse.SerializeToString)
        watch.unary_stream.__func__.experimental_non_blocking = True
        self._methods = {
            f"/{HEALTH_SERVICE}/Check": grpc.unary_unary_rpc_method_handler(
                logged(f"/{HEALTH_SERVICE}/Check", health.check),
                request_deserializer=_health_pb2.HealthCheckRequest.FromString,
                response_serializer=_health_pb2.HealthCheckResponse.SerializeToString),
            f"/{HEALTH_SERVICE}/Watch": watch,
            f"/{SMOKE_SERVICE}/SmokeTest": grpc.unary_unary_rpc_method_handler(
                logged(f"/{SMOKE_SERVICE}/SmokeTest", smoke.smoke),
                request_deserializer=_smoke_pb2.SmokeTestRequest.FromString,
                response_serializer=_smoke_pb2.SmokeTestResponse.SerializeToString),
        }

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        """The handler of a known method."""
        return self._methods.get(handler_call_details.method)


def main(argv: Sequence[str] | None = None) -> int:
    """Serve until a signal, drain, then stop; return the exit code."""
    parser = argparse.ArgumentParser(prog="python -m bench.prototype", description=__doc__.splitlines()[0])
    parser.add_argument("--address", default="127.0.0.1:0", help="HOST:PORT (port 0: any free port)")
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS, help="pool threads")
    parser.add_argument("--drain", type=float, default=0.0, help="seconds to keep serving after SIGTERM")
    args = parser.parse_args(argv)
    pipeline = configure([StdoutSink()], "text", "INFO")
    loop = asyncio.new_event_loop()  # the pipeline's asyncio side, on a thread of its own
    threading.Thread(target=loop.run_forever, name="confirmations", daemon=True).start()

    def confirm() -> Any:
        return asyncio.run_coroutine_threadsafe(pipeline.confirm(LOG_TIMEOUT), loop).result(LOG_TIMEOUT + 1)

    def access(path: str, began: float) -> None:
        millis = (time.perf_counter() - began) * 1000
        pipeline.enqueue(light_record("bench.prototype.access", "%s OK %.3fms", (path, millis), {}))

    pool = futures.ThreadPoolExecutor(max_workers=args.workers)
    server = grpc.server(pool, maximum_concurrent_rpcs=None)
    health = Health(pool)
    server.add_generic_rpc_handlers((_Handlers(health, Smoke(confirm, f"{socket.gethostname()}-{os.getpid()}"),
                                               access),))
    port = server.add_insecure_port(args.address)
    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if stopping.is_set():
            os._exit(128 + signum)
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.start()
    _LOGGER.info("serving on %s:%d", args.address.rpartition(":")[0], port)
    stopping.wait()
    for name in NAMES:
        if name != "liveness":
            health.set(name, _health_pb2.HealthCheckResponse.NOT_SERVING)
    _LOGGER.info("signalled: statuses NOT_SERVING; serving %gs more", args.drain)
    time.sleep(args.drain)
    health.end_watches()
    server.stop(1.0).wait()
    pipeline.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
