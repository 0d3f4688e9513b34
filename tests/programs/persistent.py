"""Callers that never give up: each calls SmokeTest again 20 ms after every refusal, through a shutdown.

``python -m tests.programs.persistent ADDRESS SECONDS`` runs 50 callers over 5
channels for SECONDS seconds (past the server's exit: then every call fails
to connect), prints ``calling`` once every caller has had an answer, and at
the end one JSON object: how many calls ended with each status code.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import Counter

import grpc

from petsage_grpc._proto.smoke.v1 import smoke_pb2, smoke_pb2_grpc

CHANNELS = 5
CALLERS = 50
#: The pause after a refused call, as a client with a short fixed backoff.
PAUSE = 0.02
CALL_TIMEOUT = 5.0


async def persist(address: str, seconds: float) -> Counter[str]:
    """Run the callers for ``seconds``; count the codes their calls ended with."""
    codes: Counter[str] = Counter()
    answered = asyncio.Event()
    first: set[int] = set()
    channels = [grpc.aio.insecure_channel(address, options=(("grpc.use_local_subchannel_pool", 1),))
                for _ in range(CHANNELS)]
    end = time.monotonic() + seconds

    async def caller(number: int) -> None:
        smoke = smoke_pb2_grpc.SmokeTestServiceStub(channels[number % CHANNELS]).SmokeTest
        while time.monotonic() < end:
            try:
                await smoke(smoke_pb2.SmokeTestRequest(), timeout=CALL_TIMEOUT)
                codes["OK"] += 1
            except grpc.aio.AioRpcError as exc:
                codes[exc.code().name] += 1
                await asyncio.sleep(PAUSE)
            first.add(number)
            if len(first) == CALLERS:
                answered.set()

    async def announce() -> None:
        await answered.wait()
        print("calling", flush=True)

    announcer = asyncio.ensure_future(announce())
    await asyncio.gather(*(caller(number) for number in range(CALLERS)))
    announcer.cancel()
    await asyncio.gather(*(channel.close() for channel in channels))
    return codes


if __name__ == "__main__":
    print(json.dumps(asyncio.run(persist(sys.argv[1], float(sys.argv[2])))), flush=True)
