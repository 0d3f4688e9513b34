"""Watch fan-out: N streams open on ``readiness``, one change, how long until every stream has it.

Neither server has an RPC that changes a status, but both turn ``readiness``
NOT_SERVING on the first SIGTERM, at once and before anything else, so the
change is that signal.  The streams are spread over several connections, as
they would be from many clients, and read by one asyncio client: its own time
to take in N messages is part of the figure, equally for both servers.

No stream is cancelled until every stream has the change (or the wait is
over): grpcio's sync ``HealthServicer`` sends the change to each watcher while
holding the lock that a cancelled watch needs to unregister, so a cancel in
the middle of the fan-out deadlocks it.  Streams end as the server ends them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2 as _health_pb2
from grpc_health.v1 import health_pb2_grpc as _health_pb2_grpc

from bench import probes
from bench.calls import NOT_SERVING, READINESS

#: Streams per connection.
STREAMS_PER_CHANNEL = 1000
#: Streams opened at once, so that opening is not one burst of N calls.
OPEN_BATCH = 500
#: Deadline of every Watch call: longer than any run of this figure.
WATCH_DEADLINE = 300.0


@dataclass
class FanOut:
    """What the fan-out measured."""

    streams: int = 0
    opened: int = 0
    delivered: int = 0
    open_seconds: float = 0.0
    rss_growth_mib: float = 0.0
    #: CPU time of this process over wall time while the change was delivered: near 100 %, the
    #: client, not the server, set the pace.
    client_busy: float = 0.0
    #: Streams told NOT_SERVING before the signal.
    early: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


@dataclass
class _Tally:
    """What the streams saw so far (the event loop's thread only)."""

    opened: int = 0
    arrived: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    #: Set once every opened stream has had the change or ended.
    settled: asyncio.Event = field(default_factory=asyncio.Event)
    ended: int = 0
    #: time.monotonic() when the change was made; None before.
    changed_at: float | None = None
    #: Streams told NOT_SERVING before the change: the server dropped readiness on its own.
    early: int = 0

    def end(self) -> None:
        """Count one stream as done with (changed, failed or ended)."""
        self.ended += 1
        if self.ended >= self.opened:
            self.settled.set()


def _channels(address: str, count: int) -> list[grpc.aio.Channel]:
    """Enough channels for ``count`` Watch streams, each with a connection of its own."""
    # A local subchannel pool per channel: otherwise grpc shares one connection among them.
    return [grpc.aio.insecure_channel(address, options=(("grpc.use_local_subchannel_pool", 1),))
            for _ in range(-(-count // STREAMS_PER_CHANNEL))]


async def _close(tasks: list[asyncio.Task[None]], channels: list[grpc.aio.Channel]) -> None:
    """Cancel the streams' tasks, wait for them to end, then close their channels."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for channel in channels:
        await channel.close()


async def _watch(stub: _health_pb2_grpc.HealthStub, opened: asyncio.Event, tally: _Tally) -> None:
    """One stream: open on the first status, then record when NOT_SERVING arrives after the change."""
    call = stub.Watch(_health_pb2.HealthCheckRequest(service=READINESS), timeout=WATCH_DEADLINE)
    changed = dropped = False
    try:
        async for answer in call:
            if not opened.is_set():
                tally.opened += 1
                opened.set()
            if answer.status != NOT_SERVING or changed:
                continue
            if tally.changed_at is not None:
                changed = True
                tally.arrived.append(time.monotonic())
                tally.end()
            elif not dropped:  # e.g. a check failing while the streams open: a figure of its own
                dropped = True
                tally.early += 1
    except grpc.aio.AioRpcError as exc:
        if not changed:  # after the change, the server ending the stream is expected
            tally.errors.append(f"{exc.code().name} {exc.details()}")
    finally:
        if not changed and opened.is_set():
            tally.end()
        opened.set()  # an early end must not leave the opening wait hanging


async def fan_out(address: str, count: int, rss_mib: Callable[[], float], change: Callable[[], None],
                  timeout: float) -> FanOut:
    """Open ``count`` Watch streams, call ``change()`` and time every stream's NOT_SERVING.

    ``rss_mib`` reads the server's memory before opening and once all are open.
    Every step is bounded by ``timeout`` seconds.
    """
    result = FanOut(streams=count)
    before = rss_mib()
    channels = _channels(address, count)
    tally = _Tally()
    tasks: list[asyncio.Task[None]] = []
    try:
        began = time.monotonic()
        for start in range(0, count, OPEN_BATCH):
            batch = []
            for index in range(start, min(count, start + OPEN_BATCH)):
                opened = asyncio.Event()
                stub = _health_pb2_grpc.HealthStub(channels[index // STREAMS_PER_CHANNEL])
                tasks.append(asyncio.create_task(_watch(stub, opened, tally)))
                batch.append(opened.wait())
            await asyncio.wait_for(asyncio.gather(*batch), max(0.0, timeout - (time.monotonic() - began)))
        result.open_seconds = time.monotonic() - began
        result.opened = tally.opened
        result.rss_growth_mib = rss_mib() - before
        # Streams that failed while others were opening may have set it already.
        tally.settled.clear()
        if tally.ended >= tally.opened:
            tally.settled.set()
        signalled, cpu = time.monotonic(), time.process_time()
        tally.changed_at = signalled
        change()
        try:
            await asyncio.wait_for(tally.settled.wait(), timeout)
        except TimeoutError:
            pass
        result.client_busy = (time.process_time() - cpu) / max(time.monotonic() - signalled, 1e-9)
        result.delivered = len(tally.arrived)
        result.latencies_ms = [(moment - signalled) * 1000 for moment in tally.arrived]
        if result.delivered < count:
            result.problems.append(f"{count - result.delivered} of {count} streams had no NOT_SERVING "
                                   f"(waited up to {timeout}s)")
    except TimeoutError:
        result.opened = tally.opened
        result.problems.append(f"only {tally.opened} of {count} streams open after {timeout}s")
    finally:
        result.early = tally.early
        if tally.early:
            result.problems.append(f"{tally.early} streams were told NOT_SERVING before the signal")
        if tally.errors:
            result.problems.append(f"{len(tally.errors)} streams failed, e.g. {tally.errors[0]}")
        await _close(tasks, channels)
    return result


@dataclass
class Storm:
    """What the cancel storm measured: probes answered while the server changed status and lost watchers."""

    streams: int = 0
    probe_latencies_ms: list[float] = field(default_factory=list)
    probe_failures: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


async def cancel_storm(address: str, count: int, change: Callable[[], None], *, probe_rate: float,
                       probe_seconds: float, timeout: float) -> Storm:
    """Open ``count`` Watch streams, then call ``change()`` and cancel every stream at once; probe meanwhile.

    The status change makes the server send to every watcher while the
    cancellations make it unregister them: a server that sends while holding
    the lock its cancellations take deadlocks here, and its probes fail.
    Probes, each on a fresh connection with the kubelet's 1 s budget, start
    at the change and run for ``probe_seconds`` (the server must still serve:
    start it with a drain longer than that).
    """
    result = Storm()
    channels = _channels(address, count)
    tally = _Tally()
    tasks: list[asyncio.Task[None]] = []
    try:
        openings = []
        for index in range(count):
            opened = asyncio.Event()
            stub = _health_pb2_grpc.HealthStub(channels[index // STREAMS_PER_CHANNEL])
            tasks.append(asyncio.create_task(_watch(stub, opened, tally)))
            openings.append(opened.wait())
        try:
            await asyncio.wait_for(asyncio.gather(*openings), timeout)
        except TimeoutError:
            result.problems.append(f"only {tally.opened} of {count} streams open after {timeout}s")
        result.streams = tally.opened
        tally.changed_at = time.monotonic()
        change()
        for task in tasks:  # every stream cancelled in this same instant
            task.cancel()
        # Any status is an answer: the change turned them NOT_SERVING, a deadlocked server gives none.
        seen = await probes.probe(address, probe_rate, probe_seconds, any_status=True)
        result.probe_latencies_ms, result.probe_failures = seen.latencies_ms, seen.failures
    finally:
        await _close(tasks, channels)
    return result
