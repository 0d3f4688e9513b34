"""Faults with real processes: SIGTERM under load, misbehaving checks, clients that vanish.

Every scenario runs a real server and real clients, some in child processes
(tests/programs: the load client, Watch crowds, SmokeTest storms), and each
test stays well under 30 s.
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
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from petsage_grpc._proto.smoke.v1 import smoke_pb2
from tests.programs.load import LOAD_LIMIT
from tests.programs.smoke_storm import start_smoke_storm
from tests.programs.watch_crowd import watching
from tests.support import (
    NOT_SERVING,
    PROCESS_TIMEOUT,
    RPC_TIMEOUT,
    SERVING,
    SERVING_LINE,
    App,
    LineLog,
    ServerProcess,
    Start,
    child,
    proc_status,
    reaped,
    stall,
    start_on_small_pipe,
    wait_for_file_line,
)

#: How long the load runs at full rate before the signal.
LOAD_SECONDS = 2.0
#: Calls per second the load must reach before the signal, on a busy 2-core machine.
LOAD_FLOOR = 700


def _percentile(values: list[float], fraction: float) -> float:
    """The value below which ``fraction`` of ``values`` lie (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


# --- SIGTERM under sustained load ----------------------------------------------------------------

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
    with reaped([child("tests.programs.load", server.address)]) as (client,):
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
    assert [status for status, _, _ in watched] == ["SERVING", "NOT_SERVING", "UNAVAILABLE"]
    # SmokeTest agrees with readiness: OK until the signal, FAILING (the shutdown) from then on.
    smoke_tests = [c for c in calls if c.method == "SmokeTest" and c.code == "OK"]
    assert {c.answer for c in smoke_tests if c.seq < watched[1][2]} == {"STATUS_OK"}
    assert {c.answer for c in smoke_tests if c.started > watched[1][1]} <= {"STATUS_FAILING"}
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
    start_app: Callable[..., App], record_property: Callable[[str, object], None]
) -> None:
    """Checks hanging (async and on a thread), raising and leaking at 0.1 s: health stays fast and right."""
    app = start_app()
    server = app.server
    pid = server.process.pid
    threads_healthy = min(proc_status(pid, "Threads") for _ in range(5))
    app.steer("cache", "hang")  # async, never returns
    app.steer("legacy", "hang")  # a plain function on its thread, never returns
    app.steer("wrapped", "raise quota exceeded")
    app.steer("database", "leak")  # critical, passes, leaks 1 MiB and a task per run
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
    app.steer("database", "raise connection refused")
    assert next(watch).status == NOT_SERVING
    latencies = _timed_checks(server, 1.0, {"readiness": NOT_SERVING, "liveness": SERVING, "": NOT_SERVING})
    assert _percentile(latencies, 0.99) < 0.1 and max(latencies) < 0.5
    app.steer("database", "leak")
    assert next(watch).status == SERVING
    watch.cancel()
    assert server.health("liveness") == SERVING
    # Still one hung thread, not one per run (grpc core may have started one of its own meanwhile).
    assert proc_status(pid, "Threads") <= threads_hung + 1


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
        process = child("tests.programs.watch_crowd", address, "readiness", str(CROWD_STREAMS))
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


def test_watch_disconnect_storms_release_every_slot(start_app: Callable[..., App]) -> None:
    """Rounds of clients that vanish with hundreds of Watch streams leave no slot taken and no harm done.

    No status changes while streams vanish: that is the next test's case.
    """
    app = start_app("--max-watchers", str(MAX_WATCHERS))
    server = app.server
    for _ in range(ROUNDS):
        deadline = time.monotonic() + 15
        with reaped([]) as crowds:
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
                        past_cap = await _one_more_watch(crowd.channels[0])  # the holder's own connection
                        app.steer("database", "raise down")
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


async def _one_more_watch(channel: grpc.aio.Channel) -> grpc.StatusCode:
    """The code of one more Watch stream on ``channel`` (RESOURCE_EXHAUSTED when the cap is full).

    On the connection that holds the slots: another connection would take one
    of them, as callers holding fewer do (see test_hostile.py).
    """
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
    start_app: Callable[..., App]
) -> None:
    """Hundreds of Watch clients that leave while the server sends them a change: it keeps serving."""
    app = start_app(env={"PYTHONFAULTHANDLER": "1"})
    server = app.server

    async def vanish_during_change(command: str) -> None:
        async with watching(server.address, "readiness", VANISHING) as crowd:
            app.steer("database", command)
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


def test_abandoned_slow_smoke_tests_leave_the_server_healthy(start_server: Start) -> None:
    """Hundreds of SmokeTests stuck on a stalled log writer, cancelled and then killed: the server recovers."""
    server, read_end, write_end = start_on_small_pipe(
        start_server, "--log-timeout", "3", "--check-interval", "0.2"
    )
    stall(write_end)  # every SmokeTest now waits for its record (up to 3 s)

    async def cancel_all() -> list[grpc.StatusCode]:
        channels, calls = await start_smoke_storm(server.address, ABANDONED)
        for call in calls:
            call.cancel()
        codes = [await call.code() for call in calls]
        for channel in channels:
            await channel.close()
        return codes

    assert asyncio.run(cancel_all()) == [grpc.StatusCode.CANCELLED] * ABANDONED
    with reaped([child("tests.programs.smoke_storm", server.address, str(ABANDONED))]) as (client,):
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
