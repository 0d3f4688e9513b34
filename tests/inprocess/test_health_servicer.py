"""The grpc.health.v1 servicer (health/servicer.py) on a real in-process server: Check, Watch, List, drain."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from petsage_grpc.health.servicer import MAX_LIST_SERVICES, HealthServicer
from petsage_grpc.health.statuses import LIVENESS, NOT_SERVING, READINESS, SERVICE_UNKNOWN, SERVING
from tests.support.aio import run, serving

TIMEOUT = 5.0


def with_health(scenario: Callable[[HealthServicer, Any], Awaitable[Any]], max_watchers: int = 100) -> Any:
    """Run ``scenario(servicer, stub)`` against a HealthServicer served in-process."""

    async def served() -> Any:
        servicer = HealthServicer(max_watchers)
        async with serving(lambda server: health_pb2_grpc.add_HealthServicer_to_server(servicer, server)) as channel:
            return await scenario(servicer, health_pb2_grpc.HealthStub(channel))

    return run(served)


def request(service: str) -> health_pb2.HealthCheckRequest:
    return health_pb2.HealthCheckRequest(service=service)


async def next_status(watch: Any) -> int:
    answer = await watch.read()
    assert answer is not grpc.aio.EOF, await watch.code()
    return int(answer.status)


async def error_of(call: Awaitable[Any]) -> tuple[grpc.StatusCode, str]:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    raise AssertionError("the call succeeded")


def test_check_answers_the_published_status_and_not_found_for_an_unknown_name() -> None:
    async def scenario(servicer: HealthServicer, stub: Any) -> tuple[int, tuple[grpc.StatusCode, str]]:
        servicer.set(READINESS, SERVING)
        answer = await stub.Check(request(READINESS), timeout=TIMEOUT)
        return answer.status, await error_of(stub.Check(request("nope"), timeout=TIMEOUT))

    assert with_health(scenario) == (SERVING, (grpc.StatusCode.NOT_FOUND, "unknown service"))


def test_watch_sends_the_current_status_then_only_changes() -> None:
    async def scenario(servicer: HealthServicer, stub: Any) -> list[int]:
        servicer.set(READINESS, SERVING)
        watch = stub.Watch(request(READINESS), timeout=TIMEOUT)
        seen = [await next_status(watch)]
        servicer.set(READINESS, SERVING, "again")  # no change: nothing sent
        servicer.set(READINESS, NOT_SERVING, "down")
        seen.append(await next_status(watch))
        servicer.set(READINESS, SERVING, "up")
        seen.append(await next_status(watch))
        watch.cancel()
        return seen

    assert with_health(scenario) == [SERVING, NOT_SERVING, SERVING]


def test_watch_of_an_unknown_name_says_so_and_stays_open_until_the_name_appears() -> None:
    async def scenario(servicer: HealthServicer, stub: Any) -> list[int]:
        watch = stub.Watch(request("orders"), timeout=TIMEOUT)
        seen = [await next_status(watch)]
        servicer.set("orders", SERVING)
        seen.append(await next_status(watch))
        watch.cancel()
        return seen

    assert with_health(scenario) == [SERVICE_UNKNOWN, SERVING]


def test_watchers_past_the_cap_are_refused_and_a_freed_slot_is_taken_again() -> None:
    async def scenario(servicer: HealthServicer, stub: Any) -> tuple[tuple[grpc.StatusCode, str], int]:
        servicer.set(READINESS, SERVING)
        watches = [stub.Watch(request(READINESS), timeout=TIMEOUT) for _ in range(3)]
        for watch in watches:
            await next_status(watch)
        refused = await error_of(stub.Watch(request(READINESS), timeout=TIMEOUT).read())
        watches[0].cancel()
        while servicer.watchers == 3:  # the server hears of the cancellation a moment later
            await asyncio.sleep(0.01)
        again = stub.Watch(request(READINESS), timeout=TIMEOUT)
        status = await next_status(again)
        for watch in [*watches, again]:
            watch.cancel()
        return refused, status

    assert with_health(scenario, max_watchers=3) == (
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "too many watchers (limit 3)"), SERVING)


def test_list_answers_every_name_with_its_status_up_to_its_limit() -> None:
    async def scenario(servicer: HealthServicer, stub: Any) -> tuple[dict[str, int], tuple[grpc.StatusCode, str]]:
        servicer.set(READINESS, NOT_SERVING)
        servicer.set(LIVENESS, SERVING)
        answer = await stub.List(health_pb2.HealthListRequest(), timeout=TIMEOUT)
        listed = {name: entry.status for name, entry in answer.statuses.items()}
        for number in range(MAX_LIST_SERVICES):
            servicer.set(f"service-{number}", SERVING)
        return listed, await error_of(stub.List(health_pb2.HealthListRequest(), timeout=TIMEOUT))

    listed, refused = with_health(scenario)
    assert listed == {READINESS: NOT_SERVING, LIVENESS: SERVING}
    assert refused == (grpc.StatusCode.RESOURCE_EXHAUSTED,
                       f"server health list exceeds maximum capacity: {MAX_LIST_SERVICES}")


def test_drain_turns_every_status_but_liveness_not_serving_for_good() -> None:
    async def scenario(servicer: HealthServicer, stub: Any) -> dict[str, int]:
        for name in ("", READINESS, LIVENESS, "orders"):
            servicer.set(name, SERVING)
        servicer.drain()
        servicer.set(READINESS, SERVING, "a check passed")  # ignored from now on
        servicer.set("new", SERVING)  # so is a name that appears late
        servicer.set(LIVENESS, NOT_SERVING, "event loop stalled")  # liveness still follows the watchdog
        answer = await stub.List(health_pb2.HealthListRequest(), timeout=TIMEOUT)
        return {name: entry.status for name, entry in answer.statuses.items()}

    assert with_health(scenario) == {"": NOT_SERVING, READINESS: NOT_SERVING, "orders": NOT_SERVING,
                                     LIVENESS: NOT_SERVING}


def test_ending_watches_closes_open_streams_unavailable_and_new_ones_after_their_first_answer() -> None:
    async def scenario(servicer: HealthServicer, stub: Any) -> list[Any]:
        servicer.set(READINESS, SERVING)
        open_watch = stub.Watch(request(READINESS), timeout=TIMEOUT)
        await next_status(open_watch)
        servicer.drain()
        drained = await next_status(open_watch)
        servicer.end_watches()
        ended = await error_of(open_watch.read())
        late = stub.Watch(request(READINESS), timeout=TIMEOUT)
        return [drained, ended, await next_status(late), await error_of(late.read()), servicer.watchers]

    unavailable = (grpc.StatusCode.UNAVAILABLE, "server is shutting down; reconnect elsewhere")
    assert with_health(scenario) == [NOT_SERVING, unavailable, NOT_SERVING, unavailable, 0]


def test_a_status_set_from_another_thread_is_answered_at_once_and_wakes_watchers() -> None:
    async def scenario(servicer: HealthServicer, stub: Any) -> tuple[int, int]:
        servicer.set(LIVENESS, SERVING)
        watch = stub.Watch(request(LIVENESS), timeout=TIMEOUT)
        await next_status(watch)
        await asyncio.to_thread(servicer.set_threadsafe, LIVENESS, NOT_SERVING, "stalled")
        checked = (await stub.Check(request(LIVENESS), timeout=TIMEOUT)).status
        watched = await next_status(watch)
        watch.cancel()
        return checked, watched

    assert with_health(scenario) == (NOT_SERVING, NOT_SERVING)


def test_change_listeners_hear_each_change_with_the_old_and_new_status() -> None:
    async def scenario(servicer: HealthServicer, stub: Any) -> list[tuple[str, int | None, int]]:
        heard: list[tuple[str, int | None, int]] = []
        servicer.change_listeners.append(lambda service, old, new: heard.append((service, old, new)))
        servicer.set(READINESS, SERVING)
        servicer.set(READINESS, SERVING)
        servicer.set(READINESS, NOT_SERVING)
        return heard

    assert with_health(scenario) == [(READINESS, None, SERVING), (READINESS, SERVING, NOT_SERVING)]
