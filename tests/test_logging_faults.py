"""Real logging faults: full disks, removed directories, broken and stuck pipes, closed stdout.

Each fault must turn SmokeTest FAILING with the OS error, readiness (and the
overall and smoke-service statuses) NOT_SERVING, leave liveness SERVING and
the server answering, and, where the fault can clear, recover by itself.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from petsage_grpc._proto.smoke.v1 import smoke_pb2
from petsage_grpc.logs import setup as logs
from tests.support import (
    NOT_SERVING,
    SERVING,
    SERVING_LINE,
    LineLog,
    ServerProcess,
    Start,
    stall,
    start_on_small_pipe,
    wait_for_file_line,
)

DEPENDENT = ("", "readiness", "petsage.smoke.v1.SmokeTestService")


def assert_failing(server: ServerProcess, *fragments: str) -> smoke_pb2.CheckResult:
    """SmokeTest FAILING with ``fragments`` in the logging detail; statuses follow."""
    response = server.smoke()
    assert response.status == smoke_pb2.STATUS_FAILING
    assert response.message == "PetSage services are failing: logging."
    check, loop_check, _ = response.checks
    assert (check.name, check.status) == ("logging", smoke_pb2.STATUS_FAILING)
    assert (loop_check.name, loop_check.status) == ("event_loop", smoke_pb2.STATUS_OK)
    for fragment in fragments:
        assert fragment in check.detail
    for service in DEPENDENT:
        assert server.health(service) == NOT_SERVING
    assert server.health("liveness") == SERVING
    return check


def fill(path: Path) -> None:
    """Write zeros to ``path`` until its file system is full."""
    with path.open("wb", buffering=0) as filler:
        try:
            while True:
                filler.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs: a disk that really fills up and can be freed again (needs root)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount_point)], check=True)
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=True)


def test_log_file_on_full_device_fails_smoke_and_readiness(start_server: Start) -> None:
    server = start_server("--log-file", "/dev/full")

    assert_failing(server, "file /dev/full: [Errno 28] No space left on device")
    assert server.smoke().status == smoke_pb2.STATUS_FAILING  # and it keeps answering


def test_disk_full_then_freed_recovers(tiny_disk: Path, start_server: Start) -> None:
    server = start_server("--log-file", str(tiny_disk / "server.log"), "--check-interval", "0.2")
    assert server.smoke().status == smoke_pb2.STATUS_OK

    fill(tiny_disk / "filler")
    # The log file's last page still has room: writes fail once it is used up.
    for _ in range(200):
        if server.smoke().status == smoke_pb2.STATUS_FAILING:
            break
    assert_failing(server, "No space left on device")

    (tiny_disk / "filler").unlink()
    server.wait_for_health("readiness", SERVING)
    assert server.smoke().status == smoke_pb2.STATUS_OK
    assert server.health("") == SERVING


def test_removed_log_directory_fails_then_recovers_when_recreated(start_server: Start, tmp_path: Path) -> None:
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    log_file = log_dir / "server.log"
    server = start_server("--log-file", str(log_file), "--check-interval", "0.2")

    shutil.rmtree(log_dir)
    assert_failing(server, f"file {log_file}: [Errno 2] No such file or directory")

    log_dir.mkdir()
    server.wait_for_health("readiness", SERVING)
    probe_id = server.smoke().checks[0].detail.split()[1]
    assert probe_id in log_file.read_text()


def test_broken_stdout_pipe_fails_smoke(start_server: Start, tmp_path: Path) -> None:
    read_end, write_end = os.pipe()
    server = start_server("--log-file", str(tmp_path / "server.log"), stdout=write_end, wait=False)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        for raw in reader:
            match = SERVING_LINE.search(raw.decode())
            if match:
                server.address = match[1]
                break
    # The reader is gone: every write to stdout now fails with EPIPE.

    assert_failing(server, "stdout: [Errno 32] Broken pipe")


def test_stdout_closed_at_start_fails_smoke(start_server: Start, tmp_path: Path) -> None:
    log_file = tmp_path / "server.log"
    server = start_server(
        "--log-file", str(log_file), stdout=subprocess.DEVNULL, preexec_fn=lambda: os.close(1), wait=False
    )
    server.address = wait_for_file_line(log_file, SERVING_LINE.pattern)[1]

    assert_failing(server, "stdout: [Errno 9] stdout was closed when the server started")


def test_stuck_log_writer_fails_smoke_then_recovers(start_server: Start) -> None:
    server, read_end, write_end = start_on_small_pipe(
        start_server, "--log-timeout", "0.3", "--check-interval", "0.2"
    )
    stall(write_end)

    check = assert_failing(server, "the log writer did not confirm probe", "within 0.3s")
    # uvloop's timers work in whole milliseconds: the timeout may fire up to 1 ms early.
    assert check.duration.ToNanoseconds() >= 299_000_000

    drained = LineLog(os.fdopen(read_end, "rb"))  # read again: the writer gets unstuck
    server.wait_for_health("readiness", SERVING)
    assert server.smoke().status == smoke_pb2.STATUS_OK
    drained.wait_for("health status of 'readiness': NOT_SERVING -> SERVING")
    os.close(write_end)


def test_json_log_format_from_environment(start_server: Start) -> None:
    server = start_server(env={"PETSAGE_GRPC_LOG_FORMAT": "json"})
    probe_id = server.smoke().checks[0].detail.split()[1]

    line = server.stdout.wait_for(probe_id).string
    record = json.loads(line)
    assert record["level"] == "INFO" and record["logger"] == "petsage_grpc.logprobe"
    assert record["message"] == f"logging probe {probe_id}" and record["probe_id"] == probe_id
    assert record["time"].endswith("Z")
    for earlier in server.stdout.lines:
        assert set(json.loads(earlier)) >= {"time", "level", "logger", "message"}


def test_strict_log_level_still_writes_the_probe(start_server: Start) -> None:
    server = start_server("--log-level", "warning")
    response = server.smoke()

    assert response.status == smoke_pb2.STATUS_OK
    server.stdout.wait_for(response.checks[0].detail.split()[1])
    info = [line for line in server.stdout.lines if " - INFO - " in line]
    assert info and all(any(f" - {name} - " in line for name in logs.ALWAYS_INFO) for line in info)
    assert any(" - petsage_grpc.health - INFO - health status of 'readiness'" in line for line in info)


#: The check interval of the detection tests, and what a quiet server may take beyond it.
INTERVAL = 1.0
SLACK = 0.75


@dataclass
class Fault:
    """A real logging fault made on a running server, and how to clear it (None: it cannot be)."""

    flags: tuple[str, ...]
    make: Callable[[], None]
    clear: Callable[[], None] | None
    error: str


def removed_directory(tmp_path: Path, _request: pytest.FixtureRequest) -> Fault:
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    return Fault(("--log-file", str(log_dir / "server.log")), lambda: shutil.rmtree(log_dir), log_dir.mkdir,
                 "[Errno 2] No such file or directory")


def full_disk(_tmp_path: Path, request: pytest.FixtureRequest) -> Fault:
    disk: Path = request.getfixturevalue("tiny_disk")
    return Fault(("--log-file", str(disk / "server.log")), lambda: fill(disk / "filler"),
                 (disk / "filler").unlink, "[Errno 28] No space left on device")


@pytest.mark.parametrize("make_fault", [removed_directory, full_disk])
def test_fault_on_a_quiet_server_is_detected_within_one_check_interval_and_clears(
    start_server: Start, tmp_path: Path, request: pytest.FixtureRequest,
    make_fault: Callable[[Path, pytest.FixtureRequest], Fault],
) -> None:
    fault = make_fault(tmp_path, request)
    # No access log and no calls but the Watch: only the periodic logging check writes.
    server = start_server(*fault.flags, "--check-interval", str(INTERVAL), "--no-access-log")
    assert server.health("readiness") == SERVING

    started = time.monotonic()
    fault.make()
    server.wait_for_health("readiness", NOT_SERVING)
    assert time.monotonic() - started < INTERVAL + SLACK
    server.stdout.wait_for(rf"check logging is failing: file .*: {re.escape(fault.error)}")
    assert_failing(server, fault.error)

    assert fault.clear is not None
    started = time.monotonic()
    fault.clear()
    server.wait_for_health("readiness", SERVING)
    assert time.monotonic() - started < INTERVAL + SLACK
    assert server.smoke().status == smoke_pb2.STATUS_OK


def test_stalled_writer_on_a_quiet_server_is_detected_within_one_interval(start_server: Start) -> None:
    server, read_end, write_end = start_on_small_pipe(
        start_server, "--log-timeout", "0.3", "--check-interval", str(INTERVAL), "--no-access-log")
    started = time.monotonic()
    stall(write_end)
    server.wait_for_health("readiness", NOT_SERVING)
    assert time.monotonic() - started < INTERVAL + 0.3 + SLACK

    drained = LineLog(os.fdopen(read_end, "rb"))
    started = time.monotonic()
    server.wait_for_health("readiness", SERVING)
    assert time.monotonic() - started < INTERVAL + SLACK
    drained.wait_for("check logging is failing: the log writer did not confirm probe")
    os.close(write_end)


def test_broken_stdout_pipe_on_a_quiet_server_is_detected_within_one_interval(
    start_server: Start, tmp_path: Path
) -> None:
    read_end, write_end = os.pipe()
    server = start_server("--log-file", str(tmp_path / "server.log"), "--check-interval", str(INTERVAL),
                          "--no-access-log", stdout=write_end, wait=False)
    os.close(write_end)
    reader = os.fdopen(read_end, "rb")
    for raw in reader:
        if match := SERVING_LINE.search(raw.decode()):
            server.address = match[1]
            break
    assert server.health("readiness") == SERVING

    started = time.monotonic()
    reader.close()  # the reader is gone: the next write to stdout fails with EPIPE
    server.wait_for_health("readiness", NOT_SERVING)
    assert time.monotonic() - started < INTERVAL + SLACK
    wait_for_file_line(tmp_path / "server.log", r"check logging is failing: stdout: \[Errno 32\] Broken pipe")
    assert_failing(server, "stdout: [Errno 32] Broken pipe")


def test_records_a_stuck_writer_cannot_write_at_exit_are_reported_on_stderr(start_server: Start) -> None:
    server, read_end, write_end = start_on_small_pipe(start_server)
    stall(write_end)
    server.smoke()  # at least its probe and access records now wait in the queue

    server.signal()
    assert server.wait() == 0  # the shutdown does not wait on logging beyond its bound
    line = server.stderr.wait_for(r"petsage-grpc: (\d+) log record\(s\) not written at exit: the log writer "
                                  r"is stuck")
    assert int(line[1]) > 0
    os.close(read_end)
    os.close(write_end)
