"""What the HTTP listener answers, from the same health model as gRPC (never a copy of a status).

| route | answers |
| --- | --- |
| ``/api/v1/smoke-test/`` | the original REST smoke test: 200 ok/degraded, 503 failing, JSON |
| ``/livez``, ``/readyz``, ``/healthz`` (and ``/NAME``) | the Kubernetes API server's health contract |
| ``/health?service=NAME`` | any health name, as grpc-gateway maps it: 200, 503 or 404 |
| ``/metrics`` | Prometheus text, when metrics are on |
| ``/openapi.json`` | an OpenAPI 3 document of these routes |

Every route takes GET and HEAD.  Calls pass the server's shutdown gate as
gRPC calls do: the smoke test is refused (503) once the gate closes, the
health routes keep answering until the listener closes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from petsage_grpc.health.checks import CheckOutcome
from petsage_grpc.health.runner import CheckRunner
from petsage_grpc.health.servicer import HealthServicer
from petsage_grpc.health.smoke import SHUTDOWN_CHECK, SHUTTING_DOWN, SmokeReport, SmokeTest, Verdict
from petsage_grpc.health.statuses import LIVENESS, SERVING, status_name
from petsage_grpc.server.access import CallObserver
from petsage_grpc.server.gate import Gate
from petsage_grpc.server.handlers import SHUTTING_DOWN as REFUSED
from petsage_grpc.server.http.listener import Reply, Request
from petsage_grpc.server.smoke import Identity

if TYPE_CHECKING:
    from petsage_grpc.server.metrics import Metrics

SMOKE_PATH = "/api/v1/smoke-test/"
#: The Kubernetes health endpoints: each lists its checks (see :meth:`HttpHealth.entries`).
HEALTH_ENDPOINTS = ("livez", "readyz", "healthz")
JSON = "application/json"
TEXT = "text/plain; charset=utf-8"
#: Headers on every answer: health answers must never be cached, nor sniffed into another type.
COMMON_HEADERS = [("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff")]
ALLOWED = "GET, HEAD"
#: The ``/livez`` entry that answers while the event loop runs: it is what answers the request.
PING = "ping"
EVENT_LOOP = "event_loop"


@dataclass(frozen=True)
class Entry:
    """One line of a ``/livez``, ``/readyz`` or ``/healthz`` answer: a check, whether it passes, and why not."""

    name: str
    ok: bool
    reason: str = ""


def reply(status: int, body: bytes, content_type: str, *extra: tuple[str, str]) -> Reply:
    """An answer with the common headers."""
    return Reply(status, body, [("Content-Type", content_type), *COMMON_HEADERS, *extra])


def json_reply(status: int, document: object) -> Reply:
    """A JSON answer (one line, UTF-8)."""
    return reply(status, json.dumps(document, ensure_ascii=False).encode(), JSON)


def rfc3339(nanoseconds: int) -> str:
    """``2026-11-30T10:00:00.123456Z``: RFC 3339, UTC, microseconds."""
    stamp = datetime.fromtimestamp(nanoseconds / 1e9, UTC)
    return stamp.isoformat(timespec="microseconds").replace("+00:00", "Z")


class HttpHealth:
    """Answers every route from the health servicer, the check runner, the smoke test and the metrics.

    ``details``: whether answers show why checks fail and which server answers
    (``--smoke-details full``); the reasons are always in the log, where each
    check's change is written.
    """

    def __init__(self, *, health: HealthServicer, runner: CheckRunner, smoke: SmokeTest, identity: Identity,
                 gate: Gate, details: bool, observer: CallObserver | None, metrics: Metrics | None) -> None:
        self._health = health
        self._runner = runner
        self._smoke = smoke
        self._identity = identity
        self._gate = gate
        self._details = details
        self._observer = observer
        self._metrics = metrics
        self.routes: dict[str, Callable[[Request, str], Awaitable[Reply]]] = {
            SMOKE_PATH: self._smoke_test, "/health": self._health_of, "/openapi.json": self._openapi,
            **{f"/{endpoint}": self._endpoint for endpoint in HEALTH_ENDPOINTS},
        }
        if metrics is not None:
            self.routes["/metrics"] = self._metrics_text

    async def handle(self, request: Request) -> Reply:
        """Answer ``request``, passing the gate, and record it (access log, metrics)."""
        started = time.perf_counter()
        path, check = request.path, ""
        handler = self.routes.get(path)
        if handler is None and path.count("/") == 2 and path.split("/")[1] in HEALTH_ENDPOINTS:
            path, check = path.rpartition("/")[0], path.rpartition("/")[2]
            handler = self.routes[path]
        if handler is None:
            answer = self._not_found(request)
        elif request.method not in ("GET", "HEAD"):
            answer = reply(405, b"method not allowed: use GET or HEAD\n", TEXT, ("Allow", ALLOWED))
        else:
            answer = await self._gated(handler, request, check, refusable=path == SMOKE_PATH)
        if self._observer is not None:
            route = path if handler is not None else "other"
            self._observer.finished_http(request, route, answer.status, time.perf_counter() - started)
        return answer

    async def _gated(self, handler: Callable[[Request, str], Awaitable[Reply]], request: Request, check: str,
                     *, refusable: bool) -> Reply:
        gate = self._gate
        if refusable and not gate.open:
            gate.refuse()
            return reply(503, f"{REFUSED}\n".encode(), TEXT, ("Retry-After", "1"))
        gate.enter()
        try:
            return await handler(request, check)
        finally:
            gate.leave(refusable)

    def _not_found(self, request: Request) -> Reply:
        if request.path == SMOKE_PATH.rstrip("/"):  # the original service's URL always ended in a slash
            return reply(308, b"", TEXT, ("Location", SMOKE_PATH))
        return reply(404, f"no route {request.path!r}; see /openapi.json\n".encode(), TEXT)

    # -- the REST smoke test ---------------------------------------------------------------------

    async def _smoke_test(self, request: Request, _: str) -> Reply:
        report = await self._smoke.run()
        return json_reply(503 if report.verdict is Verdict.FAILING else 200, self.smoke_document(report))

    def smoke_document(self, report: SmokeReport) -> dict[str, object]:
        """The original contract's keys (status, message, timestamp), then checks and server with details on."""
        document: dict[str, object] = {"status": report.verdict.value, "message": report.message,
                                       "timestamp": rfc3339(report.ran_at_ns)}
        if self._details:
            document["checks"] = [
                {"name": o.name, "status": "ok" if o.ok else "failing", "detail": o.detail,
                 "duration_seconds": round(o.duration, 6), "critical": o.critical}
                for o in report.outcomes
            ]
            identity = self._identity
            document["server"] = {"version": identity.version, "instance_id": identity.instance_id,
                                  "start_time": rfc3339(int(identity.start_time.timestamp() * 1e9))}
        return document

    # -- Kubernetes health endpoints -------------------------------------------------------------

    def entries(self, endpoint: str) -> list[Entry]:
        """The checks ``endpoint`` lists: liveness's for ``livez``, the critical ones and shutdown otherwise."""
        outcomes: dict[str, CheckOutcome] = dict(self._runner.results)
        if endpoint == "livez":
            alive = self._health.status_of(LIVENESS) == SERVING
            stalled = outcomes.get(EVENT_LOOP)
            reason = stalled.detail if stalled is not None and not stalled.ok else "the event loop stalled"
            return [Entry(PING, True), Entry(EVENT_LOOP, alive, "" if alive else reason)]
        entries = [Entry(o.name, o.ok, o.detail) for o in outcomes.values() if o.critical]
        draining = self._health.draining
        return [*entries, Entry(SHUTDOWN_CHECK, not draining, SHUTTING_DOWN if draining else "")]

    async def _endpoint(self, request: Request, check: str) -> Reply:
        endpoint = request.path.split("/")[1]
        entries = self.entries(endpoint)
        if check:
            return self._one(entries, check)
        excluded = set(request.query.get("exclude", []))
        lines, failed = [], False
        for entry in entries:
            if entry.name in excluded:
                excluded.discard(entry.name)
                lines.append(f"[+]{entry.name} excluded: ok")
            elif entry.ok:
                lines.append(f"[+]{entry.name} ok")
            else:
                failed = True
                lines.append(f"[-]{entry.name} failed: {self._reason(entry)}")
        if excluded:
            names = ", ".join(json.dumps(name) for name in sorted(excluded))
            lines.append(f"warn: some health checks cannot be excluded: no matches for {names}")
        if failed:  # always verbose on failure, as Kubernetes is
            return reply(500, "".join(f"{line}\n" for line in lines).encode() + f"{endpoint} check failed\n".encode(),
                         TEXT)
        if "verbose" not in request.query:
            return reply(200, b"ok", TEXT)
        return reply(200, "".join(f"{line}\n" for line in [*lines, f"{endpoint} check passed"]).encode(), TEXT)

    def _one(self, entries: list[Entry], name: str) -> Reply:
        entry = next((e for e in entries if e.name == name), None)
        if entry is None:
            return reply(404, f"no check {name!r} here\n".encode(), TEXT)
        if entry.ok:
            return reply(200, b"ok", TEXT)
        return reply(500, f"internal server error: {self._reason(entry)}\n".encode(), TEXT)

    def _reason(self, entry: Entry) -> str:
        return entry.reason if self._details and entry.reason else "reason withheld"

    # -- every health name, metrics, the document ------------------------------------------------

    async def _health_of(self, request: Request, _: str) -> Reply:
        service = (request.query.get("service") or [""])[-1]
        status = self._health.status_of(service)
        if status is None:
            return json_reply(404, {"code": 5, "message": "unknown service", "details": []})
        return json_reply(200 if status == SERVING else 503, {"status": status_name(status)})

    async def _metrics_text(self, request: Request, _: str) -> Reply:
        assert self._metrics is not None
        body, content_type = await self._metrics.exposition(request.headers.get("accept", ""))
        if "gzip" in request.headers.get("accept-encoding", ""):
            import gzip  # only for scrapes that ask for it

            return reply(200, gzip.compress(body, 6), content_type, ("Content-Encoding", "gzip"),
                         ("Vary", "Accept-Encoding"))
        return reply(200, body, content_type, ("Vary", "Accept-Encoding"))

    async def _openapi(self, request: Request, _: str) -> Reply:
        from petsage_grpc.server.http.openapi import document

        return json_reply(200, document(metrics=self._metrics is not None))
