"""The liveness watchdog: notices an event loop that has stopped running.

A ticker task on the loop stamps the time every :data:`TICK` seconds.  A
daemon thread, which needs neither the loop nor any pool, compares that stamp
with the clock: when the loop has not run for ``limit`` seconds it reports the
stall at once (with the stack the loop is stuck in), and it reports recovery
only once the loop has kept time for another ``limit`` seconds.  So a Check
that was queued behind the stall is answered NOT_SERVING, and a loop that
stalls again and again does not flap back to SERVING between stalls.

A loop that never runs again cannot answer at all: its callers' deadlines
expire, which Kubernetes counts as a failed probe just the same.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
import traceback
from collections.abc import Callable

from petsage_grpc.health.checks import Check, CheckFailed

_LOGGER = logging.getLogger(__package__)
#: The name of the check that reports the watchdog's verdict.
EVENT_LOOP_CHECK = "event_loop"
#: How often the ticker stamps the time, and the watchdog thread looks.
TICK = 0.05
#: Frames of the stalled loop's stack written to the log.
STACK_FRAMES = 8


class Watchdog:
    """Watches one event loop from a thread of its own.

    ``on_change(alive, reason)`` is called from the watchdog thread each time
    the verdict changes; it must be safe to call from any thread.
    """

    def __init__(self, limit: float, on_change: Callable[[bool, str], None]) -> None:
        self.limit = limit
        self._on_change = on_change
        self._alive = True  # written by the watchdog thread only
        self._last_tick = time.monotonic()  # written by the loop, read by the thread
        self._worst_lag = 0.0  # the longest gap since last read by worst_lag_since_read()
        self._stop = threading.Event()
        self._ticker: asyncio.Task[None] | None = None
        self._thread: threading.Thread | None = None
        self._loop_thread = 0

    @property
    def alive(self) -> bool:
        """The current verdict: the loop has been running on time."""
        return self._alive

    def take_worst_lag(self) -> float:
        """The longest the loop went without running since the last call (seconds)."""
        worst, self._worst_lag = self._worst_lag, 0.0
        return max(worst, time.monotonic() - self._last_tick - TICK)

    def start(self) -> None:
        """Start ticking on the running loop and watching from a new thread."""
        self._loop_thread = threading.get_ident()
        self._last_tick = time.monotonic()
        self._ticker = asyncio.get_running_loop().create_task(self._tick(), name="watchdog-ticker")
        self._thread = threading.Thread(target=self._watch, name="liveness-watchdog", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Stop the ticker and the thread (which ends within one tick)."""
        self._stop.set()
        if self._ticker is not None:
            self._ticker.cancel()
            await asyncio.gather(self._ticker, return_exceptions=True)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 1.0)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            now = time.monotonic()
            self._worst_lag = max(self._worst_lag, now - self._last_tick - TICK)
            self._last_tick = now

    def _watch(self) -> None:
        on_time_since: float | None = None  # while stalled: when the loop began keeping time again
        while not self._stop.wait(TICK):
            now = time.monotonic()
            late = now - self._last_tick
            if self._alive:
                if late > self.limit:
                    self._alive = False
                    _LOGGER.error("event loop has not run for %.1fs (limit %gs); it is stuck in:\n%s",
                                  late, self.limit, self._loop_stack())
                    self._on_change(False, f"event loop has not run for {late:.1f}s (limit {self.limit:g}s)")
            elif late > self.limit / 2:
                on_time_since = None
            elif on_time_since is None:
                on_time_since = now
            elif now - on_time_since >= self.limit:
                self._alive = True
                on_time_since = None
                self._on_change(True, f"event loop on time again for {self.limit:g}s")

    def _loop_stack(self) -> str:
        frame = sys._current_frames().get(self._loop_thread)
        if frame is None:
            return "  (no stack)"
        return "".join(traceback.format_stack(frame)[-STACK_FRAMES:]).rstrip()


def event_loop_check(watchdog: Watchdog, interval: float) -> Check:
    """The critical ``event_loop`` check: the watchdog's verdict and the longest stall seen."""

    async def responsiveness() -> str:
        worst = watchdog.take_worst_lag()
        if not watchdog.alive:
            raise CheckFailed(f"event loop stalled for {worst:.1f}s (limit {watchdog.limit:g}s)")
        return f"longest stall {worst * 1000:.0f} ms since the last check (limit {watchdog.limit:g}s)"

    return Check(EVENT_LOOP_CHECK, responsiveness, interval=interval, timeout=1.0)
