"""Building, starting and stopping a PetSage gRPC server, ours or a service's own.

One asyncio grpcio server serves SmokeTestService, ``grpc.health.v1.Health``,
reflection and whatever servicers a service embedding it adds.  asyncio
because a Watch stream must not hold a thread: the sync server runs every
streaming call on a pool thread.

Lifecycle: bind (failing fast on a taken port), run every check once, publish
statuses, serve.  On the first SIGTERM/SIGINT: every status but liveness goes
NOT_SERVING; the server keeps serving for ``drain`` seconds, so probes and
client-side watchers see it; then open Watch streams end with UNAVAILABLE,
new calls are refused with UNAVAILABLE (health checks excepted: they keep
answering), in-flight calls get ``grace`` seconds, callers the same grace to
stop arriving; then stop and exit 0.  A second signal ends the process at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health_pb2_grpc as _health_pb2_grpc

from petsage_grpc import health, logs, reflection, smoke, workers
from petsage_grpc.binding import BindError, check_bindable
from petsage_grpc.checks import Check, CheckOutcome, CheckRunner, logging_check
from petsage_grpc.config import KEEPALIVE_TIMEOUT, PING_STRIKES, ServeSettings, SettingError
from petsage_grpc.gate import Gate, GatedRegistrar, Policy
from petsage_grpc.observe import CallObserver
from petsage_grpc.watchdog import Watchdog, event_loop_check

if TYPE_CHECKING:
    from petsage_grpc.metrics import Metrics

_LOGGER = logging.getLogger(__name__)
# No SO_REUSEPORT: a second server on a taken port must fail, not share it
# (workers of one ``serve --workers N`` excepted: they share it on purpose).
SERVER_OPTIONS = (("grpc.so_reuseport", 0),)
WORKER_OPTIONS = (("grpc.so_reuseport", 1),)
#: Calls grpc may hold before the loop takes them, beyond the watcher cap.  grpc's
#: default (1,000) answers CANCELLED to the rest of a burst, such as every
#: watcher reconnecting at once after a restart.
PENDING_HEADROOM = 1_000
#: Before grpcio's stop(), how long no call may have arrived (see Gate.wait_quiet).
QUIET_PERIOD = 0.2
#: The grace handed to grpcio's stop() once our own waiting is over.
STOP_GRACE = 0.5

#: A generated ``add_<Service>Servicer_to_server`` function.
Register = Callable[[Any, Any], None]


@dataclass(frozen=True)
class _Servicer:
    register: Register
    servicer: object
    checks: tuple[str, ...] | None  # its status follows these checks, or readiness if None


def connection_options(settings: ServeSettings) -> tuple[tuple[str, int], ...]:
    """The limits grpc core puts on each connection and message, from the settings."""

    def ms(seconds: float) -> int:
        return max(1, round(seconds * 1000))

    return (
        ("grpc.max_receive_message_length", settings.max_receive_bytes),
        ("grpc.max_concurrent_streams", settings.max_streams),
        ("grpc.max_allowed_incoming_connections", settings.max_connections),
        ("grpc.max_connection_idle_ms", ms(settings.idle_timeout)),
        ("grpc.keepalive_time_ms", ms(settings.keepalive_time)),
        ("grpc.keepalive_timeout_ms", ms(KEEPALIVE_TIMEOUT)),
        # A Watch client idles between changes: its keepalive pings are
        # welcome, as long as they respect the minimum interval.
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", ms(settings.keepalive_min_interval)),
        ("grpc.http2.max_ping_strikes", PING_STRIKES),
    )


def load_credentials(settings: ServeSettings) -> grpc.ServerCredentials:
    """The server's TLS credentials; an unusable file raises :class:`SettingError` naming it."""
    from petsage_grpc import tls  # only TLS servers pay for importing ssl

    assert settings.tls_cert is not None and settings.tls_key is not None
    try:
        return tls.server_credentials(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
    except tls.TLSError as exc:
        raise SettingError(str(exc)) from None


class PetSageServer:
    """A gRPC server with the PetSage health model: checks, health, smoke test, drain.

    Add servicers and checks, then run it with :func:`petsage_grpc.process.run`
    (or ``await start()`` and ``await shutdown()`` under your own loop).  Each added servicer's service
    gets a health status: SERVING while the checks it names pass (or, by
    default, while the server is ready), NOT_SERVING from the first signal on.
    """

    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.worker = workers.current()
        if self.worker is not None:
            self.settings = replace(settings, address=self.worker.address)
        self.instance_id = smoke.new_instance_id()
        self.address: str | None = None  # the bound address, once started
        self.metrics_address: str | None = None  # the bound metrics address, once started
        self._checks: list[Check] = []
        self._servicers: list[_Servicer] = []
        self._service_checks: dict[str, tuple[str, ...] | None] = {}
        self._loop_parts: _LoopParts | None = None

    def add_check(self, check: Check) -> None:
        """Run ``check`` in the background; a failing critical check turns readiness NOT_SERVING."""
        self._require_not_started()
        self._checks.append(check)

    def add_servicer(self, register: Register, servicer: object, *, checks: Sequence[str] | None = None) -> None:
        """Serve ``servicer``, registered by its generated ``add_<Service>Servicer_to_server``.

        Its calls are refused with UNAVAILABLE once shutdown begins, and
        waited for.  Its health status follows ``checks`` (SERVING while all
        of them pass) or, when ``checks`` is None, readiness.
        """
        self._require_not_started()
        self._servicers.append(_Servicer(register, servicer, None if checks is None else tuple(checks)))

    def publish(self, service: str, serving: bool, reason: str = "") -> None:
        """Set the status of a name no servicer or check owns (event loop thread, after start)."""
        parts = self._started()
        if service in self._service_checks or service in (health.OVERALL, health.READINESS, health.LIVENESS):
            raise ValueError(f"the status of {service!r} follows the checks; it cannot be set by hand")
        parts.health.set(service, health.SERVING if serving else health.NOT_SERVING, reason)

    def _require_not_started(self) -> None:
        if self._loop_parts is not None:
            raise RuntimeError("add servicers and checks before the server starts")

    def _started(self) -> _LoopParts:
        if self._loop_parts is None:
            raise RuntimeError("the server has not started")
        return self._loop_parts

    async def start(self, pipeline: logs.LogPipeline) -> str:
        """Bind, run every check once, publish statuses and start serving.

        Returns the address actually bound (port 0 replaced by the chosen port).
        """
        self._require_not_started()
        settings = self.settings
        credentials = None
        if settings.tls_cert is not None and settings.tls_key is not None:
            credentials = load_credentials(settings)
        if self.worker is None:  # a worker's port is shared with its siblings on purpose
            check_bindable(settings.address)
        parts = self._loop_parts = _LoopParts(self, pipeline)
        self.address = parts.bind(settings.address, credentials)
        if parts.metrics is not None and settings.metrics_address is not None:
            self.metrics_address = parts.metrics.serve(settings.metrics_address)
        # Liveness depends on nothing outside the process; the watchdog owns it from now on.
        parts.health.set(health.LIVENESS, health.SERVING, "process started")
        parts.watchdog.start()
        await parts.runner.start()
        await parts.server.start()
        if self.worker is None:
            _LOGGER.info("serving on %s", self.address)
        else:
            _LOGGER.info("worker %s ready on %s", self.worker.name, self.address)
            self.worker.report_ready()
        return self.address

    def _publish(self, results: Mapping[str, CheckOutcome]) -> None:
        """Derive the published health statuses from the check outcomes."""
        parts = self._started()
        ready = health.status_from((r for r in results.values() if r.critical), "all critical checks pass")
        parts.health.set(health.OVERALL, *ready)
        parts.health.set(health.READINESS, *ready)
        for service, names in self._service_checks.items():
            if names is None:
                parts.health.set(service, *ready)
            else:
                own = health.status_from((results[n] for n in names if n in results), f"passing: {', '.join(names)}")
                parts.health.set(service, *own)

    async def shutdown(self) -> None:
        """Drain and stop as described in the module docstring, logging each step's timing."""
        parts = self._started()
        drain, grace = self.settings.drain, self.settings.grace
        started = time.monotonic()
        parts.health.drain()
        _LOGGER.info("draining: statuses NOT_SERVING (liveness excepted); still serving for %gs", drain)
        if drain:
            await asyncio.sleep(drain)
            _LOGGER.info("drain over after %.3fs", time.monotonic() - started)
        watchers = parts.health.watchers
        parts.health.end_watches()
        parts.gate.close()
        closed = time.monotonic()
        _LOGGER.info("%d Watch stream(s) ended, new calls refused; waiting up to %gs for %d call(s) in flight",
                     watchers, grace, parts.gate.in_flight)
        if await parts.gate.wait_idle(grace):
            _LOGGER.info("in-flight calls finished after %.3fs", time.monotonic() - started)
        else:
            _LOGGER.warning("grace period of %gs over; cancelling %d call(s)", grace, parts.gate.in_flight)
        remaining = max(0.0, grace - (time.monotonic() - closed))
        if not await parts.gate.wait_quiet(QUIET_PERIOD, remaining):
            _LOGGER.warning("calls still arriving at the end of the grace period; stopping anyway")
        _LOGGER.info("%d call(s) refused with UNAVAILABLE during shutdown", parts.gate.refused)
        # Every tracked call is done; what grpcio still runs is an untracked
        # stream (reflection) or a call that arrived this instant.
        await parts.server.stop(min(STOP_GRACE, max(0.0, grace - (time.monotonic() - closed))))
        await parts.runner.stop()
        await parts.watchdog.stop()
        if parts.observer.unlogged_probe_calls:
            _LOGGER.info("%d probe call(s) answered and left out of the access log",
                         parts.observer.unlogged_probe_calls)
        if parts.metrics is not None:
            await asyncio.to_thread(parts.metrics.stop)
        _LOGGER.info("stopped after %.3fs", time.monotonic() - started)


class _LoopParts:
    """What a server builds once its event loop runs: grpc server, health, gate, checks."""

    def __init__(self, owner: PetSageServer, pipeline: logs.LogPipeline) -> None:
        settings = owner.settings
        self.metrics: Metrics | None = None
        if settings.metrics_address is not None:
            from petsage_grpc.metrics import Metrics  # prometheus-client is imported only when used

            self.metrics = Metrics(owner.instance_id)
        self.observer = CallObserver(access_log=settings.access_log, log_probes=settings.log_probes,
                                     metrics=self.metrics, enqueue=pipeline.enqueue)
        self.gate = Gate(self.observer if settings.access_log or self.metrics is not None else None)
        self.health = health.HealthServicer(settings.max_watchers)
        self.watchdog = Watchdog(settings.stall_limit, self._on_stall_change)
        checks = [
            logging_check(pipeline, settings.log_timeout, settings.check_interval),
            event_loop_check(self.watchdog, settings.check_interval),
            *owner._checks,
        ]
        self.runner = CheckRunner(checks, on_change=owner._publish)
        pipeline.add_failure_listener(lambda: self.runner.trigger("logging"))
        if self.metrics is not None:
            self._watch_metrics(self.metrics, pipeline)
        pending = settings.max_watchers + PENDING_HEADROOM
        self.server = grpc.aio.server(options=(
            *(SERVER_OPTIONS if owner.worker is None else WORKER_OPTIONS),
            *connection_options(settings),
            ("grpc.server.max_pending_requests", pending),
            ("grpc.server.max_pending_requests_hard_limit", pending),
        ))
        smoke_servicer = smoke.SmokeTestServicer(self.runner, owner.instance_id, datetime.now(UTC),
                                                 details=settings.smoke_details)
        served = [_Servicer(smoke.add_to_server, smoke_servicer, ("logging",)), *owner._servicers]
        known = {check.name for check in checks}
        for entry in served:
            registrar = GatedRegistrar(self.server, self.gate)
            entry.register(entry.servicer, registrar)
            for name in entry.checks or ():
                if name not in known:
                    raise ValueError(f"{registrar.service_names or entry.servicer!r} follows unknown check {name!r}")
            for service in registrar.service_names:
                owner._service_checks[service] = entry.checks
        # Health keeps answering while the server stops (readiness NOT_SERVING,
        # liveness SERVING): probes must see the truth, not UNAVAILABLE.
        _health_pb2_grpc.add_HealthServicer_to_server(
            self.health, GatedRegistrar(self.server, self.gate, Policy(refuse=False))
        )
        if settings.reflection:
            # An interactive tool may keep a reflection stream open for ever:
            # it must not hold up the shutdown.
            reflection.add_to_server(
                (*owner._service_checks, health.SERVICE_NAME),
                GatedRegistrar(self.server, self.gate, Policy(track=False)),
            )

    def _watch_metrics(self, metrics: Metrics, pipeline: logs.LogPipeline) -> None:
        from petsage_grpc.metrics import ServerState

        self.runner.outcome_listeners.append(metrics.observe_check)
        self.health.change_listeners.append(metrics.observe_transition)
        metrics.watch(ServerState(
            statuses=self.health.statuses,
            watchers=lambda: self.health.watchers,
            in_flight=lambda: self.gate.in_flight,
            check_results=lambda: list(self.runner.results.values()),
            dropped_unqueued=pipeline.dropped_unqueued,
            write_failures=pipeline.write_failures,
            unlogged_probe_calls=lambda: self.observer.unlogged_probe_calls,
        ))

    def bind(self, address: str, credentials: grpc.ServerCredentials | None) -> str:
        """Listen on ``address`` (TLS with ``credentials``); return it with port 0 replaced."""
        try:
            if credentials is None:
                port = self.server.add_insecure_port(address)
            else:
                port = self.server.add_secure_port(address, credentials)
        except RuntimeError:
            port = 0
        if address.startswith("unix:"):
            return address
        if port == 0:
            raise BindError(f"cannot listen on {address}")
        return f"{address.rpartition(':')[0]}:{port}"

    def _on_stall_change(self, alive: bool, reason: str) -> None:
        """Called from the watchdog thread: liveness follows the event loop."""
        self.health.set_threadsafe(health.LIVENESS, health.SERVING if alive else health.NOT_SERVING, reason)
        self.runner.trigger("event_loop")
