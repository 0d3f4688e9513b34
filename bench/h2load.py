"""Unary load from h2load, with proof that every answer was a gRPC success.

h2load speaks HTTP/2 and ignores trailers, where gRPC puts grpc-status, so a
server answering every call with UNIMPLEMENTED looks to it like a fast, healthy
server.  Each run is therefore checked three ways from h2load's own output:

* ``-v`` prints the first header block of every response.  A gRPC error before
  any message is a "trailers-only" response whose only header block carries
  grpc-status: any ``grpc-status`` line there is a failed call.
* An error can also follow a message: grpcio's sync ``HealthServicer`` answers
  an unknown service with an empty message *and* NOT_FOUND.  So the DATA bytes
  received must match the answers counted: exactly 5 + size bytes each for a
  constant answer (Check), within a few bytes for one with timestamps.
* h2load's own counts: every request done, HTTP 200, none failed or timed out.

A run in count mode (``-n``) finishes every request, so these counts are exact;
a run in duration mode (``-D``) stops with calls in flight, so the byte count
allows for them.  :mod:`bench.calls` adds the checks only a gRPC client can do.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from bench.calls import Method, grpc_frame

H2LOAD = "h2load"
HEADERS = ("content-type: application/grpc", "te: trailers")
FINISHED = re.compile(r"^finished in .*?, ([\d.]+) req/s", re.M)
REQUESTS = re.compile(r"^requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
                       r"(\d+) failed, (\d+) errored, (\d+) timeout", re.M)
_TRAFFIC = re.compile(r"^traffic: .*\((\d+)\) data", re.M)
_HEADER = re.compile(r"^\[stream_id=\d+\] (:?[^:]+): (.*)$")
#: Failure messages kept per run for the report; the count is always complete.
MAX_PROBLEMS = 5


class H2loadMissing(RuntimeError):
    """h2load is not installed."""


def require() -> str:
    """The path of h2load, or :class:`H2loadMissing` saying how to install it."""
    path = shutil.which(H2LOAD)
    if path is None:
        raise H2loadMissing("h2load not found: apt-get install -y nghttp2-client")
    return path


@dataclass(frozen=True)
class Expected:
    """What every good answer of a run looks like on the wire."""

    method: Method
    #: Smallest and largest serialized answer seen from real calls just before the run.
    smallest: int
    largest: int

    def frame_range(self) -> tuple[int, int]:
        """Bounds on the DATA bytes of one good answer (5-byte prefix included)."""
        slack = self.method.size_slack
        return 5 + max(0, self.smallest - slack), 5 + self.largest + slack


@dataclass
class Run:
    """One h2load run: its rate, and every way its answers fell short."""

    requests: int = 0
    rate: float = 0.0
    failures: int = 0
    problems: list[str] = field(default_factory=list)
    latencies_us: list[int] = field(default_factory=list)

    def fail(self, count: int, why: str) -> None:
        """Count ``count`` failed calls, keeping the first few reasons."""
        self.failures += count
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(why)


def body_file(workdir: Path, method: Method) -> Path:
    """The request body h2load posts: one gRPC frame holding the method's request."""
    path = workdir / f"{method.name}.body"
    path.write_bytes(grpc_frame(method.request))
    return path


def run(address: str, expected: Expected, workdir: Path, *, clients: int, streams: int, cpus: str,
        requests: int | None = None, duration: float | None = None, latency: bool = False) -> Run:
    """Run h2load once (``requests`` calls, or for ``duration`` seconds) and check every answer."""
    assert (requests is None) != (duration is None), "give requests or duration"
    method = expected.method
    output, log = workdir / "h2load.out", workdir / "h2load.log"
    command = ["taskset", "-c", cpus, require(), "-v", "-t", "1", "-c", str(clients), "-m", str(streams),
               "-d", str(body_file(workdir, method))]
    for header in HEADERS:
        command += ["-H", header]
    if latency:
        command += ["--log-file", str(log)]
    if duration is not None:
        command += ["-D", f"{max(1, round(duration * 1000))}ms"]
        limit = duration * 3 + 30
    else:
        command += ["-n", str(requests)]
        limit = 600.0
    command.append(f"http://{address}{method.path}")
    with output.open("wb") as sink:
        # A hard bound: the run is killed if the server stops answering.
        done = subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT, timeout=limit, check=False)
    result = Run()
    text = _check_headers(output, result)
    if done.returncode != 0:
        result.fail(1, f"h2load exited {done.returncode}")
    _check_counts(text, result, expected, exact=requests is not None, in_flight=clients * streams)
    if latency and log.exists():
        result.latencies_us = latencies(log)
    return result


def _check_headers(output: Path, result: Run) -> str:
    """Count header blocks and trailers-only errors; return the summary lines."""
    summary: list[str] = []
    answers = 0
    with output.open(encoding="utf-8", errors="replace") as lines:
        for line in lines:
            match = _HEADER.match(line)
            if match is None:
                summary.append(line)
                continue
            name, value = match[1], match[2].strip()
            if name == ":status":
                answers += 1
                if value != "200":
                    result.fail(1, f"HTTP status {value}")
            elif name == "grpc-status":
                # Even "0" here means an answer with no message: no unary success looks like that.
                result.fail(1, f"grpc-status {value} with no message")
            elif name == "grpc-message" and len(result.problems) < MAX_PROBLEMS:
                result.problems.append(f"grpc-message: {value}")
    result.requests = answers
    return "".join(summary)


def _check_counts(text: str, result: Run, expected: Expected, *, exact: bool, in_flight: int) -> None:
    """Hold h2load's own counts and the DATA bytes against the answers seen."""
    counts, traffic, finished = REQUESTS.search(text), _TRAFFIC.search(text), FINISHED.search(text)
    if counts is None or traffic is None or finished is None:
        result.fail(1, "h2load printed no summary")
        return
    total, _, done, succeeded, failed, errored, timeout = (int(n) for n in counts.groups())
    result.rate = float(finished[1])
    if failed or errored or timeout:
        result.fail(failed + errored + timeout, f"h2load: {failed} failed, {errored} errored, {timeout} timeout")
    answers = result.requests
    if exact and not total == done == succeeded == answers:
        result.fail(abs(total - min(done, succeeded, answers)) or 1,
                    f"{total} requests, {done} done, {succeeded} succeeded, {answers} answers seen")
    low, high = expected.frame_range()
    data = int(traffic[1])
    # Calls cut off at the end of a timed run may have sent headers and no message yet.
    floor = answers * low if exact else max(0, answers - in_flight) * low
    if not floor <= data <= answers * high:
        each = data / answers if answers else 0.0
        result.fail(max(1, answers - data // high if high else answers),
                    f"{data} message bytes for {answers} answers ({each:.1f} each, good answers are "
                    f"{low}..{high}): some carried an error after or instead of the message")
    if not exact:
        result.requests = done


def latencies(log: Path) -> list[int]:
    """Microseconds of every answered request in an h2load ``--log-file``."""
    values = []
    for line in log.read_text().splitlines():
        columns = line.split("\t")
        if len(columns) >= 3 and columns[1] == "200":
            values.append(int(columns[2]))
    return values


def percentile(values: list[int] | list[float], fraction: float) -> float:
    """The nearest-rank percentile of ``values`` (0 when empty)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    # round() first: 0.99 * 100 is 99.00000000000001 in floating point.
    rank = math.ceil(round(fraction * len(ordered), 9))
    return float(ordered[min(max(rank, 1), len(ordered)) - 1])
