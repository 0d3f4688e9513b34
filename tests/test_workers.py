"""``serve --workers N``: one port, N server processes, one supervisor."""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Callable

import grpc

from petsage_grpc._proto.smoke.v1 import smoke_pb2, smoke_pb2_grpc
from tests.support import RPC_TIMEOUT, ServerProcess, run_cli

Start = Callable[..., ServerProcess]


def instance_ids(server: ServerProcess, connections: int) -> set[str]:
    """The instances that answered SmokeTest on ``connections`` new connections."""
    seen = set()
    for _ in range(connections):
        # A local subchannel pool: channels to one address would otherwise share one connection.
        with grpc.insecure_channel(server.address, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            answer = smoke_pb2_grpc.SmokeTestServiceStub(channel).SmokeTest(
                smoke_pb2.SmokeTestRequest(), timeout=RPC_TIMEOUT
            )
        assert answer.status == smoke_pb2.STATUS_OK
        seen.add(answer.server.instance_id)
    return seen


def test_two_workers_share_the_port_and_stop_together(start_server: Start) -> None:
    server = start_server("--workers", "2")
    pids = server.stdout.wait_for(r"with 2 workers \(pids (\d+), (\d+)\)").groups()

    ids = instance_ids(server, 24)

    assert {i.split("-")[-2] for i in ids} == set(pids)  # both workers answered
    server.signal(signal.SIGTERM)
    assert server.wait() == 0
    assert len([line for line in server.stdout.lines if "stopped after" in line]) == 2
    server.stdout.wait_for("all 2 workers stopped; exit code 0")


def test_worker_that_dies_stops_the_others(start_server: Start) -> None:
    server = start_server("--workers", "2")
    first, _ = server.stdout.wait_for(r"with 2 workers \(pids (\d+), (\d+)\)").groups()

    os.kill(int(first), signal.SIGKILL)

    assert server.wait() == 128 + signal.SIGKILL
    server.stdout.wait_for(f"worker pid {first} exited with 137; stopping the others")


def test_workers_on_a_taken_port_fail_with_one_line() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        address = f"127.0.0.1:{holder.getsockname()[1]}"

        done = run_cli("serve", "--workers", "2", "--address", address)

    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"petsage-grpc serve: error: cannot listen on {address}: the port is already in use"
    ]
