"""The published health statuses: their names, their values, and how they follow the checks.

| name | SERVING when |
| --- | --- |
| ``""`` (overall), ``readiness`` | every critical check passes |
| ``liveness`` | the event loop runs (the watchdog sets it, never the checks) |
| a served service | the checks it follows pass, or, following none, readiness |

From the first signal on, everything but liveness is NOT_SERVING
(:meth:`~petsage_grpc.health.servicer.HealthServicer.drain`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TypeAlias

from grpc_health.v1 import health_pb2 as _health_pb2

from petsage_grpc.health.checks import CheckOutcome

#: A ``grpc.health.v1.HealthCheckResponse.ServingStatus`` number, as the wire carries it.
StatusValue: TypeAlias = int
SERVING: StatusValue = _health_pb2.HealthCheckResponse.SERVING
NOT_SERVING: StatusValue = _health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN: StatusValue = _health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
OVERALL = ""
LIVENESS = "liveness"
READINESS = "readiness"
#: The names whose statuses the health model derives itself: nobody sets them by hand.
BUILT_IN = (OVERALL, READINESS, LIVENESS)


def status_name(status: StatusValue) -> str:
    """``SERVING``, ``NOT_SERVING``, ...: the name of a status value."""
    return str(_health_pb2.HealthCheckResponse.ServingStatus.Name(status))


def status_from(outcomes: Iterable[CheckOutcome], passing: str) -> tuple[StatusValue, str]:
    """SERVING with reason ``passing`` if none of ``outcomes`` fails; else NOT_SERVING and why."""
    failing = [o for o in outcomes if not o.ok]
    if failing:
        return NOT_SERVING, "; ".join(f"check {o.name} failing: {o.detail}" for o in failing)
    return SERVING, passing


def derive(
    results: Mapping[str, CheckOutcome], follows: Mapping[str, tuple[str, ...] | None]
) -> dict[str, tuple[StatusValue, str]]:
    """Each status (with its reason) the check outcomes decide: overall, readiness and every service.

    ``follows`` maps a service to the checks its status follows, or to None
    for a service that follows readiness.
    """
    ready = status_from((r for r in results.values() if r.critical), "all critical checks pass")
    derived = {OVERALL: ready, READINESS: ready}
    for service, names in follows.items():
        if names is None:
            derived[service] = ready
        else:
            derived[service] = status_from((results[n] for n in names if n in results), f"passing: {', '.join(names)}")
    return derived
