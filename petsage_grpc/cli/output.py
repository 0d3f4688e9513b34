"""What the commands print: results on stdout, one line per failure on stderr, never a traceback.

Standard output may be closed, a pipe whose reader has gone (``probe --json |
head -c 10``) or a full disk (``>/dev/full``).  A result that cannot be
written becomes one line on stderr, and the exit code stays the outcome of the
check, as grpc_health_probe's does: the server's health does not depend on
where its report goes.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # not typing's: the probe imports this module, and is timed on its start-up
if TYPE_CHECKING:
    from typing import TextIO


def printable(text: str) -> str:
    r"""``text`` with its control characters escaped (``\n``, ``\x1b``): what a server said, on one line.

    A server's words (a message, an error's details, a name it lists) must not
    break the one-line rule, nor move a terminal's cursor or colour a CI log.
    """
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else char.encode("unicode_escape").decode("ascii") for char in text)


def result(text: str, prog: str) -> bool:
    """Print ``text`` (and a newline) on stdout, flushed; on failure say so on stderr and return False."""
    try:
        if sys.stdout is None:  # descriptor 1 was closed when the process started
            raise OSError("stdout is closed")
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
    except OSError as exc:
        _silence(sys.stdout)
        line(f"{prog}: cannot write the result to stdout: {exc.strerror or exc}")
        return False
    return True


def line(text: str) -> None:
    """Print one line on stderr; if stderr cannot take it either, nothing more can be said."""
    try:
        if sys.stderr is not None:
            sys.stderr.write(text + "\n")
            sys.stderr.flush()
    except OSError:
        _silence(sys.stderr)


def flush() -> None:
    """Flush stdout and stderr before the process ends, quietly: a pipe closed early is no traceback."""
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except OSError:
            _silence(stream)


def _silence(stream: TextIO | None) -> None:
    """Point ``stream``'s descriptor at /dev/null, so that the interpreter's last flush cannot fail again."""
    if stream is None:
        return
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, stream.fileno())
        finally:
            os.close(devnull)
    except (OSError, ValueError):
        pass
