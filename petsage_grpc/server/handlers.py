"""Wrapping every handler: the shutdown gate, request parsing and call recording, once per method.

Each service is registered with a :class:`Policy`: whether the gate refuses
its calls once closed (not the health service, which keeps answering
NOT_SERVING for readiness and SERVING for liveness until the end), and
whether its calls count as in flight (not reflection streams, which an
interactive tool may hold open for ever).  A method with a single request
is registered as request-streaming, so that its handler starts with the
call and reads the message itself, with a deadline
(:mod:`petsage_grpc.server.requests`); the wrapper parses it, so that
malformed bytes get INVALID_ARGUMENT instead of grpcio's UNKNOWN with a
traceback.  Every call's method, duration and status code go to a
:class:`~petsage_grpc.server.access.CallObserver` (access log, metrics).
Handlers are wrapped once, at registration: a call costs one object and one
coroutine frame of ours, and no interceptor.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import grpc

from petsage_grpc.server.access import CallObserver, CallStart, code_of
from petsage_grpc.server.gate import Gate
from petsage_grpc.server.grpc_output import CURRENT_CALL
from petsage_grpc.server.requests import RequestReader

_LOGGER = logging.getLogger(__package__)
#: Method paths of the health service, whose probe calls the access log may leave out.
HEALTH_PREFIX = "/grpc.health.v1.Health/"
SHUTTING_DOWN = "server is shutting down; retry another instance"
#: Handler attribute -> the call type as grpc metrics label it.
_KINDS = {"unary_unary": "unary", "unary_stream": "server_stream",
          "stream_unary": "client_stream", "stream_stream": "bidi_stream"}


@dataclass(frozen=True)
class Policy:
    """How the gate treats one service's calls."""

    refuse: bool = True  # answer UNAVAILABLE once the gate is closed
    track: bool = True  # count as in flight: shutdown waits for these calls


@dataclass(frozen=True)
class _Method:
    """What every call of one wrapped method shares."""

    kind: str  # a value of _KINDS
    path: str  # /package.Service/Method
    policy: Policy
    parse: Callable[[bytes], Any] | None  # the request parser of a single-request method
    health: bool  # a call to grpc.health.v1.Health, whose probe calls the access log may leave out


class _Call:
    """One call through a wrapped handler: a ``with`` block around all the handler does.

    Entering notes the call's start for the observer; :meth:`admit` passes
    the gate, reads the request and parses it; leaving lets the gate know the call is
    over and records how it ended (an exception included: an abort, a
    cancellation, the stream closed by the client), or, for an answer, once
    grpc has delivered it or found the caller gone.
    """

    __slots__ = ("_context", "_handlers", "_method", "_start", "_tracked", "undelivered")

    def __init__(self, handlers: Handlers, method: _Method, context: grpc.aio.ServicerContext) -> None:
        self._handlers = handlers
        self._method = method
        self._context = context
        self._start: CallStart | None = None
        self._tracked = False
        self.undelivered = False  # set when grpc reports it could not send the answer

    def __enter__(self) -> _Call:
        observer = self._handlers.observer
        if observer is not None:
            self._start = observer.begin(self._context, self._method.health)
            CURRENT_CALL.set(self)  # grpc logs a failed send from this same task: grpc_output finds us
        return self

    async def admit(self, requests: Any) -> Any:
        """Pass the gate (UNAVAILABLE once it is closed); then read and parse a single request (INVALID_ARGUMENT).

        ``requests`` is what grpcio handed the handler: the request iterator
        of a streaming method, returned as it is.
        """
        gate, policy, parse = self._handlers.gate, self._method.policy, self._method.parse
        if gate.holding:
            await gate.wait_if_held()  # the very end of a shutdown: answered once grpc's stop() has begun
        if policy.refuse and not gate.open:
            gate.refuse()
            await self._context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
        if policy.track:
            gate.enter()
            self._tracked = True
        if parse is None:
            return requests
        message = await self._handlers.requests.read(self._context)
        try:
            return parse(message)
        except Exception:
            await self._context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed {_message_name(parse)}")

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if self._tracked:
            self._handlers.gate.leave(self._method.policy.refuse)
        if self._handlers.observer is None or self._start is None:
            return
        code = code_of(self._context, error)
        if code is grpc.StatusCode.OK:
            # The answer is not delivered yet: record the call once grpc knows whether it was.
            self._context.add_done_callback(self._delivered)
        else:
            self._record(code)

    def _delivered(self, context: grpc.aio.ServicerContext) -> None:
        """Grpc has finished the call: CANCELLED if the caller left before the answer reached it."""
        gone = self.undelivered or context.cancelled()
        self._record(grpc.StatusCode.CANCELLED if gone else grpc.StatusCode.OK)

    def _record(self, code: grpc.StatusCode) -> None:
        observer, start = self._handlers.observer, self._start
        assert observer is not None and start is not None
        try:
            observer.finished(self._method.kind, self._method.path, start, code)
        except Exception:  # recording a call must never change its outcome
            _LOGGER.exception("recording a call to %s failed", self._method.path)


class Handlers:
    """Wraps handlers: their calls pass ``gate``, read their request through ``requests``, reach ``observer``."""

    def __init__(self, gate: Gate, observer: CallObserver | None, requests: RequestReader) -> None:
        self.gate = gate
        self.observer = observer
        self.requests = requests

    def wrap(self, handler: grpc.RpcMethodHandler, policy: Policy, path: str) -> grpc.RpcMethodHandler:
        """``handler`` of method ``path``, its behaviour wrapped (handlers are namedtuples)."""
        for attribute, kind in _KINDS.items():
            behaviour = getattr(handler, attribute)
            if behaviour is None:
                continue
            method = _Method(kind, path, policy, None if handler.request_streaming else handler.request_deserializer,
                             path.startswith(HEALTH_PREFIX))
            wrapped = self._wrapped(behaviour, method)
            if handler.request_streaming:
                return handler._replace(**{attribute: wrapped})
            # A single request is read by the handler itself (see requests.py): request-streaming on the wire.
            streaming = "stream_stream" if handler.response_streaming else "stream_unary"
            return handler._replace(request_streaming=True, request_deserializer=None,
                                    **{attribute: None, streaming: wrapped})
        return handler

    def _wrapped(self, behaviour: Any, method: _Method) -> Any:
        if inspect.isasyncgenfunction(behaviour):

            async def stream(requests: Any, context: grpc.aio.ServicerContext) -> Any:
                with _Call(self, method, context) as call:
                    request = await call.admit(requests)
                    async for response in behaviour(request, context):
                        yield response

            return stream
        if not inspect.iscoroutinefunction(behaviour):
            raise TypeError(f"{behaviour!r}: the asyncio server needs async handlers")

        async def unary(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            with _Call(self, method, context) as call:
                request = await call.admit(requests)
                return await behaviour(request, context)

        return unary

    def registrar(self, server: grpc.aio.Server, policy: Policy = Policy()) -> GatedRegistrar:
        """A stand-in for ``server`` that registers handlers wrapped under ``policy``."""
        return GatedRegistrar(server, self, policy)


def _message_name(parse: Callable[[bytes], Any]) -> str:
    """``petsage.smoke.v1.SmokeTestRequest`` for ``SmokeTestRequest.FromString``."""
    message_class = getattr(parse, "__self__", None)
    descriptor = getattr(message_class, "DESCRIPTOR", None)
    return getattr(descriptor, "full_name", "request")


class _GatedGenericHandler(grpc.GenericRpcHandler):
    """Delegates to a generic handler and wraps what it returns.

    Wrapped handlers are cached per known method; unknown method names are
    not cached, so a client inventing names cannot grow the cache.
    """

    def __init__(self, inner: grpc.GenericRpcHandler, handlers: Handlers, policy: Policy) -> None:
        self._inner = inner
        self._handlers = handlers
        self._policy = policy
        self._cache: dict[str, grpc.RpcMethodHandler] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        """The wrapped handler for the call's method, or None if the inner has none."""
        method = handler_call_details.method
        wrapped = self._cache.get(method)
        if wrapped is None:
            handler = self._inner.service(handler_call_details)
            if handler is None:
                return None
            wrapped = self._cache[method] = self._handlers.wrap(handler, self._policy, method)
        return wrapped


class GatedRegistrar:
    """Stands in for the server in generated ``add_*_to_server`` helpers.

    It wraps every handler it is given under ``policy``, then registers it
    with the real server, and notes the names of the services registered.
    """

    def __init__(self, server: grpc.aio.Server, handlers: Handlers, policy: Policy) -> None:
        self._server = server
        self._handlers = handlers
        self._policy = policy
        self.service_names: list[str] = []

    def _note(self, service_name: str | None) -> None:
        if service_name and service_name not in self.service_names:
            self.service_names.append(service_name)

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        """Wrap and register generic handlers."""
        for handler in handlers:
            # Handlers made by grpc.method_handlers_generic_handler know their service.
            name = getattr(handler, "service_name", None)
            self._note(name() if callable(name) else None)
        self._server.add_generic_rpc_handlers(
            tuple(_GatedGenericHandler(h, self._handlers, self._policy) for h in handlers)
        )

    def add_registered_method_handlers(self, service_name: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        """Wrap and register pre-registered method handlers."""
        self._note(service_name)
        self._server.add_registered_method_handlers(
            service_name,
            {name: self._handlers.wrap(h, self._policy, f"/{service_name}/{name}") for name, h in handlers.items()},
        )
