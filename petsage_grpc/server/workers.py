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

from petsage_grpc.server.binding import BindError, bind_socket, check_bindable

_LOGGER = logging.getLogger(__package__)
#: In a worker: "I/N", its number and the number of workers.
WORKER_ENV = "PETSAGE_GRPC_WORKER"
#: In a worker: the address the supervisor reserved (port 0 resolved).
ADDRESS_ENV = "PETSAGE_GRPC_WORKER_ADDRESS"
#: In a worker: the HTTP address the supervisor reserved, if HTTP is served.
HTTP_ADDRESS_ENV = "PETSAGE_GRPC_WORKER_HTTP_ADDRESS"
#: In a worker: the file descriptor on which it reports that it serves.
READY_FD_ENV = "PETSAGE_GRPC_WORKER_READY_FD"
#: In a worker: the file descriptor that reads EOF when the supervisor is gone.
LIFELINE_FD_ENV = "PETSAGE_GRPC_WORKER_LIFELINE_FD"
#: How long every worker gets to start serving.
START_TIMEOUT = 60.0


@dataclass(frozen=True)
class Worker:
    """What a worker process is told by its supervisor."""

    name: str  # "I/N"
    address: str
    http_address: str | None
    ready_fd: int
    lifeline_fd: int  # reads EOF once the supervisor has exited

    def report_ready(self) -> None:
        """Tell the supervisor this worker serves (once)."""
        os.write(self.ready_fd, b".")
        os.close(self.ready_fd)


def current_worker() -> Worker | None:
    """The worker this process is, or None for a supervisor or a single process."""
    name = os.environ.get(WORKER_ENV)
    if name is None:
        return None
    return Worker(name, os.environ[ADDRESS_ENV], os.environ.get(HTTP_ADDRESS_ENV),
                  int(os.environ[READY_FD_ENV]), int(os.environ[LIFELINE_FD_ENV]))


def reserve(address: str, what: str = "") -> tuple[socket.socket, str]:
    """Bind (without listening) a SO_REUSEPORT socket on ``address``; return it and the address bound.

    Holding it keeps the port ours while workers bind the same port; the
    kernel only hands connections to listening sockets.
    """
    check_bindable(address, what)
    host, _, port = address.rpartition(":")
    family, kind, proto, _, sockaddr = socket.getaddrinfo(
        host.strip("[]") or None, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    try:
        sock = bind_socket(family, kind, proto, sockaddr, socket.SO_REUSEPORT)
    except OSError as exc:
        raise BindError(f"cannot listen on {what}{address}: {exc.strerror}") from None
    return sock, f"{host}:{sock.getsockname()[1]}"


def supervise(address: str, count: int, http_address: str | None = None) -> int:
    """Run ``count`` workers serving ``address`` (and ``http_address``) until they stop; return the exit code."""
    reservations = []
    try:
        reservation, bound = reserve(address)
        reservations.append(reservation)
        http_bound = None
        if http_address is not None:
            reservation, http_bound = reserve(http_address, "HTTP ")
            reservations.append(reservation)
        return _Supervisor(bound, http_bound, count).run()
    finally:
        for reservation in reservations:
            reservation.close()


class _Supervisor:
    """Starts the workers, forwards signals to them and collects their exit codes.

    The signal handler only records and forwards: logging from it could
    deadlock on the log queue's lock if the signal lands inside a log call.
    """

    def __init__(self, address: str, http_address: str | None, count: int) -> None:
        self.address = address
        self.http_address = http_address
        self.count = count
        self.children: list[subprocess.Popen[bytes]] = []
        self.stopping = False
        self.signals: list[int] = []  # received, not yet logged
        self.forwarded: set[int] = set()  # signals sent to the workers

    def run(self) -> int:
        """Start the workers and watch them until all have exited; return the worst exit code."""
        ready_read, ready_write = os.pipe()
        # The workers hold the read end of the lifeline; when the supervisor
        # dies, even by SIGKILL, they read EOF and shut down on their own.
        lifeline_read, lifeline_write = os.pipe()
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            for number in range(1, self.count + 1):
                self.children.append(subprocess.Popen(
                    [sys.executable, *sys.orig_argv[1:]],
                    env={**os.environ, WORKER_ENV: f"{number}/{self.count}", ADDRESS_ENV: self.address,
                         **({} if self.http_address is None else {HTTP_ADDRESS_ENV: self.http_address}),
                         READY_FD_ENV: str(ready_write), LIFELINE_FD_ENV: str(lifeline_read)},
                    pass_fds=(ready_write, lifeline_read),
                    start_new_session=True,  # Ctrl-C reaches the supervisor only, which forwards it
                ))
            os.close(ready_write)
            os.close(lifeline_read)
            return self._watch(ready_read)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            for fd in (ready_read, ready_write, lifeline_read, lifeline_write):
                try:
                    os.close(fd)
                except OSError:  # closed above already
                    pass

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.signals.append(signum)
        self._stop(signum)

    def _stop(self, signum: int) -> None:
        """Send ``signum`` to every live worker (a second one makes each exit at once)."""
        self.stopping = True
        self.forwarded.add(signum)
        for child in self.children:
            if child.poll() is None:
                child.send_signal(signum)

    def _watch(self, ready_read: int) -> int:
        """Announce when every worker serves; stop all when one exits on its own; return the worst code."""
        deadline = time.monotonic() + START_TIMEOUT
        ready, reading = 0, True
        while True:
            for signum in self.signals[:]:
                self.signals.remove(signum)
                _LOGGER.info("received %s: stopping %d worker(s)", signal.Signals(signum).name, self.count)
            exited = [c for c in self.children if c.poll() is not None]
            if len(exited) == self.count:
                break
            if exited and not self.stopping:
                _LOGGER.error("worker pid %d exited with %d%s; stopping the others", exited[0].pid,
                              _shell_code(exited[0].returncode), "" if ready == self.count else " before serving")
                self._stop(signal.SIGTERM)
            elif ready < self.count and not self.stopping and time.monotonic() > deadline:
                _LOGGER.error("only %d of %d workers serve after %gs; stopping", ready, self.count, START_TIMEOUT)
                self._stop(signal.SIGTERM)
            if reading and select.select([ready_read], [], [], 0.1)[0]:
                data = os.read(ready_read, self.count)
                reading = bool(data)  # EOF: every worker has exited or reported
                ready += len(data)
                if ready == self.count:
                    _LOGGER.info("serving on %s with %d workers (pids %s)", self.address, self.count,
                                 ", ".join(str(c.pid) for c in self.children))
            elif not reading:
                time.sleep(0.1)
        # A worker still starting dies of a forwarded signal before it can handle it: a clean stop too.
        worst = max(0 if c.returncode is not None and -c.returncode in self.forwarded else _shell_code(c.returncode)
                    for c in self.children)
        _LOGGER.info("all %d workers stopped; exit code %d", self.count, worst)
        return worst


def _shell_code(returncode: int | None) -> int:
    """A worker's exit code as a shell reports it: 128+N when killed by signal N."""
    assert returncode is not None
    return 128 - returncode if returncode < 0 else returncode
