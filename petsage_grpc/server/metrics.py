"""Prometheus metrics, served at ``/metrics`` on the HTTP listener (``--http-address ... --metrics``).

Call metrics use the names, labels and code spellings of
go-grpc-prometheus's handled counter and handling-time histogram
(``grpc_server_handled_total{grpc_code="NotFound"}``,
``grpc_server_handling_seconds``), so the usual gRPC dashboard panels work.  The rest is ours, prefixed
``petsage_``: each check's status and run time, published health statuses
and their transitions, open Watch streams, calls in flight, and log records
that reached no sink.

Counters and histograms are updated as things happen, on whichever thread
sees them (prometheus-client's metrics are thread-safe).  State the server
already keeps (statuses, open streams, dropped records) is read at scrape
time by :class:`_StateCollector` instead of being mirrored, so it cannot
drift.  This module is imported only when metrics are asked for.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime

import grpc
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Histogram,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from petsage_grpc import __version__
from petsage_grpc.codes import go_name
from petsage_grpc.health.checks import CheckOutcome
from petsage_grpc.health.statuses import SERVING, status_name
from petsage_grpc.logs.stderr import StderrCounts

#: Call latency buckets, seconds: a health check answers in well under a
#: millisecond, a SmokeTest in about one, and the slowest calls wait on the
#: log timeout (1 s by default).
CALL_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
CHECK_BUCKETS = (0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True)
class ServerState:
    """Readers of the server's own state, called at scrape time on a thread of their own."""

    statuses: Callable[[], dict[str, int]]  # health status table (copied)
    watchers: Callable[[], int]  # open Watch streams
    in_flight: Callable[[], int]  # tracked calls running
    check_results: Callable[[], list[CheckOutcome]]  # latest outcome per check (copied)
    dropped_unqueued: Callable[[], dict[str, int]]  # by reason, log records that reached no sink
    write_failures: Callable[[], dict[str, int]]  # per sink, records it failed to write
    unlogged_probe_calls: Callable[[], int]  # probe calls left out of the access log
    http_connections: Callable[[], int]  # open HTTP connections
    http_closed: Callable[[], dict[str, int]]  # HTTP connections closed unanswered, by reason
    incomplete_requests: Callable[[], dict[str, int]]  # calls ended for want of a request message, by outcome
    waiting_requests: Callable[[], int]  # calls waiting for their request message now
    grpc_connections: Callable[[], int]  # established connections on the gRPC port
    watch_refused: Callable[[], dict[str, int]]  # Watch streams turned away, by reason
    certificate_expiry: Callable[[], datetime | None]  # when the TLS certificate in use expires
    stderr: Callable[[], StderrCounts]  # lines written to the process's stderr, read back into the log


class Metrics:
    """The registry and its metrics; the HTTP listener serves them."""

    def __init__(self, instance_id: str) -> None:
        # A registry of our own: an embedding service's metrics on the global
        # one stay its own business, and two servers in one test process don't clash.
        self.registry = CollectorRegistry()
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            self.registry.register(collector)
        self._handled = Counter(
            "grpc_server_handled", "Calls completed on the server, by status code.",
            ["grpc_type", "grpc_service", "grpc_method", "grpc_code"], registry=self.registry,
        )
        self._handling = Histogram(
            "grpc_server_handling_seconds", "Time from a call's arrival to its status, in seconds.",
            ["grpc_type", "grpc_service", "grpc_method"], buckets=CALL_BUCKETS, registry=self.registry,
        )
        self._check_duration = Histogram(
            "petsage_check_duration_seconds", "Run time of each check.", ["check"],
            buckets=CHECK_BUCKETS, registry=self.registry,
        )
        self._transitions = Counter(
            "petsage_health_status_transitions", "Changes of a published health status, by new status.",
            ["service", "status"], registry=self.registry,
        )
        self._http_requests = Counter(
            "petsage_http_requests", "HTTP requests answered, by route and status code.",
            ["route", "code"], registry=self.registry,
        )
        self._http_duration = Histogram(
            "petsage_http_request_duration_seconds", "Time to answer an HTTP request, in seconds.",
            ["route"], buckets=CALL_BUCKETS, registry=self.registry,
        )
        self._instance_id = instance_id
        # (method path, code) -> counter child; method path -> histogram child.
        # Labels are looked up once per pair, not on every call.
        self._handled_children: dict[tuple[str, grpc.StatusCode], Counter] = {}
        self._handling_children: dict[str, Histogram] = {}

    def observe_call(self, kind: str, path: str, code: grpc.StatusCode, seconds: float) -> None:
        """Count one finished call (``path`` is ``/package.Service/Method``); event loop thread only."""
        counter = self._handled_children.get((path, code))
        histogram = self._handling_children.get(path)
        if counter is None or histogram is None:
            service, _, method = path[1:].partition("/")
            counter = self._handled_children[(path, code)] = self._handled.labels(
                kind, service, method, go_name(code))
            histogram = self._handling_children[path] = self._handling.labels(kind, service, method)
        counter.inc()
        histogram.observe(seconds)

    def observe_http(self, route: str, code: int, seconds: float) -> None:
        """Count one answered HTTP request (``route``: its path, or ``other`` for no route)."""
        self._http_requests.labels(route, str(code)).inc()
        self._http_duration.labels(route).observe(seconds)

    def observe_check(self, outcome: CheckOutcome) -> None:
        """Record one run of a check."""
        self._check_duration.labels(outcome.name).observe(outcome.duration)

    def observe_transition(self, service: str, _old: int | None, new: int) -> None:
        """Count one change of a published health status."""
        self._transitions.labels(service, status_name(new)).inc()

    def watch(self, state: ServerState) -> None:
        """Export the server's own state, read at every scrape."""
        self.registry.register(_StateCollector(state, self._instance_id))

    async def exposition(self, accept: str) -> tuple[bytes, str]:
        """The metrics in the format ``accept`` asks for (Prometheus text, or OpenMetrics), and its content type.

        Collecting reads /proc and every collector: done on a thread, so a
        scrape never holds the event loop.
        """
        encoder, content_type = choose_encoder(accept)
        body: bytes = await asyncio.to_thread(encoder, self.registry)
        return body, content_type


class _StateCollector(Collector):
    """Builds gauges from the server's state when Prometheus scrapes."""

    def __init__(self, state: ServerState, instance_id: str) -> None:
        self._state = state
        self._instance_id = instance_id

    def collect(self) -> Iterator[Metric]:
        """Yield one fresh family per piece of state."""
        state = self._state
        info = GaugeMetricFamily("petsage_build_info", "Version and instance of this server (always 1).",
                                 labels=["version", "instance_id"])
        info.add_metric([__version__, self._instance_id], 1)
        yield info
        statuses = GaugeMetricFamily("petsage_health_serving", "1 while a published health status is "
                                     "SERVING, else 0.", labels=["service"])
        for service, status in sorted(state.statuses().items()):
            statuses.add_metric([service], 1 if status == SERVING else 0)
        yield statuses
        passing = GaugeMetricFamily("petsage_check_passing", "1 while a check's latest run passed, else 0.",
                                    labels=["check", "critical"])
        last = GaugeMetricFamily("petsage_check_last_duration_seconds", "Run time of each check's latest run.",
                                 labels=["check"])
        for outcome in state.check_results():
            passing.add_metric([outcome.name, str(outcome.critical).lower()], 1 if outcome.ok else 0)
            last.add_metric([outcome.name], outcome.duration)
        yield passing
        yield last
        yield GaugeMetricFamily("petsage_watch_streams", "Open grpc.health.v1.Health/Watch streams.",
                                value=state.watchers())
        expiry = state.certificate_expiry()
        if expiry is not None:
            yield GaugeMetricFamily("petsage_tls_certificate_expiry_timestamp_seconds", "When the TLS certificate "
                                    "in use expires, in seconds since the epoch.", value=expiry.timestamp())
        refused = CounterMetricFamily("petsage_watch_refused", "Watch streams turned away: refused at the cap, "
                                      "unknown_refused (names with no status), or evicted for a caller holding "
                                      "fewer.", labels=["reason"])
        for reason, count in state.watch_refused().items():
            refused.add_metric([reason], count)
        yield refused
        yield GaugeMetricFamily("petsage_calls_in_flight", "Calls running (reflection streams excepted).",
                                value=state.in_flight())
        dropped = CounterMetricFamily("petsage_log_records_dropped", "Log records that reached no sink: "
                                      "the log queue was full, or (reason shed) an access record found it "
                                      "half full.", labels=["reason"])
        for reason, count in state.dropped_unqueued().items():
            dropped.add_metric([reason], count)
        yield dropped
        failures = CounterMetricFamily("petsage_log_sink_write_failures", "Log records a sink failed to "
                                       "write (disk full, closed stream...).", labels=["sink"])
        for sink, count in state.write_failures().items():
            failures.add_metric([sink], count)
        yield failures
        yield GaugeMetricFamily("petsage_grpc_connections", "Established connections on the gRPC port.",
                                value=state.grpc_connections())
        yield GaugeMetricFamily("petsage_http_connections", "Open HTTP connections.",
                                value=state.http_connections())
        closed = CounterMetricFamily("petsage_http_connections_closed", "HTTP connections closed without an "
                                     "answer: evicted or refused at the cap, timed out, or malformed.",
                                     labels=["reason"])
        for reason, count in state.http_closed().items():
            closed.add_metric([reason], count)
        yield closed
        yield GaugeMetricFamily("petsage_requests_waiting", "Calls waiting for their request message now.",
                                value=state.waiting_requests())
        incomplete = CounterMetricFamily("petsage_incomplete_requests", "Calls ended for want of a whole request "
                                         "message: empty, timed_out, or evicted at the cap.", labels=["outcome"])
        for why, count in state.incomplete_requests().items():
            incomplete.add_metric([why], count)
        yield incomplete
        counts = state.stderr()
        lines = CounterMetricFamily("petsage_stderr_lines", "Lines written to the process's stderr (grpc core's "
                                    "own, or other), each read back into the log pipeline; by origin and level.",
                                    labels=["origin", "level"])
        for (origin, level), number in sorted(counts.lines.items()):
            lines.add_metric([origin, level], number)
        yield lines
        yield CounterMetricFamily("petsage_stderr_lines_folded", "Stderr lines repeated within 10 s of an identical "
                                  "one: counted in a summary record instead of logged.", value=counts.folded)
        handshakes = CounterMetricFamily("petsage_tls_handshake_failures", "TLS handshakes that failed, by "
                                         "OpenSSL reason (WRONG_VERSION_NUMBER: a plaintext client; "
                                         "PEER_DID_NOT_RETURN_A_CERTIFICATE: no client certificate).",
                                         labels=["reason"])
        for reason, number in sorted(counts.handshake_failures.items()):
            handshakes.add_metric([reason], number)
        yield handshakes
        yield CounterMetricFamily("petsage_access_log_probe_calls_unlogged", "Health calls from probes left "
                                  "out of the access log (user agents kube-probe/*, grpc_health_probe); "
                                  "--log-probes logs them.", value=state.unlogged_probe_calls())
