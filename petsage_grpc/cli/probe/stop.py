"""SIGTERM and SIGINT in the probe: a flag its waits look at, never an exception mid-call."""

from __future__ import annotations

import signal
import time

#: Longest any wait goes without looking whether a signal arrived.
SIGNAL_LATENCY = 0.05


class Stop:
    """SIGTERM and SIGINT set a flag that the probe's waits look at: no exception mid-call.

    Every wait is sliced into :data:`SIGNAL_LATENCY` steps that look at it.
    """

    def __init__(self) -> None:
        self.requested = False

    def sleep(self, seconds: float) -> bool:
        """Pause ``seconds``; False, at once, if a signal arrives meanwhile."""
        end = time.monotonic() + seconds
        while not self.requested and (remaining := end - time.monotonic()) > 0:
            time.sleep(min(remaining, SIGNAL_LATENCY))
        return not self.requested

    def install(self) -> None:
        """Handle SIGTERM and SIGINT from now on (main thread only)."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        # A flag only: printing or locking here could re-enter what the main
        # thread was doing when the signal arrived.
        self.requested = True
