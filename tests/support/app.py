"""The embedding test service (tests/programs/embedded_app.py), steered by a test through files."""

from __future__ import annotations

from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from petsage_grpc._proto.smoke.v1 import smoke_pb2
from tests.support.processes import ServerProcess

#: How to start it: ``python -m MODULE --control DIR [serve flags]``.
APP_MODULE = "tests.programs.embedded_app"


class App:
    """The embedding test service and its control folder, whose files steer its checks."""

    def __init__(self, server: ServerProcess, control: Path) -> None:
        self.server = server
        self.control = control

    def steer(self, check: str, command: str) -> None:
        """Tell a steered check what to do on its next runs."""
        path = self.control / check
        path.with_suffix(".tmp").write_text(command)
        path.with_suffix(".tmp").replace(path)  # atomic: a run never reads half a command

    def watch(self, service: str, timeout: float = 30) -> grpc.Future:
        """A Watch stream on ``service``."""
        stub = health_pb2_grpc.HealthStub(self.server.channel())
        return stub.Watch(health_pb2.HealthCheckRequest(service=service), timeout=timeout)

    def check_result(self, name: str) -> smoke_pb2.CheckResult:
        """The SmokeTest result of check ``name``."""
        return next(c for c in self.server.smoke().checks if c.name == name)
