"""Reading the one request message of a call: from the call's start, with a deadline, and a cap on waiting calls.

grpcio starts a unary handler only once the whole request message has
arrived.  A call whose message never completes (an empty body, a length
prefix promising more bytes than come, a compressed flag it cannot read) is
never handed to the server: never answered, never counted, never freed
(about 19 KB each, for as long as the client keeps the connection).  So every
single-request method is registered as request-streaming
(:mod:`petsage_grpc.server.handlers`): its handler starts with the call and
reads the one message here, which

- answers a stream that ends without a whole message at once with
  INVALID_ARGUMENT ``no request message``;
- gives a message ``timeout`` seconds to arrive, then answers
  DEADLINE_EXCEEDED ``request message not received within Ns``;
- keeps at most ``limit`` calls waiting for their message: one more ends the
  oldest waiting call with RESOURCE_EXHAUSTED.  Real requests arrive with
  their call, so they wait for microseconds; only calls that never send one
  are ever the oldest.

So the memory of incomplete calls is bounded by ``limit`` of them.  One timer
at a time looks for calls past their deadline: nothing is scheduled per call.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import grpc

NO_MESSAGE = "no request message"


class _Waiting:
    """One call waiting for its message: its task, since when, and why it was cut short (if it was)."""

    __slots__ = ("cut", "since", "task")

    def __init__(self, task: asyncio.Task[object]) -> None:
        self.task = task
        self.since = time.monotonic()
        self.cut: str | None = None  # "timed_out" or "evicted"


@dataclass
class Counts:
    """Calls ended for want of a whole request message, since the server started."""

    empty: int = 0  # the stream ended with no whole message
    timed_out: int = 0  # no message within the timeout
    evicted: int = 0  # the oldest waiting call, ended to make room


class RequestReader:
    """Reads single request messages as the module docstring says; used on the event loop's thread."""

    def __init__(self, timeout: float, limit: int) -> None:
        self.timeout = timeout
        self.limit = limit
        self.counts = Counts()
        self._waiting: dict[_Waiting, None] = {}  # in the order the calls began
        self._sweep: asyncio.TimerHandle | None = None

    @property
    def waiting(self) -> int:
        """Calls waiting for their message now."""
        return len(self._waiting)

    async def read(self, context: grpc.aio.ServicerContext) -> bytes:
        """The call's one request message; or the call ends with the status the module docstring gives."""
        task = asyncio.current_task()
        assert task is not None
        entry = _Waiting(task)
        if len(self._waiting) >= self.limit:
            self._cut(next(iter(self._waiting)), "evicted")
        self._waiting[entry] = None
        if self._sweep is None:
            self._sweep = asyncio.get_running_loop().call_later(self.timeout / 4, self._expire)
        try:
            message = await context.read()
        except asyncio.CancelledError:
            if entry.cut is None:
                raise  # the client went away
            task.uncancel()
            if entry.cut == "evicted":
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                    f"too many calls waiting for their request message (limit {self.limit})")
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                f"request message not received within {self.timeout:g}s")
        finally:
            self._waiting.pop(entry, None)
        if message is grpc.aio.EOF:
            self.counts.empty += 1
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, NO_MESSAGE)
        return message  # type: ignore[no-any-return]

    def _cut(self, entry: _Waiting, why: str) -> None:
        del self._waiting[entry]
        entry.cut = why
        if why == "evicted":
            self.counts.evicted += 1
        else:
            self.counts.timed_out += 1
        entry.task.cancel()

    def _expire(self) -> None:
        """End the calls past their deadline; look again while any call waits."""
        self._sweep = None
        oldest = time.monotonic() - self.timeout
        expired = []
        for entry in self._waiting:  # in the order the calls began: stop at the first still in time
            if entry.since > oldest:
                break
            expired.append(entry)
        for entry in expired:
            self._cut(entry, "timed_out")
        if self._waiting:
            self._sweep = asyncio.get_running_loop().call_later(self.timeout / 4, self._expire)
