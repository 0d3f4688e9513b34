"""How the published statuses follow the check outcomes (health/statuses.py)."""

from __future__ import annotations

from petsage_grpc.health.checks import CheckOutcome
from petsage_grpc.health.statuses import NOT_SERVING, OVERALL, READINESS, SERVING, derive


def outcome(name: str, ok: bool, critical: bool = True) -> CheckOutcome:
    return CheckOutcome(name, ok, "fine" if ok else f"{name} is down", 0.001, critical)


def test_overall_and_readiness_follow_the_critical_checks_only() -> None:
    results = {o.name: o for o in (outcome("logging", True), outcome("cache", False, critical=False))}

    assert derive(results, {}) == {OVERALL: (SERVING, "all critical checks pass"),
                                   READINESS: (SERVING, "all critical checks pass")}


def test_a_failing_critical_check_turns_readiness_not_serving_with_its_detail() -> None:
    results = {o.name: o for o in (outcome("logging", False), outcome("database", False))}

    reason = "check logging failing: logging is down; check database failing: database is down"
    assert derive(results, {})[READINESS] == (NOT_SERVING, reason)


def test_a_service_follows_its_own_checks_or_else_readiness() -> None:
    results = {o.name: o for o in (outcome("logging", True), outcome("database", False, critical=False))}

    derived = derive(results, {"orders": ("database",), "smoke": ("logging",), "billing": None})

    assert derived["orders"] == (NOT_SERVING, "check database failing: database is down")
    assert derived["smoke"] == (SERVING, "passing: logging")
    assert derived["billing"] == derived[READINESS] == (SERVING, "all critical checks pass")
