"""Health probes while SmokeTest load saturates the server: what a kubelet sees on a busy pod.

A kubelet's gRPC probe dials a new connection and calls Check within one
budget of a second; so does each probe here, at a fixed rate (a slow probe
does not delay the next).  A probe fails when it is late, fails or answers
anything but SERVING.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2 as _health_pb2
from grpc_health.v1 import health_pb2_grpc as _health_pb2_grpc

from bench.calls import READINESS, SERVING

#: The kubelet's budget for connecting and answering (its default timeoutSeconds).
PROBE_BUDGET = 1.0


@dataclass
class Probes:
    """Latency of every good probe, and why the others failed."""

    sent: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


async def _probe(address: str, result: Probes, service: str, any_status: bool) -> None:
    began = time.monotonic()
    # A fresh connection per probe, as the kubelet makes.
    async with grpc.aio.insecure_channel(address, options=(("grpc.use_local_subchannel_pool", 1),)) as channel:
        try:
            answer = await _health_pb2_grpc.HealthStub(channel).Check(
                _health_pb2.HealthCheckRequest(service=service), timeout=PROBE_BUDGET)
        except grpc.aio.AioRpcError as exc:
            result.failures.append(f"{exc.code().name} {exc.details()}")
            return
    if answer.status != SERVING and not any_status:
        result.failures.append(f"status {answer.status}")
    else:
        result.latencies_ms.append((time.monotonic() - began) * 1000)


async def probe(address: str, rate: float, seconds: float, *, service: str = READINESS,
                any_status: bool = False) -> Probes:
    """Probe ``address`` ``rate`` times a second for ``seconds``; wait for every probe to end.

    With ``any_status`` an answer counts whatever the status (a server shutting down answers NOT_SERVING).
    """
    result = Probes()
    tasks = []
    began = time.monotonic()
    while (due := began + result.sent / rate) < began + seconds:
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        tasks.append(asyncio.create_task(_probe(address, result, service, any_status)))
        result.sent += 1
    # Each probe ends within its budget; the margin covers closing its channel.
    await asyncio.wait_for(asyncio.gather(*tasks), PROBE_BUDGET + 5)
    return result
