"""The check runner (health/runner.py) with real checks on a real event loop: runs, outcomes, publication."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping

from petsage_grpc.health.checks import Check, CheckFailed, CheckOutcome
from petsage_grpc.health.runner import CheckRunner
from tests.support.aio import run

#: Longer than any test runs: checks run in the background only when a test asks.
NEVER = 3600.0
TIMEOUT = 0.2


class Published:
    """The runner's ``on_change``: keeps every publication (a copy of which checks passed)."""

    def __init__(self) -> None:
        self.calls: list[dict[str, bool]] = []
        self.changed = asyncio.Event()

    def __call__(self, results: Mapping[str, CheckOutcome]) -> None:
        self.calls.append({name: outcome.ok for name, outcome in results.items()})
        self.changed.set()


def check(name: str, func: object, *, critical: bool = True) -> Check:
    """A check that runs only when asked (its interval never comes)."""
    return Check(name, func, interval=NEVER, timeout=TIMEOUT, critical=critical)  # type: ignore[arg-type]


async def ok() -> str:
    return "fine"


async def hang() -> str:
    await asyncio.Event().wait()
    return "never"


def test_every_check_runs_once_before_one_first_publication_in_the_order_given() -> None:
    published = Published()

    async def scenario() -> list[str]:
        runs: list[str] = []

        def recording(name: str) -> object:
            async def func() -> str:
                runs.append(name)
                return name

            return func

        runner = CheckRunner([check(n, recording(n)) for n in ("b", "a", "c")], published)
        await runner.start()
        await runner.stop()
        assert sorted(runs) == ["a", "b", "c"]
        return list(runner.results)

    assert run(scenario) == ["b", "a", "c"]
    assert published.calls == [{"b": True, "a": True, "c": True}]


def test_statuses_are_published_again_only_when_a_check_starts_or_stops_passing() -> None:
    published = Published()
    failing = False

    async def flipping() -> str:
        if failing:
            raise CheckFailed("down")
        return "up"

    async def scenario() -> None:
        nonlocal failing
        runner = CheckRunner([check("db", flipping)], published)
        await runner.start()
        await runner.run("db")  # still passing: nothing to publish
        failing = True
        await runner.run("db")
        await runner.run("db")  # still failing
        failing = False
        await runner.run("db")
        await runner.stop()

    run(scenario)
    assert published.calls == [{"db": True}, {"db": False}, {"db": True}]


def test_a_failing_check_keeps_its_reason_as_the_detail() -> None:
    async def refused() -> str:
        raise ConnectionRefusedError("connection refused")

    async def silent() -> str:
        raise ValueError()

    async def number() -> int:
        return 42

    async def scenario() -> dict[str, tuple[bool, str]]:
        runner = CheckRunner([check("refused", refused), check("silent", silent), check("number", number),
                              check("hang", hang), check("ok", ok)], Published())
        await runner.start()
        await runner.stop()
        return {name: (o.ok, o.detail) for name, o in runner.results.items()}

    assert run(scenario) == {
        "refused": (False, "connection refused"),
        "silent": (False, "ValueError"),
        "number": (False, "returned int; a check returns a str or None"),
        "hang": (False, f"timed out after {TIMEOUT:g}s"),
        "ok": (True, "fine"),
    }


def test_a_coroutine_returned_by_a_plain_function_is_awaited() -> None:
    async def scenario() -> CheckOutcome:
        runner = CheckRunner([check("wrapped", lambda: ok())], Published())
        return await runner.run("wrapped")

    assert run(scenario).detail == "fine"


def test_a_plain_function_runs_on_a_thread_and_a_hung_one_is_not_started_again() -> None:
    started: list[str] = []
    release = threading.Event()

    def blocking() -> str:
        started.append(threading.current_thread().name)
        release.wait(10)
        return "done"

    async def scenario() -> list[CheckOutcome]:
        runner = CheckRunner([check("legacy", blocking, critical=False)], Published())
        outcomes = [await runner.run("legacy"), await runner.run("legacy")]
        release.set()
        return outcomes

    first, second = run(scenario)
    assert (first.ok, first.detail) == (False, f"timed out after {TIMEOUT:g}s")
    assert not second.ok and second.detail.startswith("previous run still running after ")
    assert started == ["check-legacy"]  # one thread, not one per run, and not the event loop's


def test_a_trigger_from_another_thread_runs_the_check_before_its_interval() -> None:
    async def scenario() -> int:
        runs = 0
        ran = asyncio.Event()

        async def counted() -> str:
            nonlocal runs
            runs += 1
            if runs > 1:
                ran.set()
            return "counted"

        runner = CheckRunner([check("logging", counted)], Published())
        await runner.start()
        await asyncio.to_thread(runner.trigger, "logging")
        await ran.wait()
        await runner.stop()
        return runs

    assert run(scenario) == 2


def test_every_outcome_reaches_the_outcome_listeners() -> None:
    async def scenario() -> list[str]:
        heard: list[str] = []
        runner = CheckRunner([check("ok", ok)], Published())
        runner.outcome_listeners.append(lambda outcome: heard.append(outcome.detail))
        await runner.start()
        await runner.run("ok")
        await runner.stop()
        return heard

    assert run(scenario) == ["fine", "fine"]


def test_stop_ends_the_background_runs() -> None:
    async def scenario() -> list[bool]:
        runner = CheckRunner([Check("often", ok, interval=0.01, timeout=TIMEOUT)], Published())
        await runner.start()
        tasks = [t for t in asyncio.all_tasks() if t.get_name() == "check:often"]
        await runner.stop()
        return [task.done() for task in tasks]

    assert run(scenario) == [True]
