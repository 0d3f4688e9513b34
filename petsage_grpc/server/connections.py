"""How many connections the gRPC port holds, read from the kernel, and the check that watches the cap.

grpc core closes a connection past ``--max-connections``, or one silent past
``--handshake-timeout``, without a word to the application.  The process's
own descriptors tell how many it holds: its connected TCP sockets whose local
port is the gRPC port.
The ``grpc_connections`` check (non-critical: SmokeTest turns DEGRADED,
readiness stays) fails once they reach nine tenths of the cap, so a flood of
connections is logged when it begins and ends, and shows in the metrics.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

from petsage_grpc.health.checks import Check, CheckFailed

#: The check's name.
CONNECTIONS_CHECK = "grpc_connections"
#: The share of ``--max-connections`` at which the check fails.
NEAR_THE_CAP = 0.9


def established(port: int) -> int:
    """The connected TCP sockets of this process whose local port is ``port``.

    Each descriptor of ``/proc/self/fd`` that is a socket is looked at
    through a socket object that borrows it: no table of the whole machine is
    read (under a flood of reconnections ``/proc/net/tcp`` holds every
    TIME_WAIT socket, and reading it takes seconds).
    """
    count = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            if not os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                continue
            borrowed = socket.socket(fileno=int(name))
        except OSError:  # closed meanwhile
            continue
        try:
            if (borrowed.type == socket.SOCK_STREAM and borrowed.family in (socket.AF_INET, socket.AF_INET6)
                    and not borrowed.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
                    and borrowed.getsockname()[1] == port):
                count += 1
        except OSError:
            pass
        finally:
            borrowed.detach()  # the descriptor stays grpc's
    return count


def connections_check(port: Callable[[], int | None], limit: int, interval: float) -> Check:
    """The non-critical ``grpc_connections`` check of the gRPC port (``port()``: None before it is bound)."""

    def count() -> str:
        bound = port()
        if bound is None:
            return "not listening yet"
        open_now = established(bound)
        if open_now >= limit * NEAR_THE_CAP:
            raise CheckFailed(f"{open_now} of {limit} gRPC connections open: at the cap, new ones are refused")
        return f"{open_now} of {limit} gRPC connections open"

    return Check(CONNECTIONS_CHECK, count, interval=interval, timeout=5.0, critical=False)
