"""What the server records about each call: an access log record and call metrics.

Every handler is wrapped (:mod:`petsage_grpc.server.handlers`), so every
call is timed and how it ended is known; it hands that to :meth:`CallObserver.finished`.
One access log record per call, of the logger ``petsage_grpc.access`` (whose
level it follows), goes straight into the log pipeline, to the same sinks as
every other record, without the cost of ``Logger.info``: method, status
code, duration, peer, user agent and the caller's ``x-request-id``.  Health
calls from probes (kubelet's ``kube-probe/*``, ``grpc_health_probe`` and our
own ``petsage-grpc probe``, which presents itself as grpc_health_probe)
arrive every few seconds from every node and say nothing new: they are
counted, and logged only with ``--log-probes``.

Calls that grpc itself answers before any handler runs (an unknown method,
a message over ``--max-receive-bytes``, a connection closed mid-call) never
reach the gate and are not recorded.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import grpc

from petsage_grpc.logs.records import light_record

if TYPE_CHECKING:
    from petsage_grpc.server.http.listener import Request
    from petsage_grpc.server.metrics import Metrics

ACCESS_LOGGER = "petsage_grpc.access"
#: User agents of probes; grpc appends its own after the caller's, so these are prefixes.
PROBE_AGENTS = ("kube-probe/", "grpc_health_probe")
#: HTTP routes whose probe requests are counted, not logged, as gRPC health calls are.
HTTP_HEALTH_ROUTES = frozenset({"/livez", "/readyz", "/healthz", "/health"})
#: Longest user agent or request id copied into a record: they come from the caller.
MAX_FIELD = 256
_ACCESS = logging.getLogger(ACCESS_LOGGER)


class CallStart(NamedTuple):
    """What :meth:`CallObserver.begin` noted at a call's start."""

    started: float  # time.perf_counter()
    record: bool  # an access log record is to be written
    peer: str  # empty when no record will be written
    user_agent: str
    request_id: str


class CallObserver:
    """Writes the access log and feeds call metrics; used on the event loop's thread."""

    def __init__(self, *, access_log: bool, log_probes: bool, metrics: Metrics | None,
                 enqueue: Callable[[logging.LogRecord], None]) -> None:
        """``enqueue`` takes the access records: the log pipeline's, which the logger would reach."""
        self._enqueue = enqueue
        self._access_log = access_log
        self._log_probes = log_probes
        self._metrics = metrics
        #: Probe calls left out of the access log (read by the metrics at scrape time).
        self.unlogged_probe_calls = 0

    @property
    def active(self) -> bool:
        """Whether calls need observing at all: the access log is on, or metrics are kept."""
        return self._access_log or self._metrics is not None

    def begin(self, context: grpc.aio.ServicerContext, health: bool) -> CallStart:
        """Note what a record needs at a call's start, while grpc still holds the call.

        The peer in particular must be read now: asked for after the client
        has gone, grpcio reads a call it has already freed (the process dies
        with SIGSEGV).  ``health``: the call is to ``grpc.health.v1.Health``,
        the only service whose probe calls are left out of the log (a caller
        claiming a probe's user agent elsewhere is logged like any other).
        """
        started = time.perf_counter()
        if not self._access_log or not _ACCESS.isEnabledFor(logging.INFO):
            return CallStart(started, False, "", "", "")
        user_agent = request_id = ""
        for key, value in context.invocation_metadata() or ():
            if key == "user-agent":
                user_agent = value[:MAX_FIELD]
            elif key == "x-request-id" and isinstance(value, str):
                request_id = value[:MAX_FIELD]
        if health and not self._log_probes and user_agent.startswith(PROBE_AGENTS):
            self.unlogged_probe_calls += 1
            return CallStart(started, False, "", "", "")
        return CallStart(started, True, context.peer(), user_agent, request_id)

    def finished(self, kind: str, path: str, start: CallStart, code: grpc.StatusCode) -> None:
        """Record a call to ``path``, begun as ``start`` says, that ended with ``code``."""
        seconds = time.perf_counter() - start.started
        if self._metrics is not None:
            self._metrics.observe_call(kind, path, code, seconds)
        if not start.record:
            return
        fields = {"method": path, "code": code.name, "duration_ms": round(seconds * 1000, 3),
                  "peer": start.peer, "user_agent": start.user_agent, "request_id": start.request_id}
        # The caller's strings are quoted as JSON strings: a newline or a quote
        # in a header cannot forge a second record or field.  Access records
        # may be shed when the log queue fills (see logs.records.SHEDDABLE_ATTR).
        self._enqueue(light_record(
            ACCESS_LOGGER, "%s %s %.3fms peer=%s user_agent=%s request_id=%s",
            (path, code.name, seconds * 1000, start.peer, json.dumps(start.user_agent),
             json.dumps(start.request_id)), fields))


    def finished_http(self, request: Request, route: str, status: int, seconds: float) -> None:
        """Record an HTTP request answered with ``status`` (``route``: its path, or ``other``)."""
        if self._metrics is not None:
            self._metrics.observe_http(route, status, seconds)
        if not self._access_log or not _ACCESS.isEnabledFor(logging.INFO):
            return
        user_agent = request.headers.get("user-agent", "")[:MAX_FIELD]
        if route in HTTP_HEALTH_ROUTES and not self._log_probes and user_agent.startswith(PROBE_AGENTS):
            self.unlogged_probe_calls += 1
            return
        method = f"{request.method[:16]} {route}"  # the route, not the caller's path: a known, short string
        request_id = request.headers.get("x-request-id", "")[:MAX_FIELD]
        fields = {"method": method, "code": str(status), "duration_ms": round(seconds * 1000, 3),
                  "peer": request.peer, "user_agent": user_agent, "request_id": request_id}
        self._enqueue(light_record(
            ACCESS_LOGGER, "%s %d %.3fms peer=%s user_agent=%s request_id=%s",
            (method, status, seconds * 1000, request.peer, json.dumps(user_agent), json.dumps(request_id)), fields))


def code_of(context: grpc.aio.ServicerContext, error: BaseException | None) -> grpc.StatusCode:
    """The status a call ended with, from the handler's outcome and its context.

    ``error`` is what the handler raised, or None if it returned.  An abort
    (or a code set by the handler) is on the context; a cancelled handler
    means the caller went away or its deadline passed; any other exception
    becomes UNKNOWN, as grpcio answers it.
    """
    code = context.code()
    if code is not None:
        # A handler may have set a bare number: grpcio hands it back as given.
        return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN
    if error is None:
        return grpc.StatusCode.OK
    if isinstance(error, grpc.aio.AbortError):
        return grpc.StatusCode.UNKNOWN
    if not isinstance(error, Exception):  # cancelled, or the stream closed
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            return grpc.StatusCode.DEADLINE_EXCEEDED
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN
