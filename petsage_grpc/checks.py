"""Health checks and the background runner that caches their results.

A check is a named async function with a timeout, an interval and a
``critical`` flag; it returns a detail string when it passes and raises when
it fails.  The runner runs each check on its interval and keeps the latest
:class:`CheckOutcome`; health answers read that cache and never wait on a
check.  The ``logging`` check (critical) confirms delivery through the log
pipeline.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from petsage_grpc.logs import LogPipeline

_LOGGER = logging.getLogger(__name__)


class CheckFailed(Exception):
    """Raised by a check function to fail with a precise detail."""


@dataclass(frozen=True)
class Check:
    """A named health check.

    ``func`` returns a short detail when the check passes and raises (any
    exception) when it fails; it is given at most ``timeout`` seconds.
    """

    name: str
    func: Callable[[], Awaitable[str]]
    interval: float
    timeout: float
    critical: bool = True

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError('"name" should not be empty')
        if self.interval <= 0 or self.timeout <= 0:
            raise ValueError(f'check {self.name!r}: "interval" and "timeout" should be > 0')


@dataclass(frozen=True)
class CheckOutcome:
    """One run of a check: whether it passed, why, and how long it took."""

    name: str
    ok: bool
    detail: str
    duration: float
    critical: bool


async def run_check(check: Check) -> CheckOutcome:
    """Run ``check`` once, turning an exception or a timeout into a failing outcome."""
    started = time.perf_counter()
    try:
        detail = await asyncio.wait_for(check.func(), check.timeout)
        ok = True
    except asyncio.CancelledError:
        raise
    except TimeoutError as exc:
        ok, detail = False, str(exc) or f"timed out after {check.timeout:g}s"
    except Exception as exc:  # a failing check is a result, not a crash
        ok, detail = False, str(exc) or type(exc).__name__
    return CheckOutcome(check.name, ok, detail, time.perf_counter() - started, check.critical)


class CheckRunner:
    """Runs checks in the background and caches their latest outcomes.

    All methods run on the event loop's thread, except :meth:`trigger`,
    which any thread may call.  ``on_change`` is called after every run
    with the whole cache, so health statuses follow the outcomes.
    """

    def __init__(
        self, checks: list[Check], on_change: Callable[[Mapping[str, CheckOutcome]], None]
    ) -> None:
        self._checks = {check.name: check for check in checks}
        self._on_change = on_change
        self._results: dict[str, CheckOutcome] = {}
        self._wakeups: dict[str, asyncio.Event] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def results(self) -> Mapping[str, CheckOutcome]:
        """The latest outcome of every check that has run."""
        return self._results

    async def run(self, name: str) -> CheckOutcome:
        """Run one check now, cache its outcome and return it."""
        outcome = await run_check(self._checks[name])
        self._record(outcome)
        return outcome

    async def start(self) -> None:
        """Run every check once (so statuses are known), then keep them running."""
        self._loop = asyncio.get_running_loop()
        await asyncio.gather(*(self.run(name) for name in self._checks))
        for name in self._checks:
            self._wakeups[name] = asyncio.Event()
            self._tasks.append(asyncio.create_task(self._repeat(name), name=f"check:{name}"))

    def trigger(self, name: str) -> None:
        """Ask for an early run of ``name``; safe to call from any thread."""
        if self._loop is not None and not self._loop.is_closed() and name in self._wakeups:
            self._loop.call_soon_threadsafe(self._wakeups[name].set)

    async def stop(self) -> None:
        """Cancel the background runs and wait for them to end."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    async def _repeat(self, name: str) -> None:
        wakeup = self._wakeups[name]
        while True:
            try:
                await asyncio.wait_for(wakeup.wait(), self._checks[name].interval)
            except TimeoutError:
                pass
            wakeup.clear()
            await self.run(name)

    def _record(self, outcome: CheckOutcome) -> None:
        previous = self._results.get(outcome.name)
        self._results[outcome.name] = outcome
        if previous is None or previous.ok != outcome.ok:
            level = logging.INFO if outcome.ok else logging.WARNING
            _LOGGER.log(level, "check %s is %s: %s", outcome.name,
                        "passing" if outcome.ok else "failing", outcome.detail)
        self._on_change(self._results)


def logging_check(pipeline: LogPipeline, timeout: float, interval: float) -> Check:
    """The critical ``logging`` check: a probe record confirmed by every sink."""
    reported = 0  # pipeline.dropped when last reported

    async def confirm_delivery() -> str:
        nonlocal reported
        delivery = await pipeline.confirm(timeout)
        lost, reported = pipeline.dropped - reported, pipeline.dropped
        if lost:
            _LOGGER.warning("%d log record(s) lost since the last logging check "
                            "(queue full or a sink write failed)", lost)
        suffix = f"; {lost} record(s) lost since the last check" if lost else ""
        if not delivery.ok:
            raise CheckFailed("; ".join(f"{sink}: {error}" for sink, error in delivery.errors.items()) + suffix)
        return f"record {delivery.probe_id} delivered to {', '.join(delivery.sinks)}{suffix}"

    # The outer timeout only backs up confirm()'s own, which explains itself.
    return Check("logging", confirm_delivery, interval=interval, timeout=timeout + 1.0)
