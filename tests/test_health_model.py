"""The health model over the wire: checks, liveness, Watch fan-out and List, on an embedding service."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
from collections.abc import Callable

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from petsage_grpc._proto.smoke.v1 import smoke_pb2
from tests.programs.watch_crowd import watching
from tests.support import NOT_SERVING, ROOT, RPC_TIMEOUT, SERVICE_UNKNOWN, SERVING, App, LineLog, ServerProcess

BUILT_IN = ("", "liveness", "readiness", "petsage.smoke.v1.SmokeTestService")


def test_checks_of_an_embedding_service_appear_in_order_and_pass(app: App) -> None:
    response = app.server.smoke()

    assert [(c.name, c.critical) for c in response.checks] == [
        ("logging", True), ("event_loop", True), ("grpc_connections", False), ("database", True), ("cache", False),
        ("wrapped", False), ("legacy", False), ("publisher", False),
    ]
    assert response.status == smoke_pb2.STATUS_OK
    assert app.check_result("legacy").detail == "legacy answers"
    assert app.check_result("wrapped").detail == "wrapped answers"  # a lambda returning a coroutine is awaited


def test_statuses_are_published_once_every_check_has_run(app: App) -> None:
    lines = app.server.stdout.lines
    first_status = next(i for i, line in enumerate(lines) if "health status of 'readiness'" in line)
    passing = [i for i, line in enumerate(lines) if " is passing: " in line]

    assert len(passing) == 8 and max(passing) < first_status
    assert "UNKNOWN -> SERVING" in lines[first_status]


def test_health_check_stays_fast_while_checks_hang(app: App) -> None:
    app.steer("cache", "hang")
    app.steer("legacy", "hang")
    app.server.stdout.wait_for("check cache is failing: timed out after 0.5s")
    app.server.stdout.wait_for("check legacy is failing: ")

    for _ in range(50):  # each answer well inside a deadline shorter than the hanging checks' timeout
        assert app.server.health("readiness", timeout=0.4) == SERVING
    # The hung thread is not joined by another one on the following runs.
    deadline = time.monotonic() + 5
    while not app.check_result("legacy").detail.startswith("previous run still running after "):
        assert time.monotonic() < deadline, app.check_result("legacy")


@pytest.mark.parametrize(
    ("command", "detail"), [("raise connection refused", "connection refused"), ("hang", "timed out after 0.5s")]
)
def test_failing_critical_check_turns_readiness_not_serving_and_back(app: App, command: str, detail: str) -> None:
    watch = app.watch("readiness")
    assert next(watch).status == SERVING

    app.steer("database", command)
    assert next(watch).status == NOT_SERVING
    response = app.server.smoke()
    assert response.status == smoke_pb2.STATUS_FAILING
    assert response.message == "PetSage services are failing: database."
    assert app.check_result("database").detail == detail
    assert app.server.health("") == NOT_SERVING
    assert app.server.health("liveness") == SERVING

    app.steer("database", "ok")
    assert next(watch).status == SERVING  # only changes are sent: no repeated NOT_SERVING before it
    assert app.server.smoke().status == smoke_pb2.STATUS_OK
    watch.cancel()


@pytest.mark.parametrize(
    ("check", "command", "detail"),
    [("cache", "raise quota exceeded", "quota exceeded"), ("legacy", "raise quota exceeded", "quota exceeded"),
     ("wrapped", "raise quota exceeded", "quota exceeded"),
     ("cache", "cancelled", "cancelled inside the check"),
     ("cache", "number", "returned int; a check returns a str or None")],
)
def test_failing_non_critical_check_degrades_smoke_test_but_not_readiness(
    app: App, check: str, command: str, detail: str
) -> None:
    app.steer(check, command)
    app.server.stdout.wait_for(f"check {check} is failing: {re.escape(detail)}")

    response = app.server.smoke()
    assert response.status == smoke_pb2.STATUS_DEGRADED
    assert response.message == "PetSage services are running; some non-critical checks are failing."
    assert app.check_result(check).status == smoke_pb2.STATUS_FAILING
    assert [app.server.health(s) for s in BUILT_IN] == [SERVING] * 4

    mark = app.server.stdout.mark()
    app.steer(check, "ok")
    app.server.stdout.wait_for(f"check {check} is passing: {check} answers", start=mark)
    response = app.server.smoke()
    assert response.status == smoke_pb2.STATUS_OK, [(c.name, c.detail) for c in response.checks]


def test_status_change_is_logged_once_with_old_and_new_status_and_reason(app: App) -> None:
    app.steer("database", "raise disk quota")
    app.server.stdout.wait_for("health status of 'readiness': SERVING -> NOT_SERVING")
    app.steer("database", "ok")
    app.server.stdout.wait_for("health status of 'readiness': NOT_SERVING -> SERVING")

    changes = [line for line in app.server.stdout.lines if "health status of 'readiness': SERVING -> NOT" in line]
    assert len(changes) == 1  # the check failed on many runs; the change is logged once
    assert changes[0].endswith("(check database failing: disk quota)")


def test_liveness_turns_not_serving_while_the_event_loop_is_blocked(start_app: Callable[..., App]) -> None:
    app = start_app("--stall-limit", "0.5")
    watch = app.watch("liveness")
    assert next(watch).status == SERVING

    app.steer("database", "block 3")  # a blocking call inside an async check stalls the whole loop
    app.server.stdout.wait_for("event loop has not run for")
    # Answered once the loop moves again, from the verdict the watchdog thread gave meanwhile.
    assert app.server.health("liveness", timeout=10) == NOT_SERVING
    assert next(watch).status == NOT_SERVING
    assert next(watch).status == SERVING  # after the loop has kept time for the stall limit again
    assert "in steered" in app.server.stdout.text()  # the log shows where the loop was stuck
    assert app.server.smoke().status == smoke_pb2.STATUS_OK
    watch.cancel()


def test_watch_unknown_name_answers_service_unknown_until_it_appears(app: App) -> None:
    watch = app.watch("orders.v1.OrderService")
    assert next(watch).status == SERVICE_UNKNOWN

    app.steer("publish", "orders.v1.OrderService")

    assert next(watch).status == SERVING
    watch.cancel()


def test_thousand_watchers_all_see_a_change(app: App) -> None:
    async def scenario() -> list[int]:
        async with watching(app.server.address, "readiness", 1000) as crowd:
            assert crowd.first == [SERVING] * 1000
            app.steer("database", "raise down")
            return await crowd.next_statuses(timeout=20)

    assert asyncio.run(scenario()) == [NOT_SERVING] * 1000


def test_burst_of_three_thousand_watchers_is_admitted_at_once(server: ServerProcess) -> None:
    async def scenario() -> list[int]:
        # Every watcher of a fleet reconnecting together: grpc's own default would cancel most of them.
        async with watching(server.address, "readiness", 3000, batch=3000) as crowd:
            return crowd.first

    assert asyncio.run(scenario()) == [SERVING] * 3000


def _open_until_admitted(address: str, count: int, expect: int, timeout: float = 20) -> None:
    """Open ``count`` more watchers, retrying refusals while the server releases old ones."""

    async def scenario() -> None:
        async with asyncio.timeout(timeout):
            while True:
                try:
                    async with watching(address, "readiness", count) as crowd:
                        assert crowd.first == [expect] * count
                        return
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc

    asyncio.run(scenario())


def test_thousand_watchers_cancelling_during_a_change_leave_the_server_healthy(
    start_app: Callable[..., App],
) -> None:
    app = start_app("--max-watchers", "1000")

    async def storm() -> None:
        async with watching(app.server.address, "readiness", 1000) as crowd:
            app.steer("database", "raise down")
            assert (await crowd.calls[0].read()).status == NOT_SERVING
            crowd.cancel()  # while the server is sending the change to the other 999

    asyncio.run(storm())

    assert app.server.health("readiness") == NOT_SERVING
    _open_until_admitted(app.server.address, 1000, NOT_SERVING)  # every cancelled stream was released
    app.steer("database", "ok")
    app.server.wait_for_health("readiness", SERVING)


def test_disconnect_storm_does_not_stall_the_other_watchers(app: App) -> None:
    crowd_process = subprocess.Popen(
        [sys.executable, "-m", "tests.programs.watch_crowd", app.server.address, "readiness", "500"],
        stdout=subprocess.PIPE, cwd=ROOT,
    )
    try:
        LineLog(crowd_process.stdout).wait_for("watching 500")

        async def scenario() -> list[int]:
            async with watching(app.server.address, "readiness", 100) as crowd:
                crowd_process.kill()  # 500 streams vanish with their connections...
                app.steer("database", "raise down")  # ...while the change goes out
                return await crowd.next_statuses(timeout=20)

        assert asyncio.run(scenario()) == [NOT_SERVING] * 100
    finally:
        crowd_process.kill()
        crowd_process.wait(RPC_TIMEOUT)


def test_watcher_cap_refuses_the_next_stream_until_one_ends(start_app: Callable[..., App]) -> None:
    app = start_app("--max-watchers", "3")
    watches = [app.watch("readiness") for _ in range(3)]
    for watch in watches:
        assert next(watch).status == SERVING

    with pytest.raises(grpc.RpcError) as caught:
        next(app.watch("readiness"))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert caught.value.details() == "too many watchers (limit 3)"

    watches[0].cancel()
    _open_until_admitted(app.server.address, 1, SERVING)
    for watch in watches[1:]:
        watch.cancel()


def test_list_returns_every_name_and_status(app: App) -> None:
    app.steer("publish", "orders.v1.OrderService")
    app.steer("database", "raise down")
    app.server.wait_for_health("orders.v1.OrderService", SERVING)
    app.server.wait_for_health("readiness", NOT_SERVING)
    stub = health_pb2_grpc.HealthStub(app.server.channel())

    answer = stub.List(health_pb2.HealthListRequest(), timeout=RPC_TIMEOUT)

    assert {name: s.status for name, s in answer.statuses.items()} == {
        "": NOT_SERVING, "readiness": NOT_SERVING, "liveness": SERVING,
        "petsage.smoke.v1.SmokeTestService": SERVING, "orders.v1.OrderService": SERVING,
    }


def test_list_is_refused_past_a_hundred_names(app: App) -> None:
    stub = health_pb2_grpc.HealthStub(app.server.channel())
    names = [f"svc{i:03}" for i in range(97)]
    app.steer("publish", "\n".join(names[:96]))  # 4 built-in names + 96 = 100: still listed
    app.server.wait_for_health(names[95], SERVING)
    assert len(stub.List(health_pb2.HealthListRequest(), timeout=RPC_TIMEOUT).statuses) == 100

    app.steer("publish", "\n".join(names))
    app.server.wait_for_health(names[96], SERVING)

    with pytest.raises(grpc.RpcError) as caught:
        stub.List(health_pb2.HealthListRequest(), timeout=RPC_TIMEOUT)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert caught.value.details() == "server health list exceeds maximum capacity: 100"
    assert app.server.health("svc096") == SERVING
