"""The shutdown gate: counts calls in flight and turns new ones away once closed.

grpcio's ``server.stop()`` answers CANCELLED to calls it still holds queued
(grpc/grpc#41785), and CANCELLED means "the caller gave up" to clients.  So
the server closes this gate first: every call that reaches a refusing handler
after that gets UNAVAILABLE, which clients retry elsewhere, and ``stop()`` is
only called once the calls in flight have finished and callers have stopped
arriving.

Each service is registered with a :class:`Policy`: whether the gate refuses
its calls once closed (not the health service, which keeps answering
NOT_SERVING for readiness and SERVING for liveness until the end), and
whether its calls count as in flight (not reflection streams, which an
interactive tool may hold open for ever).  The gate also parses single
requests, so that malformed bytes get INVALID_ARGUMENT, and hands every
call's method, duration and status code to a
:class:`~petsage_grpc.observe.CallObserver` (access log, metrics).  Handlers
are wrapped once, at registration, so a call costs two extra coroutine frames
and no interceptor.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from petsage_grpc.observe import CallObserver, CallStart, code_of

_LOGGER = logging.getLogger(__name__)
#: Method paths of the health service, whose probe calls the access log may leave out.
HEALTH_PREFIX = "/grpc.health.v1.Health/"
SHUTTING_DOWN = "server is shutting down; retry another instance"


@dataclass(frozen=True)
class Policy:
    """How the gate treats one service's calls."""

    refuse: bool = True  # answer UNAVAILABLE once the gate is closed
    track: bool = True  # count as in flight: shutdown waits for these calls


class Gate:
    """Open until :meth:`close`; tracks how many tracked calls are running.

    Used from the event loop's thread only.  ``observer``, if given, hears of
    every call that reaches a handler.
    """

    def __init__(self, observer: CallObserver | None = None) -> None:
        self.observer = observer
        self.open = True
        self.in_flight = 0
        self.refused = 0  # calls turned away since the gate closed
        self._idle = asyncio.Event()
        self._idle.set()
        self._activity = asyncio.Event()
        # time.monotonic() of the latest closing, refusal or completion after closing.
        self._quiet_since = 0.0
        self._last_refusal = float("-inf")

    def close(self) -> None:
        """Refuse every later call of a refusing service with UNAVAILABLE."""
        self.open = False
        self._mark_activity()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the calls in flight; True if none remain."""
        if self.in_flight == 0:  # wait_for(timeout=0) would time out even then
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def wait_quiet(self, quiet: float, timeout: float) -> bool:
        """Wait until ``quiet`` seconds pass with no refusal and no refusable call finishing.

        Calls that reach grpcio just before ``stop()`` are cancelled by it
        (grpc/grpc#41785).  A caller whose call just finished, or who was
        just refused, may send another one at once; once ``quiet`` seconds
        pass without either, callers have gone elsewhere.  Waits at most
        ``timeout`` seconds; False if a call was refused within the last
        ``quiet`` seconds when the time ran out.
        """
        deadline = time.monotonic() + timeout
        while True:
            now = time.monotonic()
            quiet_from = self._quiet_since + quiet
            if now >= quiet_from:
                return True
            if now >= deadline:
                return now - self._last_refusal >= quiet
            self._activity.clear()
            try:
                await asyncio.wait_for(self._activity.wait(), min(quiet_from, deadline) - now)
            except TimeoutError:
                pass

    def _mark_activity(self) -> None:
        self._quiet_since = time.monotonic()
        self._activity.set()

    def _refuse(self) -> None:
        self.refused += 1
        self._mark_activity()
        self._last_refusal = self._quiet_since

    def _enter(self) -> None:
        self.in_flight += 1
        self._idle.clear()

    def _leave(self, refusable: bool) -> None:
        self.in_flight -= 1
        # Only a call that would now be refused says its caller is still here
        # and may come back: probes keep calling Health until the process has
        # gone, and must not hold up the shutdown for the whole grace period.
        if refusable and not self.open:
            self._mark_activity()
        if self.in_flight == 0:
            self._idle.set()

    def wrap(self, handler: grpc.RpcMethodHandler, policy: Policy, path: str) -> grpc.RpcMethodHandler:
        """Return ``handler`` of method ``path`` with its behaviour gated (handlers are namedtuples)."""
        for kind, label in _KINDS.items():
            behaviour = getattr(handler, kind)
            if behaviour is None:
                continue
            parse = None if handler.request_streaming else handler.request_deserializer
            if parse is not None:
                # The gate parses single requests itself, so malformed bytes get
                # INVALID_ARGUMENT instead of grpcio's UNKNOWN with a traceback.
                handler = handler._replace(request_deserializer=None)
            return handler._replace(**{kind: self._gated(behaviour, parse, policy, _Method(label, path))})
        return handler

    def _gated(self, behaviour: Any, parse: Callable[[bytes], Any] | None, policy: Policy, method: _Method) -> Any:
        gate = self
        observer = self.observer
        health = method.path.startswith(HEALTH_PREFIX)

        def observe(start: CallStart | None, context: grpc.aio.ServicerContext, error: BaseException | None) -> None:
            if observer is None or start is None:
                return
            try:
                observer.finished(method.kind, method.path, start, code_of(context, error))
            except Exception:  # recording a call must never change its outcome
                _LOGGER.exception("recording a call to %s failed", method.path)

        async def admit(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if policy.refuse and not gate.open:
                gate._refuse()
                await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
            if policy.track:
                gate._enter()
            if parse is None:
                return request
            try:
                return parse(request)
            except Exception:
                if policy.track:
                    gate._leave(policy.refuse)
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed {_message_name(parse)}")

        def leave() -> None:
            if policy.track:
                gate._leave(policy.refuse)

        if inspect.isasyncgenfunction(behaviour):

            async def gated_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
                start = None if observer is None else observer.begin(context, health)
                error: BaseException | None = None
                try:
                    request = await admit(request, context)
                    try:
                        async for response in behaviour(request, context):
                            yield response
                    finally:
                        leave()
                except BaseException as exc:
                    error = exc
                    raise
                finally:
                    observe(start, context, error)

            return gated_stream
        if not inspect.iscoroutinefunction(behaviour):
            raise TypeError(f"{behaviour!r}: the asyncio server needs async handlers")

        async def gated(request: Any, context: grpc.aio.ServicerContext) -> Any:
            start = None if observer is None else observer.begin(context, health)
            error: BaseException | None = None
            try:
                request = await admit(request, context)
                try:
                    return await behaviour(request, context)
                finally:
                    leave()
            except BaseException as exc:
                error = exc
                raise
            finally:
                observe(start, context, error)

        return gated


#: Handler attribute -> the call type as grpc metrics label it.
_KINDS = {"unary_unary": "unary", "unary_stream": "server_stream",
          "stream_unary": "client_stream", "stream_stream": "bidi_stream"}


@dataclass(frozen=True)
class _Method:
    kind: str  # a value of _KINDS
    path: str  # /package.Service/Method


def _message_name(parse: Callable[[bytes], Any]) -> str:
    """``petsage.smoke.v1.SmokeTestRequest`` for ``SmokeTestRequest.FromString``."""
    message_class = getattr(parse, "__self__", None)
    descriptor = getattr(message_class, "DESCRIPTOR", None)
    return getattr(descriptor, "full_name", "request")


class _GatedGenericHandler(grpc.GenericRpcHandler):
    """Delegates to a generic handler and gates what it returns.

    Wrapped handlers are cached per known method; unknown method names are
    not cached, so a client inventing names cannot grow the cache.
    """

    def __init__(self, inner: grpc.GenericRpcHandler, gate: Gate, policy: Policy) -> None:
        self._inner = inner
        self._gate = gate
        self._policy = policy
        self._cache: dict[str, grpc.RpcMethodHandler] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        """The gated handler for the call's method, or None if the inner has none."""
        method = handler_call_details.method
        gated = self._cache.get(method)
        if gated is None:
            handler = self._inner.service(handler_call_details)
            if handler is None:
                return None
            gated = self._cache[method] = self._gate.wrap(handler, self._policy, method)
        return gated


class GatedRegistrar:
    """Stands in for the server in generated ``add_*_to_server`` helpers.

    It gates every handler it is given under ``policy``, then registers it
    with the real server, and notes the names of the services registered.
    """

    def __init__(self, server: grpc.aio.Server, gate: Gate, policy: Policy = Policy()) -> None:
        self._server = server
        self._gate = gate
        self._policy = policy
        self.service_names: list[str] = []

    def _note(self, service_name: str | None) -> None:
        if service_name and service_name not in self.service_names:
            self.service_names.append(service_name)

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        """Gate and register generic handlers."""
        for handler in handlers:
            # Handlers made by grpc.method_handlers_generic_handler know their service.
            name = getattr(handler, "service_name", None)
            self._note(name() if callable(name) else None)
        self._server.add_generic_rpc_handlers(
            tuple(_GatedGenericHandler(h, self._gate, self._policy) for h in handlers)
        )

    def add_registered_method_handlers(self, service_name: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        """Gate and register pre-registered method handlers."""
        self._note(service_name)
        self._server.add_registered_method_handlers(
            service_name,
            {name: self._gate.wrap(h, self._policy, f"/{service_name}/{name}") for name, h in handlers.items()},
        )
