"""The benchmark harness: a quick run reports every figure, and a failing call never passes as load."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2

from bench import h2load, report
from bench.calls import CHECK, SMOKE, Method, burst
from bench.servers import BASELINE, PROJECT, PROTOTYPE, ROOT, Kind, Server

WATCHERS = 200
CPUS = ",".join(str(cpu) for cpu in sorted(os.sched_getaffinity(0)))
UNKNOWN_METHOD = dataclasses.replace(SMOKE, name="NoSuchMethod", path=SMOKE.path.rpartition("/")[0] + "/NoSuchMethod")
UNKNOWN_SERVICE = dataclasses.replace(
    CHECK, name="CheckUnknown", request=health_pb2.HealthCheckRequest(service="no-such-service").SerializeToString())


def test_quick_run_reports_every_figure_for_every_server(tmp_path: Path) -> None:
    results_file = tmp_path / "bench.json"

    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--watchers", str(WATCHERS), "--json", str(results_file)],
        cwd=ROOT, capture_output=True, text=True, timeout=150, check=False,
    )

    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads(results_file.read_text())
    for server in ("project", "baseline", "prototype"):
        figures = results["servers"][server]["figures"]
        assert set(figures) == {figure.key for figure in report.FIGURES}, server
        for rate in ("check_rps", "smoke_rps", "probe_load_rps"):
            assert figures[rate] > 0, (server, rate)
        for low, high in (("check_c1_p50_ms", "check_c1_p99_ms"), ("smoke_c1_p50_ms", "smoke_c1_p99_ms"),
                          ("watch_p50_ms", "watch_p99_ms")):
            assert 0 < figures[low] <= figures[high], (server, low, high)
        # Probes may fail under load (the stock server's do): that is a figure, not a fault.
        assert 0 < figures["probe_p99_ms"] <= 1000 or figures["probe_failures"] > 0, server
        assert 0 < figures["start_to_ok_ms"] < 30_000, server
        assert 10 < figures["idle_rss_mib"] <= figures["loaded_rss_mib"] + 5, server
        assert figures["watch_streams"] == figures["watch_delivered"] == WATCHERS, server
        assert figures["storm_streams"] == WATCHERS, server
        assert figures["failures"] == 0, server
    for server in ("project", "prototype"):  # the stock servicer may deadlock in the storm: a figure
        figures = results["servers"][server]["figures"]
        assert figures["storm_probe_failures"] == 0 and 0 < figures["storm_probe_p99_ms"] < 1000, server
    assert results["ratios"]["check_rps"] > 0
    assert results["problems"] == []
    http = results["http"]
    assert set(http) == {key for _, *keys, _ in report.HTTP_ROWS for key in keys} | {"failures"}
    assert http["failures"] == 0
    assert all(value > 0 for key, value in http.items() if key != "failures"), http
    assert "| `/readyz` against `Health/Check` req/s (c8 m16) |" in done.stdout
    assert "| Check req/s (c8 m16, one core) |" in done.stdout
    assert "| server design | petsage-grpc (grpc.aio) | sync prototype (sync + callbacks) | ratio |" in done.stdout
    assert results["design_ratios"]["check_rps"] > 0
    assert "`serve --workers 2`" in done.stdout


@pytest.fixture(params=[PROJECT, BASELINE, PROTOTYPE], ids=lambda kind: kind.key)
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Server]:
    kind: Kind = request.param
    started = Server(kind, CPUS, tmp_path)
    yield started
    started.stop()


def load(server: Server, method: Method, reference: Method, workdir: Path) -> h2load.Run:
    """50 calls of ``method`` held against the answers a healthy ``reference`` call gives."""
    sizes = burst(server.address, reference, 5).sizes
    expected = h2load.Expected(method, min(sizes), max(sizes))
    return h2load.run(server.address, expected, workdir, clients=2, streams=4, cpus=CPUS, requests=50)


def test_good_calls_pass(server: Server, tmp_path: Path) -> None:
    run = load(server, CHECK, CHECK, tmp_path)

    assert (run.requests, run.failures, run.problems) == (50, 0, [])


def test_unimplemented_method_is_fifty_failures_though_h2load_counts_successes(server: Server, tmp_path: Path) -> None:
    run = load(server, UNKNOWN_METHOD, SMOKE, tmp_path)

    assert run.failures >= 50
    assert any("grpc-status 12" in problem for problem in run.problems)
    assert len(burst(server.address, UNKNOWN_METHOD, 3).failures) == 3


def test_error_after_a_message_is_a_failure(server: Server, tmp_path: Path) -> None:
    # The stock servicer answers an unknown service with an empty message and
    # NOT_FOUND in the trailers; ours with NOT_FOUND alone.  Both must count.
    run = load(server, UNKNOWN_SERVICE, CHECK, tmp_path)

    assert run.failures > 0
    assert run.problems
    assert len(burst(server.address, UNKNOWN_SERVICE, 3).failures) == 3
