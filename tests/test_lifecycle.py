"""Start and stop: a taken port, SIGTERM under load, and a second signal."""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections.abc import Callable

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from petsage_grpc._proto.smoke.v1 import smoke_pb2, smoke_pb2_grpc
from tests.support import RPC_TIMEOUT, ServerProcess, run_cli
from tests.test_logging_faults import stall, start_on_small_pipe

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
Start = Callable[..., ServerProcess]


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
