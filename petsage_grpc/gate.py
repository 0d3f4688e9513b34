"""The shutdown gate: counts calls in flight and turns new ones away once closed.

grpcio's ``server.stop()`` answers CANCELLED to calls it still holds queued
(grpc/grpc#41785), and CANCELLED means "the caller gave up" to clients.  So
the server closes this gate first: every call that reaches a handler after
that gets UNAVAILABLE, which clients retry elsewhere, and ``stop()`` is only
called once the calls in flight have finished.

Handlers are wrapped once, at registration, through :class:`GatedRegistrar`,
so a call costs one extra coroutine frame and no interceptor.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Sequence
from typing import Any

import grpc

SHUTTING_DOWN = "server is shutting down; retry another instance"


class Gate:
    """Open until :meth:`close`; tracks how many gated calls are running.

    Used from the event loop's thread only.
    """

    def __init__(self) -> None:
        self.open = True
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def close(self) -> None:
        """Refuse every later call with UNAVAILABLE."""
        self.open = False

    async def wait_idle(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the calls in flight; True if none remain."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def _enter(self) -> None:
        self.in_flight += 1
        self._idle.clear()

    def _leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    def wrap(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """Return ``handler`` with its behaviour gated (handlers are namedtuples)."""
        for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            behaviour = getattr(handler, kind)
            if behaviour is not None:
                return handler._replace(**{kind: self._gated(behaviour)})  # type: ignore[attr-defined, no-any-return]
        return handler

    def _gated(self, behaviour: Any) -> Any:
        gate = self
        if inspect.isasyncgenfunction(behaviour):

            async def gated_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
                if not gate.open:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
                gate._enter()
                try:
                    async for response in behaviour(request, context):
                        yield response
                finally:
                    gate._leave()

            return gated_stream
        if not inspect.iscoroutinefunction(behaviour):
            raise TypeError(f"{behaviour!r}: the asyncio server needs async handlers")

        async def gated(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if not gate.open:
                await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
            gate._enter()
            try:
                return await behaviour(request, context)
            finally:
                gate._leave()

        return gated


class _GatedGenericHandler(grpc.GenericRpcHandler):
    """Delegates to a generic handler and gates what it returns.

    Wrapped handlers are cached per known method; unknown method names are
    not cached, so a client inventing names cannot grow the cache.
    """

    def __init__(self, inner: grpc.GenericRpcHandler, gate: Gate) -> None:
        self._inner = inner
        self._gate = gate
        self._cache: dict[str, grpc.RpcMethodHandler] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        """The gated handler for the call's method, or None if the inner has none."""
        method = handler_call_details.method
        gated = self._cache.get(method)
        if gated is None:
            handler = self._inner.service(handler_call_details)
            if handler is None:
                return None
            gated = self._cache[method] = self._gate.wrap(handler)
        return gated


class GatedRegistrar:
    """Stands in for the server in generated ``add_*_to_server`` helpers.

    It gates every handler it is given, then registers it with the real server.
    """

    def __init__(self, server: grpc.aio.Server, gate: Gate) -> None:
        self._server = server
        self._gate = gate

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        """Gate and register generic handlers."""
        self._server.add_generic_rpc_handlers(
            tuple(_GatedGenericHandler(h, self._gate) for h in handlers)
        )

    def add_registered_method_handlers(
        self, service_name: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        """Gate and register pre-registered method handlers."""
        self._server.add_registered_method_handlers(
            service_name, {name: self._gate.wrap(h) for name, h in handlers.items()}
        )
