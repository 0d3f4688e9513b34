"""The load client of the SIGTERM-under-load test: Check and SmokeTest flat out, every outcome recorded.

``python -m tests.programs.load ADDRESS`` prints ``{"warm": T}`` once the load
runs at full rate, then, when every caller has stopped (or after
:data:`LOAD_LIMIT` seconds), one JSON object with every call, what a Watch on
readiness saw, and how many calls were still unfinished.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from petsage_grpc._proto.smoke.v1 import smoke_pb2, smoke_pb2_grpc
from petsage_grpc.server.process import new_event_loop

#: Load: connections, and callers of each method on each connection (one call at a time each).
LOAD_CHANNELS = 4
LOAD_CALLERS = {"Check": 18, "SmokeTest": 6}
#: How long the load runs before it counts as at full rate.
LOAD_WARM_UP = 0.5
#: The load client stops, whatever happens, after this long.
LOAD_LIMIT = 25.0
#: Deadline of each load call: far longer than any call takes, far shorter than the test.
LOAD_CALL_TIMEOUT = 5.0

_STATUS_NAMES = {value: name for name, value in health_pb2.HealthCheckResponse.ServingStatus.items()}


async def load(address: str) -> None:
    """Call Check(readiness) and SmokeTest flat out from many callers; print every outcome as JSON.

    Callers behave as clients of a load balancer would: each stops at its
    first failed call, and a Check caller also once readiness answers
    NOT_SERVING.  A Watch on readiness (on connection 0), opened first,
    records what it is told.  Every record carries its place in the order
    this process saw completions (``seq``), so orderings need no clock.
    """
    seq = itertools.count()
    calls: list[tuple[str, int, float, float, str, str, int]] = []  # as LoadCall
    watched: list[tuple[str, float, int]] = []  # status or code, when, seq
    unfinished = 0
    channels = [
        grpc.aio.insecure_channel(address, options=(("grpc.use_local_subchannel_pool", 1),))
        for _ in range(LOAD_CHANNELS)
    ]
    watch = health_pb2_grpc.HealthStub(channels[0]).Watch(
        health_pb2.HealthCheckRequest(service="readiness"), timeout=LOAD_LIMIT
    )

    async def follow() -> None:
        try:
            while (answer := await watch.read()) is not grpc.aio.EOF:
                watched.append((_STATUS_NAMES[answer.status], time.monotonic(), next(seq)))
        except grpc.aio.AioRpcError as exc:
            watched.append((exc.code().name, time.monotonic(), next(seq)))

    async def caller(method: str, connection: int) -> None:
        nonlocal unfinished
        check = health_pb2_grpc.HealthStub(channels[connection]).Check
        smoke = smoke_pb2_grpc.SmokeTestServiceStub(channels[connection]).SmokeTest
        check_request = health_pb2.HealthCheckRequest(service="readiness")
        smoke_request = smoke_pb2.SmokeTestRequest()
        while True:
            started = time.monotonic()
            unfinished += 1
            try:
                if method == "Check":
                    answer = _STATUS_NAMES[(await check(check_request, timeout=LOAD_CALL_TIMEOUT)).status]
                else:
                    answer = smoke_pb2.Status.Name((await smoke(smoke_request, timeout=LOAD_CALL_TIMEOUT)).status)
                code = "OK"
            except grpc.aio.AioRpcError as exc:
                code, answer = exc.code().name, exc.details() or ""
            unfinished -= 1
            calls.append((method, connection, started, time.monotonic(), code, answer, next(seq)))
            if code != "OK" or answer == "NOT_SERVING":
                return

    first = await watch.read()
    watched.append((_STATUS_NAMES[first.status], time.monotonic(), next(seq)))
    tasks = [asyncio.create_task(follow())] + [
        asyncio.create_task(caller(method, connection))
        for connection in range(LOAD_CHANNELS) for method, count in LOAD_CALLERS.items() for _ in range(count)
    ]
    await asyncio.sleep(LOAD_WARM_UP)
    print(json.dumps({"warm": time.monotonic()}), flush=True)
    try:
        async with asyncio.timeout(LOAD_LIMIT):
            await asyncio.gather(*tasks)
    except TimeoutError:
        pass  # reported: the calls still running count as unfinished
    print(json.dumps({"calls": calls, "watched": watched, "unfinished": unfinished}), flush=True)
    await asyncio.gather(*(channel.close() for channel in channels))


if __name__ == "__main__":
    with asyncio.Runner(loop_factory=new_event_loop) as runner:  # uvloop: more calls per CPU second
        runner.run(load(sys.argv[1]))
