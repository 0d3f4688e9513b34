"""``serve --workers N``: N server processes sharing one port through SO_REUSEPORT.

A Python gRPC server uses one core; one process per core is how it uses
more.  The kernel spreads new connections over the workers' listening
sockets.  The supervising process reserves the port first (so that port 0
names one port for all workers and a port taken by another program still
fails with one line), then starts each worker by running the same command
again with ``PETSAGE_GRPC_WORKER`` set, waits until every worker serves,
forwards SIGTERM/SIGINT, and exits with the worst exit code.

Each worker is a whole server: its own checks, health statuses, drain and
logging.  A worker that exits on its own stops the others, and the
supervisor exits non-zero, so that Kubernetes restarts the pod rather than
run it at part strength.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from types import FrameType

from petsage_grpc.binding import BindError, check_bindable

_LOGGER = logging.getLogger("petsage_grpc.server")  # kept at INFO: these are lifecycle lines
#: In a worker: "I/N", its number and the number of workers.
WORKER_ENV = "PETSAGE_GRPC_WORKER"
#: In a worker: the address the supervisor reserved (port 0 resolved).
ADDRESS_ENV = "PETSAGE_GRPC_WORKER_ADDRESS"
#: In a worker: the file descriptor on which it reports that it serves.
READY_FD_ENV = "PETSAGE_GRPC_WORKER_READY_FD"
#: How long every worker gets to start serving.
START_TIMEOUT = 60.0


@dataclass(frozen=True)
class Worker:
    """What a worker process is told by its supervisor."""

    name: str  # "I/N"
    address: str
    ready_fd: int

    def report_ready(self) -> None:
        """Tell the supervisor this worker serves (once)."""
        os.write(self.ready_fd, b".")
        os.close(self.ready_fd)


def current() -> Worker | None:
    """The worker this process is, or None for a supervisor or a single process."""
    name = os.environ.get(WORKER_ENV)
    if name is None:
        return None
    return Worker(name, os.environ[ADDRESS_ENV], int(os.environ[READY_FD_ENV]))


def reserve(address: str) -> tuple[socket.socket, str]:
    """Bind (without listening) a SO_REUSEPORT socket on ``address``; return it and the address bound.

    Holding it keeps the port ours while workers bind the same port; the
    kernel only hands connections to listening sockets.
    """
    check_bindable(address)
    host, _, port = address.rpartition(":")
    family, kind, proto, _, sockaddr = socket.getaddrinfo(
        host.strip("[]") or None, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(sockaddr)
    except OSError as exc:
        sock.close()
        raise BindError(f"cannot listen on {address}: {exc.strerror}") from None
    return sock, f"{host}:{sock.getsockname()[1]}"


def supervise(address: str, count: int) -> int:
    """Run ``count`` workers serving ``address`` until they stop; return the exit code."""
    reservation, bound = reserve(address)
    try:
        return _Supervisor(bound, count).run()
    finally:
        reservation.close()


class _Supervisor:
    """Starts the workers, forwards signals to them and collects their exit codes."""

    def __init__(self, address: str, count: int) -> None:
        self.address = address
        self.count = count
        self.children: list[subprocess.Popen[bytes]] = []
        self.stopping = False

    def run(self) -> int:
        read_end, write_end = os.pipe()
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            for number in range(1, self.count + 1):
                self.children.append(subprocess.Popen(
                    [sys.executable, *sys.orig_argv[1:]],
                    env={**os.environ, WORKER_ENV: f"{number}/{self.count}", ADDRESS_ENV: self.address,
                         READY_FD_ENV: str(write_end)},
                    pass_fds=(write_end,),
                    start_new_session=True,  # Ctrl-C reaches the supervisor only, which forwards it
                ))
            os.close(write_end)
            write_end = -1
            if self._wait_ready(read_end):
                _LOGGER.info("serving on %s with %d workers (pids %s)", self.address, self.count,
                             ", ".join(str(c.pid) for c in self.children))
            else:
                self._stop(signal.SIGTERM)
            return self._wait_all()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            for fd in (read_end, write_end):
                if fd >= 0:
                    os.close(fd)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if not self.stopping:
            _LOGGER.info("received %s: stopping %d worker(s)", signal.Signals(signum).name, self.count)
        self._stop(signum)

    def _stop(self, signum: int) -> None:
        """Send ``signum`` to every live worker (a second one makes each exit at once)."""
        self.stopping = True
        for child in self.children:
            if child.poll() is None:
                child.send_signal(signum)

    def _wait_ready(self, read_end: int) -> bool:
        """Wait until every worker reports serving; False if one exits or time runs out first."""
        deadline = time.monotonic() + START_TIMEOUT
        ready = 0
        while ready < self.count and not self.stopping:
            exited = [c for c in self.children if c.poll() is not None]
            if exited:
                _LOGGER.error("worker pid %d exited with %d before serving", exited[0].pid, exited[0].returncode)
                return False
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                _LOGGER.error("only %d of %d workers serve after %gs", ready, self.count, START_TIMEOUT)
                return False
            if select.select([read_end], [], [], min(remaining, 0.1))[0]:
                ready += len(os.read(read_end, self.count))
        return ready == self.count

    def _wait_all(self) -> int:
        """Wait for every worker; one that exits on its own stops the others.  Return the worst code."""
        codes = []
        for _ in self.children:
            pid, status = os.wait()  # retried by Python when a signal interrupts it
            code = os.waitstatus_to_exitcode(status)
            codes.append(128 - code if code < 0 else code)  # killed by signal N: 128+N, as a shell says
            if not self.stopping:
                _LOGGER.error("worker pid %d exited with %d; stopping the others", pid, codes[-1])
                self._stop(signal.SIGTERM)
        for child in self.children:
            child.returncode = 0  # reaped above: keep Popen from waiting again
        worst = max(codes, default=1)
        _LOGGER.info("all %d workers stopped; exit code %d", self.count, worst)
        return worst
