"""The shutdown gate (server/gate.py), driven directly: calls in flight, refusals, and waiting for quiet."""

from __future__ import annotations

import asyncio
import time

from petsage_grpc.server.gate import Gate
from tests.support.aio import run

QUIET = 0.05


def test_wait_idle_returns_at_once_when_no_call_is_in_flight() -> None:
    async def scenario() -> bool:
        return await Gate().wait_idle(0)

    assert run(scenario) is True


def test_wait_idle_returns_when_the_last_call_in_flight_leaves() -> None:
    async def scenario() -> tuple[bool, bool, bool, int]:
        gate = Gate()
        gate.enter()
        gate.enter()
        waiting = asyncio.ensure_future(gate.wait_idle(5))
        await asyncio.sleep(0)
        gate.leave(refusable=True)
        await asyncio.sleep(0)
        after_one = waiting.done()
        gate.leave(refusable=True)
        return after_one, await waiting, gate.open, gate.in_flight

    assert run(scenario) == (False, True, True, 0)


def test_wait_idle_gives_up_after_its_timeout_with_a_call_still_in_flight() -> None:
    async def scenario() -> tuple[bool, int]:
        gate = Gate()
        gate.enter()
        return await gate.wait_idle(QUIET), gate.in_flight

    assert run(scenario) == (False, 1)


def test_refusals_are_counted() -> None:
    gate = Gate()
    gate.close()
    for _ in range(3):
        gate.refuse()

    assert (gate.open, gate.refused) == (False, 3)


async def _refuse_every(gate: Gate, pause: float, times: int) -> float:
    """Refuse a call every ``pause`` seconds, ``times`` times; return when the last refusal was."""
    for _ in range(times):
        await asyncio.sleep(pause)
        gate.refuse()
    return time.monotonic()


def test_wait_quiet_waits_until_no_call_was_refused_for_the_quiet_period() -> None:
    async def scenario() -> tuple[bool, float]:
        gate = Gate()
        gate.close()
        refusing = asyncio.ensure_future(_refuse_every(gate, QUIET / 5, 20))
        quiet = await gate.wait_quiet(QUIET, 5)
        return quiet, time.monotonic() - await refusing

    quiet, since_last_refusal = run(scenario)
    assert quiet is True
    assert since_last_refusal >= QUIET


def test_wait_quiet_reports_callers_still_arriving_when_its_time_runs_out() -> None:
    async def scenario() -> bool:
        gate = Gate()
        gate.close()
        refusing = asyncio.ensure_future(_refuse_every(gate, QUIET / 5, 1000))
        try:
            return await gate.wait_quiet(QUIET, 4 * QUIET)
        finally:
            refusing.cancel()

    assert run(scenario) is False


def test_a_refusable_call_ending_after_close_counts_as_a_caller_still_here() -> None:
    async def scenario() -> float:
        gate = Gate()
        gate.enter()
        gate.close()
        waiting = asyncio.ensure_future(gate.wait_quiet(QUIET, 5))
        await asyncio.sleep(QUIET / 2)
        gate.leave(refusable=True)
        left = time.monotonic()
        assert await waiting
        return time.monotonic() - left

    assert run(scenario) >= QUIET  # the quiet period began again when the call ended


def test_health_calls_ending_after_close_do_not_hold_up_the_quiet_period() -> None:
    async def scenario() -> tuple[bool, int]:
        gate = Gate()
        gate.close()
        ended = 0

        async def probe_forever() -> None:
            nonlocal ended
            while True:  # a prober calling Health without pause: never refused, so never "arriving"
                gate.enter()
                await asyncio.sleep(QUIET / 10)
                gate.leave(refusable=False)
                ended += 1

        probing = asyncio.ensure_future(probe_forever())
        try:
            return await gate.wait_quiet(QUIET, 100 * QUIET), ended
        finally:
            probing.cancel()

    quiet, ended = run(scenario)
    assert quiet is True
    assert ended < 50  # long before the timeout (which would take about 100 health calls)
