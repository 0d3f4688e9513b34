"""Connection flags shared by ``probe`` and ``smoke``, with grpc_health_probe's spelling and rules.

Each flag is accepted with one dash or two (``-addr`` and ``--addr``), and
``-flag=value`` works as in Go.  Timeouts are Go durations (``250ms``,
``1.5s``, ``1m``) or plain seconds (``0.5``).  :func:`check` applies
grpc_health_probe's rules (no ``-tls-*`` flag without ``-tls``, and so on) and
:func:`open_channel` builds the channel.  Nothing here imports grpc until a
channel is opened, so argument errors cost no grpc start-up.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping, Sequence

# Not typing.TYPE_CHECKING: the probe, timed as a whole process, would pay for importing typing.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import ssl
    from typing import Any

    import grpc

    from petsage_grpc.tls import ClientTLS

_DURATION_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_HEADER_KEY = re.compile(r"^[0-9a-z_.\-]+$")
# A freshly started server should be found fast: grpc's default first
# reconnect backoff is a full second, as long as the probe's whole budget.
# The minimum backoff is also each attempt's shortest deadline: the probe's
# first attempts may last 100 ms, and it retries within -connect-timeout.
RECONNECT_OPTIONS = (("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                     ("grpc.max_reconnect_backoff_ms", 1000))
# ``smoke`` reports the first failed attempt: an attempt keeps grpc's own 20 s deadline, so that
# only a refusal, an unknown host or a failed handshake fails it before -connect-timeout.
FIRST_FAILURE_OPTIONS = (("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 1000))


def quiet_grpc() -> None:
    """Silence grpc's C core, which writes lines of its own on stderr (e.g. on every failed TLS handshake).

    grpc reads these variables when it is first imported, so call this
    before that import; it changes this process only.  The commands' stderr
    is a contract: one line per failure, theirs.
    """
    os.environ["GRPC_VERBOSITY"] = "NONE"
    os.environ["GRPC_TRACE"] = ""


def go_flags(parser: argparse.ArgumentParser, argv: Sequence[str]) -> list[str]:
    """``argv`` read as Go's flag package reads it, rewritten for ``parser`` as ``--flag=value`` pairs.

    Only flags ``parser`` defines, spelled out in full (``-ad`` is no
    ``-addr``); a flag that takes a value takes the next argument whatever
    it is (``--wait -1s``); a boolean flag takes a value only as
    ``-flag=false``.  Raises ``ValueError`` with Go's message
    (``flag provided but not defined: -ad``, ``flag needs an argument: -addr``).
    Arguments after ``--``, or from the first one that is no flag, are left as
    they are (the parser refuses them).
    """
    actions = parser._option_string_actions  # argparse's own table of every spelling
    out: list[str] = []
    index = 0
    while index < len(argv):
        arg = argv[index]
        if arg == "--" or not arg.startswith("-") or arg == "-":
            return out + list(argv[index:])
        name, equals, value = arg.partition("=")
        action = actions.get(name)
        if action is None:
            raise ValueError(f"flag provided but not defined: {name}")
        takes_value = action.nargs is None or action.nargs == 1
        if takes_value and not equals:
            index += 1
            if index >= len(argv):
                raise ValueError(f"flag needs an argument: {name}")
            value, equals = argv[index], "="
        out.append(f"{name}={value}" if equals else name)
        index += 1
    return out


def parse_duration(text: str) -> float:
    """Seconds in a Go duration (``1s``, ``250ms``, ``1m30s``, ``-1s``) or a plain number of seconds."""
    try:
        return float(text)
    except ValueError:
        pass
    sign, body = (-1.0, text[1:]) if text.startswith("-") else (1.0, text.removeprefix("+"))
    parts = _DURATION_PART.findall(body)
    if not body or "".join(number + unit for number, unit in parts) != body:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r} (expected e.g. 250ms, 1.5s, 1m or 2)")
    return sign * sum(float(number) * _UNIT_SECONDS[unit] for number, unit in parts)


def format_duration(seconds: float) -> str:
    """``seconds`` as Go prints a ``time.Duration``: ``1s``, ``250ms``, ``1.5s``, ``2m0s``, ``1.234567ms``."""
    nanos = round(seconds * 1e9)
    sign, nanos = ("-" if nanos < 0 else ""), abs(nanos)
    if nanos == 0:
        return "0s"
    if nanos < 1_000_000_000:
        for unit, size in (("ms", 1_000_000), ("µs", 1_000), ("ns", 1)):
            if nanos >= size:
                return sign + _decimal(nanos, size) + unit
    hours, rest = divmod(nanos, 3_600_000_000_000)
    minutes, rest = divmod(rest, 60_000_000_000)
    text = _decimal(rest, 1_000_000_000) + "s"
    if hours or minutes:
        text = f"{minutes}m{text}"
    if hours:
        text = f"{hours}h{text}"
    return sign + text


def _decimal(value: int, unit: int) -> str:
    whole, fraction = divmod(value, unit)
    digits = str(fraction).rjust(len(str(unit)) - 1, "0").rstrip("0") if fraction else ""
    return f"{whole}.{digits}" if digits else str(whole)


def parse_bool(text: str) -> bool:
    """A Go boolean flag value: ``true``/``false``, ``1``/``0``, ``t``/``f`` (any case Go accepts)."""
    if text in ("1", "t", "T", "true", "TRUE", "True"):
        return True
    if text in ("0", "f", "F", "false", "FALSE", "False"):
        return False
    raise argparse.ArgumentTypeError(f"invalid boolean {text!r} (expected true or false)")


def parse_header(text: str) -> tuple[str, str]:
    """A ``-rpc-header`` value, ``'name: value'``, as lower-case gRPC metadata."""
    name, colon, value = text.partition(":")
    name = name.strip().lower()
    if not colon or not _HEADER_KEY.match(name):
        raise argparse.ArgumentTypeError(f"invalid RPC header, expected 'key: value', got {text!r}")
    return name, value.lstrip()


def add_arguments(parser: argparse.ArgumentParser, *, connect_timeout: float, rpc_timeout: float,
                  user_agent: str, address: str | None = None,
                  aliases: Mapping[str, Sequence[str]] | None = None) -> None:
    """Add the address, timeout, metadata, compression and TLS flags to ``parser``.

    ``address`` is the default of ``-addr`` (required when None); ``aliases``
    gives a flag more spellings, e.g. ``{"addr": ["--address"]}``.
    """

    def _flag(name: str, **kwargs: Any) -> None:
        # Go's flag package takes -name and --name alike; a boolean takes -name=false too.
        if kwargs.get("type") is parse_bool:
            kwargs.update(nargs="?", const=True, default=False, metavar="BOOL")
        spellings = (f"-{name}", f"--{name}", *(aliases or {}).get(name, ()))
        parser.add_argument(*spellings, dest=name.replace("-", "_"), **kwargs)

    _flag("addr", default=address, metavar="HOST:PORT|unix:PATH",
          help="address of the server " + ("(required)" if address is None else f"[default {address}]"))
    _flag("connect-timeout", type=parse_duration, default=connect_timeout, metavar="DURATION",
          help=f"time allowed to connect, e.g. 250ms, 2s or 0.5 [default {format_duration(connect_timeout)}]")
    _flag("rpc-timeout", type=parse_duration, default=rpc_timeout, metavar="DURATION",
          help=f"deadline of each call [default {format_duration(rpc_timeout)}]")
    _flag("user-agent", default=user_agent, help=f"user-agent of the calls [default {user_agent}]")
    _flag("rpc-header", type=parse_header, action="append", default=[], metavar="'NAME: VALUE'",
          help="metadata sent with every call; repeatable")
    _flag("gzip", type=parse_bool, help="compress requests with gzip")
    _flag("tls", type=parse_bool, help="use TLS (default: plaintext)")
    _flag("tls-no-verify", type=parse_bool,
          help="(with -tls) trust whatever certificate the server presents (INSECURE)")
    _flag("tls-ca-cert", metavar="FILE",
          help="(with -tls) PEM file of the CA certificates that may sign the server's certificate "
               "[default: the system's trusted CAs]")
    _flag("tls-client-cert", metavar="FILE", help="(with -tls) client certificate, for mTLS")
    _flag("tls-client-key", metavar="FILE", help="(with -tls) client private key, for mTLS")
    _flag("tls-server-name", metavar="NAME", help="(with -tls) name expected in the server's certificate")


def check(args: argparse.Namespace) -> str | None:
    """grpc_health_probe's argument rules: the first broken one, as its message, or None."""
    no_tls = not args.tls
    rules = (
        (not args.addr, "-addr not specified"),
        (args.connect_timeout <= 0, "-connect-timeout must be greater than zero "
                                    f"(specified: {format_duration(args.connect_timeout)})"),
        (args.rpc_timeout <= 0, "-rpc-timeout must be greater than zero "
                                f"(specified: {format_duration(args.rpc_timeout)})"),
        (no_tls and args.tls_no_verify, "specified -tls-no-verify without specifying -tls"),
        (no_tls and args.tls_ca_cert, "specified -tls-ca-cert without specifying -tls"),
        (no_tls and args.tls_client_cert, "specified -tls-client-cert without specifying -tls"),
        (no_tls and args.tls_server_name, "specified -tls-server-name without specifying -tls"),
        (args.tls_client_cert and not args.tls_client_key,
         "specified -tls-client-cert without specifying -tls-client-key"),
        (not args.tls_client_cert and args.tls_client_key,
         "specified -tls-client-key without specifying -tls-client-cert"),
        (args.tls_no_verify and args.tls_ca_cert,
         "cannot specify -tls-ca-cert with -tls-no-verify (CA cert would not be used)"),
        (args.tls_no_verify and args.tls_server_name,
         "cannot specify -tls-server-name with -tls-no-verify (server name would not be used)"),
    )
    return next((message for broken, message in rules if broken), None)


def metadata(args: argparse.Namespace) -> tuple[tuple[str, str | bytes], ...]:
    """The ``-rpc-header`` values as call metadata (``-bin`` keys carry bytes, as gRPC requires)."""
    headers: Sequence[tuple[str, str]] = args.rpc_header
    return tuple((name, value.encode() if name.endswith("-bin") else value) for name, value in headers)


def client_tls(args: argparse.Namespace) -> ClientTLS:
    """The TLS settings the flags describe (call only with ``-tls``)."""
    from petsage_grpc.tls import ClientTLS

    return ClientTLS(args.tls_ca_cert, args.tls_client_cert, args.tls_client_key, args.tls_server_name)


#: How TLS errors name the ClientTLS fields: by the flags that set them.
FLAG_NAMES = {"ca_cert": "-tls-ca-cert", "client_cert": "-tls-client-cert", "client_key": "-tls-client-key"}


def wait_for_connection(channel: grpc.Channel, timeout: float) -> bool | None:
    """Wait until ``channel`` connects (True) or its first attempt fails (False); None after ``timeout``.

    A refused connection or an unknown host fails within milliseconds:
    waiting out the whole timeout for it would hide the reason.
    """
    import threading

    import grpc

    outcome: list[bool] = []
    settled = threading.Event()

    def on_change(state: grpc.ChannelConnectivity) -> None:
        if state in (grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.TRANSIENT_FAILURE) and not outcome:
            outcome.append(state is grpc.ChannelConnectivity.READY)
            settled.set()

    channel.subscribe(on_change, try_to_connect=True)
    try:
        settled.wait(timeout)
    finally:
        channel.unsubscribe(on_change)
    return outcome[0] if outcome else None


def connection_error(details: str) -> str:
    """The reason in grpc's "failed to connect to all addresses; last error: UNKNOWN: ipv4:...: REASON"."""
    _, found, last = details.partition("last error: ")
    if not found:
        return details
    code, colon, rest = last.partition(": ")
    return rest if colon and code.isupper() else last


def ssl_context(args: argparse.Namespace) -> ssl.SSLContext:
    """The standard library's TLS context the ``-tls*`` flags describe; TLSError names an unusable file."""
    return client_tls(args).ssl_context(FLAG_NAMES, verify=not args.tls_no_verify)


def open_channel(args: argparse.Namespace,
                 reconnect: Sequence[tuple[str, int]] = RECONNECT_OPTIONS) -> grpc.Channel:
    """A channel to ``-addr`` as the flags say; :class:`~petsage_grpc.tls.TLSError` for bad TLS files.

    With ``-tls-no-verify`` the server's certificate is fetched first and
    then trusted as it is (grpc has no switch to skip verification); that
    fetch raises :class:`TimeoutError` when it fails for ``-connect-timeout``.
    """
    import grpc

    options: list[tuple[str, Any]] = [("grpc.primary_user_agent", args.user_agent), *reconnect]
    compression = grpc.Compression.Gzip if args.gzip else None
    if not args.tls:
        return grpc.insecure_channel(args.addr, options=options, compression=compression)
    settings = client_tls(args)
    if args.tls_no_verify:
        from petsage_grpc.tls import trust_presented_certificate

        credentials, tls_options = trust_presented_certificate(args.addr, args.connect_timeout, settings, FLAG_NAMES)
    else:
        credentials, tls_options = settings.credentials(FLAG_NAMES), settings.channel_options()
    options += tls_options
    return grpc.secure_channel(args.addr, credentials, options=options, compression=compression)
