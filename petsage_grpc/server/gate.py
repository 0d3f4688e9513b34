"""The shutdown gate: counts calls in flight, and turns new ones away once closed.

grpcio's ``server.stop()`` answers CANCELLED to calls it still holds queued
(grpc/grpc#41785), and CANCELLED means "the caller gave up" to clients.  So
the server closes this gate first: every call that reaches a refusing
handler after that gets UNAVAILABLE, which clients retry elsewhere, and
``stop()`` is only called once the calls in flight have finished
(:meth:`Gate.wait_idle`) and callers have stopped arriving
(:meth:`Gate.wait_quiet`).  Callers that never stop calling are held for the
last moments (:meth:`Gate.hold`): each one's next call waits, unanswered, so
that none has a call queued inside grpc when ``stop()`` runs; they are
answered once it has begun (:meth:`Gate.release`).  :mod:`petsage_grpc.server.handlers` wraps every
handler so that each call passes through the gate.
"""

from __future__ import annotations

import asyncio
import time


class Gate:
    """Open until :meth:`close`; tracks how many tracked calls are running.

    Used from the event loop's thread only.
    """

    def __init__(self) -> None:
        self.open = True
        self.in_flight = 0
        self.refused = 0  # calls turned away since the gate closed
        self.held = 0  # calls held at the very end, answered once grpc's stop() has begun
        self.holding = False
        self._released = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._activity = asyncio.Event()
        # time.monotonic() of the latest closing, refusal or completion after closing.
        self._quiet_since = 0.0
        self._last_refusal = float("-inf")

    def close(self) -> None:
        """Refuse every later call of a refusing service with UNAVAILABLE."""
        self.open = False
        self._mark_activity()

    def hold(self) -> None:
        """From now on, every new call waits (:meth:`wait_if_held`) until :meth:`release`."""
        self.holding = True

    def release(self) -> None:
        """Let the held calls go on: to be refused, or, for health, answered."""
        self.holding = False
        self._released.set()

    async def wait_if_held(self) -> None:
        """Wait while the gate holds calls (a no-op otherwise)."""
        if self.holding:
            self.held += 1
            await self._released.wait()

    def refuse(self) -> None:
        """Count a call turned away: its caller is still calling."""
        self.refused += 1
        self._mark_activity()
        self._last_refusal = self._quiet_since

    def enter(self) -> None:
        """Count a call in flight until :meth:`leave`."""
        self.in_flight += 1
        self._idle.clear()

    def leave(self, refusable: bool) -> None:
        """A call counted by :meth:`enter` has ended; ``refusable``: the gate would now refuse its kind."""
        self.in_flight -= 1
        # Only a call that would now be refused says its caller is still here
        # and may come back: probes keep calling Health until the process has
        # gone, and must not hold up the shutdown for the whole grace period.
        if refusable and not self.open:
            self._mark_activity()
        if self.in_flight == 0:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the calls in flight; True if none remain."""
        if self.in_flight == 0:  # wait_for(timeout=0) would time out even then
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def wait_quiet(self, quiet: float, timeout: float) -> bool:
        """Wait until ``quiet`` seconds pass with no refusal and no refusable call finishing.

        Calls that reach grpcio just before ``stop()`` are cancelled by it
        (grpc/grpc#41785).  A caller whose call just finished, or who was
        just refused, may send another one at once; once ``quiet`` seconds
        pass without either, callers have gone elsewhere.  Waits at most
        ``timeout`` seconds; False if a call was refused within the last
        ``quiet`` seconds when the time ran out.
        """
        deadline = time.monotonic() + timeout
        while True:
            now = time.monotonic()
            quiet_from = self._quiet_since + quiet
            if now >= quiet_from:
                return True
            if now >= deadline:
                return now - self._last_refusal >= quiet
            self._activity.clear()
            try:
                await asyncio.wait_for(self._activity.wait(), min(quiet_from, deadline) - now)
            except TimeoutError:
                pass

    def _mark_activity(self) -> None:
        self._quiet_since = time.monotonic()
        self._activity.set()
