"""``serve --workers N``, the supervisor's side: N workers sharing one port, kept running.

The kernel spreads new connections over the workers' listening sockets
(SO_REUSEPORT).  The supervisor reserves the ports first (so that port 0 names
one port for all workers, and a port taken by another program still fails
with one line), starts each worker (:mod:`petsage_grpc.server.workers`),
announces once every worker serves, and forwards SIGTERM and SIGINT; SIGHUP
reopens its log file and is forwarded to the workers that serve, which reopen theirs.

A worker that dies after it has served is started again, after a pause that
doubles from :data:`FIRST_BACKOFF` to :data:`MAX_BACKOFF`; a worker that
sends no heartbeat for :data:`HEARTBEAT_TIMEOUT` seconds (stopped, or stuck)
is killed and started again: the kernel would otherwise keep handing it new
connections that nobody answers.  Each restart is logged.  More than
:data:`MAX_RESTARTS` restarts within :data:`RESTART_WINDOW` seconds, or a
worker that dies before it ever served, stop the others: the supervisor then
exits non-zero, so that Kubernetes restarts the pod rather than run it at
part strength.
"""

from __future__ import annotations

import collections
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

from petsage_grpc.logs.pipeline import LogPipeline
from petsage_grpc.logs.stderr import original_stderr
from petsage_grpc.server.binding import BindError, bind_socket, check_bindable
from petsage_grpc.server.workers import (
    ADDRESS_ENV,
    HTTP_ADDRESS_ENV,
    LIFELINE_FD_ENV,
    READY,
    STATUS_FD_ENV,
    WORKER_ENV,
)

_LOGGER = logging.getLogger(__package__)
#: How long every worker gets to start serving.
START_TIMEOUT = 60.0
#: Seconds without a heartbeat after which a serving worker is replaced.
HEARTBEAT_TIMEOUT = 5.0
#: The pause before a restart: it doubles from the first to the longest.
FIRST_BACKOFF, MAX_BACKOFF = 0.5, 8.0
#: Restarts allowed within the window before the supervisor gives up.
MAX_RESTARTS, RESTART_WINDOW = 5, 60.0
#: How often the supervisor looks at its workers.
TICK = 0.1


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


def supervise(address: str, count: int, http_address: str | None = None, pipeline: LogPipeline | None = None) -> int:
    """Run ``count`` workers serving ``address`` (and ``http_address``) until they stop; return the exit code.

    ``pipeline`` is the supervisor's own log pipeline, whose files SIGHUP reopens.
    """
    reservations = []
    try:
        reservation, bound = reserve(address)
        reservations.append(reservation)
        http_bound = None
        if http_address is not None:
            reservation, http_bound = reserve(http_address, "HTTP ")
            reservations.append(reservation)
        return _Supervisor(bound, http_bound, count, pipeline).run()
    finally:
        for reservation in reservations:
            reservation.close()


@dataclass
class _Slot:
    """One worker place: the process in it now, and what the supervisor knows of it."""

    number: int
    process: subprocess.Popen[bytes]
    ready: bool = False
    last_beat: float = 0.0
    restart_at: float | None = None  # while it waits to be started again

    @property
    def name(self) -> str:
        return f"worker {self.number} (pid {self.process.pid})"


class _Supervisor:
    """Starts the workers, keeps them running, forwards signals and collects their exit codes.

    The signal handler only records and forwards: logging from it could
    deadlock on the log queue's lock if the signal lands inside a log call.
    """

    def __init__(self, address: str, http_address: str | None, count: int, pipeline: LogPipeline | None) -> None:
        self.address = address
        self.pipeline = pipeline
        self.http_address = http_address
        self.count = count
        self.slots: list[_Slot] = []
        self.stopping = False
        self.announced = False
        self.signals: list[int] = []  # received, not yet logged
        self.forwarded: set[int] = set()  # signals sent to the workers
        self.restarts: collections.deque[float] = collections.deque()
        self.backoff = FIRST_BACKOFF
        self.failed: int | None = None  # the exit code that made the supervisor give up
        self._fds: dict[str, int] = {}

    def run(self) -> int:
        """Start the workers and watch them until all have exited; return the worst exit code."""
        self._fds["status_read"], self._fds["status_write"] = os.pipe()
        # The workers hold the read end of the lifeline; when the supervisor
        # dies, even by SIGKILL, they read EOF and shut down on their own.
        self._fds["lifeline_read"], self._fds["lifeline_write"] = os.pipe()
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        try:
            self.slots = [_Slot(number, self._spawn(number)) for number in range(1, self.count + 1)]
            return self._watch()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            for fd in self._fds.values():
                os.close(fd)

    def _spawn(self, number: int) -> subprocess.Popen[bytes]:
        fds = self._fds
        return subprocess.Popen(
            [sys.executable, *sys.orig_argv[1:]],
            env={**os.environ, WORKER_ENV: f"{number}/{self.count}", ADDRESS_ENV: self.address,
                 **({} if self.http_address is None else {HTTP_ADDRESS_ENV: self.http_address}),
                 STATUS_FD_ENV: str(fds["status_write"]), LIFELINE_FD_ENV: str(fds["lifeline_read"])},
            pass_fds=(fds["status_write"], fds["lifeline_read"]),
            start_new_session=True,  # Ctrl-C reaches the supervisor only, which forwards it
            stderr=original_stderr(),  # not the supervisor's capture: each worker captures its own
        )

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.signals.append(signum)
        if signum != signal.SIGHUP:
            self._stop(signum)
            return
        if self.pipeline is not None:
            self.pipeline.reopen()  # a flag: safe here
        for slot in self.slots:
            # A worker still starting has no handler yet (SIGHUP would kill it); it opens its file afresh anyway.
            if slot.ready and slot.process.poll() is None:
                slot.process.send_signal(signum)

    def _stop(self, signum: int) -> None:
        """Send ``signum`` to every live worker (a second one makes each exit at once)."""
        self.stopping = True
        self.forwarded.add(signum)
        for slot in self.slots:
            if slot.process.poll() is None:
                slot.process.send_signal(signum)

    def _watch(self) -> int:
        """Keep the workers running until a signal or a give-up; return the worst exit code."""
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            for signum in self.signals[:]:
                self.signals.remove(signum)
                if signum == signal.SIGHUP:
                    files = () if self.pipeline is None else self.pipeline.files
                    _LOGGER.info("received SIGHUP: %s; passed on to the workers that serve",
                                 f"reopened {', '.join(files)}" if files else "no log file to reopen")
                else:
                    _LOGGER.info("received %s: stopping %d worker(s)", signal.Signals(signum).name, self.count)
            self._read_status()
            now = time.monotonic()
            for slot in self.slots:
                self._look_after(slot, now)
            if self.stopping and all(s.process.poll() is not None and s.restart_at is None for s in self.slots):
                break
            if not self.announced and not self.stopping and now > deadline:
                serving = sum(s.ready for s in self.slots)
                _LOGGER.error("only %d of %d workers serve after %gs; stopping", serving, self.count, START_TIMEOUT)
                self._give_up(1)
        return self._exit_code()

    def _read_status(self) -> None:
        """Take in the workers' ready reports and heartbeats (two bytes each: number, what)."""
        fd = self._fds["status_read"]
        if not select.select([fd], [], [], TICK)[0]:
            return
        data = os.read(fd, 65536)
        now = time.monotonic()
        for offset in range(0, len(data) - 1, 2):
            number, what = data[offset], data[offset + 1]
            if not 1 <= number <= self.count:
                continue
            slot = self.slots[number - 1]
            slot.last_beat = now
            if what == READY and not slot.ready:
                slot.ready = True
                if self.announced:
                    _LOGGER.info("%s serves again", slot.name)
                elif all(s.ready for s in self.slots):
                    self.announced = True
                    _LOGGER.info("serving on %s with %d workers (pids %s)", self.address, self.count,
                                 ", ".join(str(s.process.pid) for s in self.slots))

    def _look_after(self, slot: _Slot, now: float) -> None:
        """Restart a worker that died or stopped beating, unless stopping or given up."""
        if self.stopping:
            slot.restart_at = None
            return
        if slot.restart_at is not None:
            if now >= slot.restart_at:
                slot.process, slot.ready, slot.restart_at = self._spawn(slot.number), False, None
                slot.last_beat = now
                _LOGGER.info("%s started", slot.name)
            return
        code = slot.process.poll()
        if code is None:
            if slot.ready and now - slot.last_beat > HEARTBEAT_TIMEOUT:
                _LOGGER.error("%s sent no heartbeat for %gs (stopped or stuck): replacing it",
                              slot.name, HEARTBEAT_TIMEOUT)
                slot.process.kill()  # reaped below on a later tick, then started again
            return
        if not slot.ready:
            _LOGGER.error("%s exited with %d before serving; stopping the others", slot.name, _shell_code(code))
            self._give_up(_shell_code(code))
            return
        self._restart(slot, code, now)

    def _restart(self, slot: _Slot, code: int, now: float) -> None:
        while self.restarts and now - self.restarts[0] > RESTART_WINDOW:
            self.restarts.popleft()
        if len(self.restarts) >= MAX_RESTARTS:
            _LOGGER.error("%s exited with %d, after %d restarts within %gs: giving up, stopping the others",
                          slot.name, _shell_code(code), len(self.restarts), RESTART_WINDOW)
            self._give_up(_shell_code(code))
            return
        self.restarts.append(now)
        _LOGGER.warning("%s exited with %d; starting it again in %gs", slot.name, _shell_code(code), self.backoff)
        slot.restart_at, slot.ready = now + self.backoff, False
        self.backoff = min(self.backoff * 2, MAX_BACKOFF)

    def _give_up(self, code: int) -> None:
        self.failed = code
        self._stop(signal.SIGTERM)

    def _exit_code(self) -> int:
        # A worker still starting dies of a forwarded signal before it can handle it: a clean stop too.
        codes = [0 if s.process.returncode is not None and -s.process.returncode in self.forwarded
                 else _shell_code(s.process.returncode) for s in self.slots]
        worst = max([*codes, self.failed or 0])
        _LOGGER.info("all %d workers stopped; exit code %d", self.count, worst)
        return worst


def _shell_code(returncode: int | None) -> int:
    """A worker's exit code as a shell reports it: 128+N when killed by signal N."""
    assert returncode is not None
    return 128 - returncode if returncode < 0 else returncode
