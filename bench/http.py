"""The HTTP side, in the same run: ``/readyz`` and the REST smoke test beside gRPC Check and SmokeTest.

One project server started with ``--http-address`` answers all four, so the
HTTP figures and the gRPC ones come from the same process, minutes apart at
most, under the same load shape (h2load, 8 connections × 16 requests at a time;
over HTTP/1.1 the 16 are pipelined).  Then what the listener costs: start →
first SERVING and idle RSS with and without ``--http-address``, starts
alternated.  The stock server has no HTTP side: these are ratios HTTP / gRPC and
with / without, not against stock.
"""

from __future__ import annotations

import re
import statistics
import subprocess
from pathlib import Path

from bench import h2load
from bench.calls import CHECK, SMOKE
from bench.servers import PROJECT, Server
from bench.session import CLIENTS, STREAMS, Config, Session, step

HTTP_FLAGS = ("--http-address", "127.0.0.1:0")
HTTP_LINE = re.compile(rb"HTTP health on (http://\S+:\d+)")
READYZ, SMOKE_TEST = "/readyz", "/api/v1/smoke-test/"
_STATUS_CODES = re.compile(r"^status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", re.M)


def load(url: str, workdir: Path, *, clients: int, streams: int, cpus: str, requests: int | None = None,
         duration: float | None = None, latency: bool = False) -> h2load.Run:
    """One h2load run over HTTP/1.1 against ``url``; every answer must be a 2xx."""
    assert (requests is None) != (duration is None), "give requests or duration"
    output, log = workdir / "h2load-http.out", workdir / "h2load-http.log"
    command = ["taskset", "-c", cpus, h2load.require(), "--h1", "-t", "1", "-c", str(clients), "-m", str(streams)]
    if latency:
        command += ["--log-file", str(log)]
    command += ["-D", f"{max(1, round((duration or 0) * 1000))}ms"] if duration is not None else ["-n", str(requests)]
    with output.open("wb") as sink:
        done = subprocess.run([*command, url], stdout=sink, stderr=subprocess.STDOUT,
                              timeout=600 if duration is None else duration * 3 + 30, check=False)
    text = output.read_text(errors="replace")
    result = h2load.Run()
    finished, counts, codes = h2load.FINISHED.search(text), h2load.REQUESTS.search(text), _STATUS_CODES.search(text)
    if done.returncode != 0 or finished is None or counts is None or codes is None:
        result.fail(1, f"h2load --h1 exited {done.returncode} without its summary")
        return result
    result.rate = float(finished[1])
    total, _, answered, succeeded, failed, errored, timeout = (int(n) for n in counts.groups())
    result.requests = answered
    bad = sum(int(n) for n in codes.groups()[1:])
    if bad or failed or errored or timeout or (requests is not None and not total == answered == succeeded):
        result.fail(bad + failed + errored + timeout or 1,
                    f"{url}: {codes[0]}; {failed} failed, {errored} errored, {timeout} timeout of {total}")
    if latency and log.exists():
        result.latencies_us = h2load.latencies(log)
    return result


def _measured(session: Session, url: str, *, clients: int, streams: int, latency: bool = False) -> h2load.Run:
    """A warm-up, then a run of about the configured seconds, as :meth:`Session.load` does for gRPC."""
    config = session.config
    warm = load(url, session.workdir, clients=clients, streams=streams, cpus=config.load_cpu,
                duration=config.warm_up)
    run = load(url, session.workdir, clients=clients, streams=streams, cpus=config.load_cpu,
               requests=max(clients * streams, round(warm.rate * config.seconds)), latency=latency)
    session.figures["failures"] += warm.failures + run.failures
    session.problems.extend(f"HTTP: {problem}" for problem in [*warm.problems, *run.problems])
    return run


def _throughput_and_latency(session: Session, base: str) -> dict[str, float]:
    figures: dict[str, float] = {}
    for key, grpc_method, path in (("check", CHECK, READYZ), ("smoke", SMOKE, SMOKE_TEST)):
        with step(f"{grpc_method.name} c8 m16 beside HTTP {path}"):
            figures[f"grpc_{key}_rps"] = session.load(grpc_method, CLIENTS, STREAMS).rate
            figures[f"http_{key}_rps"] = _measured(session, base + path, clients=CLIENTS, streams=STREAMS).rate
        with step(f"{grpc_method.name} c1 beside HTTP {path}"):
            grpc_latencies = session.load(grpc_method, 1, 1, latency=True).latencies_us
            http_latencies = _measured(session, base + path, clients=1, streams=1, latency=True).latencies_us
        for side, latencies in (("grpc", grpc_latencies), ("http", http_latencies)):
            figures[f"{side}_{key}_c1_p99_ms"] = h2load.percentile(latencies, 0.99) / 1000
    return figures


def _costs(config: Config, workdir: Path) -> dict[str, float]:
    """Start → first SERVING and idle RSS, with and without the listener, starts alternated."""
    samples: dict[str, list[float]] = {"with": [], "without": [], "with_rss": [], "without_rss": []}
    for _ in range(config.starts + 1):
        for side, extra in (("with", HTTP_FLAGS), ("without", ())):
            server = Server(PROJECT, config.server_cpu, workdir, extra)
            try:
                samples[side].append(server.start_seconds * 1000)
                samples[f"{side}_rss"].append(server.rss_mib())
            finally:
                server.stop()
    return {"start_with_http_ms": statistics.median(samples["with"]),
            "start_without_http_ms": statistics.median(samples["without"]),
            "idle_rss_with_http_mib": statistics.median(samples["with_rss"]),
            "idle_rss_without_http_mib": statistics.median(samples["without_rss"])}


def measure(config: Config, workdir: Path) -> tuple[dict[str, float], list[str]]:
    """Every HTTP figure of one round, and the failed calls among them."""
    session = Session(PROJECT, config, workdir, extra=HTTP_FLAGS)
    try:
        match = HTTP_LINE.search(session.server.stdout.read_bytes())
        assert match is not None, "the server did not log its HTTP address"
        figures = _throughput_and_latency(session, match[1].decode())
    finally:
        session.server.stop()
    with step("start and idle RSS, with and without --http-address"):
        figures.update(_costs(config, workdir))
    figures["failures"] = session.figures["failures"]
    return figures, session.problems
