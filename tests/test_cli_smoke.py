"""``petsage-grpc smoke`` against real servers: output and one exit code per outcome."""

from __future__ import annotations

import json
import socket

import pytest

from tests.support import ServerProcess, Start, run_cli, stall, start_on_small_pipe


def test_smoke_ok_prints_result_and_exits_0(server: ServerProcess) -> None:
    done = run_cli("smoke", "--address", server.address)

    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "status: STATUS_OK"
    assert lines[1] == "message: PetSage services are running and logging is active."
    assert lines[2].startswith("timestamp: ") and lines[2].endswith("Z")
    assert lines[3].startswith("check logging: STATUS_OK (critical, ")
    assert lines[4].startswith("check event_loop: STATUS_OK (critical, ")
    assert lines[5].startswith("check grpc_connections: STATUS_OK (non-critical, ")
    assert lines[6].startswith("server: version 0.1.0, instance ")
    assert done.stderr == ""


def test_smoke_json_prints_one_object(server: ServerProcess) -> None:
    done = run_cli("smoke", "--json", "--address", server.address)

    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["status"] == "STATUS_OK"
    assert answer["checks"][0]["name"] == "logging"
    assert answer["server"]["version"] == "0.1.0"


def test_smoke_not_ok_exits_4(start_server: Start) -> None:
    server = start_server("--log-file", "/dev/full")

    done = run_cli("smoke", "--address", server.address)

    assert done.returncode == 4
    assert done.stdout.startswith("status: STATUS_FAILING")
    assert done.stderr.splitlines() == [
        "petsage-grpc smoke: not OK: STATUS_FAILING: PetSage services are failing: logging."
    ]


def test_smoke_cannot_connect_exits_2() -> None:
    with socket.socket() as unused:  # bound, never listening: connections are refused
        unused.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{unused.getsockname()[1]}"
        done = run_cli("smoke", "--address", address, "--connect-timeout", "0.5")

    assert done.returncode == 2
    assert done.stderr.splitlines() == [f"petsage-grpc smoke: cannot connect to {address} within 0.5s"]


def test_smoke_deadline_exceeded_exits_3(start_server: Start) -> None:
    server, _read_end, write_end = start_on_small_pipe(start_server, "--log-timeout", "30")
    stall(write_end)  # SmokeTest now waits for a log write that cannot finish

    done = run_cli("smoke", "--address", server.address, "--timeout", "0.5")

    assert done.returncode == 3
    assert done.stderr.splitlines() == [
        f"petsage-grpc smoke: deadline exceeded: no answer from {server.address} within 0.5s"
    ]


def test_smoke_rpc_error_exits_3(bare_server: str) -> None:
    done = run_cli("smoke", "--address", bare_server)

    assert done.returncode == 3
    [line] = done.stderr.splitlines()
    assert line.startswith("petsage-grpc smoke: RPC failed: UNIMPLEMENTED: ")


@pytest.mark.parametrize("args", [["--timeout", "-1"], ["--connect-timeout", "x"], ["--bogus"]])
def test_smoke_bad_arguments_exit_1(args: list[str]) -> None:
    done = run_cli("smoke", *args)

    assert done.returncode == 1
    assert "petsage-grpc smoke: error: " in done.stderr


def test_smoke_takes_the_probe_connection_flags(server: ServerProcess) -> None:
    done = run_cli("smoke", f"-addr={server.address}", "-connect-timeout", "2s", "-rpc-timeout=1500ms",
                   "-user-agent", "smoke-test", "-rpc-header", "x-tenant: pets", "-gzip", "--json")

    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["status"] == "STATUS_OK"


@pytest.mark.parametrize(("args", "message"), [
    (["-tls-ca-cert", "ca.pem"], "specified -tls-ca-cert without specifying -tls"),
    (["-tls", "-tls-client-key", "k.pem"], "specified -tls-client-key without specifying -tls-client-cert"),
])
def test_smoke_applies_the_probe_tls_rules(args: list[str], message: str) -> None:
    done = run_cli("smoke", *args)

    assert (done.returncode, done.stderr.splitlines()) == (1, [f"petsage-grpc smoke: error: {message}"])
