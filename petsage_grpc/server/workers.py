"""``serve --workers N``, the worker's side: what a worker is told, and what it tells its supervisor.

A Python gRPC server uses one core; one process per core is how it uses
more (:mod:`petsage_grpc.server.supervisor` runs them).  A worker is a whole
server, started by running the same command again with ``PETSAGE_GRPC_WORKER``
set: its own checks, health statuses, drain and logging, on the port its
supervisor reserved.  It writes two-byte messages on the status pipe: once
that it serves, then a heartbeat every :data:`HEARTBEAT_INTERVAL` seconds
from its event loop, so a worker that stops (SIGSTOP, a loop stuck for good)
is noticed and replaced.  It reads EOF on the lifeline pipe when its
supervisor has gone, even by SIGKILL, and then shuts down.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

#: In a worker: "I/N", its number and the number of workers.
WORKER_ENV = "PETSAGE_GRPC_WORKER"
#: In a worker: the address the supervisor reserved (port 0 resolved).
ADDRESS_ENV = "PETSAGE_GRPC_WORKER_ADDRESS"
#: In a worker: the HTTP address the supervisor reserved, if HTTP is served.
HTTP_ADDRESS_ENV = "PETSAGE_GRPC_WORKER_HTTP_ADDRESS"
#: In a worker: the file descriptor on which it reports that it serves, and its heartbeats.
STATUS_FD_ENV = "PETSAGE_GRPC_WORKER_STATUS_FD"
#: In a worker: the file descriptor that reads EOF when the supervisor is gone.
LIFELINE_FD_ENV = "PETSAGE_GRPC_WORKER_LIFELINE_FD"
#: Seconds between a worker's heartbeats.
HEARTBEAT_INTERVAL = 0.5
#: The second byte of a status message: the worker serves, or it is still alive.
READY, BEAT = 1, 0


@dataclass(frozen=True)
class Worker:
    """What a worker process is told by its supervisor."""

    name: str  # "I/N"
    address: str
    http_address: str | None
    status_fd: int  # non-blocking: a supervisor that reads no more never holds a worker up
    lifeline_fd: int  # reads EOF once the supervisor has exited

    @property
    def number(self) -> int:
        """I, of "I/N"."""
        return int(self.name.partition("/")[0])

    def report(self, what: int) -> None:
        """Tell the supervisor this worker serves (:data:`READY`) or is alive (:data:`BEAT`)."""
        try:
            os.write(self.status_fd, bytes((self.number, what)))  # two bytes: never split on a pipe
        except (BlockingIOError, BrokenPipeError):
            pass  # a full pipe means the supervisor is busy; a broken one, gone (the lifeline says so)


def current_worker() -> Worker | None:
    """The worker this process is, or None for a supervisor or a single process."""
    name = os.environ.get(WORKER_ENV)
    # Only a supervisor sets them all: a lone PETSAGE_GRPC_WORKER is a user's misspelt PETSAGE_GRPC_WORKERS.
    if name is None or not all(v in os.environ for v in (ADDRESS_ENV, STATUS_FD_ENV, LIFELINE_FD_ENV)):
        return None
    worker = Worker(name, os.environ[ADDRESS_ENV], os.environ.get(HTTP_ADDRESS_ENV),
                    int(os.environ[STATUS_FD_ENV]), int(os.environ[LIFELINE_FD_ENV]))
    os.set_blocking(worker.status_fd, False)
    return worker
