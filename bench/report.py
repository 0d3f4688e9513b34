"""The figures, their targets, and the one table the benchmark prints.

Each :class:`Figure` says how to combine its rounds and what target, if any,
the project's value or its ratio to the stock server must meet.  Ratios are
always project / baseline; whether lower or higher is better is in the target.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

#: A figure's value in one round of one server.
Values = dict[str, float]


@dataclass(frozen=True)
class Target:
    """A target from the issue: on the ratio to the stock server, or on the project's own value."""

    text: str
    test: Callable[[float, float | None, Values], bool]


def _ratio_at_least(limit: float) -> Target:
    return Target(f"≥ {limit:g}×", lambda value, ratio, figures: ratio is not None and ratio >= limit)


def _ratio_at_most(limit: float) -> Target:
    return Target(f"≤ {limit:g}×", lambda value, ratio, figures: ratio is not None and ratio <= limit)


def _at_most(limit: float, unit: str) -> Target:
    return Target(f"≤ {limit:g} {unit}", lambda value, ratio, figures: value <= limit)


ALL_DELIVERED = Target("all", lambda value, ratio, figures: value == figures.get("watch_asked", -1) > 0)
NONE = Target("0", lambda value, ratio, figures: value == 0)


@dataclass(frozen=True)
class Figure:
    """One row of the table."""

    key: str
    label: str
    digits: int = 0
    #: How the rounds combine: the median, the smallest count, or the sum of failures.
    combine: Callable[[Sequence[float]], float] = statistics.median
    target: Target | None = None
    #: Whether a project/baseline ratio means anything for this row.
    ratio: bool = True


FIGURES: tuple[Figure, ...] = (
    Figure("check_rps", "Check req/s (c8 m16, one core)", 0, target=_ratio_at_least(1.3)),
    Figure("smoke_rps", "SmokeTest req/s (c8 m16)", 0, target=_ratio_at_least(1.0)),
    Figure("check_c1_p50_ms", "Check c1 p50 (ms)", 3),
    Figure("check_c1_p99_ms", "Check c1 p99 (ms)", 3, target=_ratio_at_most(1.0)),
    Figure("smoke_c1_p50_ms", "SmokeTest c1 p50 (ms)", 3),
    Figure("smoke_c1_p99_ms", "SmokeTest c1 p99 (ms)", 3),
    Figure("start_to_ok_ms", "start → first OK readiness (ms)", 1, target=_ratio_at_most(1.2)),
    Figure("idle_rss_mib", "idle RSS (MiB)", 1, target=_ratio_at_most(1.1)),
    Figure("loaded_rss_mib", "RSS after load (MiB)", 1),
    Figure("watch_asked", "Watch streams asked for (N)", 0, combine=min, ratio=False),
    Figure("watch_streams", "Watch streams open", 0, combine=min, ratio=False),
    Figure("watch_delivered", "Watch streams given the change", 0, combine=min, target=ALL_DELIVERED, ratio=False),
    Figure("watch_p50_ms", "Watch signal → change p50 (ms)", 1),
    Figure("watch_p99_ms", "Watch signal → change p99 (ms)", 1, target=_at_most(250, "ms")),
    Figure("watch_max_ms", "Watch signal → change max (ms)", 1),
    Figure("watch_rss_growth_mib", "Watch RSS growth, N streams (MiB)", 1, target=_at_most(60, "MiB")),
    Figure("watch_rss_per_stream_kib", "Watch RSS per stream (KiB)", 1),
    Figure("watch_open_s", "Watch time to open N streams (s)", 2),
    Figure("watch_client_busy_pct", "Watch client CPU busy during delivery (%)", 0),
    Figure("watch_early_drops", "Watch streams told NOT_SERVING before the signal", 0, combine=math.fsum,
           ratio=False),
    Figure("probe_p99_ms", "Check p99 under SmokeTest load, 20/s (ms)", 1, target=_at_most(20, "ms")),
    Figure("probe_failures", "Check failures under SmokeTest load", 0, combine=math.fsum, target=NONE, ratio=False),
    Figure("probe_load_rps", "SmokeTest req/s during those probes", 0),
    Figure("storm_streams", "cancel storm: Watch streams cancelled during the change", 0, combine=min, ratio=False),
    Figure("storm_probe_p99_ms", "cancel storm: Check probe p99, a failed probe as 1 s (ms)", 1,
           target=_at_most(100, "ms")),
    Figure("storm_probe_failures", "cancel storm: Check probes failed", 0, combine=math.fsum, target=NONE,
           ratio=False),
    Figure("failures", "failed calls in all load runs", 0, combine=math.fsum, target=NONE, ratio=False),
)

#: The design question's rows: our asyncio server beside the sync prototype (bench/prototype.py).
DESIGN_ROWS = ("check_rps", "smoke_rps", "check_c1_p99_ms", "watch_p99_ms", "watch_rss_per_stream_kib",
               "watch_open_s", "storm_probe_p99_ms", "storm_probe_failures", "probe_p99_ms", "probe_load_rps",
               "idle_rss_mib", "failures")


def combine(rounds: Sequence[Values]) -> Values:
    """One value per figure from every round that measured it."""
    combined: Values = {}
    for figure in FIGURES:
        values = [r[figure.key] for r in rounds if figure.key in r]
        if values:
            combined[figure.key] = float(figure.combine(values))
    return combined


def ratios(project: Values, baseline: Values) -> dict[str, float | None]:
    """Project / baseline for every figure where that means something."""
    result: dict[str, float | None] = {}
    for figure in FIGURES:
        a, b = project.get(figure.key), baseline.get(figure.key)
        result[figure.key] = a / b if figure.ratio and a is not None and b else None
    return result


def verdicts(project: Values, ratio: dict[str, float | None]) -> dict[str, dict[str, object]]:
    """Each target's text and whether this run meets it."""
    result: dict[str, dict[str, object]] = {}
    for figure in FIGURES:
        if figure.target is not None and figure.key in project:
            met = figure.target.test(project[figure.key], ratio.get(figure.key), project)
            result[figure.key] = {"target": figure.target.text, "met": met}
    return result


@dataclass
class Workers:
    """``serve --workers 2`` against ``--workers 1``, Check req/s with every core for the server."""

    reason: str = ""  # why it was not measured; empty when it was
    one: float = 0.0
    two: float = 0.0
    failures: int = 0

    @property
    def available(self) -> bool:
        """Whether the figure was measured."""
        return not self.reason

    @property
    def ratio(self) -> float:
        """Two workers' rate over one worker's (0 when not measured)."""
        return self.two / self.one if self.one else 0.0


#: The HTTP side's rows: label, the HTTP (or "with") figure, the gRPC (or "without") one, and digits.
HTTP_ROWS = (
    ("`/readyz` against `Health/Check` req/s (c8 m16)", "http_check_rps", "grpc_check_rps", 0),
    ("REST smoke test against `SmokeTest` req/s (c8 m16)", "http_smoke_rps", "grpc_smoke_rps", 0),
    ("`/readyz` against `Health/Check` c1 p99 (ms)", "http_check_c1_p99_ms", "grpc_check_c1_p99_ms", 3),
    ("REST smoke test against `SmokeTest` c1 p99 (ms)", "http_smoke_c1_p99_ms", "grpc_smoke_c1_p99_ms", 3),
    ("start → first OK, with `--http-address` against without (ms)", "start_with_http_ms",
     "start_without_http_ms", 1),
    ("idle RSS, with `--http-address` against without (MiB)", "idle_rss_with_http_mib",
     "idle_rss_without_http_mib", 1),
)


def http_table(figures: Values) -> str:
    """The HTTP side's table: each HTTP figure beside its gRPC twin (or with the listener beside without)."""
    lines = ["| HTTP side (one petsage-grpc server) | HTTP / with | gRPC / without | ratio |",
             "| --- | ---: | ---: | ---: |"]
    for label, first, second, digits in HTTP_ROWS:
        a, b = figures.get(first), figures.get(second)
        ratio = "–" if a is None or not b else f"{a / b:.2f}×"
        lines.append(f"| {label} | {_number(a, digits)} | {_number(b, digits)} | {ratio} |")
    return "\n".join(lines)


def design_table(labels: tuple[str, str], project: Values, prototype: Values) -> str:
    """Our server (grpc.aio) beside the sync prototype: the figures the server design turns on."""
    by_key = {figure.key: figure for figure in FIGURES}
    lines = [f"| server design | {labels[0]} (grpc.aio) | {labels[1]} (sync + callbacks) | ratio |",
             "| --- | ---: | ---: | ---: |"]
    for key in DESIGN_ROWS:
        figure = by_key[key]
        a, b = project.get(key), prototype.get(key)
        ratio = "–" if a is None or not b or not figure.ratio else f"{a / b:.2f}×"
        lines.append(f"| {figure.label} | {_number(a, figure.digits)} | {_number(b, figure.digits)} | {ratio} |")
    return "\n".join(lines)


def _number(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def table(labels: tuple[str, str], project: Values, baseline: Values, ratio: dict[str, float | None],
          targets: dict[str, dict[str, object]], workers: Workers) -> str:
    """The Markdown table: figures side by side, the ratio, the target and whether it is met."""
    lines = [f"| figure | {labels[0]} | {labels[1]} | ratio | target | met |",
             "| --- | ---: | ---: | ---: | --- | --- |"]
    for figure in FIGURES:
        target = targets.get(figure.key)
        ratio_text = "–" if ratio.get(figure.key) is None else f"{ratio[figure.key]:.2f}×"
        lines.append(
            f"| {figure.label} | {_number(project.get(figure.key), figure.digits)} | "
            f"{_number(baseline.get(figure.key), figure.digits)} | {ratio_text} | "
            f"{target['target'] if target else ''} | {('yes' if target['met'] else 'no') if target else ''} |"
        )
    lines.extend(workers_rows(workers, project.get("check_rps")))
    return "\n".join(lines)


def workers_rows(workers: Workers, one_core: float | None) -> list[str]:
    """The ``serve --workers 2`` rows: against one worker with every core, and with one core.

    One worker given both cores already uses the second for grpc's poller
    thread, so the second row (the one-core Check figure above) shows what
    the second process adds.
    """
    label = "`serve --workers 2` Check req/s (both cores)"
    if not workers.available:
        return [f"| {label} | {workers.reason} | – | – | ≥ 1.7× one worker | |"]
    rows = [f"| {label} | {workers.two:,.0f} | 1 worker: {workers.one:,.0f} | {workers.ratio:.2f}× | "
            f"≥ 1.7× one worker | {'yes' if workers.ratio >= 1.7 else 'no'} |"]
    if one_core:
        rows.append(f"| `serve --workers 2` against 1 worker on one core | {workers.two:,.0f} | "
                    f"1 worker, 1 core: {one_core:,.0f} | {workers.two / one_core:.2f}× |  |  |")
    return rows
