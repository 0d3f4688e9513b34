"""SmokeTest calls started at once and left in flight, in a test or in a child process.

``python -m tests.programs.smoke_storm ADDRESS N`` starts N SmokeTest calls,
prints ``in flight N`` once the server holds them all, then waits to be
killed (its calls vanish with its connections).
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from petsage_grpc._proto.smoke.v1 import smoke_pb2, smoke_pb2_grpc
from tests.support import RPC_TIMEOUT, SERVING

#: Connections the calls are spread over.
STORM_CHANNELS = 3


async def start_smoke_storm(address: str, count: int) -> tuple[list[grpc.aio.Channel], list[Any]]:
    """Start ``count`` SmokeTest calls; return once the server has them all in its handlers.

    Calls on one connection are dispatched in order: once a Check sent after
    them has answered, every SmokeTest before it is waiting in its handler.
    """
    channels = [
        grpc.aio.insecure_channel(address, options=(("grpc.use_local_subchannel_pool", 1),))
        for _ in range(STORM_CHANNELS)
    ]
    calls = [
        smoke_pb2_grpc.SmokeTestServiceStub(channels[i % STORM_CHANNELS]).SmokeTest(
            smoke_pb2.SmokeTestRequest(), timeout=30
        )
        for i in range(count)
    ]
    for channel in channels:
        answer = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="liveness"), timeout=RPC_TIMEOUT
        )
        assert answer.status == SERVING
    assert not any(call.done() for call in calls)
    return channels, calls


async def _hold(address: str, count: int) -> None:
    """Child process: start ``count`` SmokeTest calls, say so, then wait to be killed."""
    await start_smoke_storm(address, count)
    print(f"in flight {count}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(_hold(sys.argv[1], int(sys.argv[2])))
