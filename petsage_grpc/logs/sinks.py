"""Log sinks: where the log writer puts formatted bytes.

Each sink writes with ``os.write`` on its own file descriptor, with no Python
buffer in between, so a full disk, a closed stream or a broken pipe shows up
as an ``OSError`` on the very write that failed.  A sink never raises: it
keeps the last error in :attr:`Sink.error` (``None`` once a write succeeds
again) for the logging check to report.
"""

from __future__ import annotations

import errno
import os
import sys


def _write_all(fd: int, data: bytes) -> None:
    """Write every byte of ``data`` to ``fd`` (``os.write`` may write part of it)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class _NoFreeBlock(OSError):
    """A write succeeded but left the file system without a free block."""


class Sink:
    """A destination for log lines; subclasses provide :meth:`_write`."""

    def __init__(self, name: str) -> None:
        self.name = name
        #: The last write's error as ``"[Errno N] text"``, or None when it worked.
        self.error: str | None = None

    def write(self, data: bytes) -> bool:
        """Write ``data``; record the outcome in :attr:`error` instead of raising.

        Returns whether ``data`` was written: a sink may report an error (a
        disk just filled up) about a write that still went through.
        """
        try:
            self._write(data)
        except _NoFreeBlock as exc:
            self.error = _describe(exc)
            return True
        except OSError as exc:
            self.error = _describe(exc)
            return False
        self.error = None
        return True

    def _write(self, data: bytes) -> None:
        raise NotImplementedError

    def reopen(self) -> None:
        """Let go of the file the sink writes to: the next write opens its path afresh (SIGHUP)."""

    def close(self) -> None:
        """Release the sink's file descriptor, if it owns one."""


class StdoutSink(Sink):
    """The process's standard output (file descriptor 1)."""

    def __init__(self) -> None:
        super().__init__("stdout")
        # Python sets sys.stdout to None when fd 1 was closed at start-up; fd 1
        # may then be reused by another file, so it must never be written.
        self._fd: int | None = None if sys.stdout is None else 1
        if sys.stdout is not None:
            sys.stdout.flush()

    def _write(self, data: bytes) -> None:
        if self._fd is None:
            raise OSError(9, "stdout was closed when the server started")
        _write_all(self._fd, data)


class FileSink(Sink):
    """A file opened for appending, reopened when its path stops naming it.

    Like ``logging.handlers.WatchedFileHandler``, the sink checks before each
    write that the path still names the open file: a file deleted or rotated
    away is recreated, and a removed directory makes the write fail (instead
    of writing, unseen, into an unlinked file) until it is back.

    After each write it also asks the file system for free space: a write
    into the last, partly used block of a file succeeds on a full disk, so a
    quiet server would only notice the disk is full many records later.
    No free block left counts as the write failing with ENOSPC.
    """

    def __init__(self, path: str) -> None:
        super().__init__(f"file {path}")
        self.path = path
        self._fd: int | None = self._open()  # fails early: checked at start-up
        # Root may use the blocks a file system reserves; anyone else may not.
        self._root = os.geteuid() == 0

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def _write(self, data: bytes) -> None:
        if self._fd is not None:
            try:
                on_disk = os.stat(self.path)
            except FileNotFoundError:
                on_disk = None
            mine = os.fstat(self._fd)
            if on_disk is None or (on_disk.st_dev, on_disk.st_ino) != (mine.st_dev, mine.st_ino):
                self.close()
        if self._fd is None:
            self._fd = self._open()
        _write_all(self._fd, data)
        space = os.fstatvfs(self._fd)
        # Pseudo file systems report no blocks at all: they are never full.
        if space.f_blocks and not (space.f_bfree if self._root else space.f_bavail):
            raise _NoFreeBlock(errno.ENOSPC, "No space left on device (no free block after this write)")

    def reopen(self) -> None:
        """Close the file descriptor; the next write opens the path again (a rotated file is let go)."""
        self.close()

    def close(self) -> None:
        """Close the file descriptor; the next write reopens the path."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.close(fd)
            except OSError:
                pass


def _describe(exc: OSError) -> str:
    """``[Errno 28] No space left on device`` style text, without the file name."""
    if exc.errno is None:
        return str(exc)
    return f"[Errno {exc.errno}] {exc.strerror or os.strerror(exc.errno)}"
