"""The ``logging`` check: a tagged record that every sink must confirm, within a deadline.

It is the reason this service exists: readiness and SmokeTest fail when a
sink stops taking records (a full disk, a closed stdout, a stuck writer),
with the sink's error as the check's detail.
"""

from __future__ import annotations

import logging

from petsage_grpc.health.checks import Check, CheckFailed
from petsage_grpc.logs.pipeline import LogPipeline

_LOGGER = logging.getLogger(__package__)
#: The check's name, in SmokeTest answers and health reasons.
LOGGING_CHECK = "logging"


def logging_check(pipeline: LogPipeline, timeout: float, interval: float) -> Check:
    """The critical ``logging`` check: a probe record confirmed by every sink of ``pipeline``."""
    reported = 0  # pipeline.dropped when last reported

    async def confirm_delivery() -> str:
        nonlocal reported
        delivery = await pipeline.confirm(timeout)
        lost, reported = pipeline.dropped - reported, pipeline.dropped
        if lost:
            _LOGGER.warning("%d log record(s) lost since the last logging check "
                            "(queue full, access records shed under load, or a sink write failed)", lost)
        suffix = f"; {lost} record(s) lost since the last check" if lost else ""
        if not delivery.ok:
            raise CheckFailed("; ".join(f"{sink}: {error}" for sink, error in delivery.errors.items()) + suffix)
        return f"record {delivery.probe_id} delivered to {', '.join(delivery.sinks)}{suffix}"

    # The outer timeout only backs up confirm()'s own, which explains itself.
    return Check(LOGGING_CHECK, confirm_delivery, interval=interval, timeout=timeout + 1.0)
