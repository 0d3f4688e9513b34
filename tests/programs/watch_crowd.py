"""Many Health/Watch streams from one asyncio client, in a test or in a child process.

``python -m tests.programs.watch_crowd ADDRESS SERVICE N`` opens N streams, prints
``watching N`` once every stream has its first answer, then holds them until
it is killed (a disconnect storm, when the kill is SIGKILL).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

#: Streams per channel: one HTTP/2 connection carries this many.
PER_CHANNEL = 1000
#: Streams opened at once, by default: a burst of thousands of new calls is a test of its own.
OPEN_BATCH = 500
#: Deadline of every stream.
STREAM_TIMEOUT = 60.0


@dataclass
class Crowd:
    """Open Watch streams and the first status each one received."""

    calls: list[grpc.aio.UnaryStreamCall]
    first: list[int]
    channels: list[grpc.aio.Channel]  # one connection each

    async def next_statuses(self, timeout: float) -> list[int]:
        """The next message of every stream (each must arrive within ``timeout``)."""

        async def next_status(call: grpc.aio.UnaryStreamCall) -> int:
            answer = await asyncio.wait_for(call.read(), timeout)
            assert answer is not grpc.aio.EOF, await call.code()
            return int(answer.status)

        return list(await asyncio.gather(*(next_status(call) for call in self.calls)))

    def cancel(self) -> None:
        """Cancel every stream at once."""
        for call in self.calls:
            call.cancel()


@asynccontextmanager
async def watching(address: str, service: str, count: int, batch: int = OPEN_BATCH) -> AsyncIterator[Crowd]:
    """Open ``count`` Watch streams on ``service``, ``batch`` at a time; each has its first answer on entry."""
    # A local subchannel pool per channel: otherwise every channel shares one connection.
    channels = [
        grpc.aio.insecure_channel(address, options=(("grpc.use_local_subchannel_pool", 1),))
        for _ in range(-(-count // PER_CHANNEL))
    ]
    try:
        calls: list[grpc.aio.UnaryStreamCall] = []
        firsts = []
        for start in range(0, count, batch):
            opening = [
                health_pb2_grpc.HealthStub(channels[i // PER_CHANNEL]).Watch(
                    health_pb2.HealthCheckRequest(service=service), timeout=STREAM_TIMEOUT
                )
                for i in range(start, min(count, start + batch))
            ]
            firsts += await asyncio.gather(*(call.read() for call in opening))
            calls += opening
        yield Crowd(calls, [int(answer.status) for answer in firsts], channels)
    finally:
        await asyncio.gather(*(channel.close() for channel in channels))


async def _hold(address: str, service: str, count: int) -> None:
    async with watching(address, service, count):
        print(f"watching {count}", flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(_hold(sys.argv[1], sys.argv[2], int(sys.argv[3])))
