"""What a fleet run found on each instance: every call's reply, and the instance's outcome.

Plain data, filled in by :mod:`.checks` and read by :mod:`.summary` and
:mod:`.report`.  The outcome is one of four words, the JSON document's and
the summary line's: SERVING (every status SERVING, SmokeTest OK),
NOT_SERVING (it answered, but not all of that), RPC_FAILED (a call failed),
UNREACHABLE (no connection).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from petsage_grpc.cli.fleet.targets import Instance

#: An instance's outcome, from best to worst (exit codes 0, 4, 3 and 2).
SERVING, NOT_SERVING, RPC_FAILED, UNREACHABLE = "serving", "not_serving", "rpc_failed", "unreachable"


@dataclass
class Reply:
    """One call's outcome: the answer's status, or the failure (Go's code name and a line); its duration."""

    status: str | None = None
    code: str | None = None
    error: str | None = None
    rpc_seconds: float | None = None

    @property
    def failed(self) -> bool:
        """Whether the call failed (no answer, or an error status)."""
        return self.code is not None


@dataclass
class HealthReply(Reply):
    """A ``Health/Check`` answer, or one service of ``Health/List``."""

    service: str = ""

    def as_dict(self) -> dict[str, object]:
        """The entry in the JSON document."""
        return {"service": self.service, "status": self.status, "code": self.code, "error": self.error,
                "rpc_seconds": self.rpc_seconds}


@dataclass
class SmokeReply(Reply):
    """A ``SmokeTest`` answer: status, message, which server answered, and the checks that did not pass."""

    message: str | None = None
    instance_id: str | None = None
    version: str | None = None
    failing_checks: list[dict[str, object]] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        """The entry in the JSON document."""
        return {"status": self.status, "message": self.message, "code": self.code, "error": self.error,
                "rpc_seconds": self.rpc_seconds, "failing_checks": self.failing_checks}


@dataclass
class InstanceResult:
    """Everything one instance said, or why it said nothing."""

    instance: Instance
    attempts: int = 0
    reached: bool = False
    error: str | None = None  # why it was not reached, why --all found no status, or what cut it short
    call_failed: bool = False  # a failure no reply holds: List failed, or --timeout cut a call short (``error``)
    connect_seconds: float | None = None
    latency_seconds: float | None = None  # the last attempt: connection and every call
    elapsed_seconds: float = 0.0  # the whole check, pauses and retries included
    health: list[HealthReply] = field(default_factory=list)
    smoke: SmokeReply | None = None

    @property
    def replies(self) -> list[Reply]:
        """Every call's reply, health first."""
        return [*self.health, *([self.smoke] if self.smoke else [])]

    @property
    def outcome(self) -> str:
        """:data:`SERVING`, :data:`NOT_SERVING`, :data:`RPC_FAILED` or :data:`UNREACHABLE`."""
        if not self.reached:
            return UNREACHABLE
        if self.call_failed or any(reply.failed for reply in self.replies):
            return RPC_FAILED
        if self.error is not None or not all(reply.status in ("SERVING", "STATUS_OK") for reply in self.replies):
            return NOT_SERVING
        return SERVING
