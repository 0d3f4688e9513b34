"""What a server builds once its event loop runs, and the health statuses it owns from then on.

One asyncio grpcio server serves SmokeTestService, ``grpc.health.v1.Health``,
reflection and whatever servicers a service embedding it adds, each
registered through the call wrappers of :mod:`petsage_grpc.server.handlers`.
asyncio because a Watch stream must not hold a thread: the sync server runs
every streaming call on a pool thread.

:class:`Running` holds those parts and owns the published statuses: it
derives them from the check outcomes (:meth:`Running.follow_checks`), the
watchdog sets liveness, and the embedding service sets the names nobody
else owns (:meth:`Running.publish`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health_pb2_grpc as _health_pb2_grpc

from petsage_grpc.health import statuses
from petsage_grpc.health.checks import Check, CheckOutcome
from petsage_grpc.health.runner import CheckRunner
from petsage_grpc.health.servicer import SERVICE_NAME as HEALTH_SERVICE
from petsage_grpc.health.servicer import HealthServicer
from petsage_grpc.health.smoke import SmokeTest
from petsage_grpc.health.watchdog import EVENT_LOOP_CHECK, Watchdog, event_loop_check
from petsage_grpc.logs.check import LOGGING_CHECK, logging_check
from petsage_grpc.logs.pipeline import LogPipeline
from petsage_grpc.logs.stderr import stderr_counts
from petsage_grpc.server.access import CallObserver
from petsage_grpc.server.binding import BindError
from petsage_grpc.server.connections import connections_check, established
from petsage_grpc.server.gate import Gate
from petsage_grpc.server.handlers import Handlers, Policy
from petsage_grpc.server.reflection import add_to_server as add_reflection
from petsage_grpc.server.requests import RequestReader
from petsage_grpc.server.smoke import Identity, SmokeTestServicer
from petsage_grpc.server.smoke import add_to_server as add_smoke
from petsage_grpc.settings import KEEPALIVE_TIMEOUT, PING_STRIKES, ServeSettings

if TYPE_CHECKING:
    from petsage_grpc.server.certificates import ServerCertificate
    from petsage_grpc.server.http.listener import HttpListener
    from petsage_grpc.server.metrics import Metrics

#: Calls grpc may hold before the loop takes them, beyond the watcher cap.  grpc's
#: default (1,000) answers CANCELLED to the rest of a burst, such as every
#: watcher reconnecting at once after a restart.
PENDING_HEADROOM = 1_000

#: A generated ``add_<Service>Servicer_to_server`` function.
Register = Callable[[Any, Any], None]


@dataclass(frozen=True)
class Servicer:
    """A servicer to serve, the generated function that registers it, and what its status follows."""

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
        ("grpc.server_handshake_timeout_ms", ms(settings.handshake_timeout)),
        ("grpc.max_connection_idle_ms", ms(settings.idle_timeout)),
        ("grpc.keepalive_time_ms", ms(settings.keepalive_time)),
        ("grpc.keepalive_timeout_ms", ms(KEEPALIVE_TIMEOUT)),
        # A Watch client idles between changes: its keepalive pings are
        # welcome, as long as they respect the minimum interval.
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", ms(settings.keepalive_min_interval)),
        ("grpc.http2.max_ping_strikes", PING_STRIKES),
    )


class Running:
    """A server's parts on its event loop: grpc server, health, gate, checks, call observers.

    Create it on the event loop's thread.  ``share_port``: the port is shared
    with sibling worker processes (SO_REUSEPORT); otherwise a second server
    on a taken port fails instead of sharing it.
    """

    def __init__(self, settings: ServeSettings, pipeline: LogPipeline, *, instance_id: str,
                 checks: Sequence[Check], servicers: Sequence[Servicer], share_port: bool,
                 certificate: ServerCertificate | None = None) -> None:
        self.metrics: Metrics | None = None
        if settings.metrics:
            from petsage_grpc.server.metrics import Metrics  # prometheus-client is imported only when used

            self.metrics = Metrics(instance_id)
        self.observer = CallObserver(access_log=settings.access_log, log_probes=settings.log_probes,
                                     metrics=self.metrics, enqueue=pipeline.enqueue)
        self.gate = Gate()
        self.requests = RequestReader(settings.request_timeout, settings.max_incomplete_requests)
        self.health = HealthServicer(settings.max_watchers, aliases=settings.aliases,
                                     unavailable_unless_serving=settings.unavailable_unless_serving)
        self.watchdog = Watchdog(settings.stall_limit, self._on_stall_change)
        #: The gRPC port, once bound (None for a unix: address).
        self.port: int | None = None
        every_check = [
            logging_check(pipeline, settings.log_timeout, settings.check_interval),
            event_loop_check(self.watchdog, settings.check_interval),
            connections_check(lambda: self.port, settings.max_connections, settings.check_interval),
            *([] if certificate is None else [certificate.check(settings.check_interval)]),
            *checks,
        ]
        self.certificate = certificate
        #: Each served service, and the checks its status follows (None: readiness).
        self.follows: dict[str, tuple[str, ...] | None] = {}
        self.runner = CheckRunner(every_check, on_change=self.follow_checks)
        pipeline.add_failure_listener(lambda: self.runner.trigger(LOGGING_CHECK))
        pending = settings.max_watchers + PENDING_HEADROOM
        self.server = grpc.aio.server(options=(
            ("grpc.so_reuseport", 1 if share_port else 0),
            *connection_options(settings),
            ("grpc.server.max_pending_requests", pending),
            ("grpc.server.max_pending_requests_hard_limit", pending),
        ))
        smoke = SmokeTest(self.runner, LOGGING_CHECK, lambda: self.health.draining)
        identity = Identity(instance_id, datetime.now(UTC))
        smoke_servicer = SmokeTestServicer(smoke, identity, details=settings.smoke_details)
        served = [Servicer(add_smoke, smoke_servicer, (LOGGING_CHECK,)), *servicers]
        self._register(served, {check.name for check in every_check}, reflect=settings.reflection)
        self.http: HttpListener | None = None
        if settings.http_address is not None:
            self.http = self._http_listener(settings, smoke, identity)
        if self.metrics is not None:
            self._watch_metrics(self.metrics, pipeline)

    def _http_listener(self, settings: ServeSettings, smoke: SmokeTest, identity: Identity) -> HttpListener:
        """The HTTP side, answering from the same parts (h11 is imported only now)."""
        from petsage_grpc.server.http.listener import HttpListener
        from petsage_grpc.server.http.routes import HttpHealth

        routes = HttpHealth(health=self.health, runner=self.runner, smoke=smoke, identity=identity, gate=self.gate,
                            details=settings.smoke_details == "full",
                            observer=self.observer if self.observer.active else None, metrics=self.metrics)
        return HttpListener(routes.handle, max_connections=settings.http_max_connections)

    def _register(self, served: Sequence[Servicer], known_checks: set[str], *, reflect: bool) -> None:
        """Register every servicer, health and (if ``reflect``) reflection, each behind the gate."""
        handlers = Handlers(self.gate, self.observer if self.observer.active else None, self.requests)
        for entry in served:
            registrar = handlers.registrar(self.server)
            entry.register(entry.servicer, registrar)
            for name in entry.checks or ():
                if name not in known_checks:
                    raise ValueError(f"{registrar.service_names or entry.servicer!r} follows unknown check {name!r}")
            for service in registrar.service_names:
                self.follows[service] = entry.checks
        # Health keeps answering while the server stops (readiness NOT_SERVING,
        # liveness SERVING): probes must see the truth, not UNAVAILABLE.
        health_registrar = handlers.registrar(self.server, Policy(refuse=False))
        _health_pb2_grpc.add_HealthServicer_to_server(self.health, health_registrar)
        if reflect:
            # An interactive tool may keep a reflection stream open for ever:
            # it must not hold up the shutdown.
            add_reflection((*self.follows, HEALTH_SERVICE), handlers.registrar(self.server, Policy(track=False)))

    def follow_checks(self, results: Mapping[str, CheckOutcome]) -> None:
        """Publish the statuses the check outcomes decide (overall, readiness, every service)."""
        for service, (status, reason) in statuses.derive(results, self.follows).items():
            self.health.set(service, status, reason)

    def publish(self, service: str, serving: bool, reason: str) -> None:
        """Set the status of a name no servicer or check owns."""
        if service in self.follows or service in statuses.BUILT_IN:
            raise ValueError(f"the status of {service!r} follows the checks; it cannot be set by hand")
        self.health.set(service, statuses.SERVING if serving else statuses.NOT_SERVING, reason)

    def listen(self, address: str, credentials: grpc.ServerCredentials | None) -> str:
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
        self.port = port
        return f"{address.rpartition(':')[0]}:{port}"

    def _watch_metrics(self, metrics: Metrics, pipeline: LogPipeline) -> None:
        from petsage_grpc.server.metrics import ServerState

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
            http_connections=lambda: 0 if self.http is None else self.http.connections,
            http_closed=lambda: {} if self.http is None else dataclasses.asdict(self.http.counts),
            incomplete_requests=lambda: dataclasses.asdict(self.requests.counts),
            waiting_requests=lambda: self.requests.waiting,
            grpc_connections=lambda: 0 if self.port is None else established(self.port),
            watch_refused=lambda: dataclasses.asdict(self.health.watch_table.counts),
            certificate_expiry=lambda: None if self.certificate is None else self.certificate.pair.not_after,
            stderr=stderr_counts,
        ))

    def _on_stall_change(self, alive: bool, reason: str) -> None:
        """Called from the watchdog thread: liveness follows the event loop."""
        status = statuses.SERVING if alive else statuses.NOT_SERVING
        self.health.set_threadsafe(statuses.LIVENESS, status, reason)
        self.runner.trigger(EVENT_LOOP_CHECK)
