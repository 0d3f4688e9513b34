"""Handler wrapping (server/handlers.py) on a real in-process grpc.aio server: gate, parsing, recording."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2

from petsage_grpc.logs.records import FIELDS_ATTR
from petsage_grpc.server.access import ACCESS_LOGGER, CallObserver
from petsage_grpc.server.gate import Gate
from petsage_grpc.server.handlers import SHUTTING_DOWN, Handlers, Policy
from tests.support.aio import run, serving

CHECK = "/grpc.health.v1.Health/Check"
TIMEOUT = 5.0


class HeldCheck:
    """A Health/Check handler answering SERVING, each call only once ``release`` is set."""

    def __init__(self) -> None:
        self.arrived = asyncio.Event()
        self.release = asyncio.Event()
        self.release.set()

    async def check(self, request: health_pb2.HealthCheckRequest, context: Any) -> health_pb2.HealthCheckResponse:
        self.arrived.set()
        await self.release.wait()
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


def registered(handler: HeldCheck, gate: Gate, policy: Policy,
               observer: CallObserver | None = None) -> Callable[[grpc.aio.Server], None]:
    """Register ``handler`` through the wrapping registrar, as the server registers every service."""
    method = grpc.unary_unary_rpc_method_handler(
        handler.check, request_deserializer=health_pb2.HealthCheckRequest.FromString,
        response_serializer=health_pb2.HealthCheckResponse.SerializeToString,
    )

    def register(server: grpc.aio.Server) -> None:
        registrar = Handlers(gate, observer).registrar(server, policy)
        registrar.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("grpc.health.v1.Health",
                                                                                 {"Check": method})])

    return register


def check(channel: grpc.aio.Channel, request: bytes = b"") -> grpc.aio.UnaryUnaryCall:
    """A Check call with raw request bytes."""
    method = channel.unary_unary(CHECK, request_serializer=None, response_deserializer=None)
    return method(request, timeout=TIMEOUT)


async def outcome(call: grpc.aio.UnaryUnaryCall) -> tuple[grpc.StatusCode, str]:
    """The call's code and details, once it has ended."""
    try:
        await call
    except grpc.aio.AioRpcError:
        pass
    return await call.code(), await call.details() or ""


def test_calls_after_the_gate_closes_are_refused_unavailable_and_counted() -> None:
    gate = Gate()

    async def scenario() -> list[tuple[grpc.StatusCode, str]]:
        async with serving(registered(HeldCheck(), gate, Policy())) as channel:
            before = await outcome(check(channel))
            gate.close()
            return [before, await outcome(check(channel)), await outcome(check(channel))]

    assert run(scenario) == [(grpc.StatusCode.OK, "")] + [(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)] * 2
    assert gate.refused == 2


def test_a_service_that_is_never_refused_keeps_answering_after_close() -> None:
    gate = Gate()

    async def scenario() -> tuple[grpc.StatusCode, str]:
        async with serving(registered(HeldCheck(), gate, Policy(refuse=False))) as channel:
            gate.close()
            return await outcome(check(channel))

    assert run(scenario) == (grpc.StatusCode.OK, "")
    assert gate.refused == 0


def test_malformed_request_bytes_get_invalid_argument_naming_the_message() -> None:
    gate = Gate()

    async def scenario() -> tuple[grpc.StatusCode, str]:
        async with serving(registered(HeldCheck(), gate, Policy())) as channel:
            return await outcome(check(channel, b"\x0a\x05ab"))  # a string field promising 5 bytes, holding 2

    assert run(scenario) == (grpc.StatusCode.INVALID_ARGUMENT, "malformed grpc.health.v1.HealthCheckRequest")
    assert gate.in_flight == 0


def test_a_call_counts_in_flight_until_its_handler_returns() -> None:
    gate, servicer = Gate(), HeldCheck()

    async def scenario() -> tuple[int, bool, int]:
        servicer.release.clear()
        async with serving(registered(servicer, gate, Policy())) as channel:
            call = check(channel)
            await servicer.arrived.wait()
            held = gate.in_flight
            idle_while_held = await gate.wait_idle(0.01)
            servicer.release.set()
            await call
            return held, idle_while_held, gate.in_flight

    assert run(scenario) == (1, False, 0)


def test_an_untracked_service_never_counts_in_flight() -> None:
    gate, servicer = Gate(), HeldCheck()

    async def scenario() -> int:
        servicer.release.clear()
        async with serving(registered(servicer, gate, Policy(track=False))) as channel:
            call = check(channel)
            await servicer.arrived.wait()
            held = gate.in_flight
            servicer.release.set()
            await call
            return held

    assert run(scenario) == 0


def test_the_observer_hears_of_every_call_with_its_method_and_code(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, ACCESS_LOGGER)  # the access log follows its logger's level
    records: list[logging.LogRecord] = []
    observer = CallObserver(access_log=True, log_probes=False, metrics=None, enqueue=records.append)
    gate = Gate()

    async def scenario() -> None:
        async with serving(registered(HeldCheck(), gate, Policy(), observer)) as channel:
            await outcome(check(channel))
            await outcome(check(channel, b"\xff"))
            gate.close()
            await outcome(check(channel))

    run(scenario)
    fields = [getattr(record, FIELDS_ATTR) for record in records]
    assert [(f["method"], f["code"]) for f in fields] == [
        (CHECK, "OK"), (CHECK, "INVALID_ARGUMENT"), (CHECK, "UNAVAILABLE"),
    ]
    assert all(f["peer"].startswith("ipv4:127.0.0.1:") for f in fields)
