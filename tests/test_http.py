"""The HTTP side over real HTTP, against real server processes: the REST smoke test, Kubernetes' health
endpoints, every health name, the load-balancer options, the OpenAPI document, and shutdown."""

from __future__ import annotations

import json
import re
import signal
import subprocess
from datetime import datetime

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from openapi_spec_validator import validate

from tests.support import (
    NOT_SERVING,
    RPC_TIMEOUT,
    SERVING,
    ServerProcess,
    Start,
    run_cli,
    stall,
    start_on_small_pipe,
)

HTTP = ("--http-address", "127.0.0.1:0")
ROUTES = ["/api/v1/smoke-test/", "/livez", "/readyz", "/healthz", "/health", "/openapi.json"]
KUBERNETES_TEXT = "text/plain; charset=utf-8"


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    """Run curl (quiet, no redirects followed) and capture what it prints."""
    return subprocess.run(["curl", "--silent", "--show-error", "--max-time", str(RPC_TIMEOUT), *args],
                          capture_output=True, text=True, timeout=RPC_TIMEOUT + 5, check=False)


@pytest.fixture
def http_server(start_server: Start) -> ServerProcess:
    """A server with the HTTP listener and metrics on."""
    return start_server(*HTTP, "--metrics")


def test_the_original_rest_smoke_test_as_its_users_wrote_it(http_server: ServerProcess) -> None:
    answer = http_server.http("/api/v1/smoke-test/")

    assert answer.status == 200
    assert answer.headers["content-type"] == "application/json"
    data = answer.json()
    assert data["status"] == "ok"
    assert "PetSage services are running" in data["message"]
    assert datetime.fromisoformat(data["timestamp"].replace("Z", "+00:00"))


def test_the_rest_smoke_test_with_curl_writes_a_record_through_every_sink(http_server: ServerProcess) -> None:
    done = curl("--include", http_server.http_url + "/api/v1/smoke-test/")

    head, _, body = done.stdout.partition("\n\n")  # text mode: curl's CRLFs read as newlines
    assert head.startswith("HTTP/1.1 200 OK\n")
    assert "\nCache-Control: no-store\n" in head
    data = json.loads(body)
    assert data["message"] == "PetSage services are running and logging is active."
    [logging] = [check for check in data["checks"] if check["name"] == "logging"]
    probe_id = logging["detail"].split()[1]
    http_server.stdout.wait_for(f"logging probe {probe_id}")
    assert set(data["server"]) == {"version", "instance_id", "start_time"}


def test_a_url_without_the_trailing_slash_is_redirected_to_the_contract(http_server: ServerProcess) -> None:
    answer = http_server.http("/api/v1/smoke-test")

    assert (answer.status, answer.headers["location"]) == (308, "/api/v1/smoke-test/")


def test_a_full_disk_fails_the_smoke_test_and_readiness_but_not_liveness(start_server: Start) -> None:
    server = start_server(*HTTP, "--log-file", "/dev/full")

    smoke = server.http("/api/v1/smoke-test/")
    assert smoke.status == 503
    assert smoke.json()["status"] == "failing"
    assert smoke.json()["message"] == "PetSage services are failing: logging."
    ready = server.http("/readyz")
    assert ready.status == 500
    assert ready.headers["content-type"] == KUBERNETES_TEXT
    # The detail goes on to count the records the full disk lost: an access record per call.
    assert re.fullmatch(r"\[-\]logging failed: file /dev/full: \[Errno 28\] No space left on device[^\n]*\n"
                        r"\[\+\]event_loop ok\n\[\+\]shutdown ok\nreadyz check failed\n", ready.text), ready.text
    assert server.http("/livez").status == 200
    assert server.http("/health?service=readiness").status == 503
    assert server.http("/health?service=liveness").status == 200


def test_status_only_details_withhold_reasons_checks_and_server(start_server: Start) -> None:
    server = start_server(*HTTP, "--log-file", "/dev/full", "--smoke-details", "status")

    assert set(server.http("/api/v1/smoke-test/").json()) == {"status", "message", "timestamp"}
    assert server.http("/readyz").text.startswith("[-]logging failed: reason withheld\n")
    assert server.http("/readyz/logging").text == "internal server error: reason withheld\n"
    # The reason is in the log, where the check's change was written.
    server.stdout.wait_for(r"check logging is failing: file /dev/full: \[Errno 28\]")


def test_kubernetes_endpoints_answer_ok_or_one_line_per_check(http_server: ServerProcess) -> None:
    for endpoint in ("livez", "readyz", "healthz"):
        answer = http_server.http(f"/{endpoint}")
        assert (answer.status, answer.text) == (200, "ok")
        assert answer.headers["content-type"] == KUBERNETES_TEXT
        assert answer.headers["x-content-type-options"] == "nosniff"

    assert http_server.http("/livez?verbose").text == "[+]ping ok\n[+]event_loop ok\nlivez check passed\n"
    assert http_server.http("/readyz?verbose").text == (
        "[+]logging ok\n[+]event_loop ok\n[+]shutdown ok\nreadyz check passed\n")


def test_exclude_leaves_a_check_out_and_warns_of_names_that_match_none(start_server: Start) -> None:
    server = start_server(*HTTP, "--log-file", "/dev/full")

    answer = server.http("/readyz?exclude=logging&exclude=nope&exclude=other&verbose")

    assert answer.status == 200
    assert answer.text == ("[+]logging excluded: ok\n[+]event_loop ok\n[+]shutdown ok\n"
                           'warn: some health checks cannot be excluded: no matches for "nope", "other"\n'
                           "readyz check passed\n")


def test_one_check_answers_by_itself(start_server: Start) -> None:
    server = start_server(*HTTP, "--log-file", "/dev/full")

    assert (server.http("/readyz/event_loop").status, server.http("/readyz/event_loop").text) == (200, "ok")
    failing = server.http("/readyz/logging")
    assert failing.status == 500
    assert failing.text.startswith("internal server error: file /dev/full: [Errno 28] No space left on device")
    assert server.http("/livez/ping").text == "ok"
    assert server.http("/livez/logging").status == 404  # liveness does not follow logging
    assert server.http("/readyz/nope").status == 404


def test_every_health_name_as_grpc_gateway_maps_it(start_server: Start) -> None:
    server = start_server(*HTTP, "--health-aliases", "grpc.health.v1.Health=readiness")

    assert server.http("/health").json() == {"status": "SERVING"}
    for name in ("readiness", "liveness", "petsage.smoke.v1.SmokeTestService", "grpc.health.v1.Health"):
        answer = server.http(f"/health?service={name}")
        assert (answer.status, answer.json()) == (200, {"status": "SERVING"}), name
        assert answer.headers["content-type"] == "application/json"
    unknown = server.http("/health?service=nope")
    assert (unknown.status, unknown.json()) == (404, {"code": 5, "message": "unknown service", "details": []})


def test_head_answers_get_s_headers_without_a_body(http_server: ServerProcess) -> None:
    for path in [*ROUTES, "/metrics", "/readyz/logging"]:
        get, head = http_server.http(path), http_server.http(path, "HEAD")
        assert (head.status, head.body) == (get.status, b""), path
        assert head.headers["content-type"] == get.headers["content-type"], path
        if path not in ("/api/v1/smoke-test/", "/metrics"):  # answers that change from call to call
            assert head.headers["content-length"] == str(len(get.body)), path


def test_unknown_paths_and_other_methods_are_refused(http_server: ServerProcess) -> None:
    missing = http_server.http("/nope")
    assert missing.status == 404
    for method in ("POST", "PUT", "DELETE", "OPTIONS"):
        refused = http_server.http("/readyz", method)
        assert (refused.status, refused.headers["allow"]) == (405, "GET, HEAD"), method


def test_the_openapi_document_is_valid_and_lists_exactly_the_routes_served(http_server: ServerProcess) -> None:
    document = http_server.http("/openapi.json").json()

    validate(document)
    documented = set(document["paths"])
    assert documented == {*ROUTES, "/metrics", "/livez/{check}", "/readyz/{check}", "/healthz/{check}"}
    for path in documented:
        answer = http_server.http(path.replace("{check}", "event_loop" if "livez" not in path else "ping"))
        assert answer.status in (200, 308), path
    without_metrics = set(http_server.http("/openapi.json").json()["paths"]) - {"/metrics"}
    assert without_metrics == documented - {"/metrics"}


def test_metrics_are_served_only_when_asked_for(start_server: Start, http_server: ServerProcess) -> None:
    plain = start_server(*HTTP)

    assert plain.http("/metrics").status == 404
    assert "/metrics" not in plain.http("/openapi.json").json()["paths"]
    answer = http_server.http("/metrics", headers={"Accept-Encoding": "gzip"})
    assert answer.headers["content-encoding"] == "gzip"
    assert http_server.http("/metrics").text.count("petsage_http_requests_total{") >= 1


def test_load_balancer_mode_answers_not_serving_as_unavailable(start_server: Start) -> None:
    server = start_server("--unavailable-unless-serving", "--log-file", "/dev/full",
                          "--health-aliases", "grpc.health.v1.Health=readiness")
    stub = health_pb2_grpc.HealthStub(server.channel())

    for name in ("readiness", "grpc.health.v1.Health"):
        with pytest.raises(grpc.RpcError) as raised:
            stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=RPC_TIMEOUT)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        assert raised.value.details() == f"service {name!r} is NOT_SERVING"
    assert stub.Check(health_pb2.HealthCheckRequest(service="liveness"), timeout=RPC_TIMEOUT).status == SERVING
    probe = run_cli("probe", "-addr", server.address, "-service", "readiness")
    assert probe.returncode == 3, probe.stderr  # still a failed probe, as grpc_health_probe reads it
    assert "code = Unavailable desc = service 'readiness' is NOT_SERVING" in probe.stderr
    # Watch still streams the status itself, for clients that read it.
    watch = stub.Watch(health_pb2.HealthCheckRequest(service="grpc.health.v1.Health"), timeout=RPC_TIMEOUT)
    assert next(watch).status == NOT_SERVING
    watch.cancel()


def in_flight(server: ServerProcess) -> float:
    """``petsage_calls_in_flight``, scraped."""
    name = "petsage_calls_in_flight "
    return float(next(line for line in server.http("/metrics").text.splitlines() if line.startswith(name))[len(name):])


def test_shutdown_fails_readiness_at_once_then_refuses_new_smoke_tests_and_finishes_the_one_in_flight(
    start_server: Start,
) -> None:
    server, _, write_end = start_on_small_pipe(start_server, *HTTP, "--metrics", "--drain", "1", "--log-timeout", "3")
    watch = health_pb2_grpc.HealthStub(server.channel()).Watch(
        health_pb2.HealthCheckRequest(service="readiness"), timeout=30)
    assert next(watch).status == SERVING
    stall(write_end)  # every smoke test now waits for its record, up to the 3 s log timeout
    with subprocess.Popen(["curl", "--silent", "--max-time", "20", "--write-out", "\n%{http_code}",
                           server.http_url + "/api/v1/smoke-test/"], stdout=subprocess.PIPE, text=True) as slow:
        while in_flight(server) < 1:  # the request has reached its handler
            assert slow.poll() is None
        server.signal(signal.SIGTERM)
        assert next(watch).status == NOT_SERVING
        ready = server.http("/readyz")
        assert ready.status == 500 and "[-]shutdown failed: the server is shutting down\n" in ready.text
        assert server.http("/livez").status == 200
        assert server.http("/health?service=readiness").status == 503
        with pytest.raises(grpc.RpcError) as ended:
            next(watch)  # the drain is over: Watch streams end, new calls are refused
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        refused = server.http("/api/v1/smoke-test/")
        assert (refused.status, refused.text) == (503, "server is shutting down; retry another instance\n")
        assert refused.headers["retry-after"] == "1"
        body, code = slow.communicate(timeout=20)[0].rsplit("\n", 1)
    assert code == "503"
    assert json.loads(body)["status"] == "failing"  # the call in flight got its whole answer
    checks = {check["name"]: check for check in json.loads(body)["checks"]}
    assert checks["shutdown"] == {"name": "shutdown", "status": "failing", "detail": "the server is shutting down",
                                  "duration_seconds": 0.0, "critical": True}
    assert server.wait() == 0
