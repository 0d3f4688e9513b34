"""The process's standard error (file descriptor 2), read back into the log pipeline.

grpc's C core writes lines of its own straight to file descriptor 2, in
absl's format (``I1130 04:46:52.156533 11626 ssl_transport_security.cc:2563]
Handshake failed ...``): one per failed TLS handshake, so a port scanner or a
client without a certificate could fill a disk with them, unseen by
``--log-format json`` and ``--log-file``.  :class:`StderrCapture` points
descriptor 2 at a pipe and reads it on a thread of its own:

- an absl line becomes a record of logger ``grpc`` at its own level (I, W, E,
  F: INFO, WARNING, ERROR, CRITICAL) with a ``source`` field (``file.cc:line``);
- anything else (a C library's message, a traceback some thread printed)
  becomes one WARNING record of logger ``stderr`` per burst of lines;
- a line repeated within :data:`WINDOW` seconds is logged once, then counted,
  and the count logged when the window ends (``... repeated 41 more time(s)
  in 10s``), so the volume stays bounded whatever a peer does;
- every line is counted, by origin and level, and failed TLS handshakes by
  their OpenSSL reason, for the metrics.

The original descriptor 2 is kept for last words (:func:`stderr_line`):
what is written when the pipeline itself may be stuck.  Workers are given it
as their stderr, so each worker captures its own.  grpc core names no peer
in its handshake lines; the reason says what kind of client it was.
"""

from __future__ import annotations

import collections
import fcntl
import logging
import os
import re
import select
import sys
import threading
import time
from dataclasses import dataclass, field
from types import TracebackType

from petsage_grpc.logs.records import FIELDS_ATTR

#: Seconds during which a repeated line is counted instead of logged.
WINDOW = 10.0
#: Distinct lines remembered in one window; lines beyond them are counted as "other".
MAX_KINDS = 100
#: Longest line kept, in bytes: the rest of a longer one is cut (bounds the reader's memory).
MAX_LINE = 16 * 1024
#: Distinct handshake failure reasons counted; further ones count as "other".
MAX_REASONS = 32
#: Seconds the reader waits for the rest of a burst of non-absl lines (a traceback) before logging it.
BURST = 0.05
#: Logger names of the records made from the captured lines.
GRPC_LOGGER, OTHER_LOGGER = "grpc", "stderr"

# absl's prefix: severity letter, MMDD hh:mm:ss.micros, thread id, file:line]
_ABSL = re.compile(r"^([IWEF])\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+\s+([^\s:\]]+:\d+)\] ?(.*)$")
_LEVELS = {"I": logging.INFO, "W": logging.WARNING, "E": logging.ERROR, "F": logging.CRITICAL}
_HANDSHAKE = re.compile(r"Handshake failed.*?OPENSSL_internal:([A-Z0-9_]+)")
#: What a handshake failure's reason says about the client, for the log line.
HANDSHAKE_HINTS = {
    "WRONG_VERSION_NUMBER": "a client that does not speak TLS: plaintext to this TLS port?",
    "HTTP_REQUEST": "an HTTP/1 client on this TLS port",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "a client without a certificate, which mTLS requires",
    "CERTIFICATE_VERIFY_FAILED": "a client certificate that --tls-client-ca did not sign",
    "TLSV1_ALERT_UNKNOWN_CA": "a client that does not trust the server's certificate",
    "NO_SHARED_CIPHER": "a client with no cipher in common",
}

#: The descriptor that reaches the real stderr: 2 until a capture starts.
_last_words_fd = 2
_current: StderrCapture | None = None


def stderr_line(text: str) -> None:
    """Write one line to the real stderr, bypassing the pipeline (for last words)."""
    try:
        os.write(_last_words_fd, (text + "\n").encode())
    except OSError:
        pass


def original_stderr() -> int:
    """The descriptor of the process's real stderr (for a child's stderr): 2 when nothing is captured."""
    return _last_words_fd


@dataclass(frozen=True)
class StderrCounts:
    """What a capture has read: lines by (origin, level), handshake failures by reason, lines folded."""

    lines: dict[tuple[str, str], int] = field(default_factory=dict)
    handshake_failures: dict[str, int] = field(default_factory=dict)
    folded: int = 0


def stderr_counts() -> StderrCounts:
    """The counts of the capture running in this process (all zero when stderr is not captured)."""
    capture = _current
    return StderrCounts() if capture is None else capture.counts()


class StderrCapture:
    """Descriptor 2 pointed at a pipe whose lines a thread turns into log records; a context manager.

    Only the process's entry point starts one, after logging is configured;
    leaving the ``with`` block puts descriptor 2 back, logs what the reader
    still holds and stops it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()  # guards the counters, read by the metrics on another thread
        self._lines: collections.Counter[tuple[str, str]] = collections.Counter()  # (origin, level) -> lines
        self._handshake_failures: collections.Counter[str] = collections.Counter()  # reason -> failures
        self._folded = 0  # lines counted into a "repeated" summary instead of logged
        self._repeats: dict[tuple[int, str, str], int] = {}  # (level, source, message) -> repeats this window
        self._other_kinds = 0  # lines this window beyond MAX_KINDS distinct ones
        self._window_end = 0.0
        self._burst: list[str] = []  # non-absl lines waiting for the rest of their burst
        self._saved: int | None = None
        self._read_fd: int | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> StderrCapture:
        global _last_words_fd, _current
        sys.stderr.flush()
        self._saved = os.dup(2)
        os.set_inheritable(self._saved, False)
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        # A reader that falls behind costs grpc lines (EAGAIN), never a grpc thread blocked on a write.
        fcntl.fcntl(write_fd, fcntl.F_SETFL, fcntl.fcntl(write_fd, fcntl.F_GETFL) | os.O_NONBLOCK)
        os.dup2(write_fd, 2)
        os.close(write_fd)
        self._read_fd = read_fd
        _last_words_fd, _current = self._saved, self
        self._thread = threading.Thread(target=self._run, name="stderr-reader", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        global _last_words_fd, _current
        sys.stderr.flush()
        if self._saved is not None:
            os.dup2(self._saved, 2)  # the pipe's last writer goes: the reader reads EOF
        if self._thread is not None:
            self._thread.join(1.0)
        if self._saved is not None:
            _last_words_fd, _current = 2, None
            os.close(self._saved)
            self._saved = None

    def counts(self) -> StderrCounts:
        """A copy of the counts (any thread)."""
        with self._lock:
            return StderrCounts(dict(self._lines), dict(self._handshake_failures), self._folded)

    # -- the reader thread ---------------------------------------------------------------
    def _run(self) -> None:
        assert self._read_fd is not None
        pending = b""
        try:
            while True:
                timeout = self._next_timeout()
                if not select.select([self._read_fd], [], [], timeout)[0]:
                    self._flush_burst()
                    self._end_window_if_due()
                    continue
                data = os.read(self._read_fd, 65536)
                if not data:
                    break
                pending += data
                *complete, pending = pending.split(b"\n")
                if len(pending) > MAX_LINE:
                    complete.append(pending[:MAX_LINE])
                    pending = b""
                for raw in complete:
                    self._line(raw[:MAX_LINE].decode("utf-8", "replace").rstrip("\r"))
                self._end_window_if_due()
        except Exception as exc:  # the reader must never take the process down
            stderr_line(f"petsage-grpc: stderr reader error: {exc!r}")
        finally:
            if pending:
                self._line(pending.decode("utf-8", "replace"))
            self._flush_burst()
            self._end_window(final=True)
            if self._read_fd is not None:
                os.close(self._read_fd)

    def _next_timeout(self) -> float | None:
        if self._burst:
            return BURST
        if self._repeats or self._other_kinds:
            return max(0.0, self._window_end - time.monotonic())
        return None

    def _line(self, line: str) -> None:
        match = _ABSL.match(line)
        if match is None:
            if line.strip() or self._burst:
                self._burst.append(line)
            return
        self._flush_burst()
        letter, source, message = match.groups()
        level = _LEVELS[letter]
        handshake = _HANDSHAKE.search(message)
        with self._lock:
            self._lines[("grpc", logging.getLevelName(level).lower())] += 1
            if handshake is not None:
                reason = handshake[1]
                if reason not in self._handshake_failures and len(self._handshake_failures) >= MAX_REASONS:
                    reason = "other"
                self._handshake_failures[reason] += 1
        fields: dict[str, object] = {"source": source}
        if handshake is not None:
            fields["tls_reason"] = handshake[1]
            hint = HANDSHAKE_HINTS.get(handshake[1])
            if hint is not None:
                message = f"{message} ({hint})"  # grpc core names no peer: the reason says what kind
        self._log(GRPC_LOGGER, level, message, fields, (level, source, message))

    def _flush_burst(self) -> None:
        if not self._burst:
            return
        lines, self._burst = self._burst, []
        while lines and not lines[-1].strip():
            lines.pop()
        with self._lock:
            self._lines[("other", "warning")] += len(lines)
        text = "\n".join(lines)
        self._log(OTHER_LOGGER, logging.WARNING, text, {}, (logging.WARNING, "", text))

    def _log(self, logger: str, level: int, message: str, fields: dict[str, object],
             key: tuple[int, str, str]) -> None:
        """Log a line, or count it when the same line was already logged this window."""
        now = time.monotonic()
        if not self._repeats and not self._other_kinds:
            self._window_end = now + WINDOW
        if key in self._repeats:
            self._repeats[key] += 1
            with self._lock:
                self._folded += 1
            return
        if len(self._repeats) >= MAX_KINDS:
            self._other_kinds += 1
            with self._lock:
                self._folded += 1
            return
        self._repeats[key] = 0
        logging.getLogger(logger).log(level, "%s", message, extra={FIELDS_ATTR: fields})

    def _end_window_if_due(self) -> None:
        if (self._repeats or self._other_kinds) and time.monotonic() >= self._window_end:
            self._end_window()

    def _end_window(self, final: bool = False) -> None:
        """Log how often each line logged this window came again, then start afresh."""
        span = "before exit" if final else f"in {WINDOW:g}s"
        for (level, source, message), repeats in self._repeats.items():
            if repeats:
                logger = GRPC_LOGGER if source else OTHER_LOGGER
                logging.getLogger(logger).log(level, "%s", f"repeated {repeats} more time(s) {span}: {message}",
                                              extra={FIELDS_ATTR: {"source": source, "repeats": repeats}
                                                     if source else {"repeats": repeats}})
        if self._other_kinds:
            logging.getLogger(OTHER_LOGGER).warning(
                "%d more stderr line(s) %s not logged: more than %d distinct lines", self._other_kinds, span, MAX_KINDS)
        self._repeats.clear()
        self._other_kinds = 0
