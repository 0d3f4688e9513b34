"""The in-process layer's means: a bounded event loop per test, and a real grpc.aio server on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import grpc

_T = TypeVar("_T")
#: How long one in-process scenario may run: far longer than any takes.
SCENARIO_TIMEOUT = 10.0


def run(scenario: Callable[[], Coroutine[Any, Any, _T]], timeout: float = SCENARIO_TIMEOUT) -> _T:
    """Run ``scenario()`` on a new event loop, failing the test if it takes over ``timeout`` seconds."""

    async def bounded() -> _T:
        async with asyncio.timeout(timeout):
            return await scenario()

    return asyncio.run(bounded())


@asynccontextmanager
async def serving(register: Callable[[grpc.aio.Server], None]) -> AsyncIterator[grpc.aio.Channel]:
    """A grpc.aio server on a free loopback port with what ``register`` adds; a channel to it."""
    server = grpc.aio.server()
    register(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield channel
    finally:
        await channel.close()
        await server.stop(None)
