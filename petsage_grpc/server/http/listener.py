"""An HTTP/1.1 listener on the server's own event loop: h11 parses, this module bounds what a client may hold.

h11 (a small, well-kept HTTP/1.1 state machine with no I/O of its own)
parses requests and frames answers; everything a client could use to hold
the server is bounded here:

- a request head (request line and headers) may be at most
  :data:`MAX_HEAD_BYTES`; a longer one gets 431 and the connection closes;
- a client has :data:`HEAD_TIMEOUT` seconds to send a whole request head,
  counted from the connection's start or from the end of the previous
  answer (so an idle keep-alive connection closes too), and the same time to
  read an answer; a slow or silent client is closed (408 if it had begun);
- at most ``max_connections`` connections are open; at the cap a new one
  replaces the oldest connection that is waiting for a request head (a slow
  client cannot keep a real one out), or is refused if every connection is
  being answered;
- request bodies are never read: an answer to a request that carried one
  closes the connection;
- one request per connection is answered at a time, and reading pauses
  meanwhile, so pipelined requests cost the server nothing until their turn.

Answers come from a handler (:mod:`petsage_grpc.server.http.routes`).
Closing stops accepting, lets the answers in progress finish, then closes
every connection.
"""

from __future__ import annotations

import asyncio
import errno
import http
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast
from urllib.parse import parse_qs, urlsplit

import h11

from petsage_grpc.server.binding import BindError, bind_socket

if TYPE_CHECKING:
    import ssl

_LOGGER = logging.getLogger(__package__)
#: The longest request head (request line and headers) read, in bytes.
MAX_HEAD_BYTES = 8 * 1024
#: Seconds a client has to send a whole request head, or to read an answer.
HEAD_TIMEOUT = 5.0
#: Seconds between two log lines about connections the cap closed.
CAP_LOG_INTERVAL = 60.0


@dataclass(frozen=True)
class Request:
    """One HTTP request, as a handler sees it."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-case names; a repeated header keeps its last value
    peer: str


@dataclass(frozen=True)
class Reply:
    """A handler's answer: status, headers (Content-Length and Date are added) and body."""

    status: int
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)


Handler = Callable[[Request], Awaitable[Reply]]


@dataclass
class Counts:
    """What the listener has done to connections it did not answer, since it started."""

    evicted: int = 0  # closed at the cap to make room: they had not sent a whole request
    refused: int = 0  # closed at the cap: every open connection was being answered
    timed_out: int = 0  # closed after HEAD_TIMEOUT without a whole request, or with an answer unread
    malformed: int = 0  # closed after a request h11 could not parse (400, 431, ...)


class _Connection(asyncio.Protocol):
    """One client connection: its h11 state, its timer and the answer in progress."""

    def __init__(self, listener: HttpListener) -> None:
        self._listener = listener
        self._loop = asyncio.get_running_loop()
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._answering: asyncio.Task[None] | None = None
        self._began = False  # bytes of a request head have arrived since the last answer
        self.peer = ""

    @property
    def waiting(self) -> bool:
        """No answer is in progress: the connection waits for (the rest of) a request head."""
        return self._answering is None

    @property
    def answering(self) -> asyncio.Task[None] | None:
        """The answer in progress, if any."""
        return self._answering

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's
        peer = self._transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        if self._listener.admit(self):
            self._arm()
        else:
            self._transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self._listener.forget(self)
        if self._timer is not None:
            self._timer.cancel()
        if self._answering is not None:
            self._answering.cancel()  # the client has gone: nobody reads the answer

    def data_received(self, data: bytes) -> None:
        self._began = True
        self._h11.receive_data(data)
        self._next()

    def eof_received(self) -> bool:
        self._h11.receive_data(b"")
        self._next()
        return True  # half-open: an answer in progress may still be written

    def close(self) -> None:
        """Close now (answers written so far are still flushed)."""
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        """Drop the connection at once, unsent data and all."""
        if self._transport is not None:
            self._transport.abort()

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_later(HEAD_TIMEOUT, self._timed_out)

    def _timed_out(self) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        self._listener.counts.timed_out += 1
        if transport.get_write_buffer_size():
            self.abort()  # the client does not read its answer
            return
        if self.waiting and self._began:
            self._send_error(408, f"no whole request head within {HEAD_TIMEOUT:g}s")
        self.close()

    def _next(self) -> None:
        if self._answering is not None or self._transport is None or self._transport.is_closing():
            return
        try:
            event = self._h11.next_event()
        except h11.RemoteProtocolError as exc:
            self._listener.counts.malformed += 1
            self._send_error(exc.error_status_hint, str(exc))
            self.close()
            return
        if isinstance(event, h11.Request):
            if _head_size(event) > MAX_HEAD_BYTES:  # h11 bounds only a head still arriving, not one read whole
                self._listener.counts.malformed += 1
                self._send_error(431, f"request head over {MAX_HEAD_BYTES} bytes")
                self.close()
                return
            self._transport.pause_reading()  # one request at a time: pipelined ones wait in the kernel
            self._answering = self._loop.create_task(self._answer(event))
        elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
            self.close()

    async def _answer(self, event: h11.Request) -> None:
        target = urlsplit(event.target.decode("ascii", "replace"))
        headers = {name.decode("ascii", "replace"): value.decode("latin-1") for name, value in event.headers}
        request = Request(event.method.decode("ascii", "replace"), target.path,
                          parse_qs(target.query, keep_blank_values=True), headers, self.peer)
        try:
            reply = await self._listener.handle(request)
        except Exception:  # a bug in a route: the caller gets a 500, the log gets the traceback
            _LOGGER.exception("HTTP %s %s failed", request.method, request.path)
            reply = Reply(500, b"internal error: see the server's log\n",
                          [("Content-Type", "text/plain; charset=utf-8")])
        assert self._transport is not None
        if not self._transport.is_closing():
            self._send(reply, head_only=request.method == "HEAD")
        self._answering = None
        self._finish_cycle()

    def _finish_cycle(self) -> None:
        """After an answer: the next request on a kept-alive connection, or close."""
        assert self._transport is not None
        if self._h11.their_state is h11.SEND_BODY:
            try:
                self._h11.next_event()  # a request without a body ends at once
            except h11.RemoteProtocolError:
                pass
        if self._listener.closing or self._h11.our_state is not h11.DONE or self._h11.their_state is not h11.DONE:
            self.close()  # a body we did not read, HTTP/1.0, "Connection: close", or shutting down
            return
        self._h11.start_next_cycle()
        self._began = False
        self._arm()
        self._transport.resume_reading()
        self._next()

    def _send(self, reply: Reply, *, head_only: bool) -> None:
        assert self._transport is not None
        headers = [*reply.headers, ("Content-Length", str(len(reply.body))), ("Date", _http_date())]
        if self._listener.closing:
            headers.append(("Connection", "close"))
        data = self._h11.send(h11.Response(status_code=reply.status, headers=headers, reason=_phrase(reply.status)))
        data = data or b""
        if not head_only and reply.body:
            data += self._h11.send(h11.Data(data=reply.body)) or b""
        data += self._h11.send(h11.EndOfMessage()) or b""
        self._transport.write(data)

    def _send_error(self, status: int, reason: str) -> None:
        """Answer a request that cannot be read whole, and close: written as bytes, h11 has no request to answer."""
        if self._transport is None or self._h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        body = f"{reason}\n".encode()
        self._transport.write(
            f"HTTP/1.1 {status} {_phrase(status)}\r\nContent-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nDate: {_http_date()}\r\nConnection: close\r\n\r\n".encode() + body
        )


class HttpListener:
    """Serves ``handle``'s answers on one or more bound sockets, with the limits of the module docstring."""

    def __init__(self, handle: Handler, *, max_connections: int) -> None:
        self.handle = handle
        self.max_connections = max_connections
        self.counts = Counts()
        self.closing = False
        self._connections: dict[_Connection, None] = {}  # in the order they came
        self._servers: list[asyncio.Server] = []
        self._cap_logged_at = float("-inf")

    @property
    def connections(self) -> int:
        """How many connections are open."""
        return len(self._connections)

    async def start(self, address: str, *, tls: ssl.SSLContext | None = None, share_port: bool = False) -> str:
        """Listen on ``address`` (HOST:PORT; TLS with ``tls``); return it with port 0 replaced.

        Raises :class:`~petsage_grpc.server.binding.BindError` with the reason when it cannot.
        """
        loop = asyncio.get_running_loop()
        host, _, port_text = address.rpartition(":")
        port = int(port_text)
        try:
            infos = socket.getaddrinfo(host.strip("[]") or None, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
        except socket.gaierror as exc:
            raise BindError(f"cannot listen on HTTP {address}: cannot resolve {host!r} ({exc.strerror})") from None
        reuse = socket.SO_REUSEPORT if share_port else socket.SO_REUSEADDR
        for family, kind, proto, _, sockaddr in dict.fromkeys(infos):
            try:
                sock = bind_socket(family, kind, proto, (sockaddr[0], port, *sockaddr[2:]), reuse)
            except OSError as exc:
                await self.close(0)
                reason = "the port is already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
                raise BindError(f"cannot listen on HTTP {address}: {reason}") from None
            port = sock.getsockname()[1]  # port 0: every address gets the port the first one got
            self._servers.append(await loop.create_server(lambda: _Connection(self), sock=sock, ssl=tls,
                                                          backlog=min(self.max_connections, 4096),
                                                          start_serving=False))
        return f"{host}:{port}"

    async def start_serving(self) -> None:
        """Accept connections from now on (the sockets were bound by :meth:`start`)."""
        for server in self._servers:
            await server.start_serving()

    def admit(self, connection: _Connection) -> bool:
        """Take ``connection`` in, making room at the cap if a waiting one can go; False to refuse it."""
        if self.closing:
            return False
        if len(self._connections) >= self.max_connections:
            oldest = next((c for c in self._connections if c.waiting), None)
            if oldest is None:
                self.counts.refused += 1
                self._log_cap()
                return False
            self.counts.evicted += 1
            self._log_cap()
            self._connections.pop(oldest)
            oldest.abort()
        self._connections[connection] = None
        return True

    def forget(self, connection: _Connection) -> None:
        """A connection has closed."""
        self._connections.pop(connection, None)

    def _log_cap(self) -> None:
        now = time.monotonic()
        if now - self._cap_logged_at >= CAP_LOG_INTERVAL:
            self._cap_logged_at = now
            _LOGGER.warning("HTTP connection cap (%d) reached: %d waiting connection(s) closed to make room, "
                            "%d new one(s) refused so far", self.max_connections, self.counts.evicted,
                            self.counts.refused)

    async def close(self, grace: float) -> None:
        """Stop accepting, let answers in progress finish within ``grace`` seconds, then close every connection."""
        self.closing = True
        for server in self._servers:
            server.close()
        for connection in list(self._connections):
            if connection.waiting:
                connection.close()
        answers = [c.answering for c in self._connections if c.answering is not None]
        if answers:
            await asyncio.wait(answers, timeout=grace)  # each closes its connection once written
        for connection in list(self._connections):
            connection.abort()
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()


_date_cache: tuple[int, str] = (0, "")
_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def _http_date() -> str:
    """The ``Date`` header's value (RFC 9110's IMF-fixdate), formatted once a second."""
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        t = time.gmtime(now)
        _date_cache = (now, f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year} "
                            f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} GMT")
    return _date_cache[1]


def _phrase(status: int) -> str:
    """The reason phrase of ``status`` (``Not Found``), or ``Error`` for a code without one."""
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def _head_size(request: h11.Request) -> int:
    """The bytes of a request head, about: request line and headers."""
    return len(request.method) + len(request.target) + 12 + sum(len(n) + len(v) + 4 for n, v in request.headers)
