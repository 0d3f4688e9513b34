"""One session: a fresh server process, measured figure by figure.

Each round of the benchmark runs one session per server.  A server, pinned
to the first core, is measured in this order: start → first SERVING, idle RSS,
Check and SmokeTest throughput (h2load, 8 connections × 16 streams), Check and
SmokeTest latency (1 connection, 1 stream), Check probes at 20/s while h2load
saturates it with SmokeTest, RSS after load, and last Watch fan-out, whose
change is the SIGTERM that ends the process.  The load (h2load and this
process) runs on the second core.  Every load run is checked call by call (see
:mod:`bench.h2load` and :mod:`bench.calls`); a failed call makes the exit code 1.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench import h2load, probes, report, watch
from bench.calls import CHECK, SMOKE, SMOKE_SERVICE, Method, StatusWatch, burst
from bench.servers import STOP_TIMEOUT, Kind, Server

#: Connections × streams per connection of the throughput figures.
CLIENTS, STREAMS = 8, 16
#: Real calls made before each load run (to learn the answers' sizes) and after it (to check them).
BURST = 20
#: Problems kept per server in the report.
MAX_PROBLEMS = 20


@dataclass(frozen=True)
class Config:
    """How long and how hard to measure."""

    quick: bool
    rounds: int
    seconds: float  # per throughput, latency and probe figure
    warm_up: float
    watchers: int
    starts: int  # extra start-up samples per server and round
    probe_rate: float
    server_cpu: str
    load_cpu: str


class Session:
    """One server process and the figures measured on it."""

    def __init__(self, kind: Kind, config: Config, workdir: Path, cpus: str | None = None,
                 extra: tuple[str, ...] = ()) -> None:
        self.config, self.workdir = config, workdir
        self.server = Server(kind, cpus or config.server_cpu, workdir, extra)
        self.figures: report.Values = {"start_to_ok_ms": self.server.start_seconds * 1000, "failures": 0}
        #: Failed calls of the load itself: they make the figures meaningless.
        self.problems: list[str] = []
        #: What the figures measured going wrong (a late probe, an undelivered change): results, not faults.
        self.notes: list[str] = []
        self.expected: dict[str, h2load.Expected] = {}

    def _expect(self, method: Method) -> h2load.Expected:
        if method.name not in self.expected:
            sample = burst(self.server.address, method, BURST)
            self._note(len(sample.failures), sample.failures)
            sizes = sample.sizes or [0]
            self.expected[method.name] = h2load.Expected(method, min(sizes), max(sizes))
        return self.expected[method.name]

    def _note(self, failures: int, problems: Sequence[str]) -> None:
        self.figures["failures"] += failures
        room = max(0, MAX_PROBLEMS - len(self.problems))
        self.problems.extend(f"{self.server.kind.label}: {p}" for p in problems[:room])

    def load(self, method: Method, clients: int, streams: int, *, load_cpus: str | None = None,
             latency: bool = False) -> h2load.Run:
        """A warm-up, then one checked h2load run of about the configured seconds.

        The run is a count of calls (the warm-up's rate times the seconds), so every call ends and is counted.
        """
        expected, cpus = self._expect(method), load_cpus or self.config.load_cpu
        address = self.server.address
        sentinel = StatusWatch(address, SMOKE_SERVICE, timeout=600)
        try:
            warm = h2load.run(address, expected, self.workdir, clients=clients, streams=streams, cpus=cpus,
                              duration=self.config.warm_up)
            requests = max(clients * streams, round(warm.rate * self.config.seconds))
            run = h2load.run(address, expected, self.workdir, clients=clients, streams=streams, cpus=cpus,
                             requests=requests, latency=latency)
        finally:
            dropped = sentinel.close()
        after = burst(address, method, BURST)
        self._note(warm.failures + run.failures + len(dropped) + len(after.failures),
                   [*warm.problems, *run.problems, *dropped, *self._why(dropped), *after.failures])
        return run

    def _why(self, dropped: Sequence[str]) -> list[str]:
        """When a status fell during a run, the server's own log lines about it."""
        return [f"logged: {line}" for line in self.server.log_lines("NOT_SERVING")[:3]] if dropped else []

    def probe_under_load(self) -> None:
        """Check probes at the configured rate while h2load saturates the server with SmokeTest."""
        lead = min(1.0, self.config.seconds / 4)  # the load is at full speed before the first probe
        expected, address = self._expect(SMOKE), self.server.address
        sentinel = StatusWatch(address, SMOKE_SERVICE, timeout=600)
        try:
            with ThreadPoolExecutor(1) as pool:
                loading = pool.submit(h2load.run, address, expected, self.workdir, clients=CLIENTS, streams=STREAMS,
                                      cpus=self.config.load_cpu, duration=self.config.seconds + 2 * lead)
                time.sleep(lead)
                seen = asyncio.run(probes.probe(address, self.config.probe_rate, self.config.seconds))
                run = loading.result()
        finally:
            dropped = sentinel.close()
        self._note(run.failures + len(dropped), [*run.problems, *dropped, *self._why(dropped)])
        self.figures["probe_p99_ms"] = h2load.percentile(seen.latencies_ms, 0.99)
        self.figures["probe_failures"] = float(len(seen.failures))
        self.figures["probe_load_rps"] = run.rate
        self.notes.extend(f"{self.server.kind.label}: probe {p}" for p in sorted(set(seen.failures)))

    def fan_out(self) -> None:
        """Watch fan-out; its change is the SIGTERM that ends the server."""
        result = asyncio.run(watch.fan_out(self.server.address, self.config.watchers, self.server.rss_mib,
                                           self.server.signal, timeout=120))
        self.notes.extend(f"{self.server.kind.label}: Watch {p}" for p in result.problems)
        if result.early:
            self.notes.extend(f"{self.server.kind.label}: {line}" for line in self._why(result.problems))
        self.figures.update(
            watch_asked=result.streams, watch_streams=result.opened, watch_delivered=result.delivered,
            watch_open_s=result.open_seconds, watch_client_busy_pct=result.client_busy * 100,
            watch_early_drops=result.early,
            watch_rss_growth_mib=result.rss_growth_mib,
            watch_rss_per_stream_kib=result.rss_growth_mib * 1024 / max(1, result.opened),
            watch_p50_ms=h2load.percentile(result.latencies_ms, 0.5),
            watch_p99_ms=h2load.percentile(result.latencies_ms, 0.99),
            watch_max_ms=max(result.latencies_ms, default=0.0),
        )

    def measure(self) -> report.Values:
        """Every figure, in the order of the module docstring."""
        time.sleep(min(1.0, self.config.seconds / 4))  # let start-up work finish before "idle"
        self.figures["idle_rss_mib"] = self.server.rss_mib()
        with step("Check c8 m16"):
            self.figures["check_rps"] = self.load(CHECK, CLIENTS, STREAMS).rate
        with step("SmokeTest c8 m16"):
            self.figures["smoke_rps"] = self.load(SMOKE, CLIENTS, STREAMS).rate
        for method, key in ((CHECK, "check"), (SMOKE, "smoke")):
            with step(f"{method.name} c1"):
                latencies = self.load(method, 1, 1, latency=True).latencies_us
            self.figures[f"{key}_c1_p50_ms"] = h2load.percentile(latencies, 0.5) / 1000
            self.figures[f"{key}_c1_p99_ms"] = h2load.percentile(latencies, 0.99) / 1000
        with step("probes under load"):
            self.probe_under_load()
        self.figures["loaded_rss_mib"] = self.server.rss_mib()
        with step(f"Watch x{self.config.watchers}"):
            self.fan_out()
        with step("exit"):
            if self.server.wait() is None:
                self.notes.append(f"{self.server.kind.label}: still running {STOP_TIMEOUT:g}s after SIGTERM")
        return self.figures


#: Watch streams of the cancel storm, at most, and the drain its server is started with (longer than the probes).
STORM_STREAMS, STORM_DRAIN = 1000, 5.0


def storm(kind: Kind, config: Config, workdir: Path) -> tuple[report.Values, list[str]]:
    """The cancel storm on a fresh server of ``kind`` (every kind takes ``--drain``): its figures and notes."""
    server = Server(kind, config.server_cpu, workdir, ("--drain", f"{STORM_DRAIN:g}"))
    try:
        with step("cancel storm"):
            result = asyncio.run(watch.cancel_storm(
                server.address, min(config.watchers, STORM_STREAMS), server.signal, probe_rate=config.probe_rate,
                probe_seconds=min(2.0, STORM_DRAIN / 2), timeout=60))
    finally:
        server.process.kill()  # a server deadlocked by the storm would not stop on a signal
        server.process.wait(STOP_TIMEOUT)
    # A probe that failed took the kubelet's whole budget: it counts as that long.
    failed = [probes.PROBE_BUDGET * 1000] * len(result.probe_failures)
    figures = {"storm_streams": float(result.streams),
               "storm_probe_p99_ms": h2load.percentile([*result.probe_latencies_ms, *failed], 0.99),
               "storm_probe_failures": float(len(result.probe_failures))}
    notes = [f"{kind.label}: cancel storm {p}" for p in [*result.problems, *sorted(set(result.probe_failures))]]
    return figures, notes


@contextmanager
def step(name: str) -> Iterator[None]:
    """Say on stderr how long a step took: a slow step is the first sign of trouble."""
    began = time.monotonic()
    try:
        yield
    finally:
        print(f"  {name}: {time.monotonic() - began:.1f}s", file=sys.stderr, flush=True)
