"""The background runner that runs health checks and caches their latest outcomes.

The runner runs each check on its interval and keeps the latest
:class:`~petsage_grpc.health.checks.CheckOutcome`; health answers read that
cache and never wait on a check.  Plain (non-async) functions run on a
thread of their own check, never on the event loop; a run that has not
returned is not started again, so a hanging dependency holds one thread,
not one per interval.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import cast

from petsage_grpc.health.checks import Check, CheckFailed, CheckOutcome

_LOGGER = logging.getLogger(__package__)


class _Call:
    """Calls one check's function: awaited if async, else on a thread of its own.

    A plain function cannot be interrupted: when it outlives its timeout it
    keeps its thread, and later runs report it instead of starting another.
    The thread is a daemon, so a function that never returns cannot keep the
    process from exiting.
    """

    def __init__(self, check: Check) -> None:
        self._check = check
        self._is_async = inspect.iscoroutinefunction(check.func)
        self._pending: concurrent.futures.Future[object] | None = None
        self._pending_since = 0.0

    async def __call__(self) -> str:
        if self._is_async:
            result = await cast(Callable[[], Awaitable[object]], self._check.func)()
        else:
            if self._pending is not None and not self._pending.done():
                raise CheckFailed(f"previous run still running after {time.monotonic() - self._pending_since:.1f}s")
            future: concurrent.futures.Future[object] = concurrent.futures.Future()
            self._pending, self._pending_since = future, time.monotonic()
            threading.Thread(target=self._run, args=(future,), name=f"check-{self._check.name}", daemon=True).start()
            # shield: a timeout gives up waiting; it cannot stop the thread.
            result = await asyncio.shield(asyncio.wrap_future(future))
        if inspect.isawaitable(result):  # e.g. ``lambda: db.ping()`` around a coroutine function
            result = await result
        if result is not None and not isinstance(result, str):
            raise CheckFailed(f"returned {type(result).__name__}; a check returns a str or None")
        return result or "ok"

    def _run(self, future: concurrent.futures.Future[object]) -> None:
        try:
            future.set_result(cast(Callable[[], object], self._check.func)())
        except BaseException as exc:  # handed to the awaiting run, which reports it
            future.set_exception(exc)


async def _run_check(check: Check, call: _Call) -> CheckOutcome:
    """Run ``check`` once, turning an exception or a timeout into a failing outcome."""
    started = time.perf_counter()
    try:
        async with asyncio.timeout(check.timeout):  # unlike wait_for, no task per run
            detail = await call()
        ok = True
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise  # the run itself is being cancelled (the runner stops)
        ok, detail = False, "cancelled inside the check"  # e.g. it awaited a task someone else cancelled
    except TimeoutError as exc:
        ok, detail = False, str(exc) or f"timed out after {check.timeout:g}s"
    except Exception as exc:  # a failing check is a result, not a crash
        ok, detail = False, str(exc) or type(exc).__name__
    return CheckOutcome(check.name, ok, detail, time.perf_counter() - started, check.critical)


class CheckRunner:
    """Runs checks in the background and caches their latest outcomes.

    All methods run on the event loop's thread, except :meth:`trigger`,
    which any thread may call.  ``on_change`` is called with the whole cache
    whenever a check starts or stops passing, so health statuses follow.
    """

    def __init__(
        self, checks: Sequence[Check], on_change: Callable[[Mapping[str, CheckOutcome]], None]
    ) -> None:
        self._checks = {check.name: check for check in checks}
        if len(self._checks) != len(checks):
            raise ValueError("check names should be unique")
        self._calls = {check.name: _Call(check) for check in checks}
        self._on_change = on_change
        #: Called with every outcome, on the event loop's thread (e.g. to export metrics).
        self.outcome_listeners: list[Callable[[CheckOutcome], None]] = []
        self._results: dict[str, CheckOutcome] = {}
        self._wakeups: dict[str, asyncio.Event] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = False  # until every check has run once, outcomes are not published

    @property
    def results(self) -> Mapping[str, CheckOutcome]:
        """The latest outcome of every check that has run."""
        return self._results

    async def run(self, name: str) -> CheckOutcome:
        """Run one check now, cache its outcome and return it."""
        outcome = await _run_check(self._checks[name], self._calls[name])
        self._record(outcome)
        return outcome

    async def start(self) -> None:
        """Run every check once, report every outcome at once, then keep them running."""
        self._loop = asyncio.get_running_loop()
        await asyncio.gather(*(self.run(name) for name in self._checks))
        self._results = {name: self._results[name] for name in self._checks}  # in the order given
        self._started = True
        self._on_change(self._results)  # one first publication from complete results, not one per check
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
            try:
                await self.run(name)
            except Exception:  # an on_change bug must not stop this check for good
                _LOGGER.exception("check %s: publishing its outcome failed", name)

    def _record(self, outcome: CheckOutcome) -> None:
        previous = self._results.get(outcome.name)
        self._results[outcome.name] = outcome
        for listener in self.outcome_listeners:
            try:
                listener(outcome)
            except Exception:  # a listener's bug must not keep statuses from following the checks
                _LOGGER.exception("check outcome listener failed")
        if previous is None or previous.ok != outcome.ok:
            level = logging.INFO if outcome.ok else logging.WARNING
            _LOGGER.log(level, "check %s is %s: %s", outcome.name,
                        "passing" if outcome.ok else "failing", outcome.detail)
            # Statuses follow whether checks pass, so only a change can change them.
            if self._started:
                self._on_change(self._results)

