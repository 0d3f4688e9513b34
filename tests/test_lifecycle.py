"""Start and stop: a taken port, SIGTERM under load, and a second signal."""

from __future__ import annotations

import os
import re
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from petsage_grpc._proto.smoke.v1 import smoke_pb2, smoke_pb2_grpc
from tests.support import (
    NOT_SERVING,
    RPC_TIMEOUT,
    SERVING,
    LineLog,
    ServerProcess,
    Start,
    run_cli,
    stall,
    start_on_small_pipe,
)


def test_taken_port_fails_at_start_with_clear_message(server: ServerProcess) -> None:
    second = run_cli("serve", "--address", server.address)

    assert second.returncode == 2
    assert second.stderr.strip().splitlines() == [
        f"petsage-grpc serve: error: cannot listen on {server.address}: the port is already in use"
    ]
    assert server.health("readiness") == SERVING


def test_port_held_by_another_program_fails_at_start() -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        address = f"127.0.0.1:{other.getsockname()[1]}"

        refused = run_cli("serve", "--address", address)

    assert refused.returncode == 2
    assert "the port is already in use" in refused.stderr


def _hammer(address: str, outcomes: list[tuple[float, float, grpc.StatusCode]], warm: threading.Event) -> None:
    """Call SmokeTest back to back until the server refuses; record every outcome."""
    with grpc.insecure_channel(address) as channel:
        stub = smoke_pb2_grpc.SmokeTestServiceStub(channel)
        for count in range(5000):
            started = time.monotonic()
            try:
                stub.SmokeTest(smoke_pb2.SmokeTestRequest(), timeout=RPC_TIMEOUT)
                code = grpc.StatusCode.OK
            except grpc.RpcError as exc:
                code = exc.code()
            outcomes.append((started, time.monotonic(), code))
            if count == 20:
                warm.set()
            if code != grpc.StatusCode.OK:
                return


def test_sigterm_under_load_loses_no_call_and_flips_statuses_first(server: ServerProcess) -> None:
    outcomes: list[tuple[float, float, grpc.StatusCode]] = []
    warm = [threading.Event() for _ in range(8)]
    workers = [threading.Thread(target=_hammer, args=(server.address, outcomes, w)) for w in warm]
    watch = health_pb2_grpc.HealthStub(server.channel()).Watch(
        health_pb2.HealthCheckRequest(service="readiness"), timeout=30
    )
    assert next(watch).status == SERVING
    for worker in workers:
        worker.start()
    for event in warm:
        assert event.wait(30)

    signalled_at = time.monotonic()
    server.signal(signal.SIGTERM)
    assert next(watch).status == NOT_SERVING
    assert server.wait() == 0
    for worker in workers:
        worker.join(30)

    codes = {code for _, _, code in outcomes}
    assert codes <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, codes
    assert any(start < signalled_at for start, _, code in outcomes if code == grpc.StatusCode.OK)
    log = server.stdout.text()
    flipped = log.index("'readiness': SERVING -> NOT_SERVING")
    refused = log.index("new calls refused")
    assert flipped < refused < log.index("in-flight calls finished") < log.index("stopped after")


def test_second_signal_exits_at_once_while_calls_wait(start_server: Start) -> None:
    server, _read_end, write_end = start_on_small_pipe(start_server, "--log-timeout", "60", "--grace", "60")
    watch = health_pb2_grpc.HealthStub(server.channel()).Watch(
        health_pb2.HealthCheckRequest(service="readiness"), timeout=30
    )
    assert next(watch).status == SERVING
    stall(write_end)  # the next log write blocks: a SmokeTest now waits 60 s for confirmation
    channel = server.channel()
    pending = smoke_pb2_grpc.SmokeTestServiceStub(channel).SmokeTest.future(
        smoke_pb2.SmokeTestRequest(), timeout=30
    )
    # Calls on one connection are dispatched in order: once this Check has
    # answered, the SmokeTest is waiting in its handler.
    check = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service="liveness"), timeout=RPC_TIMEOUT
    )
    assert check.status == SERVING

    server.signal(signal.SIGTERM)
    assert next(watch).status == NOT_SERVING
    assert server.process.poll() is None  # waiting for the SmokeTest in flight
    started = time.monotonic()
    server.signal(signal.SIGTERM)

    assert server.wait() == 128 + signal.SIGTERM
    assert time.monotonic() - started < 5
    server.stderr.wait_for("second SIGTERM: exiting at once")
    with pytest.raises(grpc.RpcError):
        pending.result()


def test_in_flight_call_finishes_while_health_answers_and_new_calls_are_refused(start_server: Start) -> None:
    server, read_end, write_end = start_on_small_pipe(start_server, "--log-timeout", "60", "--grace", "60")
    channel = server.channel()
    health = health_pb2_grpc.HealthStub(channel)
    smoke = smoke_pb2_grpc.SmokeTestServiceStub(channel)
    watch = health.Watch(health_pb2.HealthCheckRequest(service="readiness"), timeout=30)
    assert next(watch).status == SERVING
    stall(write_end)  # the in-flight SmokeTest waits for its record until we read again
    in_flight = smoke.SmokeTest.future(smoke_pb2.SmokeTestRequest(), timeout=30)
    assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=RPC_TIMEOUT).status == SERVING

    server.signal(signal.SIGTERM)
    assert next(watch).status == NOT_SERVING

    def check(service: str) -> int:
        status: int = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=RPC_TIMEOUT).status
        return status

    assert (check("readiness"), check(""), check("liveness")) == (NOT_SERVING, NOT_SERVING, SERVING)
    with pytest.raises(grpc.RpcError) as refused:
        smoke.SmokeTest(smoke_pb2.SmokeTestRequest(), timeout=RPC_TIMEOUT)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert server.process.poll() is None

    LineLog(os.fdopen(read_end, "rb"))  # reading again lets the record through
    answer = in_flight.result()  # answered after the signal: FAILING, for the shutdown, with logging fine
    assert (answer.status, answer.message) == (smoke_pb2.STATUS_FAILING, "PetSage services are failing: shutdown.")
    assert {c.name: c.status for c in answer.checks}["logging"] == smoke_pb2.STATUS_OK
    assert server.wait() == 0


def _call_until_refused(address: str, codes: list[grpc.StatusCode]) -> None:
    with grpc.insecure_channel(address) as channel:
        stub = smoke_pb2_grpc.SmokeTestServiceStub(channel)
        for _ in range(200):
            try:
                stub.SmokeTest(smoke_pb2.SmokeTestRequest(), timeout=RPC_TIMEOUT)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                codes.append(exc.code())
                return


def test_sigterm_with_slow_calls_refuses_the_next_calls_instead_of_cancelling(start_server: Start) -> None:
    # A stuck stdout makes every SmokeTest take its whole --log-timeout (0.5 s):
    # callers send their next call just as the previous one finishes.
    server, _read_end, write_end = start_on_small_pipe(start_server, "--log-timeout", "0.5")
    stall(write_end)
    codes: list[grpc.StatusCode] = []
    callers = [threading.Thread(target=_call_until_refused, args=(server.address, codes)) for _ in range(4)]
    for caller in callers:
        caller.start()
    watch = health_pb2_grpc.HealthStub(server.channel()).Watch(
        health_pb2.HealthCheckRequest(service="liveness"), timeout=30
    )
    next(watch)
    while len(codes) < 4:  # every caller has finished at least one slow call
        assert all(c.is_alive() for c in callers)
        callers[0].join(0.05)

    server.signal(signal.SIGTERM)
    assert server.wait() == 0
    for caller in callers:
        caller.join(30)

    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, codes
    assert codes.count(grpc.StatusCode.UNAVAILABLE) == 4


def test_open_reflection_stream_does_not_hold_up_shutdown(start_server: Start) -> None:
    server = start_server("--grace", "30")
    stub = reflection_pb2_grpc.ServerReflectionStub(server.channel())
    asked = threading.Event()

    def requests() -> Iterator[reflection_pb2.ServerReflectionRequest]:
        yield reflection_pb2.ServerReflectionRequest(list_services="")
        asked.wait(30)  # keep the stream open, as an interactive tool does

    stream = stub.ServerReflectionInfo(requests(), timeout=30)
    assert next(stream).list_services_response.service
    started = time.monotonic()

    server.signal(signal.SIGTERM)

    assert server.wait() == 0
    assert time.monotonic() - started < 10
    asked.set()


def test_probes_calling_health_without_pause_do_not_hold_up_shutdown(start_server: Start) -> None:
    server = start_server("--grace", "30")
    stop = threading.Event()
    answered = threading.Semaphore(0)

    def probe() -> None:
        stub = health_pb2_grpc.HealthStub(server.channel())
        request = health_pb2.HealthCheckRequest(service="liveness")
        while not stop.is_set():
            try:
                stub.Check(request, timeout=RPC_TIMEOUT)
            except grpc.RpcError:
                continue  # CANCELLED by grpcio's stop() or refused once it has gone: keep probing
            answered.release()

    probes = [threading.Thread(target=probe) for _ in range(4)]
    for thread in probes:
        thread.start()
    try:
        for _ in range(100):
            assert answered.acquire(timeout=RPC_TIMEOUT)
        started = time.monotonic()
        server.signal(signal.SIGTERM)
        # Health answers never stop, so they must not count as callers still arriving.
        assert server.wait() == 0
        assert time.monotonic() - started < 10
        assert "grace period of 30s over" not in server.stdout.text()
    finally:
        stop.set()
        for thread in probes:
            thread.join()


def test_drain_keeps_serving_not_serving_then_ends_watches_and_finishes_in_flight_calls(start_server: Start) -> None:
    server, read_end, write_end = start_on_small_pipe(
        start_server, "--drain", "1.5", "--grace", "30", "--log-timeout", "60"
    )
    channel = server.channel()
    health = health_pb2_grpc.HealthStub(channel)
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    watch = health.Watch(health_pb2.HealthCheckRequest(service="readiness"), timeout=30)
    assert next(watch).status == SERVING
    stall(write_end)  # the in-flight SmokeTest waits for its record until we read again
    in_flight = smoke_pb2_grpc.SmokeTestServiceStub(channel).SmokeTest.future(smoke_pb2.SmokeTestRequest(), timeout=30)

    def list_services() -> list[str]:
        answers = reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=RPC_TIMEOUT
        )
        return [s.name for s in next(answers).list_services_response.service]

    server.signal(signal.SIGTERM)
    assert next(watch).status == NOT_SERVING
    not_serving_at = time.monotonic()
    # Draining: still answering every call, with the new statuses.
    assert "grpc.health.v1.Health" in list_services()
    assert health.Check(health_pb2.HealthCheckRequest(service="readiness"), timeout=RPC_TIMEOUT).status == NOT_SERVING
    assert health.Check(health_pb2.HealthCheckRequest(service="liveness"), timeout=RPC_TIMEOUT).status == SERVING

    with pytest.raises(grpc.RpcError) as ended:
        next(watch)
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - not_serving_at >= 1.0  # not before the drain is over
    with pytest.raises(grpc.RpcError) as refused:
        list_services()
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert not in_flight.done()

    output = LineLog(os.fdopen(read_end, "rb"))  # reading again lets the record through
    assert in_flight.result().status == smoke_pb2.STATUS_FAILING  # answered during shutdown
    assert server.wait() == 0
    steps = ["draining: statuses NOT_SERVING", "drain over after 1.5", "1 Watch stream(s) ended, new calls refused",
             "in-flight calls finished", "stopped after"]
    found = [output.wait_for(re.escape(step)).string for step in steps]
    assert [output.lines.index(line) for line in found] == sorted(output.lines.index(line) for line in found)


def test_smoke_test_agrees_with_readiness_from_the_first_signal(start_server: Start) -> None:
    server = start_server("--drain", "3")
    assert server.smoke().status == smoke_pb2.STATUS_OK

    server.signal(signal.SIGTERM)
    server.wait_for_health("readiness", NOT_SERVING)
    answer = server.smoke()
    command = run_cli("smoke", "--address", server.address)

    assert (answer.status, answer.message) == (smoke_pb2.STATUS_FAILING, "PetSage services are failing: shutdown.")
    shutdown = {c.name: c for c in answer.checks}["shutdown"]
    assert (shutdown.status, shutdown.detail, shutdown.critical) == (
        smoke_pb2.STATUS_FAILING, "the server is shutting down", True)
    assert command.returncode == 4
    assert command.stderr == ("petsage-grpc smoke: not OK: STATUS_FAILING: "
                              "PetSage services are failing: shutdown.\n")
    assert server.wait() == 0


def test_sighup_reopens_the_log_file_after_rotation_and_the_server_keeps_serving(
        start_server: Start, tmp_path: Path) -> None:
    """The logrotate habit, ``mv`` then ``postrotate kill -HUP``: the process used to die with 129, unlogged."""
    log = tmp_path / "server.log"
    server = start_server("--log-file", str(log))
    log.rename(tmp_path / "server.log.1")

    for _ in range(2):
        mark = server.stdout.mark()
        server.signal(signal.SIGHUP)
        server.stdout.wait_for(rf"received SIGHUP: reopened file {re.escape(str(log))}$", start=mark)

    assert server.process.poll() is None
    assert server.health("readiness") == health_pb2.HealthCheckResponse.SERVING
    assert server.smoke().status == smoke_pb2.STATUS_OK
    assert log.read_text().count("received SIGHUP") == 2  # the new file at the path has both lines
    assert "received SIGHUP" not in (tmp_path / "server.log.1").read_text()
    held = {os.readlink(f"/proc/{server.process.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{server.process.pid}/fd")}
    assert str(tmp_path / "server.log.1") not in held  # the rotated file is let go at once
    assert "NOT_SERVING" not in server.stdout.text()
    server.signal(signal.SIGTERM)
    assert server.wait() == 0
    assert server.stderr.text() == ""


def test_sighup_without_a_log_file_says_so_in_one_line(server: ServerProcess) -> None:
    server.signal(signal.SIGHUP)

    server.stdout.wait_for("received SIGHUP: no log file to reopen \\(logging to stdout only\\)")
    assert server.health("liveness") == health_pb2.HealthCheckResponse.SERVING
    server.signal(signal.SIGTERM)
    assert server.wait() == 0


def test_the_shutdown_log_times_the_grace_apart_from_the_drain(start_server: Start) -> None:
    """As reported: with --drain 5, "in-flight calls finished after 5.001s" counted the drain as waiting."""
    server = start_server("--drain", "1", "--grace", "7")
    server.signal(signal.SIGTERM)
    assert server.wait() == 0

    server.stdout.wait_for(r"waiting up to 7s for 0 call\(s\) in flight")
    finished = server.stdout.wait_for(r"in-flight calls finished ([\d.]+)s after new calls were refused")
    assert float(finished[1]) < 1.0  # nothing was in flight: no part of the 1 s drain
