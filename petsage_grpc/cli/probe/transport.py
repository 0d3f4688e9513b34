"""The probe's gRPC client: unary calls over one HTTP/2 connection, with the standard library alone.

An exec probe is timed as a whole process, and importing grpc took 60 of
its 100 ms, and most of its 37 MB.  The health protocol needs little of it:
one connection, a few unary calls, two tiny messages.  This module speaks
the gRPC over HTTP/2 protocol (PROTOCOL-HTTP2.md of the gRPC repository)
for those calls: the connection preface and SETTINGS, a HEADERS frame and a
DATA frame per call, the response headers, message and trailers, PING and
flow control answered, GOAWAY and RST_STREAM mapped to gRPC codes as grpc
does.  TLS (with ALPN ``h2``) comes from the standard library's :mod:`ssl`,
imported only for ``-tls``; header compression from :mod:`.hpack`.

Every wait is sliced into :data:`SIGNAL_LATENCY` steps that look at the
probe's :class:`~petsage_grpc.cli.probe.stop.Stop` flag, so a signal ends a
connect, a handshake or a call within 50 ms.
"""

from __future__ import annotations

import errno
import select
import socket
import struct
import time

from petsage_grpc.cli.probe import hpack
from petsage_grpc.cli.probe.stop import SIGNAL_LATENCY, Stop

# Not typing.TYPE_CHECKING: importing typing (and dataclasses) costs the probe milliseconds it is timed on.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import ssl
    from collections.abc import Sequence

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 0, 1, 3, 4, 5, 6, 7, 8, 9
END_STREAM = ACK = 0x1
END_HEADERS, PADDED, PRIORITY = 0x4, 0x8, 0x20
#: The largest frame either side sends or accepts: HTTP/2's default, which neither side raises here.
MAX_FRAME = 16384
#: The largest response message accepted, as grpc's default receive limit; a header block, 64 KiB.
MAX_MESSAGE, MAX_HEADER_BLOCK = 4 * 1024 * 1024, 64 * 1024
#: grpc's default port, for an address without one.
DEFAULT_PORT = 443

# gRPC status codes (the numbers are the protocol's).
OK, CANCELLED, UNKNOWN, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED = 0, 1, 2, 4, 8
PERMISSION_DENIED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, UNAUTHENTICATED = 7, 12, 13, 14, 16
#: HTTP/2 error codes of RST_STREAM and GOAWAY: their names, and the gRPC code grpc maps each to.
H2_ERRORS = ("NO_ERROR", "PROTOCOL_ERROR", "INTERNAL_ERROR", "FLOW_CONTROL_ERROR", "SETTINGS_TIMEOUT",
             "STREAM_CLOSED", "FRAME_SIZE_ERROR", "REFUSED_STREAM", "CANCEL", "COMPRESSION_ERROR", "CONNECT_ERROR",
             "ENHANCE_YOUR_CALM", "INADEQUATE_SECURITY", "HTTP_1_1_REQUIRED")
_H2_TO_GRPC = {7: UNAVAILABLE, 8: CANCELLED, 11: RESOURCE_EXHAUSTED, 12: PERMISSION_DENIED}
#: gRPC over HTTP/2: the gRPC code of a response whose HTTP status is not 200 and that carries none.
_HTTP_TO_GRPC = {400: INTERNAL, 401: UNAUTHENTICATED, 403: PERMISSION_DENIED, 404: UNIMPLEMENTED, 429: UNAVAILABLE,
                 502: UNAVAILABLE, 503: UNAVAILABLE, 504: UNAVAILABLE}


class ConnectError(Exception):
    """No connection within the time allowed, or a refusal; the message says why."""


class Cancelled(Exception):
    """A signal asked the probe to stop."""


class Target:
    """Where to connect: a TCP host and port, or a unix socket path; and the ``:authority`` to send."""

    __slots__ = ("authority", "host", "port", "unix_path")

    def __init__(self, host: str, port: int, unix_path: str | None, authority: str) -> None:
        self.host, self.port, self.unix_path, self.authority = host, port, unix_path, authority

    def __repr__(self) -> str:
        return f"Target({self.host!r}, {self.port}, {self.unix_path!r}, {self.authority!r})"


def parse_target(address: str) -> Target:
    """Read a grpc target: ``HOST:PORT``, ``[V6]:PORT``, ``HOST`` (port 443), ``dns:///HOST:PORT``, ``unix:PATH``.

    ``ipv4:`` and ``ipv6:`` prefixes and ``unix-abstract:NAME`` are read too, as grpc reads them.
    """
    if address.startswith("unix-abstract:"):
        return Target("", 0, "\0" + address[len("unix-abstract:"):], "localhost")
    if address.startswith("unix:"):
        path = address[len("unix:"):]
        return Target("", 0, path[2:] if path.startswith("//") else path, "localhost")
    rest = address
    for scheme in ("dns:", "ipv4:", "ipv6:"):
        if rest.startswith(scheme):
            rest = rest[len(scheme):]
            if rest.startswith("//"):  # dns://[DNS-SERVER]/HOST:PORT: the server named is not used
                rest = rest[2:].partition("/")[2]
            break
    if rest.startswith("["):
        host, _, after = rest[1:].partition("]")
        port = after[1:] if after.startswith(":") else ""
    elif rest.count(":") == 1:
        host, _, port = rest.partition(":")
    else:  # a bare host, or an IPv6 address without brackets
        host, port = rest, ""
    if not port.isdigit() or not 0 < int(port) <= 65535:
        if port:
            raise ConnectError(f"invalid port {port!r} in {address!r}")
        port = str(DEFAULT_PORT)
    shown = f"[{host}]" if ":" in host else host
    return Target(host, int(port), None, f"{shown}:{port}")


def _frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes((kind, flags)) + struct.pack(">I", stream) + payload


class CallResult:
    """One call's outcome: the gRPC code, its message, and the response message when the code is OK."""

    __slots__ = ("code", "message", "payload")

    def __init__(self, code: int, message: str, payload: bytes | None = None) -> None:
        self.code, self.message, self.payload = code, message, payload

    def __repr__(self) -> str:
        return f"CallResult({self.code}, {self.message!r}, {self.payload!r})"


class _Stream:
    __slots__ = ("data", "headers", "number", "result", "trailers")

    def __init__(self, number: int) -> None:
        self.number = number
        self.headers: dict[str, str] | None = None  # the response headers, once received
        self.trailers: dict[str, str] | None = None
        self.data = bytearray()
        self.result: CallResult | None = None  # set once the call is over


class Connection:
    """One HTTP/2 connection to a gRPC server, past its preface (see :func:`connect`)."""

    def __init__(self, sock: socket.socket, target: Target, scheme: str, stop: Stop) -> None:
        self._sock = sock
        self._target = target
        self._scheme = scheme
        self._stop = stop
        self._decoder = hpack.Decoder()
        self._buffer = bytearray()
        self._next_stream = 1
        self._goaway: tuple[int, str] | None = None  # (last stream id, why)
        self._block: tuple[int, int, bytearray] | None = None  # a header block awaiting CONTINUATION

    def close(self) -> None:
        """Close the socket (the server sees the connection end)."""
        try:
            self._sock.close()
        except OSError:
            pass

    # -- the calls -------------------------------------------------------------------------------------
    def unary(self, path: str, requests: Sequence[bytes], *, timeout: float,
              metadata: Sequence[tuple[str, str | bytes]], user_agent: str,
              gzip: bool = False) -> list[tuple[CallResult, float]]:
        """Call ``path`` once per request, all at once; each outcome and the seconds it took, in order."""
        started = time.monotonic()
        deadline = started + timeout
        headers: list[tuple[str, str | bytes]] = [
            (":method", "POST"), (":scheme", self._scheme), (":path", path), (":authority", self._target.authority),
            ("content-type", "application/grpc"), ("te", "trailers"), ("user-agent", user_agent),
            ("grpc-timeout", f"{max(1, int(timeout * 1000))}m"), ("grpc-accept-encoding", "identity"),
        ]
        if gzip:
            headers.append(("grpc-encoding", "gzip"))
        for name, value in metadata:
            if name.endswith("-bin"):  # binary metadata travels base64-encoded, unpadded
                import base64

                raw = value if isinstance(value, bytes) else value.encode()
                value = base64.b64encode(raw).rstrip(b"=")
            headers.append((name, value))
        block = hpack.encode(headers)
        streams: list[_Stream] = []
        finished: dict[int, float] = {}
        out = bytearray()
        for request in requests:
            stream = _Stream(self._next_stream)
            self._next_stream += 2
            streams.append(stream)
            out += self._headers_frames(stream.number, block)
            body = request
            flag = 0
            if gzip:
                import gzip as _gzip

                body, flag = _gzip.compress(request), 1
            message = bytes((flag,)) + struct.pack(">I", len(body)) + body
            for at in range(0, max(len(message), 1), MAX_FRAME):
                chunk = message[at:at + MAX_FRAME]
                last = at + MAX_FRAME >= len(message)
                out += _frame(DATA, END_STREAM if last else 0, stream.number, chunk)
        by_number = {stream.number: stream for stream in streams}
        try:
            self._sock.sendall(bytes(out))
        except OSError as exc:
            return [(CallResult(UNAVAILABLE, f"connection lost: {_reason(exc)}"), time.monotonic() - started)
                    for _ in streams]
        while any(stream.result is None for stream in streams):
            try:
                kind, flags, number, payload = self._read_frame(deadline)
            except TimeoutError:
                break
            except Cancelled:
                for stream in streams:
                    if stream.result is None:
                        stream.result = CallResult(CANCELLED, "context canceled")
                break
            except (OSError, ConnectionError, hpack.HpackError, ValueError) as exc:
                for stream in streams:
                    if stream.result is None:
                        stream.result = CallResult(UNAVAILABLE, f"connection lost: {_reason(exc)}")
                break
            self._handle(kind, flags, number, payload, by_number)
            for stream in streams:
                if stream.result is not None and stream.number not in finished:
                    finished[stream.number] = time.monotonic()
        now = time.monotonic()
        results = []
        for stream in streams:
            if stream.result is None:
                stream.result = CallResult(DEADLINE_EXCEEDED, "context deadline exceeded")
            results.append((stream.result, finished.get(stream.number, now) - started))
        return results

    def _headers_frames(self, number: int, block: bytes) -> bytes:
        pieces = [block[at:at + MAX_FRAME] for at in range(0, len(block), MAX_FRAME)] or [b""]
        out = _frame(HEADERS, END_HEADERS if len(pieces) == 1 else 0, number, pieces[0])
        for index, piece in enumerate(pieces[1:], 1):
            out += _frame(CONTINUATION, END_HEADERS if index == len(pieces) - 1 else 0, number, piece)
        return out

    # -- frames in -------------------------------------------------------------------------------------
    def _handle(self, kind: int, flags: int, number: int, payload: bytes, streams: dict[int, _Stream]) -> None:
        if kind == SETTINGS and not flags & ACK:
            self._send(_frame(SETTINGS, ACK, 0))
        elif kind == PING and not flags & ACK:
            self._send(_frame(PING, ACK, 0, payload))
        elif kind == GOAWAY:
            last, code = struct.unpack(">II", payload[:8]) if len(payload) >= 8 else (0, 1)
            last &= 0x7FFFFFFF
            name = H2_ERRORS[code] if code < len(H2_ERRORS) else str(code)
            debug = payload[8:].decode("utf-8", "replace")
            self._goaway = (last, f"the server sent GOAWAY ({name}{': ' + debug if debug else ''})")
            for refused in streams.values():
                if refused.number > last and refused.result is None:
                    refused.result = CallResult(UNAVAILABLE, self._goaway[1])
        elif kind in (HEADERS, CONTINUATION):
            self._header_block(kind, flags, number, payload, streams)
        elif kind == DATA:
            receiving = streams.get(number)
            counted = len(payload)  # flow control counts the padding too
            if flags & PADDED and payload:
                payload = payload[1:len(payload) - payload[0]]
            if receiving is not None and receiving.result is None:
                receiving.data += payload
                if len(receiving.data) > MAX_MESSAGE + 5:
                    receiving.result = CallResult(RESOURCE_EXHAUSTED, f"response larger than {MAX_MESSAGE} bytes")
            if counted:  # give the window back: a large List answer must not stall
                increment = struct.pack(">I", counted)
                self._send(_frame(WINDOW_UPDATE, 0, 0, increment)
                           + (_frame(WINDOW_UPDATE, 0, number, increment) if not flags & END_STREAM else b""))
            if flags & END_STREAM and receiving is not None and receiving.result is None:
                receiving.result = self._finish(receiving)
        elif kind == RST_STREAM:
            reset = streams.get(number)
            if reset is not None and reset.result is None:
                code = struct.unpack(">I", payload[:4])[0] if len(payload) >= 4 else 2
                name = H2_ERRORS[code] if code < len(H2_ERRORS) else str(code)
                reset.result = CallResult(_H2_TO_GRPC.get(code, INTERNAL),
                                          f"stream terminated by RST_STREAM with error code: {name}")

    def _header_block(self, kind: int, flags: int, number: int, payload: bytes, streams: dict[int, _Stream]) -> None:
        if kind == HEADERS:
            if flags & PADDED and payload:
                payload = payload[1:len(payload) - payload[0]]
            if flags & PRIORITY:
                payload = payload[5:]
            self._block = (number, flags & END_STREAM, bytearray(payload))
        elif self._block is None or self._block[0] != number:
            raise ValueError("CONTINUATION without HEADERS")
        else:
            self._block[2].extend(payload)
        if len(self._block[2]) > MAX_HEADER_BLOCK:
            raise ValueError(f"header block over {MAX_HEADER_BLOCK} bytes")
        if not flags & END_HEADERS:
            return
        number, ends, block = self._block
        self._block = None
        fields = dict(self._decoder.decode(bytes(block)))  # decoded even if unused: the table must follow
        stream = streams.get(number)
        if stream is None or stream.result is not None:
            return
        if stream.headers is None:
            stream.headers = fields
            if ends:  # Trailers-Only: the status is in the only header block
                stream.trailers = fields
                stream.result = self._finish(stream)
        else:
            stream.trailers = fields
            stream.result = self._finish(stream)

    def _finish(self, stream: _Stream) -> CallResult:
        """The outcome of a stream the server has ended."""
        headers, trailers = stream.headers or {}, stream.trailers or {}
        status = trailers.get("grpc-status")
        if status is None:
            http = headers.get(":status", "")
            if http != "200":
                code = _HTTP_TO_GRPC.get(int(http) if http.isdigit() else 0, UNKNOWN)
                return CallResult(code, f"unexpected HTTP status code received from server: {http}")
            return CallResult(INTERNAL, "server closed the stream without sending trailers")
        code = int(status) if status.isdigit() else UNKNOWN
        message = _percent_decode(trailers.get("grpc-message", ""))
        if code != OK:
            return CallResult(code, message)
        data = bytes(stream.data)
        if len(data) < 5 or len(data) - 5 != struct.unpack(">I", data[1:5])[0]:
            return CallResult(INTERNAL, "the response is not one whole gRPC message")
        body = data[5:]
        if data[0] & 1:
            encoding = headers.get("grpc-encoding", "identity")
            try:
                import zlib

                body = zlib.decompress(body, {"gzip": 31, "deflate": 15}[encoding])
            except (KeyError, zlib.error):
                return CallResult(INTERNAL, f"cannot decompress a response encoded {encoding!r}")
        return CallResult(OK, "", body)

    # -- bytes ----------------------------------------------------------------------------------------
    def _send(self, data: bytes) -> None:
        try:
            self._sock.sendall(data)
        except OSError:
            pass  # the next read reports the connection's end

    def _read_frame(self, deadline: float) -> tuple[int, int, int, bytes]:
        """The next frame: (type, flags, stream, payload); TimeoutError past ``deadline``, Cancelled on a signal."""
        while True:
            if len(self._buffer) >= 9:
                length = int.from_bytes(self._buffer[:3], "big")
                if length > MAX_FRAME:
                    raise ValueError(f"frame of {length} bytes beyond {MAX_FRAME}")
                if len(self._buffer) >= 9 + length:
                    head, self._buffer = bytes(self._buffer[:9 + length]), self._buffer[9 + length:]
                    return head[3], head[4], int.from_bytes(head[5:9], "big") & 0x7FFFFFFF, head[9:]
            self._receive(deadline)

    def _receive(self, deadline: float) -> None:
        while True:
            if self._stop.requested:
                raise Cancelled()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError()
            self._sock.settimeout(min(remaining, SIGNAL_LATENCY))
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            if not data:
                raise ConnectionError(self._goaway[1] if self._goaway else "the server closed the connection")
            self._buffer += data
            return


def connect(target: Target, *, timeout: float, stop: Stop, tls: ssl.SSLContext | None = None,
            server_name: str | None = None) -> Connection:
    """Connect to ``target`` and exchange HTTP/2 prefaces (TLS first with ``tls``), within ``timeout`` seconds.

    Raises :class:`ConnectError` (refused, unknown host, failed handshake,
    no answer in time: the message says which), or :class:`Cancelled`.
    """
    deadline = time.monotonic() + timeout
    sock = _open_socket(target, deadline, stop)
    try:
        if tls is not None:
            sock = _handshake(sock, tls, server_name or target.host or "localhost", deadline, stop)
        sock.settimeout(SIGNAL_LATENCY)
        sock.sendall(PREFACE + _frame(SETTINGS, 0, 0, struct.pack(">HI", 2, 0)))  # ENABLE_PUSH 0
        connection = Connection(sock, target, "https" if tls is not None else "http", stop)
        while True:  # the server's preface is a SETTINGS frame
            try:
                kind, flags, _, _ = connection._read_frame(deadline)
            except TimeoutError:
                raise ConnectError("no HTTP/2 answer from the server in time") from None
            except (ConnectionError, ValueError) as exc:
                raise ConnectError(f"no HTTP/2 answer: {_reason(exc)}") from None
            if kind == SETTINGS and not flags & ACK:
                connection._send(_frame(SETTINGS, ACK, 0))
                return connection
    except BaseException:
        sock.close()
        raise


def _open_socket(target: Target, deadline: float, stop: Stop) -> socket.socket:
    if target.unix_path is not None:
        candidates: list[tuple[int, object]] = [(socket.AF_UNIX, target.unix_path)]
    else:
        candidates = _resolve(target, deadline, stop)
    last_error = "no address"
    for family, address in candidates:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            code = sock.connect_ex(address)  # type: ignore[arg-type]
            while code in (errno.EINPROGRESS, errno.EAGAIN, errno.EALREADY):
                if stop.requested:
                    raise Cancelled()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ConnectError("connection attempt timed out")
                if select.select([], [sock], [], min(remaining, SIGNAL_LATENCY))[1]:
                    code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                raise OSError(code, _strerror(code))
            if family != socket.AF_UNIX:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        except OSError as exc:
            sock.close()
            last_error = _reason(exc)
        except BaseException:
            sock.close()
            raise
    raise ConnectError(last_error)


def _resolve(target: Target, deadline: float, stop: Stop) -> list[tuple[int, object]]:
    """getaddrinfo, on a thread of its own when the host is a name: a slow resolver must not outlast the timeout."""
    # An ASCII name as bytes: a str is encoded with the idna codec, whose import alone takes a millisecond.
    host = target.host.encode("ascii") if target.host.isascii() else target.host
    try:
        infos = socket.getaddrinfo(host, target.port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
        return [(family, address) for family, _, _, _, address in infos]
    except socket.gaierror:
        pass
    import threading  # only for a name to resolve

    answer: list[object] = []
    done = threading.Event()

    def lookup() -> None:
        try:
            answer.append(socket.getaddrinfo(host, target.port, type=socket.SOCK_STREAM))
        except OSError as exc:
            answer.append(exc)
        done.set()

    threading.Thread(target=lookup, daemon=True).start()
    while not done.wait(min(max(0.0, deadline - time.monotonic()), SIGNAL_LATENCY)):
        if stop.requested:
            raise Cancelled()
        if time.monotonic() >= deadline:
            raise ConnectError(f"no answer resolving {target.host!r} in time")
    result = answer[0]
    if isinstance(result, OSError):
        raise ConnectError(f"cannot resolve {target.host!r}: {_reason(result)}")
    assert isinstance(result, list)
    return [(family, address) for family, _, _, _, address in result]


def _handshake(sock: socket.socket, context: ssl.SSLContext, server_name: str, deadline: float,
               stop: Stop) -> socket.socket:
    import ssl

    context.set_alpn_protocols(["h2"])
    wrapped = context.wrap_socket(sock, server_hostname=server_name, do_handshake_on_connect=False)
    while True:
        try:
            wrapped.do_handshake()
            break
        except ssl.SSLWantReadError:
            readable, writable = [wrapped], []
        except ssl.SSLWantWriteError:
            readable, writable = [], [wrapped]
        except (ssl.SSLError, OSError) as exc:
            raise ConnectError(f"TLS handshake failed: {_reason(exc)}") from None
        if stop.requested:
            raise Cancelled()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ConnectError("TLS handshake timed out")
        select.select(readable, writable, [], min(remaining, SIGNAL_LATENCY))
    if wrapped.selected_alpn_protocol() != "h2":
        raise ConnectError("the server did not agree to HTTP/2 over TLS (ALPN h2)")
    return wrapped


def _percent_decode(text: str) -> str:
    """grpc-message is percent-encoded UTF-8 (gRPC over HTTP/2)."""
    if "%" not in text:
        return text
    from urllib.parse import unquote

    return unquote(text, errors="replace")


def _strerror(code: int) -> str:
    import os

    return os.strerror(code)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
