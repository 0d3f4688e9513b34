"""Servers whose stdout is a small pipe, and pipes filled to capacity: a log writer that blocks."""

from __future__ import annotations

import fcntl
import os
import select
import time

from tests.support.processes import HTTP_LINE, PROCESS_TIMEOUT, SERVING_LINE, ServerProcess, Start


def stall(pipe_write_end: int) -> None:
    """Fill a pipe to capacity through a non-blocking description of our own.

    Opening /proc/self/fd/N gives a new open file description, so O_NONBLOCK
    here leaves the server's (blocking) one alone: its next write blocks.
    """
    own = os.open(f"/proc/self/fd/{pipe_write_end}", os.O_WRONLY | os.O_NONBLOCK)
    try:
        while True:
            os.write(own, b"#" * 512)
    except BlockingIOError:
        pass
    finally:
        os.close(own)


def start_on_small_pipe(start: Start, *args: str) -> tuple[ServerProcess, int, int]:
    """A server whose stdout is a 4 KiB pipe we read until it serves, then stop reading."""
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 4096)
    server = start(*args, stdout=write_end, wait=False)
    deadline = time.monotonic() + PROCESS_TIMEOUT
    output = b""
    while (match := SERVING_LINE.search(output.decode(errors="replace"))) is None:
        # We hold the write end too, so a dead server gives no EOF: watch the process.
        assert server.process.poll() is None and time.monotonic() < deadline, server.stderr.text()
        if select.select([read_end], [], [], 0.5)[0]:
            output += os.read(read_end, 4096)
    server.address = match[1]
    http = HTTP_LINE.search(output.decode(errors="replace"))
    server.http_base = http[1] if http else None
    return server, read_end, write_end
