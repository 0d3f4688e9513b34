"""The verdict of a fleet run: the counts, the exit code, and the lines that say what went wrong.

Exit codes (:class:`~petsage_grpc.codes.ExitCode`).  When several apply, the
first of this list wins, so the code names the earliest stage that failed
(finding the instances, reaching them, calling them, their answers):

====  ========================================================================
1     bad arguments (nothing was looked up or called; :mod:`.main` says so), or a target that gave
      more instances than ``--max-instances`` (none is called)
2     a DNS server did not answer for a target: how many instances exist is unknown
5     a target resolved to nothing, or fewer instances answered than ``--min-instances``
2     an instance was not reached, ``--retries`` included
3     a call failed on an instance that was reached: an error status, or the deadline
4     an instance answered, but a status was not SERVING or SmokeTest was not OK
0     every instance passed
====  ========================================================================
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from petsage_grpc.cli.fleet.results import NOT_SERVING, RPC_FAILED, SERVING, UNREACHABLE, InstanceResult
from petsage_grpc.cli.fleet.targets import DNS_FAILED, NO_INSTANCES, TOO_MANY, Resolution
from petsage_grpc.codes import ExitCode


@dataclass(frozen=True)
class Summary:
    """How many instances ended which way, the versions they answered with, and the exit code."""

    instances: int
    serving: int
    not_serving: int
    rpc_failed: int
    unreachable: int
    min_instances: int
    versions: dict[str, int]
    exit_code: ExitCode

    @property
    def reached(self) -> int:
        """Instances that answered: connected, whatever they said."""
        return self.serving + self.not_serving + self.rpc_failed

    def line(self) -> str:
        """The summary line: ``4 instances: 2 SERVING, 1 NOT_SERVING, 0 RPC failed, 1 unreachable``."""
        noun = "instance" if self.instances == 1 else "instances"
        return (f"{self.instances} {noun}: {self.serving} SERVING, {self.not_serving} NOT_SERVING, "
                f"{self.rpc_failed} RPC failed, {self.unreachable} unreachable")

    def as_dict(self, elapsed_seconds: float) -> dict[str, object]:
        """The ``summary`` object of the JSON document."""
        return {"instances": self.instances, "serving": self.serving, "not_serving": self.not_serving,
                "rpc_failed": self.rpc_failed, "unreachable": self.unreachable, "reached": self.reached,
                "min_instances": self.min_instances, "versions": self.versions, "exit_code": int(self.exit_code),
                "elapsed_seconds": elapsed_seconds}


def exit_code(resolutions: Sequence[Resolution], outcomes: Sequence[str], min_instances: int) -> ExitCode:
    """The exit code, by the precedence of the module's table."""
    reached = sum(outcome != UNREACHABLE for outcome in outcomes)
    problems = {resolution.problem for resolution in resolutions}
    if TOO_MANY in problems:
        return ExitCode.USAGE
    if DNS_FAILED in problems:
        return ExitCode.CONNECTION
    if NO_INSTANCES in problems or reached < min_instances:
        return ExitCode.NO_INSTANCES
    for outcome, code in ((UNREACHABLE, ExitCode.CONNECTION), (RPC_FAILED, ExitCode.RPC_FAILED),
                          (NOT_SERVING, ExitCode.UNHEALTHY)):
        if outcome in outcomes:
            return code
    return ExitCode.OK


def summarize(resolutions: Sequence[Resolution], results: Sequence[InstanceResult], min_instances: int) -> Summary:
    """Count the outcomes and the versions, and pick the exit code."""
    outcomes = [result.outcome for result in results]
    counts = Counter(outcomes)
    versions = Counter(result.smoke.version for result in results if result.smoke and result.smoke.version)
    return Summary(len(results), counts[SERVING], counts[NOT_SERVING], counts[RPC_FAILED], counts[UNREACHABLE],
                   min_instances, dict(sorted(versions.items())), exit_code(resolutions, outcomes, min_instances))


def describe(result: InstanceResult) -> str:
    """Why an instance did not pass, in one line."""
    if result.outcome == UNREACHABLE:
        if result.attempts == 0:
            return f"unreachable: {result.error}"
        return f"unreachable after {result.attempts} attempt(s): {result.error}"
    parts = [] if result.error is None else [result.error]
    for reply in result.health:
        if reply.status != "SERVING":
            parts.append(f'health "{reply.service}": {reply.error or reply.status}')
    smoke = result.smoke
    if smoke is not None and smoke.status != "STATUS_OK":
        parts.append(f"SmokeTest: {smoke.error}" if smoke.failed else f"SmokeTest {smoke.status}: {smoke.message}")
    return "; ".join(parts)


def problems(resolutions: Sequence[Resolution], results: Sequence[InstanceResult], summary: Summary) -> list[str]:
    """The stderr lines of a run: each target's problem, a shortfall, each failing instance, a version mix."""
    lines = [resolution.error for resolution in resolutions if resolution.error]
    if results and summary.reached < summary.min_instances:
        lines.append(f"{summary.reached} of {summary.instances} instance(s) answered, fewer than "
                     f"--min-instances {summary.min_instances}")
    lines += [f"{result.instance.address}: {describe(result)}" for result in results if result.outcome != SERVING]
    if len(summary.versions) > 1:
        mix = ", ".join(f"{version} on {count}" for version, count in summary.versions.items())
        lines.append(f"warning: instances answer with different versions ({mix}): a rollout may still be in progress")
    return lines
