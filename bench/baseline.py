"""The stock server the benchmark compares against: what a team gets from grpcio out of the box.

grpcio's synchronous ``grpc.server`` on a thread pool of ten workers (the
size grpcio's own examples use), grpcio-health-checking's ``HealthServicer``
(``""``, ``readiness``, ``liveness`` and the smoke service SERVING),
reflection, and a ``SmokeTest`` shaped like ours that logs one line to stdout
and returns: no check runs and nothing confirms that the line was written.

Like ``petsage-grpc serve`` it logs ``serving on HOST:PORT`` once it accepts
calls, and on the first SIGTERM/SIGINT it turns every status NOT_SERVING
(``enter_graceful_shutdown()``, so Watch streams hear of it), keeps serving
for ``--drain`` seconds (default 0), then stops with a short grace; a second
signal ends it at once.

Run it with ``python -m bench.baseline --address 127.0.0.1:0``.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from concurrent import futures
from datetime import UTC, datetime
from types import FrameType

import grpc
from grpc_health.v1 import health as _health
from grpc_health.v1 import health_pb2 as _health_pb2
from grpc_health.v1 import health_pb2_grpc as _health_pb2_grpc
from grpc_reflection.v1alpha import reflection as _reflection

from petsage_grpc._proto.smoke.v1 import smoke_pb2 as _smoke_pb2
from petsage_grpc._proto.smoke.v1 import smoke_pb2_grpc as _smoke_pb2_grpc

_LOGGER = logging.getLogger("bench.baseline")
SMOKE_SERVICE = _smoke_pb2.DESCRIPTOR.services_by_name["SmokeTestService"].full_name
#: The names our server publishes, so that both answer the same Check and Watch requests.
HEALTH_NAMES = (_health.OVERALL_HEALTH, "readiness", "liveness", SMOKE_SERVICE)
#: The same sentence as our server, so that both answers are about the same size.
OK_MESSAGE = "PetSage services are running and logging is active."
#: Thread pool size of grpcio's examples: the stock choice.
DEFAULT_WORKERS = 10
#: Grace given to ``server.stop()`` after the first signal.
DEFAULT_GRACE = 2.0
LOG_FORMAT = "%(asctime)s - %(name)s - %(levelname)s - %(message)s"


class LoggingSmokeTest(_smoke_pb2_grpc.SmokeTestServiceServicer):
    """A SmokeTest that logs one line and answers OK without confirming the line was written."""

    def __init__(self, instance_id: str, started_at: datetime) -> None:
        self._server = _smoke_pb2.ServerInfo(version="stock", instance_id=instance_id)
        self._server.start_time.FromDatetime(started_at)

    def SmokeTest(
        self, request: _smoke_pb2.SmokeTestRequest, context: grpc.ServicerContext
    ) -> _smoke_pb2.SmokeTestResponse:
        """Log a tagged line and answer OK."""
        began = time.perf_counter()
        record_id = uuid.uuid4().hex
        _LOGGER.info("smoke test %s", record_id)
        check = _smoke_pb2.CheckResult(
            name="logging", status=_smoke_pb2.STATUS_OK, detail=f"record {record_id} logged to stdout", critical=True,
        )
        check.duration.FromNanoseconds(int((time.perf_counter() - began) * 1e9))
        response = _smoke_pb2.SmokeTestResponse(
            status=_smoke_pb2.STATUS_OK, message=OK_MESSAGE, checks=[check], server=self._server,
        )
        response.timestamp.GetCurrentTime()
        return response


def build(workers: int) -> tuple[grpc.Server, _health.HealthServicer]:
    """The stock server with every service added, not yet bound or started."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers))
    # experimental_non_blocking (the default) answers Watch from callbacks, so
    # an open stream holds no pool thread.
    health = _health.HealthServicer()
    for name in HEALTH_NAMES:
        health.set(name, _health_pb2.HealthCheckResponse.SERVING)
    _health_pb2_grpc.add_HealthServicer_to_server(health, server)
    started_at = datetime.now(UTC)
    instance_id = f"{socket.gethostname()}-{os.getpid()}"
    _smoke_pb2_grpc.add_SmokeTestServiceServicer_to_server(LoggingSmokeTest(instance_id, started_at), server)
    _reflection.enable_server_reflection((SMOKE_SERVICE, _health.SERVICE_NAME, _reflection.SERVICE_NAME), server)
    return server, health


def main(argv: Sequence[str] | None = None) -> int:
    """Serve until a signal, then shut down; return the exit code."""
    parser = argparse.ArgumentParser(prog="python -m bench.baseline", description=__doc__.splitlines()[0])
    parser.add_argument("--address", default="127.0.0.1:0", help="HOST:PORT to listen on (port 0: any free port)")
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS, help="thread pool size")
    parser.add_argument("--grace", type=float, default=DEFAULT_GRACE, help="seconds given to stop() on a signal")
    parser.add_argument("--drain", type=float, default=0.0,
                        help="seconds to keep serving after the first signal, before stop()")
    args = parser.parse_args(argv)
    logging.basicConfig(stream=sys.stdout, level=logging.INFO, format=LOG_FORMAT)
    server, health = build(args.workers)
    port = server.add_insecure_port(args.address)
    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if stopping.is_set():
            os._exit(128 + signum)
        # At once, in the handler: watchers must hear NOT_SERVING before anything else happens.
        health.enter_graceful_shutdown()
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.start()
    _LOGGER.info("serving on %s:%d", args.address.rpartition(":")[0], port)
    stopping.wait()
    if args.drain:
        _LOGGER.info("signalled: statuses NOT_SERVING, serving %gs more", args.drain)
        time.sleep(args.drain)
    _LOGGER.info("signalled: statuses NOT_SERVING, stopping with %gs grace", args.grace)
    server.stop(args.grace).wait()
    _LOGGER.info("stopped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
