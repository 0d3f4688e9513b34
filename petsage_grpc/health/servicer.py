"""The ``grpc.health.v1.Health`` service: Check, Watch and List over a status table.

Statuses are set on the event loop's thread, except through
:meth:`HealthServicer.set_threadsafe`.  A change is handed to watchers by
setting an ``asyncio.Event`` per watcher (never by awaiting a send while
holding anything), so a slow or vanished watcher cannot stall the others, and
no watcher holds a thread.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Mapping

import grpc
from grpc_health.v1 import health_pb2 as _health_pb2
from grpc_health.v1 import health_pb2_grpc as _health_pb2_grpc

from petsage_grpc.health.statuses import LIVENESS, NOT_SERVING, SERVICE_UNKNOWN, SERVING, StatusValue, status_name
from petsage_grpc.health.watchers import WatcherTable

_LOGGER = logging.getLogger(__package__)

SERVICE_NAME = _health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
#: List answers RESOURCE_EXHAUSTED past this many services, as grpc-go does.
MAX_LIST_SERVICES = 100
#: Concurrent Watch streams allowed before RESOURCE_EXHAUSTED.
DEFAULT_MAX_WATCHERS = 10_000
#: Of those, streams on names that have no status yet.
DEFAULT_MAX_UNKNOWN = 100

# One immutable answer per status, built once: Check allocates nothing.
_ANSWERS = {
    status: _health_pb2.HealthCheckResponse(status=status)
    for status in _health_pb2.HealthCheckResponse.ServingStatus.values()
}


class HealthServicer(_health_pb2_grpc.HealthServicer):
    """Serves the status table; :meth:`set`, :meth:`drain` and :meth:`end_watches` change it.

    Create it on the event loop's thread: watchers are woken on that loop.
    """

    def __init__(self, max_watchers: int = DEFAULT_MAX_WATCHERS, *, aliases: Mapping[str, str] | None = None,
                 unavailable_unless_serving: bool = False, max_unknown_watchers: int = DEFAULT_MAX_UNKNOWN) -> None:
        """``aliases`` maps extra names to the name whose status each answers.

        ``max_watchers`` caps the open Watch streams, ``max_unknown_watchers``
        those on names with no status yet (see :mod:`~petsage_grpc.health.watchers`).

        With ``unavailable_unless_serving``, Check answers any status but
        SERVING as the gRPC error UNAVAILABLE, for load balancers that read
        only the status code.
        """
        self._loop = asyncio.get_running_loop()
        self._aliases = dict(aliases or {})
        self._strict = unavailable_unless_serving
        # Written on the loop thread, except liveness, which the watchdog
        # thread alone changes after start (set_threadsafe): that thread never
        # adds a key, so iterating here on the loop is safe.
        self._statuses: dict[str, StatusValue] = {}
        #: The open Watch streams and their holders.
        self.watch_table = WatcherTable(max_watchers, max_unknown_watchers)
        self._frozen: tuple[str, ...] | None = None  # once draining: the names set() may still change
        self._closing = False  # once True, open and new watches end after their first answer
        #: Called with (service, old, new) on every change, from the thread that made it.
        self.change_listeners: list[Callable[[str, StatusValue | None, StatusValue], None]] = []

    @property
    def watchers(self) -> int:
        """How many Watch streams are open."""
        return len(self.watch_table)

    @property
    def draining(self) -> bool:
        """Whether :meth:`drain` has been called: the server is shutting down."""
        return self._frozen is not None

    def status_of(self, service: str) -> StatusValue | None:
        """The published status of ``service`` (an alias answers its target's), or None if unknown."""
        return self._statuses.get(self._aliases.get(service, service))

    def set(self, service: str, status: StatusValue, reason: str = "") -> None:
        """Publish ``status`` for ``service`` and wake its watchers (loop thread only).

        Once :meth:`drain` has been called, only the names it kept change.
        """
        if self._store(service, status, reason):
            self._wake(service)

    def set_threadsafe(self, service: str, status: StatusValue, reason: str) -> None:
        """:meth:`set` from another thread, for a service only that thread sets.

        The table changes at once, so a Check queued behind a stalled loop
        answers the new status; watchers are woken when the loop runs again.
        """
        if self._store(service, status, reason):
            self._loop.call_soon_threadsafe(self._wake, service)

    def _store(self, service: str, status: StatusValue, reason: str) -> bool:
        if self._frozen is not None and service not in self._frozen:
            return False
        old = self._statuses.get(service)
        if old == status:
            return False
        self._statuses[service] = status
        _LOGGER.info(
            "health status of %r: %s -> %s (%s)", service,
            "UNKNOWN" if old is None else status_name(old), status_name(status), reason or "set",
        )
        for listener in self.change_listeners:
            try:
                listener(service, old, status)
            except Exception:  # may run on the watchdog thread, which must outlive any listener
                _LOGGER.exception("health change listener failed")
        return True

    def statuses(self) -> dict[str, StatusValue]:
        """A copy of the status table, aliases included (safe from any thread: each copy is one C-level step)."""
        statuses = dict(self._statuses)
        for alias, target in self._aliases.items():
            if target in statuses:
                statuses[alias] = statuses[target]
        return statuses

    def _wake(self, service: str) -> None:
        for watcher in self.watch_table:
            if watcher.service == service:
                watcher.wakeup.set()

    def drain(self, keep: tuple[str, ...] = (LIVENESS,)) -> None:
        """Turn every status but ``keep`` NOT_SERVING for good; watches stay open."""
        for service in list(self._statuses):
            if service not in keep:
                self.set(service, NOT_SERVING, "server is shutting down")
        self._frozen = keep

    def end_watches(self) -> None:
        """End every open Watch with UNAVAILABLE, and later ones after their first answer."""
        self._closing = True
        for watcher in self.watch_table:
            watcher.wakeup.set()

    async def Check(
        self, request: _health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> _health_pb2.HealthCheckResponse:
        """Answer the cached status of one service, or NOT_FOUND (and UNAVAILABLE if strict and not SERVING)."""
        service = request.service
        status = self._statuses.get(self._aliases.get(service, service))
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "unknown service")
        elif self._strict and status != SERVING:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"service {service!r} is {status_name(status)}")
        return _ANSWERS[status]

    async def List(
        self, request: _health_pb2.HealthListRequest, context: grpc.aio.ServicerContext
    ) -> _health_pb2.HealthListResponse:
        """Answer a snapshot of every service (aliases included) and its status."""
        statuses = self.statuses()
        if len(statuses) > MAX_LIST_SERVICES:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"server health list exceeds maximum capacity: {MAX_LIST_SERVICES}",
            )
        response = _health_pb2.HealthListResponse()
        for service, status in statuses.items():
            response.statuses[service].status = status
        return response

    async def Watch(
        self, request: _health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[_health_pb2.HealthCheckResponse]:
        """Send the current status, then each change, until the stream ends."""
        service = self._aliases.get(request.service, request.service)
        watcher = self.watch_table.admit(service, context.peer(), known=service in self._statuses)
        if isinstance(watcher, str):
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, watcher)
            return
        try:
            sent = None
            while True:
                watcher.wakeup.clear()
                if watcher.evicted:
                    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, watcher.evicted)
                status = self._statuses.get(watcher.service, SERVICE_UNKNOWN)
                if status != sent:
                    sent = status
                    yield _ANSWERS[status]
                    # The status may have changed (and the server begun to
                    # close) while the send was in progress: look again.
                    continue
                if self._closing:
                    await context.abort(
                        grpc.StatusCode.UNAVAILABLE, "server is shutting down; reconnect elsewhere"
                    )
                await watcher.wakeup.wait()
        finally:
            self.watch_table.discard(watcher)

