"""``serve --workers N``: one port, N server processes, one supervisor."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import time
from pathlib import Path

import grpc
import pytest

from petsage_grpc._proto.smoke.v1 import smoke_pb2, smoke_pb2_grpc
from petsage_grpc.server.supervisor import HEARTBEAT_TIMEOUT
from tests.support import PROCESS_TIMEOUT, RPC_TIMEOUT, ServerProcess, Start, run_cli


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


def test_a_worker_that_dies_is_started_again_and_both_serve(start_server: Start) -> None:
    server = start_server("--workers", "2")
    first, second = server.stdout.wait_for(r"with 2 workers \(pids (\d+), (\d+)\)").groups()

    os.kill(int(first), signal.SIGKILL)

    server.stdout.wait_for(rf"worker 1 \(pid {first}\) exited with 137; starting it again in 0.5s")
    again = server.stdout.wait_for(r"worker 1 \(pid (\d+)\) serves again")[1]
    assert again != first
    ids = instance_ids(server, 24)
    assert {i.split("-")[-2] for i in ids} == {again, second}  # both workers answer, the new one too
    server.signal(signal.SIGTERM)
    assert server.wait() == 0


def test_a_worker_that_stops_is_replaced_and_fresh_connections_are_answered(start_server: Start) -> None:
    """The attack as reported: a SIGSTOPped worker kept receiving connections; 11 of 20 probes failed."""
    server = start_server("--workers", "2")
    first = server.stdout.wait_for(r"with 2 workers \(pids (\d+), (\d+)\)")[1]

    os.kill(int(first), signal.SIGSTOP)
    server.stdout.wait_for(rf"worker 1 \(pid {first}\) sent no heartbeat for 5s \(stopped or stuck\): replacing it",
                           timeout=HEARTBEAT_TIMEOUT + 5)
    server.stdout.wait_for(r"worker 1 \(pid \d+\) serves again")

    probes = [run_cli("probe", "-addr", server.address, "-service", "liveness").returncode for _ in range(20)]
    assert probes == [0] * 20  # each on a fresh connection, as the kubelet probes
    server.signal(signal.SIGTERM)
    assert server.wait() == 0


def test_a_worker_that_dies_again_before_serving_makes_the_supervisor_give_up(start_server: Start) -> None:
    server = start_server("--workers", "2")
    first, _ = server.stdout.wait_for(r"with 2 workers \(pids (\d+), (\d+)\)").groups()

    os.kill(int(first), signal.SIGKILL)
    again = int(server.stdout.wait_for(r"worker 1 \(pid (\d+)\) started")[1])
    os.kill(again, signal.SIGKILL)  # before it serves: restarting would not help

    assert server.wait() == 128 + signal.SIGKILL
    server.stdout.wait_for(rf"worker 1 \(pid {again}\) exited with 137 before serving; stopping the others")


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


def test_sigterm_while_workers_start_stops_cleanly(start_server: Start) -> None:
    server = start_server("--workers", "2", wait=False)
    server.stdout.wait_for("petsage-grpc 0.1.0 starting")  # a worker is on its way up

    server.signal(signal.SIGTERM)

    assert server.wait() == 0
    server.stdout.wait_for("received SIGTERM: stopping 2 worker")
    server.stdout.wait_for("all 2 workers stopped; exit code 0")
    assert "Traceback" not in server.stdout.text() + server.stderr.text()


def test_workers_with_unreadable_tls_files_stop_before_any_worker_starts(tmp_path: Path) -> None:
    done = run_cli("serve", "--workers", "2", "--address", "127.0.0.1:0",
                   "--tls-cert", str(tmp_path / "nope.pem"), "--tls-key", str(tmp_path / "nope.key"))

    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"petsage-grpc serve: error: cannot read --tls-cert '{tmp_path / 'nope.pem'}': No such file or directory"
    ]
    assert "starting" not in done.stdout


def test_workers_shut_down_when_the_supervisor_is_killed(start_server: Start) -> None:
    server = start_server("--workers", "2")
    pids = [int(p) for p in server.stdout.wait_for(r"with 2 workers \(pids (\d+), (\d+)\)").groups()]

    server.process.kill()  # no chance to forward anything
    server.wait()

    server.stdout.wait_for("the supervising process has gone: shutting down")
    for _ in range(2):
        server.stdout.wait_for("stopped after", start=server.stdout.lines.index(
            server.stdout.wait_for("the supervising process has gone").string))
    deadline = time.monotonic() + PROCESS_TIMEOUT
    while any(_alive(pid) for pid in pids):  # the orphans are reaped by init, not by us
        assert time.monotonic() < deadline, "workers outlived their supervisor"
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as status:
            return "\nState:\tZ" not in status.read()
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_the_summary_is_logged_once_and_every_worker_line_names_its_worker(
        start_server: Start, tmp_path: Path, log_format: str) -> None:
    log = tmp_path / "server.log"
    server = start_server("--workers", "2", "--log-format", log_format, "--log-file", str(log))
    server.signal(signal.SIGTERM)
    assert server.wait() == 0
    server.stdout.wait_for("all 2 workers stopped")

    for text in (server.stdout.text(), log.read_text()):
        lines = text.splitlines()
        assert len([line for line in lines if "with 2 workers (pids" in line]) == 1
        stopped = [line for line in lines if "stopped after" in line]
        if log_format == "json":
            records = [json.loads(line) for line in lines]
            assert sorted(r["worker"] for r in records if "stopped after" in r["message"]) == ["1/2", "2/2"]
            assert all("worker" not in r for r in records if "workers" in r["message"])  # the supervisor's own
        else:
            workers = [re.search(r"worker (\d/2): stopped after", line) for line in stopped]
            assert sorted(match[1] for match in workers if match) == ["1/2", "2/2"]


def test_sighup_reopens_every_log_file_and_no_process_dies(start_server: Start, tmp_path: Path) -> None:
    """As reported: the supervisor died of SIGHUP and every worker logged that it had gone, twice."""
    log = tmp_path / "server.log"
    server = start_server("--workers", "2", "--log-file", str(log))
    pids = [int(p) for p in server.stdout.wait_for(r"with 2 workers \(pids (\d+), (\d+)\)").groups()]
    log.rename(tmp_path / "server.log.1")

    server.signal(signal.SIGHUP)

    server.stdout.wait_for(r"received SIGHUP: reopened file \S+; passed on to the workers that serve")
    for worker in ("1/2", "2/2"):
        server.stdout.wait_for(rf"worker {worker}: received SIGHUP: reopened file ")
    assert server.process.poll() is None and all(_alive(pid) for pid in pids)
    probes = [run_cli("probe", "-addr", server.address, "-service", "readiness").returncode for _ in range(4)]
    assert probes == [0] * 4
    server.signal(signal.SIGTERM)
    assert server.wait() == 0
    text = server.stdout.text()
    assert "the supervising process has gone" not in text and "exited with" not in text
    assert log.read_text().count("received SIGHUP") == 3
