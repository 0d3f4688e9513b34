"""Settings of ``petsage-grpc serve``, read from flags and ``PETSAGE_GRPC_*`` variables.

Each setting is declared once, as a field of :class:`ServeSettings` with its
default, parser, metavar and help (:func:`setting`); the flag table of
``serve --help`` (:func:`add_arguments`), the README's configuration table
and :data:`SETTINGS` all derive from those fields.  The flag ``--log-file``
reads the variable ``PETSAGE_GRPC_LOG_FILE`` when the flag is absent; flags
win.  A bad value raises :class:`SettingError` naming the setting and where
the value came from, so the program stops before it binds with one precise
line.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from petsage_grpc.values import (
    GRPC_SECONDS_MAX,
    aliases,
    choice,
    count,
    days,
    parse_address,
    path,
    seconds,
    switch,
    tcp_address,
)

ENV_PREFIX = "PETSAGE_GRPC_"
LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
SMOKE_DETAILS = ("full", "status")
#: Seconds an unanswered keepalive ping may wait before its connection is closed.
KEEPALIVE_TIMEOUT = 20.0
#: Keepalive pings a client may send too soon before its connection is closed.
PING_STRIKES = 2
_SPEC = "petsage_setting"
_T = TypeVar("_T")


class SettingError(ValueError):
    """A setting has a value the server cannot use; the message names the setting."""


@dataclass(frozen=True)
class _Spec:
    parse: Callable[[str], Any]
    metavar: str | None  # None: an on/off setting whose flag (--NAME or --no-NAME) takes no value
    help: str


def setting(default: _T, parse: Callable[[str], Any], metavar: str | None, help: str) -> _T:
    """Declare a field of :class:`ServeSettings`: its default, parser, flag metavar and help.

    ``metavar`` None makes an on/off switch: its flag takes no value.
    """
    return dataclasses.field(default=default, metadata={_SPEC: _Spec(parse, metavar, help)})


@dataclass(frozen=True)
class ServeSettings:
    """Validated settings of one ``serve`` run; the defaults suit a developer's laptop."""

    address: str = setting("[::]:50051", parse_address, "HOST:PORT|unix:PATH",
                           "address to listen on: HOST:PORT (port 0 picks a free port and the log names it) "
                           "or unix:PATH, a unix socket")
    log_format: str = setting("text", choice(LOG_FORMATS, str.lower), "{text,json}",
                              "log line format: text (classic) or json (one object per line)")
    log_file: str | None = setting(None, path, "PATH",
                                   "also append every log record to this file (stdout is always a sink)")
    log_level: str = setting("INFO", choice(LOG_LEVELS, str.upper), "LEVEL",
                             "lowest level logged: DEBUG, INFO, WARNING, ERROR or CRITICAL; start/stop lines, "
                             "health changes and the logging probe are always written")
    grace: float = setting(10.0, seconds(0, True), "SECONDS",
                           "on SIGTERM/SIGINT, seconds in-flight calls get to finish")
    log_timeout: float = setting(1.0, seconds(0, False), "SECONDS",
                                 "seconds the logging check waits for every sink to confirm its record")
    # Each logging check writes a record: a floor keeps a typo from flooding the log (0.001 s: 668 records a second).
    check_interval: float = setting(10.0, seconds(0.1, True), "SECONDS",
                                    "seconds between background runs of each built-in check (at least 0.1)")
    drain: float = setting(0.0, seconds(0, True), "SECONDS",
                           "on SIGTERM/SIGINT, seconds to keep serving with readiness NOT_SERVING before "
                           "Watch streams end and new calls are refused (let load balancers notice)")
    # grpc's pending-call limit is this plus 1,000 (server.running.PENDING_HEADROOM); a watcher costs ~25 KiB.
    max_watchers: int = setting(10_000, count(1, 1_000_000), "N",
                                "concurrent Health/Watch streams allowed; more get RESOURCE_EXHAUSTED")
    # The watchdog looks every 0.05 s: a smaller limit would call ordinary jitter a stall.
    stall_limit: float = setting(2.0, seconds(0.5, True), "SECONDS",
                                 "seconds the event loop may go without running before liveness turns NOT_SERVING")
    tls_cert: str | None = setting(None, path, "PATH", "serve TLS with this PEM certificate chain (with --tls-key)")
    tls_key: str | None = setting(None, path, "PATH", "the PEM private key of --tls-cert")
    tls_client_ca: str | None = setting(None, path, "PATH",
                                        "require client certificates signed by these PEM CA certificates (mTLS)")
    tls_expiry_warning: float = setting(14.0, days(0), "DAYS",
                                        "warn (and answer SmokeTest DEGRADED) while the TLS certificate expires "
                                        "within this many days")
    reflection: bool = setting(True, switch, None, "do not serve reflection (the variable takes true or false)")
    workers: int = setting(1, count(1, 256), "N",
                           "server processes sharing the port (SO_REUSEPORT); one per core uses every core; one "
                           "that dies or stops is started again; metrics need one worker")
    # Our own requests are a few bytes (a service name, a reflection symbol).
    max_receive_bytes: int = setting(16 * 1024, count(1024), "BYTES",
                                     "largest request message accepted; larger ones get RESOURCE_EXHAUSTED")
    request_timeout: float = setting(5.0, seconds(0, False, GRPC_SECONDS_MAX), "SECONDS",
                                     "seconds a call may take to send its whole request message, counted from "
                                     "the call's start; later, DEADLINE_EXCEEDED")
    # A call still waiting for its request message holds about 19 KiB: the cap bounds that memory.
    max_incomplete_requests: int = setting(1_000, count(1, 1_000_000), "N",
                                           "calls waiting for their request message at once; one more ends the "
                                           "oldest of them with RESOURCE_EXHAUSTED (bounds their memory)")
    max_streams: int = setting(1_000, count(1), "N",
                               "concurrent calls (streams) one connection may have open; more wait for a free one")
    # An idle connection costs the server about 17 KiB (tests/test_limits.py): the cap bounds that memory.
    max_connections: int = setting(10_000, count(1), "N",
                                   "open connections accepted; further ones are closed at once (bounds memory)")
    # grpc core's own default is 120 s (and 60 s for the HTTP/2 preface): silent sockets would hold
    # connection slots for a minute each.
    handshake_timeout: float = setting(5.0, seconds(0, False, GRPC_SECONDS_MAX), "SECONDS",
                                       "seconds a new connection has to finish its TLS handshake and HTTP/2 "
                                       "preface; a silent one is closed after this long")
    idle_timeout: float = setting(300.0, seconds(0, False, GRPC_SECONDS_MAX), "SECONDS",
                                  "close a connection that has had no call in flight for this long")
    keepalive_time: float = setting(60.0, seconds(0, False, GRPC_SECONDS_MAX), "SECONDS",
                                    "ping a connection after this long without traffic; close it if the ping goes "
                                    f"unanswered for {KEEPALIVE_TIMEOUT:g}s (finds Watch clients that vanished)")
    keepalive_min_interval: float = setting(10.0, seconds(0, False, GRPC_SECONDS_MAX), "SECONDS",
                                            "shortest interval allowed between a client's keepalive pings; after "
                                            f"{PING_STRIKES} more pings sooner the connection is closed "
                                            "(GOAWAY too_many_pings)")
    http_address: str | None = setting(None, tcp_address, "HOST:PORT",
                                       "also serve HTTP health (the REST smoke test, /livez, /readyz, /healthz, "
                                       "/health, /metrics) on this TCP address (no unix:PATH)")
    # An idle HTTP connection costs about 3 KiB, one holding a nearly full 8 KiB request head about 11 KiB.
    http_max_connections: int = setting(512, count(1, 65_536), "N",
                                        "open HTTP connections; at the cap a new one replaces the oldest that has "
                                        "not sent a whole request, or is closed if all are being answered")
    metrics: bool = setting(False, switch, None,
                            "serve Prometheus metrics at /metrics on --http-address (the variable takes true or false)")
    access_log: bool = setting(True, switch, None,
                               "do not write an access log record per call (the variable takes true or false)")
    log_probes: bool = setting(False, switch, None,
                               "also log health checks from probes (user agents kube-probe/*, grpc_health_probe, "
                               "petsage-grpc probe), which are otherwise only counted")
    smoke_details: str = setting("full", choice(SMOKE_DETAILS, str.lower), "{full,status}",
                                 "what SmokeTest answers: full (checks and server info) or status (status, message "
                                 "and timestamp only, for callers who are not trusted); also whether /readyz and "
                                 "/livez show why a check fails")
    unavailable_unless_serving: bool = setting(False, switch, None,
                                               "answer Health/Check with the error UNAVAILABLE for any status but "
                                               "SERVING, for load balancers that read only the status code (the "
                                               "variable takes true or false)")
    health_aliases: str | None = setting(None, aliases, "ALIAS=NAME[,...]",
                                  "extra health names, each answering the status of another "
                                  "(e.g. grpc.health.v1.Health=readiness)")

    @property
    def aliases(self) -> dict[str, str]:
        """:attr:`health_aliases` as a mapping: alias to the name whose status it answers."""
        return dict(pair.split("=", 1) for pair in (self.health_aliases or "").split(",") if pair)

    def __post_init__(self) -> None:
        # Settings built in code (by a service embedding the server) get the
        # same checks as flags; parsing also normalizes, e.g. "json" or "info".
        for row in SETTINGS:
            value = getattr(self, row.name)
            if value is None and row.default is None:
                continue
            try:
                object.__setattr__(self, row.name, row.parse(str(value)))
            except ValueError as exc:
                raise SettingError(f"{row.name!r} {exc}") from None
        if (self.tls_cert is None) != (self.tls_key is None):
            raise SettingError("--tls-cert and --tls-key go together: give both to serve TLS")
        if self.workers > 1 and self.address.startswith("unix:"):
            raise SettingError("--workers needs a HOST:PORT address: workers share a TCP port")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise SettingError("--tls-client-ca needs --tls-cert and --tls-key: mTLS is TLS first")
        if self.metrics and self.http_address is None:
            raise SettingError("--metrics needs --http-address: /metrics is served there")
        if self.metrics and self.workers > 1:
            raise SettingError("--metrics serves one process's metrics: use it with --workers 1 "
                               "(run more pods, not more workers, to scale a scraped server)")


@dataclass(frozen=True)
class Setting:
    """One configurable value as its field declares it: flag, environment variable, parser, help."""

    name: str
    default: Any
    parse: Callable[[str], Any]
    metavar: str | None
    help: str

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


#: Settings that no longer exist, and what to use instead: given anyway, they stop the program.
RETIRED = {
    "metrics_address": "--metrics-address is retired: serve /metrics on the HTTP listener with "
                       "--http-address HOST:PORT --metrics",
}

#: Every setting, in the order of :class:`ServeSettings`' fields.
SETTINGS: tuple[Setting, ...] = tuple(
    Setting(field.name, field.default, spec.parse, spec.metavar, spec.help)
    for field in dataclasses.fields(ServeSettings)
    for spec in [field.metadata[_SPEC]]
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per setting (and, hidden, the retired ones); values stay raw strings until :func:`resolve`."""
    for name in RETIRED:
        parser.add_argument("--" + name.replace("_", "-"), dest=name, default=None, help=argparse.SUPPRESS)
    for row in SETTINGS:
        help_text = f"{row.help} [env {row.env}; default {row.default_text}]"
        if row.metavar is None:
            parser.add_argument(row.flag, dest=row.name, action="store_const",
                                const="false" if row.default else "true", default=None, help=help_text)
        else:
            parser.add_argument(row.flag, dest=row.name, default=None, metavar=row.metavar, help=help_text)


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """One warning per ``PETSAGE_GRPC_*`` variable that names no setting, with the closest one that does.

    A misspelt variable is otherwise ignored without a word.
    """
    known = {row.env for row in SETTINGS} | {ENV_PREFIX + name.upper() for name in RETIRED}
    warnings = []
    for name in sorted(environ):
        if name.startswith(ENV_PREFIX) and name not in known:
            # Compared without the prefix they all share, which would make any two names look alike.
            suffixes = sorted(known_name.removeprefix(ENV_PREFIX) for known_name in known)
            close = difflib.get_close_matches(name.removeprefix(ENV_PREFIX), suffixes, n=1, cutoff=0.7)
            hint = f"did you mean {ENV_PREFIX}{close[0]}?" if close else "serve --help lists every variable"
            warnings.append(f"{name} is not a setting and was ignored: {hint}")
    return warnings


def resolve(args: argparse.Namespace, environ: Mapping[str, str]) -> ServeSettings:
    """Combine flags (which win) with environment variables, validating each value."""
    for name, message in RETIRED.items():
        if getattr(args, name, None) is not None or ENV_PREFIX + name.upper() in environ:
            raise SettingError(message)
    values: dict[str, Any] = {}
    for row in SETTINGS:
        raw: str | None = getattr(args, row.name)
        source = row.flag
        if raw is None and row.env in environ:
            raw, source = environ[row.env], row.env
        if raw is None:
            continue
        try:
            values[row.name] = row.parse(raw)
        except ValueError as exc:
            raise SettingError(f"invalid {source}={raw!r}: {exc}") from None
    return ServeSettings(**values)
