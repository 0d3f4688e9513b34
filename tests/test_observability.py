"""The access log, Prometheus metrics and ``--smoke-details``, seen from outside a real server."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from petsage_grpc._proto.smoke.v1 import smoke_pb2, smoke_pb2_grpc
from petsage_grpc.logs import pipeline as logs
from tests.support import (
    NOT_SERVING,
    RPC_TIMEOUT,
    SERVING,
    LineLog,
    ServerProcess,
    Start,
    proc_status,
    run_cli,
    stall,
    start_on_small_pipe,
    wait_for_file_line,
)

ACCESS = " - petsage_grpc.access - INFO - "
CHECK = "/grpc.health.v1.Health/Check"
SMOKE = "/petsage.smoke.v1.SmokeTestService/SmokeTest"


def check_as(server: ServerProcess, user_agent: str, service: str = "readiness", request_id: str = "") -> int:
    """Health/Check from a channel presenting ``user_agent`` (grpc appends its own after it)."""
    with grpc.insecure_channel(server.address, options=(("grpc.primary_user_agent", user_agent),)) as channel:
        metadata = (("x-request-id", request_id),) if request_id else ()
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=RPC_TIMEOUT, metadata=metadata)
        except grpc.RpcError as exc:
            code: int = exc.code().value[0]
            return -code
        return int(response.status)


HTTP_LINE = r"HTTP health on (http://\S+)"
METRICS = ("--http-address", "127.0.0.1:0", "--metrics")


def metrics_address(server: ServerProcess) -> str:
    return server.stdout.wait_for(HTTP_LINE)[1] + "/metrics"


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(server: ServerProcess) -> Samples:
    """Every sample of ``/metrics``, keyed by name and labels."""
    with urllib.request.urlopen(metrics_address(server), timeout=RPC_TIMEOUT) as answer:
        assert answer.status == 200
        text = answer.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text) for sample in family.samples
    }


def sample(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def access_records(server: ServerProcess, method: str) -> list[str]:
    return [line for line in server.stdout.lines if ACCESS in line and f"{ACCESS}{method} " in line]


def test_access_log_records_every_call_with_its_fields(start_server: Start) -> None:
    server = start_server()
    assert check_as(server, "billing/2.1", service="nope", request_id="req-42") == -grpc.StatusCode.NOT_FOUND.value[0]
    server.smoke()
    malformed = server.channel().unary_unary(SMOKE)
    with pytest.raises(grpc.RpcError):
        malformed(b"\xff", timeout=RPC_TIMEOUT)

    line = server.stdout.wait_for(rf"{ACCESS}{CHECK} NOT_FOUND").string
    assert 'user_agent="billing/2.1 grpc-python/' in line and 'request_id="req-42"' in line
    assert " peer=ipv4:127.0.0.1:" in line
    assert float(line.split(" NOT_FOUND ")[1].split("ms ")[0]) > 0
    server.stdout.wait_for(rf"{ACCESS}{SMOKE} INVALID_ARGUMENT .* request_id=\"\"")
    server.stdout.wait_for(rf"{ACCESS}{SMOKE} OK ")


def test_access_log_in_json_has_one_key_per_field(start_server: Start) -> None:
    server = start_server("--log-format", "json")
    forged = 'a", "code": "FORGED'
    assert check_as(server, "billing/2.1", request_id=forged) == SERVING

    record = json.loads(server.stdout.wait_for(r'"logger": "petsage_grpc.access"').string)
    assert record["method"] == CHECK and record["code"] == "OK"
    assert record["request_id"] == forged  # a forged field stays inside its string
    assert record["user_agent"].startswith("billing/2.1 ") and record["peer"].startswith("ipv4:127.0.0.1:")
    assert isinstance(record["duration_ms"], float)


def test_probe_calls_are_counted_not_logged(start_server: Start) -> None:
    server = start_server(*METRICS)
    for agent in ("kube-probe/1.31", "grpc_health_probe"):
        assert check_as(server, agent) == SERVING
    assert run_cli("probe", "-addr", server.address, "-service", "liveness").returncode == 0
    assert check_as(server, "billing/2.1") == SERVING  # logged: a caller, not a probe
    server.stdout.wait_for(rf"{ACCESS}{CHECK} OK .*billing/2.1")

    samples = scrape(server)
    assert sample(samples, "petsage_access_log_probe_calls_unlogged_total") == 3
    assert sample(samples, "grpc_server_handled_total", grpc_type="unary", grpc_service="grpc.health.v1.Health",
                  grpc_method="Check", grpc_code="OK") == 4
    assert len(access_records(server, CHECK)) == 1
    server.signal()
    assert server.wait() == 0
    server.stdout.wait_for("3 probe call\\(s\\) answered and left out of the access log")


def test_log_probes_flag_logs_probe_calls_and_no_access_log_turns_it_off(start_server: Start) -> None:
    verbose = start_server("--log-probes")
    silent = start_server("--no-access-log")
    for server in (verbose, silent):
        check_as(server, "kube-probe/1.31")
        server.smoke()
    verbose.stdout.wait_for(rf"{ACCESS}{CHECK} OK .*kube-probe/1.31")
    silent.signal()
    assert silent.wait() == 0
    assert not [line for line in silent.stdout.lines if ACCESS in line]


def test_metrics_count_calls_checks_statuses_and_watch_streams(start_server: Start) -> None:
    server = start_server(*METRICS)
    server.smoke()
    check_as(server, "billing/2.1", service="nope")
    watch = health_pb2_grpc.HealthStub(server.channel()).Watch(
        health_pb2.HealthCheckRequest(service="readiness"), timeout=30)
    try:
        assert next(watch).status == SERVING
        samples = scrape(server)
    finally:
        watch.cancel()

    smoke = {"grpc_type": "unary", "grpc_service": "petsage.smoke.v1.SmokeTestService", "grpc_method": "SmokeTest"}
    assert sample(samples, "grpc_server_handled_total", grpc_code="OK", **smoke) == 1
    assert sample(samples, "grpc_server_handling_seconds_count", **smoke) == 1
    assert 0 < sample(samples, "grpc_server_handling_seconds_sum", **smoke) < RPC_TIMEOUT
    assert sample(samples, "grpc_server_handled_total", grpc_type="unary", grpc_service="grpc.health.v1.Health",
                  grpc_method="Check", grpc_code="NotFound") == 1
    assert sample(samples, "petsage_watch_streams") == 1
    for check in ("logging", "event_loop"):
        assert sample(samples, "petsage_check_passing", check=check, critical="true") == 1
        assert sample(samples, "petsage_check_duration_seconds_count", check=check) >= 1
    for service in ("", "readiness", "liveness", "petsage.smoke.v1.SmokeTestService"):
        assert sample(samples, "petsage_health_serving", service=service) == 1
        assert sample(samples, "petsage_health_status_transitions_total", service=service, status="SERVING") == 1
    for reason in ("queue_full", "shed"):
        assert sample(samples, "petsage_log_records_dropped_total", reason=reason) == 0
    assert sample(samples, "petsage_log_sink_write_failures_total", sink="stdout") == 0
    assert sample(samples, "process_resident_memory_bytes") > 0


def test_metrics_follow_a_logging_fault(start_server: Start) -> None:
    server = start_server(*METRICS, "--log-file", "/dev/full")
    for _ in range(5):
        server.smoke()

    samples = scrape(server)
    # Every record since start-up failed on the full device, the access records of those 5 calls included.
    assert sample(samples, "petsage_log_sink_write_failures_total", sink="file /dev/full") >= 10
    assert sample(samples, "petsage_check_passing", check="logging", critical="true") == 0
    assert sample(samples, "petsage_health_serving", service="readiness") == 0
    assert sample(samples, "grpc_server_handled_total", grpc_type="unary",
                  grpc_service="petsage.smoke.v1.SmokeTestService", grpc_method="SmokeTest", grpc_code="OK") == 5


async def burst(address: str, calls: int, concurrency: int = 64) -> int:
    """Send ``calls`` Health/Check calls, ``concurrency`` at a time; return how many succeeded."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service="liveness")
        remaining = iter(range(calls))
        ok = 0

        async def worker() -> None:
            nonlocal ok
            for _ in remaining:
                await stub.Check(request, timeout=RPC_TIMEOUT)
                ok += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return ok


def test_access_records_are_shed_and_counted_when_the_log_queue_backs_up(start_server: Start, tmp_path: Path) -> None:
    log_file = tmp_path / "server.log"
    server, read_end, write_end = start_on_small_pipe(
        start_server, *METRICS, "--log-file", str(log_file), "--log-timeout", "0.3", "--check-interval", "0.5")
    url = wait_for_file_line(log_file, HTTP_LINE)[1] + "/metrics"
    stall(write_end)  # the writer blocks on stdout: records pile up in the queue

    assert asyncio.run(burst(server.address, 12_000)) == 12_000  # calls never wait on logging
    with urllib.request.urlopen(url, timeout=RPC_TIMEOUT) as answer:
        text = answer.read().decode()
    dropped = {s.labels["reason"]: s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "petsage_log_records_dropped_total"}
    # Access records stop being queued at half the queue (5,000 of 10,000): the rest are shed, counted.
    # (The stuck writer holds one batch it took from the queue before it blocked.)
    assert dropped["shed"] >= 12_000 - logs.SHED_ABOVE - logs.BATCH_SIZE
    assert dropped["queue_full"] == 0
    # So the logging check's own record still found room: the check fails on the stuck writer,
    # not on a full queue.
    check = server.smoke().checks[0]
    assert "the log writer did not confirm probe" in check.detail, check.detail
    server.wait_for_health("readiness", NOT_SERVING)

    drained = LineLog(os.fdopen(read_end, "rb"))  # read again: the writer gets unstuck
    server.wait_for_health("readiness", SERVING)
    # The loss is also reported in the log (by the logging check), not only counted.
    drained.wait_for(r"\d+ log record\(s\) lost since the last logging check \(queue full, access records shed")
    os.close(write_end)


def test_probe_user_agent_keeps_only_health_calls_out_of_the_access_log(start_server: Start) -> None:
    server = start_server()
    with grpc.insecure_channel(server.address, options=(("grpc.primary_user_agent", "kube-probe/1.31"),)) as channel:
        smoke = smoke_pb2_grpc.SmokeTestServiceStub(channel).SmokeTest(smoke_pb2.SmokeTestRequest(),
                                                                       timeout=RPC_TIMEOUT)
    assert smoke.status == smoke_pb2.STATUS_OK
    server.stdout.wait_for(rf"{ACCESS}{SMOKE} OK .*kube-probe/1.31")


def test_idle_connections_to_the_http_port_hold_no_thread_and_keep_no_scrape_out(start_server: Start) -> None:
    server = start_server(*METRICS)
    host, port = metrics_address(server).split("//")[1].split("/")[0].rsplit(":", 1)
    scrape(server)
    before = proc_status(server.process.pid, "Threads")
    idle = [socket.create_connection((host, int(port)), timeout=RPC_TIMEOUT) for _ in range(100)]
    try:
        for connection in idle[:50]:
            connection.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # a head that never ends
        assert sample(scrape(server), "petsage_http_connections") >= 101
        assert proc_status(server.process.pid, "Threads") <= before + 1  # the scrape's collector thread at most
    finally:
        for connection in idle:
            connection.close()


@pytest.mark.parametrize("fault", [(), ("--log-file", "/dev/full")])
def test_status_only_smoke_details_hide_checks_and_server(start_server: Start, fault: tuple[str, ...]) -> None:
    server = start_server("--smoke-details", "status", *fault)
    response = server.smoke()

    assert response.HasField("timestamp") and response.message
    assert not response.checks and not response.HasField("server")
    expected = smoke_pb2.STATUS_FAILING if fault else smoke_pb2.STATUS_OK
    assert response.status == expected
    full = smoke_pb2_grpc.SmokeTestServiceStub(start_server(*fault).channel()).SmokeTest(
        smoke_pb2.SmokeTestRequest(), timeout=RPC_TIMEOUT)
    assert full.status == expected and full.message == response.message
    assert full.checks and full.HasField("server")


def test_http_port_in_use_or_bad_metrics_settings_stop_the_server(start_server: Start) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        in_use = run_cli("serve", "--address", "127.0.0.1:0", "--http-address", f"127.0.0.1:{port}", "--metrics")
    assert in_use.returncode == 2
    assert in_use.stderr == (f"petsage-grpc serve: error: cannot listen on HTTP 127.0.0.1:{port}: "
                             "the port is already in use\n")
    assert "serving on" not in in_use.stdout

    for flags, message in (
        (("--http-address", "unix:/tmp/m"), "invalid --http-address='unix:/tmp/m'"),
        (("--metrics",), "--metrics needs --http-address: /metrics is served there"),
        ((*METRICS, "--workers", "2"), "--metrics serves one process"),
        (("--metrics-address", "127.0.0.1:0"), "--metrics-address is retired: serve /metrics on the HTTP listener "
                                                 "with --http-address HOST:PORT --metrics"),
        (("--smoke-details", "some"), "invalid --smoke-details='some': expected one of full, status"),
        (("--max-receive-bytes", "10"), "invalid --max-receive-bytes='10': should be ≥ 1024"),
    ):
        result = run_cli("serve", "--address", "127.0.0.1:0", *flags)
        assert result.returncode == 1 and message in result.stderr, result.stderr
    retired = run_cli("serve", "--address", "127.0.0.1:0", env={"PETSAGE_GRPC_METRICS_ADDRESS": "127.0.0.1:0"})
    assert retired.returncode == 1 and "--metrics-address is retired" in retired.stderr
