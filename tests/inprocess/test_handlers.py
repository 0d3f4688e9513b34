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
from petsage_grpc.server.requests import NO_MESSAGE, RequestReader
from tests.support.aio import run, serving

CHECK = "/grpc.health.v1.Health/Check"
TIMEOUT = 5.0
#: How long a call may take to send its request, and how many may wait for theirs at once.
READ_TIMEOUT = 0.2
WAITING = 3


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


def registered(handler: HeldCheck, gate: Gate, policy: Policy, observer: CallObserver | None = None,
               reader: RequestReader | None = None) -> Callable[[grpc.aio.Server], None]:
    """Register ``handler`` through the wrapping registrar, as the server registers every service."""
    method = grpc.unary_unary_rpc_method_handler(
        handler.check, request_deserializer=health_pb2.HealthCheckRequest.FromString,
        response_serializer=health_pb2.HealthCheckResponse.SerializeToString,
    )

    def register(server: grpc.aio.Server) -> None:
        requests = reader or RequestReader(READ_TIMEOUT, WAITING)
        registrar = Handlers(gate, observer, requests).registrar(server, policy)
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


def held_back(channel: grpc.aio.Channel) -> tuple[grpc.aio.StreamUnaryCall, asyncio.Event]:
    """A Check call that sends its headers, then its message only once the returned event is set."""
    send = asyncio.Event()

    async def requests() -> Any:
        await send.wait()
        yield b""

    method = channel.stream_unary(CHECK, request_serializer=None, response_deserializer=None)
    return method(requests(), timeout=TIMEOUT), send


def test_a_stream_that_ends_without_a_request_message_gets_invalid_argument_at_once() -> None:
    gate = Gate()

    async def scenario() -> tuple[grpc.StatusCode, str]:
        async with serving(registered(HeldCheck(), gate, Policy())) as channel:
            method = channel.stream_unary(CHECK, request_serializer=None, response_deserializer=None)
            return await outcome(method(iter(()), timeout=TIMEOUT))

    assert run(scenario) == (grpc.StatusCode.INVALID_ARGUMENT, NO_MESSAGE)
    assert gate.in_flight == 0


def test_a_request_message_that_never_comes_ends_the_call_at_the_read_deadline_counted_meanwhile() -> None:
    gate = Gate()

    async def scenario() -> tuple[int, tuple[grpc.StatusCode, str]]:
        async with serving(registered(HeldCheck(), gate, Policy())) as channel:
            call, _ = held_back(channel)
            while gate.in_flight == 0:  # the handler runs from the call's start: the call is counted
                await asyncio.sleep(0.01)
            return gate.in_flight, await outcome(call)

    counted, ended = run(scenario)
    assert counted == 1
    assert ended == (grpc.StatusCode.DEADLINE_EXCEEDED, f"request message not received within {READ_TIMEOUT:g}s")
    assert gate.in_flight == 0


def test_past_the_cap_of_waiting_calls_the_oldest_is_ended_and_real_requests_go_through() -> None:
    reader = RequestReader(READ_TIMEOUT, WAITING)

    async def scenario() -> list[tuple[grpc.StatusCode, str]]:
        async with serving(registered(HeldCheck(), Gate(), Policy(), reader=reader)) as channel:
            waiting = [held_back(channel)[0] for _ in range(WAITING)]
            while reader.waiting < WAITING:  # until all three wait in their handlers
                await asyncio.sleep(0.005)
            answered = await outcome(check(channel))  # a real request: the oldest waiting call makes room
            return [answered, *[await outcome(call) for call in waiting]]

    answered, *waited = run(scenario)
    assert answered == (grpc.StatusCode.OK, "")
    evicted = (grpc.StatusCode.RESOURCE_EXHAUSTED,
               f"too many calls waiting for their request message (limit {WAITING})")
    assert waited.count(evicted) == 1  # the one that began first (grpc starts handlers in its own order)
    assert {answer[0] for answer in waited if answer != evicted} == {grpc.StatusCode.DEADLINE_EXCEEDED}
    assert (reader.counts.evicted, reader.counts.timed_out) == (1, WAITING - 1)
