"""``python -m bench [--quick] [--json FILE]``: the project's server against a stock one, in one run.

Rounds alternate the servers (project, stock, sync prototype, project, …) so
that drift in a shared machine hits all; each round measures a fresh process
of each (see :mod:`bench.session`), then a cancel storm on another fresh
process of each, then ``serve --workers 2`` against one worker when the
server has that flag.  Rounds combine by the median; failures add up.

Prints Markdown tables (each figure for our server and the stock one, the
ratio project/baseline, the target and whether this run meets it; then our
server beside the sync prototype of :mod:`bench.prototype`, the design
question; then the HTTP side) and writes every figure, round by round, as
JSON.  Exit code 0, or 1 when a call of the load
itself failed (the figures of such a run mean nothing), or 2 when the machine
lacks a tool.  Probes that fail under load, or a Watch change that does not
arrive, are figures, not faults: they are printed as notes.

Needs h2load (``apt-get install -y nghttp2-client``) and ``taskset``.  The
servers get the first core this process may use and the load the second.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import grpc

from bench import h2load, report
from bench import http as http_side
from bench.calls import CHECK
from bench.servers import BASELINE, PROJECT, PROTOTYPE, ROOT, Kind, Server, serve_flags
from bench.session import CLIENTS, STREAMS, Config, Session, step, storm

DEFAULT_JSON = Path(tempfile.gettempdir()) / "petsage-bench.json"


def start_samples(kind: Kind, config: Config, workdir: Path) -> list[float]:
    """Extra start → first SERVING samples, each from a new process."""
    samples = []
    for _ in range(config.starts):
        server = Server(kind, config.server_cpu, workdir)
        try:
            samples.append(server.start_seconds * 1000)
        finally:
            server.stop()
    return samples


def measure_workers(config: Config, workdir: Path) -> report.Workers:
    """``serve --workers 2`` against ``--workers 1``: Check req/s with every core for the server."""
    if "--workers" not in serve_flags():
        return report.Workers(reason="n/a (no --workers)")
    both = f"{config.server_cpu},{config.load_cpu}"
    if config.server_cpu == config.load_cpu:
        return report.Workers(reason="n/a (one core)")
    rates = {}
    failures = 0
    for count in (1, 2):
        session = Session(PROJECT, config, workdir, cpus=both, extra=("--workers", str(count)))
        try:
            with step(f"--workers {count}: Check c8 m16"):
                rates[count] = session.load(CHECK, CLIENTS, STREAMS, load_cpus=both).rate
            failures += int(session.figures["failures"])
        finally:
            session.server.stop()
    return report.Workers(one=rates[1], two=rates[2], failures=failures)


@dataclass
class Outcome:
    """Every round's figures, what went wrong, and the workers figure."""

    rounds: dict[str, list[report.Values]]
    problems: list[str]
    notes: list[str]
    workers: report.Workers
    http: report.Values


#: The servers of each round, in the order they run: ours, the stock one, and the sync prototype.
KINDS = (PROJECT, BASELINE, PROTOTYPE)


def run_rounds(config: Config, workdir: Path) -> Outcome:
    """Every round, alternating the servers; the workers figure once per round."""
    rounds: dict[str, list[report.Values]] = {kind.key: [] for kind in KINDS}
    problems: list[str] = []
    notes: list[str] = []
    workers: list[report.Workers] = []
    http_rounds: list[report.Values] = []
    for number in range(config.rounds):
        for kind in KINDS:
            print(f"round {number + 1}/{config.rounds}: {kind.label} …", file=sys.stderr, flush=True)
            session = Session(kind, config, workdir)
            try:
                figures = session.measure()
            finally:
                session.server.stop()
            starts = [figures["start_to_ok_ms"], *start_samples(kind, config, workdir)]
            figures["start_to_ok_ms"] = statistics.median(starts)
            stormed, stormy = storm(kind, config, workdir)
            figures.update(stormed)
            rounds[kind.key].append(figures)
            problems.extend(session.problems)
            notes.extend([*session.notes, *stormy])
        workers.append(measure_workers(config, workdir))
        print(f"round {number + 1}/{config.rounds}: the HTTP side …", file=sys.stderr, flush=True)
        figures, failed = http_side.measure(config, workdir)
        http_rounds.append(figures)
        problems.extend(failed)
    combined = workers[0] if not workers[0].available else report.Workers(
        one=statistics.median(w.one for w in workers), two=statistics.median(w.two for w in workers),
        failures=sum(w.failures for w in workers))
    http = {key: statistics.median(r[key] for r in http_rounds) for key in http_rounds[0] if key != "failures"}
    http["failures"] = sum(r["failures"] for r in http_rounds)
    return Outcome(rounds, problems, notes, combined, http)


def parse(argv: Sequence[str] | None) -> tuple[Config, Path]:
    """The configuration and the JSON path from the command line."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds per figure, one round (for CI)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, metavar="FILE",
                        help=f"where to write the results (default {DEFAULT_JSON})")
    parser.add_argument("--rounds", type=int, help="rounds of project then stock (default 2, quick 1)")
    parser.add_argument("--seconds", type=float, help="seconds per load figure (default 10, quick 1)")
    parser.add_argument("--watchers", type=int, help="Watch streams for the fan-out (default 10000, quick 1000)")
    parser.add_argument("--starts", type=int, help="extra start-up samples per server and round (default 4, quick 0)")
    parser.add_argument("--probe-rate", type=float, default=20.0, help="Check probes per second under load")
    args = parser.parse_args(argv)
    cpus = sorted(os.sched_getaffinity(0))
    config = Config(
        quick=args.quick,
        rounds=args.rounds or (1 if args.quick else 2),
        seconds=args.seconds or (1.0 if args.quick else 10.0),
        warm_up=0.3 if args.quick else 2.0,
        watchers=args.watchers or (1000 if args.quick else 10_000),
        starts=args.starts if args.starts is not None else (0 if args.quick else 4),
        probe_rate=args.probe_rate,
        server_cpu=str(cpus[0]),
        load_cpu=str(cpus[1] if len(cpus) > 1 else cpus[0]),
    )
    if min(config.rounds, config.watchers) < 1 or config.seconds <= 0 or config.probe_rate <= 0:
        parser.error("--rounds, --seconds, --watchers and --probe-rate must be positive")
    return config, args.json


def machine() -> dict[str, object]:
    """What the figures were measured on."""
    def output(*command: str) -> str:
        try:
            done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=30, check=False)
        except OSError:  # e.g. no git: the figures still stand
            return ""
        return done.stdout.strip()

    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "grpcio": grpc.__version__, "h2load": output(h2load.require(), "--version"),
            # Which server was measured: the commit, "-dirty" when the tree had changes.
            "project": output("git", "describe", "--always", "--dirty")}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; print the table and write the JSON; return the exit code."""
    config, json_path = parse(argv)
    try:
        h2load.require()
    except h2load.H2loadMissing as exc:
        print(f"python -m bench: {exc}", file=sys.stderr)
        return 2
    if config.server_cpu == config.load_cpu:
        print("python -m bench: one core only: server and load share it", file=sys.stderr)
    # This process is the Watch and probe client: it belongs with the load.
    os.sched_setaffinity(0, {int(config.load_cpu)})
    # Byte-compiled, as pip installs them: with PYTHONDONTWRITEBYTECODE set, a source tree would
    # otherwise be compiled again at every start of either server.
    for package in ("petsage_grpc", "bench"):
        compileall.compile_dir(ROOT / package, quiet=2)
    began = datetime.now(UTC)
    with tempfile.TemporaryDirectory(prefix="petsage-bench-") as workdir:
        outcome = run_rounds(config, Path(workdir))
    rounds, workers = outcome.rounds, outcome.workers
    project, baseline = report.combine(rounds[PROJECT.key]), report.combine(rounds[BASELINE.key])
    prototype = report.combine(rounds[PROTOTYPE.key])
    ratios = report.ratios(project, baseline)
    targets = report.verdicts(project, ratios)
    print(f"\n{began:%Y-%m-%d}, {os.cpu_count()} cores, server on core {config.server_cpu}, "
          f"load on core {config.load_cpu}, {config.rounds} round(s){', quick' if config.quick else ''}\n")
    print(report.table((PROJECT.label, BASELINE.label), project, baseline, ratios, targets, workers))
    print()
    print(report.design_table((PROJECT.label, PROTOTYPE.label), project, prototype))
    print()
    print(report.http_table(outcome.http))
    for note in outcome.notes:
        print(f"note: {note}")
    for problem in outcome.problems:
        print(f"failed call: {problem}")
    results = {
        "date": began.isoformat(timespec="seconds"),
        "config": asdict(config),
        "machine": machine(),
        "servers": {
            kind.key: {"label": kind.label, "figures": figures, "rounds": rounds[kind.key]}
            for kind, figures in ((PROJECT, project), (BASELINE, baseline), (PROTOTYPE, prototype))
        },
        "design_ratios": report.ratios(project, prototype),
        "ratios": ratios,
        "targets": targets,
        "workers": {**asdict(workers), "available": workers.available, "ratio": workers.ratio},
        "http": outcome.http,
        "notes": outcome.notes,
        "problems": outcome.problems,
    }
    json_path.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    print(f"\nJSON written to {json_path}")
    failed = (project.get("failures", 0) + baseline.get("failures", 0) + prototype.get("failures", 0)
              + workers.failures + outcome.http["failures"])
    if failed:
        print(f"python -m bench: {failed:g} call(s) failed: these figures are not valid", file=sys.stderr)
    return 1 if failed or outcome.problems else 0
