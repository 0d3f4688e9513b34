"""Typed clients of a PetSage server: :class:`Client` (blocking) and :class:`AsyncClient` (asyncio).

Each holds one channel, reused by every call, and is closed by ``with`` (or
``async with``).  Every call has a deadline (:data:`DEFAULT_TIMEOUT`, or
:data:`DEFAULT_WATCH_TIMEOUT` for a watch); results are plain values: enums,
``datetime``/``timedelta`` and frozen dataclasses, never protobuf messages.
Every failed call raises :class:`ClientError`, which carries the
``grpc.StatusCode``::

    with Client("localhost:50051") as client:
        if client.check("readiness") is ServingStatus.SERVING:
            print(client.smoke().message)

It depends only on grpc, the generated code and :mod:`petsage_grpc.tls`.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
from grpc_health.v1 import health_pb2 as _health_pb2
from grpc_health.v1 import health_pb2_grpc as _health_pb2_grpc

from petsage_grpc._proto.smoke.v1 import smoke_pb2 as _smoke_pb2
from petsage_grpc._proto.smoke.v1 import smoke_pb2_grpc as _smoke_pb2_grpc
from petsage_grpc.tls import ClientTLS

__all__ = [
    "DEFAULT_TIMEOUT", "DEFAULT_WATCH_TIMEOUT", "AsyncClient", "CheckResult", "Client", "ClientError",
    "ClientTLS", "ServerInfo", "ServingStatus", "SmokeResult", "SmokeStatus",
]

#: Deadline, in seconds, of each call that does not name its own.
DEFAULT_TIMEOUT = 5.0
#: Deadline of a watch: it ends with ClientError(DEADLINE_EXCEEDED) after this many seconds.
DEFAULT_WATCH_TIMEOUT = 3600.0


class ServingStatus(enum.Enum):
    """A ``grpc.health.v1`` serving status."""

    UNKNOWN = _health_pb2.HealthCheckResponse.UNKNOWN
    SERVING = _health_pb2.HealthCheckResponse.SERVING
    NOT_SERVING = _health_pb2.HealthCheckResponse.NOT_SERVING
    SERVICE_UNKNOWN = _health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class SmokeStatus(enum.Enum):
    """The result of a smoke test or of one of its checks."""

    UNSPECIFIED = _smoke_pb2.STATUS_UNSPECIFIED
    OK = _smoke_pb2.STATUS_OK
    DEGRADED = _smoke_pb2.STATUS_DEGRADED
    FAILING = _smoke_pb2.STATUS_FAILING


@dataclass(frozen=True)
class CheckResult:
    """One check run by a smoke test (e.g. ``logging``)."""

    name: str
    status: SmokeStatus
    detail: str
    duration: timedelta
    critical: bool


@dataclass(frozen=True)
class ServerInfo:
    """The server process that answered."""

    version: str
    instance_id: str
    start_time: datetime


@dataclass(frozen=True)
class SmokeResult:
    """A SmokeTest answer; ``timestamp`` and ``server.start_time`` are aware UTC datetimes.

    A server run with ``--smoke-details status`` answers no checks and no
    server: ``checks`` is then empty and ``server`` None.
    """

    status: SmokeStatus
    message: str
    timestamp: datetime
    checks: tuple[CheckResult, ...]
    server: ServerInfo | None

    @property
    def ok(self) -> bool:
        """Whether the status is :attr:`SmokeStatus.OK`."""
        return self.status is SmokeStatus.OK


class ClientError(Exception):
    """A call failed: ``code`` is its ``grpc.StatusCode``, ``details`` the server's (or grpc's) message.

    ``UNAVAILABLE``: the server cannot be reached (or is shutting down);
    ``DEADLINE_EXCEEDED``: no answer within the deadline; ``NOT_FOUND``: an
    unknown health service name.
    """

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> ClientError:
        """The :class:`ClientError` for a grpc error (sync or asyncio)."""
        return cls(error.code(), error.details() or "")


def _smoke_result(answer: _smoke_pb2.SmokeTestResponse) -> SmokeResult:
    checks = tuple(
        CheckResult(check.name, SmokeStatus(check.status), check.detail, check.duration.ToTimedelta(), check.critical)
        for check in answer.checks
    )
    server = (ServerInfo(answer.server.version, answer.server.instance_id,
                         answer.server.start_time.ToDatetime(tzinfo=UTC))
              if answer.HasField("server") else None)
    return SmokeResult(SmokeStatus(answer.status), answer.message, answer.timestamp.ToDatetime(tzinfo=UTC),
                       checks, server)


def _statuses(answer: _health_pb2.HealthListResponse) -> dict[str, ServingStatus]:
    return {name: ServingStatus(entry.status) for name, entry in sorted(answer.statuses.items())}


def _options(tls: ClientTLS | None,
             options: Sequence[tuple[str, Any]]) -> tuple[grpc.ChannelCredentials | None, list[tuple[str, Any]]]:
    if tls is None:
        return None, list(options)
    return tls.credentials(), [*tls.channel_options(), *options]


class Client:
    """Blocking client over one channel to ``address`` (``HOST:PORT``); plaintext unless ``tls`` is given.

    Raises :class:`~petsage_grpc.tls.TLSError` at once if a TLS file is
    unusable; connecting is lazy (the first call connects).
    """

    def __init__(self, address: str, *, tls: ClientTLS | None = None, timeout: float = DEFAULT_TIMEOUT,
                 options: Sequence[tuple[str, Any]] = ()) -> None:
        credentials, channel_options = _options(tls, options)
        self._channel = (grpc.insecure_channel(address, options=channel_options) if credentials is None
                         else grpc.secure_channel(address, credentials, options=channel_options))
        self._timeout = timeout
        self._health = _health_pb2_grpc.HealthStub(self._channel)
        self._smoke = _smoke_pb2_grpc.SmokeTestServiceStub(self._channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel; calls in flight end with CANCELLED."""
        self._channel.close()

    def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return method(request, timeout=self._timeout if timeout is None else timeout)
        except grpc.RpcError as exc:
            raise ClientError.from_rpc_error(exc) from None

    def smoke(self, *, timeout: float | None = None) -> SmokeResult:
        """Run the server's smoke test (its logging check included) and return the result."""
        return _smoke_result(self._call(self._smoke.SmokeTest, _smoke_pb2.SmokeTestRequest(), timeout))

    def check(self, service: str = "", *, timeout: float | None = None) -> ServingStatus:
        """The health status of ``service`` (``""``: the whole server); NOT_FOUND for an unknown name."""
        answer = self._call(self._health.Check, _health_pb2.HealthCheckRequest(service=service), timeout)
        return ServingStatus(answer.status)

    def list(self, *, timeout: float | None = None) -> dict[str, ServingStatus]:
        """Every service the server reports, with its status, sorted by name."""
        return _statuses(self._call(self._health.List, _health_pb2.HealthListRequest(), timeout))

    def watch(self, service: str = "", *, timeout: float = DEFAULT_WATCH_TIMEOUT) -> Iterator[ServingStatus]:
        """The status of ``service`` now, then each change; leaving the loop cancels the stream.

        An unknown name yields SERVICE_UNKNOWN and keeps watching.  The stream
        ends with :class:`ClientError` (UNAVAILABLE when the server shuts
        down, DEADLINE_EXCEEDED after ``timeout`` seconds).
        """
        stream = self._health.Watch(_health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        try:
            for answer in stream:
                yield ServingStatus(answer.status)
        except grpc.RpcError as exc:
            raise ClientError.from_rpc_error(exc) from None
        finally:
            stream.cancel()


class AsyncClient:
    """The asyncio flavour of :class:`Client`: the same calls, awaited; ``watch`` is an async iterator.

    Create it where an event loop runs; close it with ``async with`` or
    :meth:`close`.
    """

    def __init__(self, address: str, *, tls: ClientTLS | None = None, timeout: float = DEFAULT_TIMEOUT,
                 options: Sequence[tuple[str, Any]] = ()) -> None:
        credentials, channel_options = _options(tls, options)
        self._channel = (grpc.aio.insecure_channel(address, options=channel_options) if credentials is None
                         else grpc.aio.secure_channel(address, credentials, options=channel_options))
        self._timeout = timeout
        self._health = _health_pb2_grpc.HealthStub(self._channel)
        self._smoke = _smoke_pb2_grpc.SmokeTestServiceStub(self._channel)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel; calls in flight end with CANCELLED."""
        await self._channel.close()

    async def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return await method(request, timeout=self._timeout if timeout is None else timeout)
        except grpc.RpcError as exc:  # grpc.aio.AioRpcError is one
            raise ClientError.from_rpc_error(exc) from None

    async def smoke(self, *, timeout: float | None = None) -> SmokeResult:
        """Run the server's smoke test and return the result."""
        return _smoke_result(await self._call(self._smoke.SmokeTest, _smoke_pb2.SmokeTestRequest(), timeout))

    async def check(self, service: str = "", *, timeout: float | None = None) -> ServingStatus:
        """The health status of ``service``; NOT_FOUND for an unknown name."""
        answer = await self._call(self._health.Check, _health_pb2.HealthCheckRequest(service=service), timeout)
        return ServingStatus(answer.status)

    async def list(self, *, timeout: float | None = None) -> dict[str, ServingStatus]:
        """Every service the server reports, with its status, sorted by name."""
        return _statuses(await self._call(self._health.List, _health_pb2.HealthListRequest(), timeout))

    async def watch(self, service: str = "", *,
                    timeout: float = DEFAULT_WATCH_TIMEOUT) -> AsyncIterator[ServingStatus]:
        """The status of ``service`` now, then each change, as :meth:`Client.watch`."""
        stream = self._health.Watch(_health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        try:
            async for answer in stream:
                yield ServingStatus(answer.status)
        except grpc.RpcError as exc:
            raise ClientError.from_rpc_error(exc) from None
        finally:
            stream.cancel()
