"""What a health check is, and what one run of it found.

A check is a named function, async or not, with a timeout, an interval and
a ``critical`` flag; it returns a short detail (or None) when it passes and
raises when it fails.  :class:`~petsage_grpc.health.runner.CheckRunner` runs
checks and caches their :class:`CheckOutcome`; health answers read that
cache and never wait on a check.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeAlias

#: What a check function may be: ``async def f() -> str | None`` or ``def f() -> str | None``.
CheckFunction: TypeAlias = Callable[[], Awaitable[str | None]] | Callable[[], str | None]


class CheckFailed(Exception):
    """Raised by a check function to fail with a precise detail."""


@dataclass(frozen=True)
class Check:
    """A named health check.

    ``func`` returns a short detail (or None) when the check passes and
    raises (any exception) when it fails; it is given at most ``timeout``
    seconds, every ``interval`` seconds.  A failing ``critical`` check turns
    readiness NOT_SERVING and SmokeTest FAILING; a failing non-critical one
    makes SmokeTest DEGRADED only.
    """

    name: str
    func: CheckFunction
    interval: float
    timeout: float
    critical: bool = True

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError('"name" should not be empty')
        if self.interval <= 0 or self.timeout <= 0:
            raise ValueError(f'check {self.name!r}: "interval" and "timeout" should be > 0')


@dataclass(frozen=True)
class CheckOutcome:
    """One run of a check: whether it passed, why, and how long it took."""

    name: str
    ok: bool
    detail: str
    duration: float
    critical: bool
