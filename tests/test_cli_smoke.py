"""``petsage-grpc smoke`` against real servers: output and one exit code per outcome."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator

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


def test_status_only_details_print_no_server_line_and_no_checks_key(start_server: Start) -> None:
    """As reported: ``server: version , instance , started 1970-01-01T00:00:00Z`` and ``"checks": []``."""
    server = start_server("--smoke-details", "status")

    text = run_cli("smoke", "--address", server.address)
    document = run_cli("smoke", "--json", "--address", server.address)

    assert text.returncode == 0 and document.returncode == 0
    assert [line.partition(":")[0] for line in text.stdout.splitlines()] == ["status", "message", "timestamp"]
    assert sorted(json.loads(document.stdout)) == ["message", "status", "timestamp"]


def test_smoke_not_ok_exits_4(start_server: Start) -> None:
    server = start_server("--log-file", "/dev/full")

    done = run_cli("smoke", "--address", server.address)

    assert done.returncode == 4
    assert done.stdout.startswith("status: STATUS_FAILING")
    assert done.stderr.splitlines() == [
        "petsage-grpc smoke: not OK: STATUS_FAILING: PetSage services are failing: logging."
    ]


def test_smoke_reports_a_refused_connection_at_once_with_the_reason() -> None:
    """As reported: it waited the whole connect timeout, then said "within 5s" without the reason."""
    with socket.socket() as unused:  # bound, never listening: connections are refused
        unused.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{unused.getsockname()[1]}"
        done = run_cli("smoke", "--address", address, "--connect-timeout", "120", timeout=60)

    # Ended by the refusal: waiting out the 120 s connect timeout would have failed run_cli's own 60 s.
    assert done.returncode == 2
    [line] = done.stderr.splitlines()
    assert line.startswith(f"petsage-grpc smoke: cannot connect to {address}: ") and "Connection refused" in line


def test_smoke_says_cannot_connect_within_the_timeout_when_nothing_answers() -> None:
    with socket.socket() as silent:  # listening, never accepting: the HTTP/2 handshake never completes
        silent.bind(("127.0.0.1", 0))
        silent.listen(0)
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        done = run_cli("smoke", "--address", address, "--connect-timeout", "0.5")

    assert (done.returncode, done.stderr.splitlines()) == (
        2, [f"petsage-grpc smoke: cannot connect to {address} within 0.5s"])


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


@pytest.mark.parametrize(("args", "message"), [
    (["--timeout", "-1"], "-rpc-timeout must be greater than zero (specified: -1s)"),
    (["--connect-timeout", "x"], "argument -connect-timeout/--connect-timeout: invalid duration"),
    (["--bogus"], "flag provided but not defined: --bogus"),
    (["-ad", "localhost:1"], "flag provided but not defined: -ad"),  # no abbreviation of -addr
    (["--addre", "localhost:1"], "flag provided but not defined: --addre"),
    (["--address"], "flag needs an argument: --address"),
    (["--address", "nohost"], "invalid --address='nohost': expected HOST:PORT (e.g. [::]:50051 or 127.0.0.1:0) "
                              "or unix:PATH"),
])
def test_smoke_bad_arguments_are_one_line_and_exit_1(args: list[str], message: str) -> None:
    """As reported: the whole usage block (8 lines) came before the error."""
    done = run_cli("smoke", *args)

    assert done.returncode == 1
    [line] = done.stderr.splitlines()
    assert line.startswith(f"petsage-grpc smoke: error: {message}"), line


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


def _unwritable_stdouts() -> Iterator[tuple[str, int, str]]:
    """A pipe whose reader has gone, a full device, and a closed descriptor; with what each command says."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    yield "a pipe nobody reads", write_end, "Broken pipe"
    os.close(write_end)
    with open("/dev/full", "wb") as full:
        yield "a full disk", full.fileno(), "No space left on device"


@pytest.mark.parametrize("command", [["smoke", "--address"], ["smoke", "--json", "--address"],
                                     ["probe", "--json", "-addr"], ["probe", "--version", "-addr"]])
def test_a_result_stdout_cannot_take_is_one_line_and_the_exit_code_of_the_check(
        server: ServerProcess, command: list[str]) -> None:
    """As reported: BrokenPipeError and ENOSPC tracebacks, and exit 1 although the server was SERVING."""
    prog = f"petsage-grpc {command[0]}"
    for what, fd, reason in _unwritable_stdouts():
        done = run_cli(*command, server.address, stdout=fd)
        assert done.returncode == 0, (what, done.stderr)
        assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr, done.stderr
        assert done.stderr.splitlines()[-1] == f"{prog}: cannot write the result to stdout: {reason}", what
    closed = subprocess.run([sys.executable, "-m", "petsage_grpc", *command, server.address], stdout=None,
                            stderr=subprocess.PIPE, text=True, timeout=60, check=False,
                            preexec_fn=lambda: os.close(1))
    assert closed.returncode == 0
    assert closed.stderr.splitlines()[-1] == f"{prog}: cannot write the result to stdout: stdout is closed"


def test_help_into_a_pipe_closed_early_is_no_traceback() -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = run_cli("serve", "--help", stdout=write_end)
    finally:
        os.close(write_end)
    assert (done.returncode, done.stderr) == (0, "")
