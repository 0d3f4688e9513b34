"""Building, starting and stopping the PetSage gRPC server.

One asyncio grpcio server serves SmokeTestService, ``grpc.health.v1.Health``
and reflection.  asyncio because a Watch stream must not hold a thread: the
sync server runs every streaming call on a pool thread.

Lifecycle: bind (failing fast on a taken port), run every check once, publish
statuses, serve.  On the first SIGTERM/SIGINT: statuses to NOT_SERVING
(liveness excepted) and Watch streams ended, new calls refused with
UNAVAILABLE (health checks excepted: they keep answering the statuses),
in-flight calls given ``grace`` seconds, callers given the same grace to stop
arriving, then stop and return 0.  A second signal ends the process at once.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import socket
import time
from collections.abc import Mapping
from datetime import UTC, datetime

import grpc
from grpc_health.v1 import health_pb2_grpc as _health_pb2_grpc
from grpc_reflection.v1alpha import reflection as _reflection
from grpc_reflection.v1alpha import reflection_pb2_grpc as _reflection_pb2_grpc

from petsage_grpc import __version__, health, smoke
from petsage_grpc.checks import CheckOutcome, CheckRunner, logging_check
from petsage_grpc.config import ServeSettings
from petsage_grpc.gate import Gate, GatedRegistrar, Policy
from petsage_grpc.logs import LogPipeline, stderr_line

_LOGGER = logging.getLogger(__name__)
#: Services listed by reflection (reflection lists itself too).
SERVICE_NAMES = (smoke.SERVICE_NAME, health.SERVICE_NAME, _reflection.SERVICE_NAME)
# No SO_REUSEPORT: a second server on a taken port must fail, not share it.
SERVER_OPTIONS = (("grpc.so_reuseport", 0),)
#: Before grpcio's stop(), how long no call may have arrived (see Gate.wait_quiet).
QUIET_PERIOD = 0.2
#: The grace handed to grpcio's stop() once our own waiting is over.
STOP_GRACE = 0.5


class BindError(RuntimeError):
    """The server cannot listen on the configured address."""


def check_bindable(address: str) -> None:
    """Fail with a precise :class:`BindError` if ``address`` cannot be listened on.

    grpc reports only "Failed to bind"; a trial bind (with SO_REUSEADDR, as
    grpc uses) tells a taken port from an unknown host or a missing permission.
    """
    if address.startswith("unix:"):
        return
    host, _, port_text = address.rpartition(":")
    host, port = host.strip("[]"), int(port_text)
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise BindError(f"cannot listen on {address}: cannot resolve {host!r} ({exc.strerror})") from None
    for family, kind, proto, _, sockaddr in infos:
        try:
            probe = socket.socket(family, kind, proto)
        except OSError:  # e.g. IPv6 disabled: grpc falls back to what works
            continue
        with probe:
            try:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                probe.bind(sockaddr)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise BindError(f"cannot listen on {address}: the port is already in use") from None
                if exc.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL) and len(infos) > 1:
                    continue
                raise BindError(f"cannot listen on {address}: {exc.strerror}") from None


class PetSageServer:
    """The server process's parts: gRPC server, health table, checks and gate."""

    def __init__(self, settings: ServeSettings, pipeline: LogPipeline) -> None:
        self.settings = settings
        self.gate = Gate()
        self.health = health.HealthServicer()
        self.runner = CheckRunner(
            [logging_check(pipeline, settings.log_timeout, settings.check_interval)],
            on_change=self._publish,
        )
        pipeline.add_failure_listener(lambda: self.runner.trigger("logging"))
        self.instance_id = smoke.new_instance_id()
        self.started_at = datetime.now(UTC)
        self.address: str | None = None
        self._server = grpc.aio.server(options=SERVER_OPTIONS)
        smoke.add_to_server(
            smoke.SmokeTestServicer(self.runner, self.instance_id, self.started_at),
            GatedRegistrar(self._server, self.gate),
        )
        # Health keeps answering while the server stops (readiness NOT_SERVING,
        # liveness SERVING): probes must see the truth, not UNAVAILABLE.
        _health_pb2_grpc.add_HealthServicer_to_server(
            self.health, GatedRegistrar(self._server, self.gate, Policy(refuse=False))
        )
        # An interactive tool may keep a reflection stream open for ever: it
        # must not hold up the shutdown.
        _reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
            _reflection.aio.ReflectionServicer(SERVICE_NAMES),
            GatedRegistrar(self._server, self.gate, Policy(track=False)),
        )

    def _publish(self, results: Mapping[str, CheckOutcome]) -> None:
        """Derive the published health statuses from the check outcomes."""
        ready, reason = health.statuses_from_checks(results)
        status = health.SERVING if ready else health.NOT_SERVING
        self.health.set(health.OVERALL, status, reason)
        self.health.set(health.READINESS, status, reason)
        logging_outcome = results.get("logging")
        logging_ok = logging_outcome is not None and logging_outcome.ok
        self.health.set(
            smoke.SERVICE_NAME,
            health.SERVING if logging_ok else health.NOT_SERVING,
            "logging check passes" if logging_ok else reason,
        )

    async def start(self) -> str:
        """Bind, run every check once, publish statuses and start serving.

        Returns the address actually bound (port 0 replaced by the chosen port).
        """
        address = self.settings.address
        check_bindable(address)
        try:
            port = self._server.add_insecure_port(address)
        except RuntimeError:
            port = 0
        if port == 0 and not address.startswith("unix:"):
            raise BindError(f"cannot listen on {address}")
        self.address = address if address.startswith("unix:") else f"{address.rpartition(':')[0]}:{port}"
        # Liveness depends on nothing outside the process.
        self.health.set(health.LIVENESS, health.SERVING, "process started")
        await self.runner.start()
        await self._server.start()
        _LOGGER.info("serving on %s", self.address)
        return self.address

    async def shutdown(self, grace: float) -> None:
        """Stop as described in the module docstring, logging each step's timing."""
        started = time.monotonic()
        self.health.shutdown()
        self.gate.close()
        _LOGGER.info("statuses NOT_SERVING, new calls refused; waiting up to %gs for %d call(s) in flight",
                     grace, self.gate.in_flight)
        if await self.gate.wait_idle(grace):
            _LOGGER.info("in-flight calls finished after %.3fs", time.monotonic() - started)
        else:
            _LOGGER.warning("grace period of %gs over; cancelling %d call(s)", grace, self.gate.in_flight)
        remaining = max(0.0, grace - (time.monotonic() - started))
        if not await self.gate.wait_quiet(QUIET_PERIOD, remaining):
            _LOGGER.warning("calls still arriving at the end of the grace period; stopping anyway")
        _LOGGER.info("%d call(s) refused with UNAVAILABLE during shutdown", self.gate.refused)
        # Every tracked call is done; what grpcio still runs is an untracked
        # stream (reflection) or a call that arrived this instant.
        await self._server.stop(min(STOP_GRACE, max(0.0, grace - (time.monotonic() - started))))
        await self.runner.stop()
        _LOGGER.info("stopped after %.3fs", time.monotonic() - started)


async def serve(settings: ServeSettings, pipeline: LogPipeline) -> int:
    """Run the server until a signal, then shut down gracefully; return the exit code."""
    loop = asyncio.get_running_loop()
    server = PetSageServer(settings, pipeline)
    _LOGGER.info("petsage-grpc %s starting (instance %s, logging to %s)",
                 __version__, server.instance_id, ", ".join(s.name for s in pipeline.sinks))
    signalled = asyncio.Event()

    def on_signal(signum: int) -> None:
        if signalled.is_set():
            stderr_line(f"petsage-grpc: second {signal.Signals(signum).name}: exiting at once")
            os._exit(128 + signum)
        _LOGGER.info("received %s: shutting down (grace %gs)", signal.Signals(signum).name, settings.grace)
        signalled.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        await server.start()
        await signalled.wait()
        await server.shutdown(settings.grace)
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    return 0
