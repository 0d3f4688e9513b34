"""Settings of ``petsage-grpc serve``, read from flags and ``PETSAGE_GRPC_*`` variables.

Every setting is one :class:`Setting` row: the flag ``--log-file`` reads the
variable ``PETSAGE_GRPC_LOG_FILE`` when the flag is absent; flags win.  A bad
value raises :class:`SettingError` naming the setting and where the value
came from, so the program stops before it binds with one precise line.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

ENV_PREFIX = "PETSAGE_GRPC_"
#: Exit code for a bad flag or setting, before anything starts (as grpc_health_probe's 1).
EXIT_BAD_SETTING = 1
LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
SMOKE_DETAILS = ("full", "status")
#: Seconds an unanswered keepalive ping may wait before its connection is closed.
KEEPALIVE_TIMEOUT = 20.0
#: Keepalive pings a client may send too soon before its connection is closed.
PING_STRIKES = 2
# HOST:PORT with an optional [IPv6] host; grpc also takes unix:PATH.
_ADDRESS = re.compile(r"^(?P<host>\[[0-9A-Fa-f:.%\w]+\]|[^\s:\[\]]+):(?P<port>\d{1,5})$")


class SettingError(ValueError):
    """A setting has a value the server cannot use; the message names the setting."""


def parse_address(value: str) -> str:
    """Accept ``HOST:PORT`` (port 0..65535; ``[::1]:0`` style for IPv6) or ``unix:PATH``."""
    if value.startswith("unix:") and len(value) > len("unix:"):
        return value
    match = _ADDRESS.match(value)
    if match is None:
        raise ValueError("expected HOST:PORT (e.g. [::]:50051 or 127.0.0.1:0) or unix:PATH")
    if int(match["port"]) > 65535:
        raise ValueError("port should be in 0..65535")
    return value


#: The largest value grpc core takes for a count, or for a time in milliseconds (a C int).
GRPC_INT_MAX = 2**31 - 1
#: The longest time handed to grpc core, in seconds (its milliseconds must fit a C int).
GRPC_SECONDS_MAX = GRPC_INT_MAX // 1000


def _seconds(minimum: float, inclusive: bool, maximum: float | None = None) -> Callable[[str], float]:
    """Build a parser for a finite number of seconds above ``minimum`` (and at most ``maximum``)."""

    def parse(value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            raise ValueError("expected a number of seconds") from None
        if not math.isfinite(number) or number < minimum or (number == minimum and not inclusive):
            raise ValueError(f"should be {'≥' if inclusive else '>'} {minimum:g} seconds")
        if maximum is not None and number > maximum:
            raise ValueError(f"should be ≤ {maximum:.0f} seconds" if maximum == int(maximum)
                             else f"should be ≤ {maximum:g} seconds")
        return number

    return parse


def _count(minimum: int, maximum: int = GRPC_INT_MAX) -> Callable[[str], int]:
    """Build a parser for a whole number from ``minimum`` to ``maximum``."""

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


def _choice(choices: tuple[str, ...], fold: Callable[[str], str]) -> Callable[[str], str]:
    """Build a parser accepting one of ``choices`` (after ``fold``, e.g. upper-casing)."""

    def parse(value: str) -> str:
        folded = fold(value)
        if folded not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return folded

    return parse


def _tcp_address(value: str) -> str:
    """Accept ``HOST:PORT`` only (an HTTP listener takes no unix:PATH)."""
    if value.startswith("unix:"):
        raise ValueError("expected HOST:PORT (e.g. [::]:9090 or 127.0.0.1:0)")
    return parse_address(value)


def _switch(value: str) -> bool:
    """Accept true/false, yes/no, on/off or 1/0, in any case."""
    folded = value.strip().lower()
    if folded in ("1", "true", "yes", "on"):
        return True
    if folded in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def _path(value: str) -> str:
    """Accept a non-empty path (the file is opened, and checked, at start-up)."""
    if not value.strip():
        raise ValueError("expected a file path")
    return value


@dataclass(frozen=True)
class Setting:
    """One configurable value: its flag, its environment variable and its parser."""

    name: str
    parse: Callable[[str], Any]
    help: str
    metavar: str | None  # None: an on/off setting whose flag (--NAME or --no-NAME) takes no value

    @property
    def default(self) -> Any:
        """The default, as declared on :class:`ServeSettings`."""
        return ServeSettings.__dataclass_fields__[self.name].default

    @property
    def default_text(self) -> str:
        """The default as ``--help`` and the README show it: ``none``, ``on``/``off`` or the value."""
        if self.default is None:
            return "none"
        if isinstance(self.default, bool):
            return "on" if self.default else "off"
        return str(self.default)

    @property
    def flag(self) -> str:
        """The command-line flag, e.g. ``--log-file``.

        An on/off setting's flag flips its default: ``--no-reflection`` for
        one that is on, ``--log-probes`` for one that is off.
        """
        negate = self.metavar is None and self.default is True
        return ("--no-" if negate else "--") + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        """The environment variable, e.g. ``PETSAGE_GRPC_LOG_FILE``."""
        return ENV_PREFIX + self.name.upper()


@dataclass(frozen=True)
class ServeSettings:
    """Validated settings of one ``serve`` run; the defaults suit a developer's laptop."""

    address: str = "[::]:50051"
    log_format: str = "text"
    log_file: str | None = None
    log_level: str = "INFO"
    grace: float = 10.0
    log_timeout: float = 1.0
    check_interval: float = 10.0
    drain: float = 0.0
    max_watchers: int = 10_000
    stall_limit: float = 2.0
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    reflection: bool = True
    workers: int = 1
    max_receive_bytes: int = 16 * 1024
    max_streams: int = 1_000
    max_connections: int = 10_000
    idle_timeout: float = 300.0
    keepalive_time: float = 60.0
    keepalive_min_interval: float = 10.0
    metrics_address: str | None = None
    access_log: bool = True
    log_probes: bool = False
    smoke_details: str = "full"

    def __post_init__(self) -> None:
        # Settings built in code (by a service embedding the server) get the
        # same checks as flags; parsing also normalizes, e.g. "json" or "info".
        for setting in SETTINGS:
            value = getattr(self, setting.name)
            if value is None and setting.default is None:
                continue
            try:
                object.__setattr__(self, setting.name, setting.parse(str(value)))
            except ValueError as exc:
                raise SettingError(f"{setting.name!r} {exc}") from None
        if (self.tls_cert is None) != (self.tls_key is None):
            raise SettingError("--tls-cert and --tls-key go together: give both to serve TLS")
        if self.workers > 1 and self.address.startswith("unix:"):
            raise SettingError("--workers needs a HOST:PORT address: workers share a TCP port")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise SettingError("--tls-client-ca needs --tls-cert and --tls-key: mTLS is TLS first")
        if self.metrics_address is not None and self.workers > 1:
            raise SettingError("--metrics-address serves one process's metrics: use it with --workers 1 "
                               "(run more pods, not more workers, to scale a scraped server)")


SETTINGS: tuple[Setting, ...] = (
    Setting("address", parse_address,
            "address to listen on; port 0 picks a free port and the log names it", "HOST:PORT"),
    Setting("log_format", _choice(LOG_FORMATS, str.lower),
            "log line format: text (classic) or json (one object per line)", "{text,json}"),
    Setting("log_file", _path,
            "also append every log record to this file (stdout is always a sink)", "PATH"),
    Setting("log_level", _choice(LOG_LEVELS, str.upper),
            "lowest level logged; start/stop lines, health changes and the logging probe are always written", "LEVEL"),
    Setting("grace", _seconds(0, True),
            "on SIGTERM/SIGINT, seconds in-flight calls get to finish", "SECONDS"),
    Setting("log_timeout", _seconds(0, False),
            "seconds the logging check waits for every sink to confirm its record", "SECONDS"),
    Setting("check_interval", _seconds(0, False),
            "seconds between background runs of each built-in check", "SECONDS"),
    Setting("drain", _seconds(0, True),
            "on SIGTERM/SIGINT, seconds to keep serving with readiness NOT_SERVING before "
            "Watch streams end and new calls are refused (let load balancers notice)", "SECONDS"),
    # grpc's pending-call limit is this plus 1,000 (server.PENDING_HEADROOM); a watcher costs ~25 KiB.
    Setting("max_watchers", _count(1, 1_000_000),
            "concurrent Health/Watch streams allowed; more get RESOURCE_EXHAUSTED", "N"),
    # The watchdog looks every 0.05 s: a smaller limit would call ordinary jitter a stall.
    Setting("stall_limit", _seconds(0.5, True),
            "seconds the event loop may go without running before liveness turns NOT_SERVING", "SECONDS"),
    Setting("tls_cert", _path, "serve TLS with this PEM certificate chain (with --tls-key)", "PATH"),
    Setting("tls_key", _path, "the PEM private key of --tls-cert", "PATH"),
    Setting("tls_client_ca", _path,
            "require client certificates signed by these PEM CA certificates (mTLS)", "PATH"),
    Setting("reflection", _switch,
            "do not serve reflection (the variable takes true or false)", None),
    Setting("workers", _count(1, 256),
            "server processes sharing the port (SO_REUSEPORT); one per core uses every core", "N"),
    # Our own requests are a few bytes (a service name, a reflection symbol).
    Setting("max_receive_bytes", _count(1024),
            "largest request message accepted; larger ones get RESOURCE_EXHAUSTED", "BYTES"),
    Setting("max_streams", _count(1),
            "concurrent calls (streams) one connection may have open; more wait for a free one", "N"),
    # An idle connection costs the server about 17 KiB (tests/test_limits.py): the cap bounds that memory.
    Setting("max_connections", _count(1),
            "open connections accepted; further ones are closed at once (bounds memory)", "N"),
    Setting("idle_timeout", _seconds(0, False, GRPC_SECONDS_MAX),
            "close a connection that has had no call in flight for this long", "SECONDS"),
    Setting("keepalive_time", _seconds(0, False, GRPC_SECONDS_MAX),
            "ping a connection after this long without traffic; close it if the ping goes "
            f"unanswered for {KEEPALIVE_TIMEOUT:g}s (finds Watch clients that vanished)", "SECONDS"),
    Setting("keepalive_min_interval", _seconds(0, False, GRPC_SECONDS_MAX),
            f"shortest interval allowed between a client's keepalive pings; after {PING_STRIKES} "
            "more pings sooner the connection is closed (GOAWAY too_many_pings)", "SECONDS"),
    Setting("metrics_address", _tcp_address,
            "serve Prometheus metrics over HTTP at http://ADDRESS/metrics", "HOST:PORT"),
    Setting("access_log", _switch,
            "do not write an access log record per call (the variable takes true or false)", None),
    Setting("log_probes", _switch,
            "also log health checks from probes (user agents kube-probe/*, grpc_health_probe, "
            "petsage-grpc probe), which are otherwise only counted", None),
    Setting("smoke_details", _choice(SMOKE_DETAILS, str.lower),
            "what SmokeTest answers: full (checks and server info) or status (status, message and "
            "timestamp only, for callers who are not trusted)", "{full,status}"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per setting; values stay raw strings until :func:`resolve`."""
    for setting in SETTINGS:
        help_text = f"{setting.help} [env {setting.env}; default {setting.default_text}]"
        if setting.metavar is None:
            parser.add_argument(setting.flag, dest=setting.name, action="store_const",
                                const="false" if setting.default else "true", default=None, help=help_text)
        else:
            parser.add_argument(setting.flag, dest=setting.name, default=None, metavar=setting.metavar,
                                help=help_text)


def resolve(args: argparse.Namespace, environ: Mapping[str, str]) -> ServeSettings:
    """Combine flags (which win) with environment variables, validating each value."""
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        raw: str | None = getattr(args, setting.name)
        source = setting.flag
        if raw is None and setting.env in environ:
            raw, source = environ[setting.env], setting.env
        if raw is None:
            continue
        try:
            values[setting.name] = setting.parse(raw)
        except ValueError as exc:
            raise SettingError(f"invalid {source}={raw!r}: {exc}") from None
    return ServeSettings(**values)
