"""The ``petsage.smoke.v1.SmokeTestService`` servicer: the smoke test of :mod:`petsage_grpc.health.smoke` as protobuf.

With ``details="status"`` an answer carries status, message and timestamp
only: no check details (which name sinks, files and errors) and no server
information, for callers who are not trusted.  The HTTP smoke test answers
the same report as JSON (:mod:`petsage_grpc.server.http.routes`).
"""

from __future__ import annotations

import os
import secrets
import socket
from dataclasses import dataclass
from datetime import datetime

import grpc

from petsage_grpc import __version__
from petsage_grpc._proto.smoke.v1 import smoke_pb2 as _smoke_pb2
from petsage_grpc._proto.smoke.v1 import smoke_pb2_grpc as _smoke_pb2_grpc
from petsage_grpc.health.checks import CheckOutcome
from petsage_grpc.health.smoke import SmokeTest, Verdict

SERVICE_NAME = _smoke_pb2.DESCRIPTOR.services_by_name["SmokeTestService"].full_name
_STATUSES = {Verdict.OK: _smoke_pb2.STATUS_OK, Verdict.DEGRADED: _smoke_pb2.STATUS_DEGRADED,
             Verdict.FAILING: _smoke_pb2.STATUS_FAILING}


def new_instance_id() -> str:
    """A name unique to this process: host, pid and a random suffix."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


@dataclass(frozen=True)
class Identity:
    """Which server process answers: its version, instance id and start time (aware, UTC)."""

    instance_id: str
    start_time: datetime
    version: str = __version__


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
    """Answers SmokeTest with a fresh :class:`~petsage_grpc.health.smoke.SmokeTest` report."""

    def __init__(self, smoke: SmokeTest, identity: Identity, *, details: str = "full") -> None:
        self._smoke = smoke
        self._full = details == "full"
        self._server = _smoke_pb2.ServerInfo(version=identity.version, instance_id=identity.instance_id)
        self._server.start_time.FromDatetime(identity.start_time)

    async def SmokeTest(
        self, request: _smoke_pb2.SmokeTestRequest, context: grpc.aio.ServicerContext
    ) -> _smoke_pb2.SmokeTestResponse:
        """Run the smoke test and report every check's outcome."""
        report = await self._smoke.run()
        response = _smoke_pb2.SmokeTestResponse(status=_STATUSES[report.verdict], message=report.message)
        if self._full:
            response.checks.extend(_check_result(o) for o in report.outcomes)
            response.server.CopyFrom(self._server)
        response.timestamp.FromNanoseconds(report.ran_at_ns)
        return response


def add_to_server(servicer: SmokeTestServicer, server: object) -> None:
    """Register ``servicer`` with ``server`` (anything the generated helper accepts)."""
    _smoke_pb2_grpc.add_SmokeTestServiceServicer_to_server(servicer, server)
