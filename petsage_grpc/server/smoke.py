"""The ``petsage.smoke.v1.SmokeTestService`` servicer.

``SmokeTest`` runs a fresh logging probe (which also refreshes the cached
``logging`` outcome, and with it the health statuses), adds the latest
outcome of every other check, and answers OK, DEGRADED (only non-critical
checks failing) or FAILING (a critical check failing).
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from collections.abc import Iterable
from datetime import datetime

import grpc

from petsage_grpc import __version__
from petsage_grpc._proto.smoke.v1 import smoke_pb2 as _smoke_pb2
from petsage_grpc._proto.smoke.v1 import smoke_pb2_grpc as _smoke_pb2_grpc
from petsage_grpc.health.checks import CheckOutcome
from petsage_grpc.health.runner import CheckRunner
from petsage_grpc.logs.check import LOGGING_CHECK

SERVICE_NAME = _smoke_pb2.DESCRIPTOR.services_by_name["SmokeTestService"].full_name
OK_MESSAGE = "PetSage services are running and logging is active."
DEGRADED_MESSAGE = "PetSage services are running; some non-critical checks are failing."
FAILING_MESSAGE = "PetSage services are failing: {names}."


def new_instance_id() -> str:
    """A name unique to this process: host, pid and a random suffix."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


def summarize(outcomes: Iterable[CheckOutcome]) -> tuple[_smoke_pb2.Status.ValueType, str]:
    """The overall status and message for a set of check outcomes."""
    outcomes = list(outcomes)
    critical = [o.name for o in outcomes if o.critical and not o.ok]
    if critical:
        return _smoke_pb2.STATUS_FAILING, FAILING_MESSAGE.format(names=", ".join(critical))
    if any(not o.ok for o in outcomes):
        return _smoke_pb2.STATUS_DEGRADED, DEGRADED_MESSAGE
    return _smoke_pb2.STATUS_OK, OK_MESSAGE


def _check_result(outcome: CheckOutcome) -> _smoke_pb2.CheckResult:
    result = _smoke_pb2.CheckResult(
        name=outcome.name,
        status=_smoke_pb2.STATUS_OK if outcome.ok else _smoke_pb2.STATUS_FAILING,
        detail=outcome.detail,
        critical=outcome.critical,
    )
    result.duration.FromNanoseconds(int(outcome.duration * 1e9))
    return result


class SmokeTestServicer(_smoke_pb2_grpc.SmokeTestServiceServicer):
    """Answers SmokeTest from a fresh logging probe and the cached check outcomes.

    With ``details="status"`` the answer carries status, message and
    timestamp only: no check details (which name sinks, files and errors) and
    no server information, for callers who are not trusted.
    """

    def __init__(self, runner: CheckRunner, instance_id: str, start_time: datetime, *,
                 details: str = "full") -> None:
        self._runner = runner
        self._full = details == "full"
        self._server = _smoke_pb2.ServerInfo(version=__version__, instance_id=instance_id)
        self._server.start_time.FromDatetime(start_time)

    async def SmokeTest(
        self, request: _smoke_pb2.SmokeTestRequest, context: grpc.aio.ServicerContext
    ) -> _smoke_pb2.SmokeTestResponse:
        """Run the smoke test and report every check's outcome."""
        ran_at = time.time_ns()
        fresh = await self._runner.run(LOGGING_CHECK)
        # Our own probe's outcome, not one a concurrent call may have cached since.
        outcomes = [fresh if o.name == fresh.name else o for o in self._runner.results.values()]
        status, message = summarize(outcomes)
        response = _smoke_pb2.SmokeTestResponse(status=status, message=message)
        if self._full:
            response.checks.extend(_check_result(o) for o in outcomes)
            response.server.CopyFrom(self._server)
        response.timestamp.FromNanoseconds(ran_at)
        return response


def add_to_server(servicer: SmokeTestServicer, server: object) -> None:
    """Register ``servicer`` with ``server`` (anything the generated helper accepts)."""
    _smoke_pb2_grpc.add_SmokeTestServiceServicer_to_server(servicer, server)
