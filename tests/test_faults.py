"""Faults with real processes: SIGTERM under load, misbehaving checks, clients that vanish.

Every scenario runs a real server and real clients, some in child processes
that this module also provides (``python -m tests.test_faults load ADDRESS``
and ``python -m tests.test_faults smoke-storm ADDRESS N``), and each test
stays well under 30 s.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from petsage_grpc._proto.smoke.v1 import smoke_pb2, smoke_pb2_grpc
from petsage_grpc.server.process import new_event_loop
from tests.support import (
    PROCESS_TIMEOUT,
    ROOT,
    RPC_TIMEOUT,
    SERVING_LINE,
    LineLog,
    ServerProcess,
    proc_status,
    stall,
    start_on_small_pipe,
    wait_for_file_line,
)
from tests.watch_crowd import watching

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
Start = Callable[..., ServerProcess]

#: Load: connections, and callers of each method on each connection (one call at a time each).
LOAD_CHANNELS = 4
LOAD_CALLERS = {"Check": 18, "SmokeTest": 6}
#: How long the load runs before it counts as at full rate, and then before the signal.
LOAD_WARM_UP = 0.5
LOAD_SECONDS = 2.0
#: The load client stops, whatever happens, after this long.
LOAD_LIMIT = 25.0
#: Calls per second the load must reach before the signal, on a busy 2-core machine.
LOAD_FLOOR = 700
#: Deadline of each load call: far longer than any call takes, far shorter than the test.
LOAD_CALL_TIMEOUT = 5.0


def _child(module: str, *args: str) -> subprocess.Popen[bytes]:
    """``python -m MODULE ARGS`` as a child process, its output piped to us."""
    return subprocess.Popen(
        [sys.executable, "-m", module, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT
    )


@contextmanager
def _reaped(processes: list[subprocess.Popen[bytes]]) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Kill (by its own PID) and wait for every child process in ``processes`` on the way out."""
    try:
        yield processes
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.wait(RPC_TIMEOUT)


def _percentile(values: list[float], fraction: float) -> float:
    """The value below which ``fraction`` of ``values`` lie (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


# --- SIGTERM under sustained load ----------------------------------------------------------------

_STATUS_NAMES = {value: name for name, value in health_pb2.HealthCheckResponse.ServingStatus.items()}


async def _load(address: str) -> None:
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


@dataclass
class LoadCall:
    """One call the load client made."""

    method: str
    connection: int
    started: float
    ended: float
    code: str
    answer: str  # the status answered, or the error's details
    seq: int  # its place in the order the client saw completions


@dataclass
class LoadRun:
    """What the load client saw around one SIGTERM."""

    calls: list[LoadCall]
    watched: list[tuple[str, float, int]]
    rate: float  # calls per second between warm-up and the signal
    log: str  # the server's log


def _sigterm_under_load(start_server: Start, log: Path, *args: str) -> LoadRun:
    """Run the load against a server, SIGTERM it at full rate; the server must exit 0."""
    with log.open("wb") as stdout:  # a file: reading a line per call here would slow the load
        server = start_server(*args, stdout=stdout.fileno(), wait=False)
    server.address = wait_for_file_line(log, SERVING_LINE.pattern)[1]
    with _reaped([_child("tests.test_faults", "load", server.address)]) as (client,):
        output, errors = LineLog(client.stdout), LineLog(client.stderr)
        warm = json.loads(output.wait_for(r'^\{"warm"').string)["warm"]
        time.sleep(LOAD_SECONDS)  # sustain the load: nothing to wait for but time
        signalled = time.monotonic()
        server.signal(signal.SIGTERM)
        assert server.wait() == 0, server.stderr.text()
        assert client.wait(LOAD_LIMIT) == 0, errors.text()
        result = json.loads(output.wait_for(r'^\{"calls"').string)
    assert result["unfinished"] == 0
    calls = [LoadCall(*row) for row in result["calls"]]
    rate = sum(warm <= c.ended <= signalled for c in calls) / (signalled - warm)
    return LoadRun(calls, result["watched"], rate, log.read_text())


@pytest.mark.parametrize("drain", [0, 1])
def test_sigterm_under_sustained_load_loses_no_call(
    start_server: Start, tmp_path: Path, record_property: Callable[[str, object], None], drain: int
) -> None:
    """SIGTERM at full load: every call OK or UNAVAILABLE, readiness NOT_SERVING first, exit 0."""
    run = _sigterm_under_load(start_server, tmp_path / "server.log", "--drain", str(drain), "--grace", "5")

    calls, watched = run.calls, run.watched
    codes = {code: sum(c.code == code for c in calls) for code in sorted({c.code for c in calls})}
    failed = sorted((c for c in calls if c.code != "OK"), key=lambda c: c.seq)
    assert failed, "the load never saw the server refuse a call"
    first_failed = failed[0]
    _, not_serving_at, not_serving_seq = watched[1]
    refused = re.search(r"(\d+) call\(s\) refused with UNAVAILABLE", run.log)
    record_property("terminal_summary", (
        f"SIGTERM under load, drain {drain}: {run.rate:.0f} calls/s before the signal; {len(calls)} calls "
        f"{codes}, server: {refused and refused[0]}; first refusal (connection {first_failed.connection}) "
        f"{(first_failed.ended - not_serving_at) * 1e3:+.2f} ms, {first_failed.seq - not_serving_seq:+d} "
        "completions after the Watch (connection 0) saw NOT_SERVING"
    ))

    assert set(codes) <= {"OK", "UNAVAILABLE"}, [c for c in calls if c.code not in ("OK", "UNAVAILABLE")][:5]
    assert run.rate > LOAD_FLOOR, f"only {run.rate:.0f} calls/s"
    assert {c.method for c in calls} == {"Check", "SmokeTest"}
    assert {c.answer for c in calls if c.method == "SmokeTest" and c.code == "OK"} == {"STATUS_OK"}
    assert [status for status, _, _ in watched] == ["SERVING", "NOT_SERVING", "UNAVAILABLE"]
    # The server turned readiness NOT_SERVING before it refused anything.
    assert run.log.index("'readiness': SERVING -> NOT_SERVING") < run.log.index("new calls refused")
    if drain:
        # Draining: readiness NOT_SERVING, yet calls keep succeeding for about the drain period.
        in_drain = [c for c in calls if c.code == "OK" and c.started > not_serving_at]
        record_property("terminal_summary", (
            f"SIGTERM under load, drain {drain}: {len(in_drain)} calls OK after NOT_SERVING was seen, "
            f"over {max(c.ended for c in in_drain) - not_serving_at:.3f}s"
        ))
        assert not_serving_seq < first_failed.seq, (watched, first_failed)
        assert first_failed.ended - not_serving_at >= 0.8 * drain
        assert max(c.ended for c in in_drain) - not_serving_at >= 0.8 * drain
        assert len(in_drain) > 100
    else:
        # No drain: the Watch message and the first refusals leave the server in the same
        # event loop turn, on different streams (and connections), so either may be seen first.
        assert abs(first_failed.ended - not_serving_at) < 0.1, (watched, first_failed)


# --- Checks that misbehave -----------------------------------------------------------------------


def _steer(control: Path, check: str, command: str) -> None:
    """Tell one steered check of tests/embedded_app.py what to do on its next runs."""
    path = control / check
    path.with_suffix(".tmp").write_text(command)
    path.with_suffix(".tmp").replace(path)  # atomic: a run never reads half a command


def _start_app(start_server: Start, control: Path, *args: str, **kwargs: Any) -> ServerProcess:
    """The embedding test service (tests/embedded_app.py), steered through ``control``."""
    command = (sys.executable, "-m", "tests.embedded_app", "--control", str(control))
    return start_server(*args, command=command, **kwargs)


def _timed_checks(server: ServerProcess, seconds: float, expect: dict[str, int]) -> list[float]:
    """Sequential Health/Check calls for ``seconds``, each answering as ``expect``; their latencies."""
    stub = health_pb2_grpc.HealthStub(server.channel())
    requests = [(health_pb2.HealthCheckRequest(service=name), status) for name, status in expect.items()]
    latencies = []
    end = time.monotonic() + seconds
    for request, status in itertools.cycle(requests):
        started = time.perf_counter()
        answer = stub.Check(request, timeout=1.0)
        latencies.append(time.perf_counter() - started)
        assert answer.status == status, request.service
        if time.monotonic() > end:
            return latencies
    raise AssertionError("unreachable")


def test_hanging_raising_and_leaking_checks_leave_health_fast_and_readiness_on_critical(
    start_server: Start, tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    """Checks hanging (async and on a thread), raising and leaking at 0.1 s: health stays fast and right."""
    server = _start_app(start_server, tmp_path)
    pid = server.process.pid
    threads_healthy = min(proc_status(pid, "Threads") for _ in range(5))
    _steer(tmp_path, "cache", "hang")  # async, never returns
    _steer(tmp_path, "legacy", "hang")  # a plain function on its thread, never returns
    _steer(tmp_path, "wrapped", "raise quota exceeded")
    _steer(tmp_path, "database", "leak")  # critical, passes, leaks 1 MiB and a task per run
    server.stdout.wait_for("check legacy is failing: timed out after 0.5s")
    server.stdout.wait_for("check cache is failing: timed out after 0.5s")
    server.stdout.wait_for("check wrapped is failing: quota exceeded")
    threads_hung = proc_status(pid, "Threads")
    rss_before = proc_status(pid, "VmRSS")

    all_serving = dict.fromkeys(("readiness", "liveness", ""), SERVING)
    latencies = _timed_checks(server, 3.0, all_serving)  # 30 runs of each misbehaving check

    rss_growth_mib = (proc_status(pid, "VmRSS") - rss_before) / 1024
    threads_after = proc_status(pid, "Threads")
    p99, worst = _percentile(latencies, 0.99), max(latencies)
    record_property("terminal_summary", (
        f"misbehaving checks: {len(latencies)} Checks, p50 {statistics.median(latencies) * 1e3:.2f} ms, "
        f"p99 {p99 * 1e3:.2f} ms, max {worst * 1e3:.2f} ms; RSS +{rss_growth_mib:.0f} MiB; "
        f"threads {threads_healthy} healthy, {threads_hung} hung, {threads_after} after"
    ))
    assert p99 < 0.1 and worst < 0.5
    assert rss_growth_mib > 10  # the leak really ran while health answered
    assert threads_after <= threads_hung <= threads_healthy + 1  # one hung thread, not one per run
    response = server.smoke()
    assert response.status == smoke_pb2.STATUS_DEGRADED
    details = {c.name: c.detail for c in response.checks}
    assert details["cache"] == "timed out after 0.5s"
    assert details["legacy"].startswith("previous run still running after ")
    assert details["wrapped"] == "quota exceeded"
    assert details["database"] == "database answers"

    # Readiness follows the critical check alone, while the others keep misbehaving.
    watch = health_pb2_grpc.HealthStub(server.channel()).Watch(
        health_pb2.HealthCheckRequest(service="readiness"), timeout=30
    )
    assert next(watch).status == SERVING
    _steer(tmp_path, "database", "raise connection refused")
    assert next(watch).status == NOT_SERVING
    latencies = _timed_checks(server, 1.0, {"readiness": NOT_SERVING, "liveness": SERVING, "": NOT_SERVING})
    assert _percentile(latencies, 0.99) < 0.1 and max(latencies) < 0.5
    _steer(tmp_path, "database", "leak")
    assert next(watch).status == SERVING
    watch.cancel()
    assert server.health("liveness") == SERVING
    assert proc_status(pid, "Threads") <= threads_hung


# --- Client disconnect storms --------------------------------------------------------------------

#: The watcher cap of the storm test: leaked slots would show as RESOURCE_EXHAUSTED.
MAX_WATCHERS = 600
#: Crowd processes per round, and streams each opens: together, the cap.
CROWDS = 3
CROWD_STREAMS = MAX_WATCHERS // CROWDS
ROUNDS = 3


def _crowd(address: str, deadline: float) -> subprocess.Popen[bytes]:
    """A child process holding CROWD_STREAMS Watch streams; retried while the cap refuses it.

    Streams of a killed client are released once the server has noticed the
    connection is gone: until then, a new crowd may be refused.
    """
    while True:
        process = _child("tests.watch_crowd", address, "readiness", str(CROWD_STREAMS))
        try:
            LineLog(process.stdout).wait_for(f"watching {CROWD_STREAMS}", timeout=deadline - time.monotonic())
            return process
        except AssertionError:
            process.kill()
            process.wait(RPC_TIMEOUT)
            assert process.stderr is not None
            error = process.stderr.read().decode()
            if "RESOURCE_EXHAUSTED" not in error or time.monotonic() > deadline:
                raise AssertionError(error) from None


def test_watch_disconnect_storms_release_every_slot(start_server: Start, tmp_path: Path) -> None:
    """Rounds of clients that vanish with hundreds of Watch streams leave no slot taken and no harm done.

    No status changes while streams vanish: that is the next test's case.
    """
    server = _start_app(start_server, tmp_path, "--max-watchers", str(MAX_WATCHERS))
    for _ in range(ROUNDS):
        deadline = time.monotonic() + 15
        with _reaped([]) as crowds:
            for _ in range(CROWDS):
                crowds.append(_crowd(server.address, deadline))
            for crowd in crowds:
                crowd.kill()  # every stream vanishes with its connection, none cancelled

    assert server.health("readiness") == SERVING
    assert server.smoke().status == smoke_pb2.STATUS_OK

    async def fill_the_cap_then_stop() -> tuple[list[int], grpc.StatusCode, list[int], list[grpc.StatusCode]]:
        """MAX_WATCHERS new streams (refusals retried until the server has let the old ones go), one more.

        Then a status change, and a SIGTERM that must end every stream.
        """
        async with asyncio.timeout(20):
            while True:
                try:
                    async with watching(server.address, "readiness", MAX_WATCHERS) as crowd:
                        past_cap = await _one_more_watch(server.address)
                        _steer(tmp_path, "database", "raise down")
                        changes = await crowd.next_statuses(timeout=RPC_TIMEOUT)
                        server.signal(signal.SIGTERM)
                        ends = [await call.code() for call in crowd.calls]
                        return crowd.first, past_cap, changes, ends
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc

    first, past_cap, changes, ends = asyncio.run(fill_the_cap_then_stop())
    assert first == [SERVING] * MAX_WATCHERS
    assert past_cap == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert changes == [NOT_SERVING] * MAX_WATCHERS
    assert ends == [grpc.StatusCode.UNAVAILABLE] * MAX_WATCHERS
    assert server.wait() == 0, server.stderr.text()
    assert "Traceback" not in server.stderr.text() + server.stdout.text()


async def _one_more_watch(address: str) -> grpc.StatusCode:
    """The code of one more Watch stream on ``address`` (RESOURCE_EXHAUSTED when the cap is full)."""
    async with grpc.aio.insecure_channel(address) as channel:
        extra = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service="readiness"), timeout=RPC_TIMEOUT
        )
        try:
            await extra.read()
        except grpc.aio.AioRpcError:
            pass
        else:
            extra.cancel()
        code: grpc.StatusCode = await extra.code()
        return code


#: Watch streams that vanish while a status change is sent to them, and how many times.
VANISHING = 500
VANISHING_ROUNDS = 4


def test_clients_vanishing_while_a_status_change_goes_out_do_not_crash_the_server(
    start_server: Start, tmp_path: Path
) -> None:
    """Hundreds of Watch clients that leave while the server sends them a change: it keeps serving."""
    server = _start_app(start_server, tmp_path, env={"PYTHONFAULTHANDLER": "1"})

    async def vanish_during_change(command: str) -> None:
        async with watching(server.address, "readiness", VANISHING) as crowd:
            _steer(tmp_path, "database", command)
            await crowd.calls[0].read()  # the change is going out: leave, connection and all

    for round_ in range(VANISHING_ROUNDS):
        try:
            asyncio.run(vanish_during_change("raise down" if round_ % 2 == 0 else "ok"))
            assert server.health("liveness") == SERVING
        except grpc.RpcError as exc:
            code = server.process.wait(PROCESS_TIMEOUT)
            raise AssertionError(f"round {round_ + 1}: the server died ({code}):\n{server.stderr.text()}") from exc
    server.signal(signal.SIGTERM)
    assert server.wait() == 0, server.stderr.text()


# --- SmokeTest calls abandoned in flight ---------------------------------------------------------

#: SmokeTest calls abandoned at once, by each kind of client.
ABANDONED = 300
#: Connections the abandoned calls are spread over.
STORM_CHANNELS = 3


async def _start_smoke_storm(address: str, count: int) -> tuple[list[grpc.aio.Channel], list[Any]]:
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


async def _hold_smoke_storm(address: str, count: int) -> None:
    """Child process: start ``count`` SmokeTest calls, say so, then wait to be killed."""
    await _start_smoke_storm(address, count)
    print(f"in flight {count}", flush=True)
    await asyncio.Event().wait()


def test_abandoned_slow_smoke_tests_leave_the_server_healthy(start_server: Start) -> None:
    """Hundreds of SmokeTests stuck on a stalled log writer, cancelled and then killed: the server recovers."""
    server, read_end, write_end = start_on_small_pipe(
        start_server, "--log-timeout", "3", "--check-interval", "0.2"
    )
    stall(write_end)  # every SmokeTest now waits for its record (up to 3 s)

    async def cancel_all() -> list[grpc.StatusCode]:
        channels, calls = await _start_smoke_storm(server.address, ABANDONED)
        for call in calls:
            call.cancel()
        codes = [await call.code() for call in calls]
        for channel in channels:
            await channel.close()
        return codes

    assert asyncio.run(cancel_all()) == [grpc.StatusCode.CANCELLED] * ABANDONED
    with _reaped([_child("tests.test_faults", "smoke-storm", server.address, str(ABANDONED))]) as (client,):
        LineLog(client.stdout).wait_for(f"in flight {ABANDONED}")
        client.kill()  # connections gone with the calls on them
    assert server.health("liveness") == SERVING
    server.wait_for_health("readiness", NOT_SERVING)  # the logging check has timed out: still stuck

    output = LineLog(os.fdopen(read_end, "rb"))  # read again: the log writer gets unstuck
    server.wait_for_health("readiness", SERVING)
    assert server.smoke().status == smoke_pb2.STATUS_OK
    assert server.process.poll() is None
    server.signal(signal.SIGTERM)
    assert server.wait() == 0
    output.wait_for("stopped after")
    output.wait_for(r"waiting up to \S+ for 0 call\(s\) in flight")  # every abandoned call was let go
    assert "Traceback" not in server.stderr.text() + output.text()
    os.close(write_end)


def main(argv: list[str]) -> None:
    """The child-process clients: ``load ADDRESS`` and ``smoke-storm ADDRESS N``."""
    if argv[0] == "load":
        with asyncio.Runner(loop_factory=new_event_loop) as runner:  # uvloop: more calls per CPU second
            runner.run(_load(argv[1]))
    elif argv[0] == "smoke-storm":
        asyncio.run(_hold_smoke_storm(argv[1], int(argv[2])))
    else:
        raise SystemExit(f"unknown client {argv[0]!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
