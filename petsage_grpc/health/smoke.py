"""The smoke test: a fresh logging probe, every other check's latest outcome, and one verdict.

OK when every check passes; DEGRADED when only non-critical checks fail;
FAILING when a critical check fails, or from the first signal on (the
``shutdown`` entry), so that the smoke test agrees with readiness on every
side: the RPC, ``petsage-grpc smoke`` and the HTTP smoke test.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from petsage_grpc.health.checks import CheckOutcome
from petsage_grpc.health.runner import CheckRunner

OK_MESSAGE = "PetSage services are running and logging is active."
DEGRADED_MESSAGE = "PetSage services are running; some non-critical checks are failing."
FAILING_MESSAGE = "PetSage services are failing: {names}."
#: The entry that fails from the first signal on, in the smoke test and in ``/readyz``.
SHUTDOWN_CHECK = "shutdown"
SHUTTING_DOWN = "the server is shutting down"


class Verdict(enum.Enum):
    """A smoke test's overall result (its value is the REST contract's ``status``)."""

    OK = "ok"
    DEGRADED = "degraded"
    FAILING = "failing"


@dataclass(frozen=True)
class SmokeReport:
    """One smoke test: its verdict, the sentence for people, when it ran, and every check's outcome."""

    verdict: Verdict
    message: str
    ran_at_ns: int  # time.time_ns() when it began
    outcomes: tuple[CheckOutcome, ...]


def summarize(outcomes: Iterable[CheckOutcome]) -> tuple[Verdict, str]:
    """The verdict and message for a set of check outcomes."""
    outcomes = list(outcomes)
    critical = [o.name for o in outcomes if o.critical and not o.ok]
    if critical:
        return Verdict.FAILING, FAILING_MESSAGE.format(names=", ".join(critical))
    if any(not o.ok for o in outcomes):
        return Verdict.DEGRADED, DEGRADED_MESSAGE
    return Verdict.OK, OK_MESSAGE


def shutdown_outcome() -> CheckOutcome:
    """The failing ``shutdown`` entry, once a signal has arrived."""
    return CheckOutcome(SHUTDOWN_CHECK, False, SHUTTING_DOWN, 0.0, True)


class SmokeTest:
    """Runs the smoke test: ``probe`` (the logging check) afresh, the rest from the runner's cache.

    ``shutting_down`` says whether a signal has arrived.
    """

    def __init__(self, runner: CheckRunner, probe: str, shutting_down: Callable[[], bool]) -> None:
        self._runner = runner
        self._probe = probe
        self._shutting_down = shutting_down

    async def run(self) -> SmokeReport:
        """Run the probe now and report on every check."""
        ran_at = time.time_ns()
        fresh = await self._runner.run(self._probe)
        # Our own probe's outcome, not one a concurrent call may have cached since.
        outcomes = [fresh if o.name == fresh.name else o for o in self._runner.results.values()]
        if self._shutting_down():
            outcomes.append(shutdown_outcome())
        verdict, message = summarize(outcomes)
        return SmokeReport(verdict, message, ran_at, tuple(outcomes))
