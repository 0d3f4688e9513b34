"""Binding the listening address, with a precise reason when it cannot be done.

grpc reports only "Failed to bind"; a trial bind before grpc's tells a taken
port from an unknown host or a missing permission.
"""

from __future__ import annotations

import errno
import socket
from typing import Any


class BindError(RuntimeError):
    """The server cannot listen on the configured address."""


def check_bindable(address: str, what: str = "") -> None:
    """Fail with a precise :class:`BindError` if ``address`` cannot be listened on.

    The trial bind uses SO_REUSEADDR, as grpc does, and no SO_REUSEPORT.
    ``what`` names the listener in the message (``"HTTP "``).
    """
    if address.startswith("unix:"):
        return
    host, _, port_text = address.rpartition(":")
    host, port = host.strip("[]"), int(port_text)
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise BindError(f"cannot listen on {what}{address}: cannot resolve {host!r} ({exc.strerror})") from None
    for family, kind, proto, _, sockaddr in infos:
        try:
            bind_socket(family, kind, proto, sockaddr, socket.SO_REUSEADDR).close()
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise BindError(f"cannot listen on {what}{address}: the port is already in use") from None
            if exc.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL) and len(infos) > 1:
                continue  # e.g. IPv6 disabled: grpc falls back to what works
            raise BindError(f"cannot listen on {what}{address}: {exc.strerror}") from None


def bind_socket(family: int, kind: int, proto: int, sockaddr: tuple[Any, ...], reuse: int) -> socket.socket:
    """A socket bound to ``sockaddr`` with ``reuse`` (SO_REUSEADDR or SO_REUSEPORT) set.

    IPv6 sockets are dual-stack, as grpc binds them.  Raises ``OSError``.
    """
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, reuse, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(sockaddr)
    except OSError:
        sock.close()
        raise
    return sock
