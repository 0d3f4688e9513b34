"""Parsers of setting values: addresses, seconds, counts, choices, switches, paths and aliases.

Each takes the raw text of a flag or an environment variable and returns the
value, or raises ``ValueError`` with the reason in a few words (``should be ≥
0 seconds``); :mod:`petsage_grpc.settings` adds which setting it was.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

#: The largest value grpc core takes for a count, or for a time in milliseconds (a C int).
GRPC_INT_MAX = 2**31 - 1
#: The longest time handed to grpc core, in seconds (its milliseconds must fit a C int).
GRPC_SECONDS_MAX = GRPC_INT_MAX // 1000
# HOST:PORT with an optional [IPv6] host.
_ADDRESS = re.compile(r"^(?P<host>\[[0-9A-Fa-f:.%\w]+\]|[^\s:\[\]]+):(?P<port>\d{1,5})$")
#: The address rule, in the words of every message, help text and the README: gRPC takes a unix socket too.
ADDRESS_RULE = "HOST:PORT (e.g. [::]:50051 or 127.0.0.1:0) or unix:PATH"
#: The rule for a TCP-only address (the HTTP listener).
TCP_ADDRESS_RULE = "HOST:PORT (e.g. [::]:8080 or 127.0.0.1:0); unix:PATH is for the gRPC --address only"


def _host_port(value: str, rule: str) -> str:
    match = _ADDRESS.match(value)
    if match is None:
        raise ValueError(f"expected {rule}")
    if int(match["port"]) > 65535:
        raise ValueError("port should be in 0..65535")
    return value


def parse_address(value: str) -> str:
    """Accept :data:`ADDRESS_RULE`: ``HOST:PORT`` (port 0..65535; ``[::1]:0`` style for IPv6) or ``unix:PATH``."""
    if value.startswith("unix:") and len(value) > len("unix:"):
        return value
    return _host_port(value, ADDRESS_RULE)


def tcp_address(value: str) -> str:
    """Accept :data:`TCP_ADDRESS_RULE`: ``HOST:PORT`` only (an HTTP listener takes no unix:PATH)."""
    return _host_port(value, TCP_ADDRESS_RULE)


def seconds(minimum: float, inclusive: bool, maximum: float | None = None) -> Callable[[str], float]:
    """A parser for a finite number of seconds above ``minimum`` (and at most ``maximum``)."""

    def parse(value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            raise ValueError("expected a number of seconds") from None
        if not math.isfinite(number):
            raise ValueError("expected a finite number of seconds")
        if number < minimum or (number == minimum and not inclusive):
            raise ValueError(f"should be {'≥' if inclusive else '>'} {minimum:g} seconds")
        if maximum is not None and number > maximum:
            raise ValueError(f"should be ≤ {maximum:.0f} seconds" if maximum == int(maximum)
                             else f"should be ≤ {maximum:g} seconds")
        return number

    return parse


def days(minimum: float) -> Callable[[str], float]:
    """A parser for a finite number of days, at least ``minimum``."""

    def parse(value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            raise ValueError("expected a number of days") from None
        if not math.isfinite(number):
            raise ValueError("expected a finite number of days")
        if number < minimum:
            raise ValueError(f"should be ≥ {minimum:g} days")
        return number

    return parse


def count(minimum: int, maximum: int = GRPC_INT_MAX) -> Callable[[str], int]:
    """A parser for a whole number from ``minimum`` to ``maximum``."""

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise ValueError("expected a whole number") from None
        if number < minimum:
            raise ValueError(f"should be ≥ {minimum}")
        if number > maximum:
            raise ValueError(f"should be ≤ {maximum}")
        return number

    return parse


def choice(choices: tuple[str, ...], fold: Callable[[str], str]) -> Callable[[str], str]:
    """A parser accepting one of ``choices`` (after ``fold``, e.g. upper-casing)."""

    def parse(value: str) -> str:
        folded = fold(value)
        if folded not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return folded

    return parse


def switch(value: str) -> bool:
    """Accept true/false, yes/no, on/off or 1/0, in any case."""
    folded = value.strip().lower()
    if folded in ("1", "true", "yes", "on"):
        return True
    if folded in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false (or yes/no, on/off, 1/0)")


def path(value: str) -> str:
    """Accept a non-empty path (the file is opened, and checked, at start-up)."""
    if not value.strip():
        raise ValueError("expected a file path")
    return value


def aliases(value: str) -> str:
    """Accept ``ALIAS=NAME[,ALIAS=NAME...]`` (health names answering another's status); return it tidied."""
    pairs = []
    for item in filter(None, (part.strip() for part in value.split(","))):
        alias, equals, name = (side.strip() for side in item.partition("="))
        if not equals or not alias:
            raise ValueError(f"expected ALIAS=NAME pairs separated by commas, got {item!r}")
        pairs.append(f"{alias}={name}")
    if len({pair.partition("=")[0] for pair in pairs}) != len(pairs):
        raise ValueError("each alias may be given once")
    return ",".join(pairs)
