"""The delivery-confirming log pipeline: a bounded queue, one writer thread, the sinks.

A log call only appends the record to a bounded queue (it never blocks an
RPC); one writer thread formats records and writes each batch to every sink
with ``os.write``, so a write error surfaces at once instead of hiding in a
buffer.  :meth:`LogPipeline.confirm` writes one INFO record tagged with a
unique id and waits, bounded, until the writer reports what every sink did
with it: that is the logging check.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from petsage_grpc.logs.records import PROBE_ATTR, SHEDDABLE_ATTR, probe_record
from petsage_grpc.logs.sinks import FileSink, Sink
from petsage_grpc.logs.stderr import stderr_line

#: Logger of the probe records.
PROBE_LOGGER = "petsage_grpc.logprobe"
#: Records the queue holds before new ones are dropped (and counted).
QUEUE_SIZE = 10_000
#: Queued records beyond which sheddable records are dropped (and counted), so
#: that a flood of calls can never crowd out the logging check's probe record
#: or the server's own records.
SHED_ABOVE = QUEUE_SIZE // 2
#: Records written to the sinks in one ``os.write``.
BATCH_SIZE = 256
#: Seconds the writer lets records gather before writing them.  Waking the writer
#: thread for every record (one per call, with the access log) cost about a fifth
#: of the server's calls per second; a warning, or a probe record that a lone
#: SmokeTest waits for, ends the wait at once.
LINGER = 0.005
#: Probes waiting for confirmation that are written at once, together.
FLUSH_AT = 8
#: Seconds fewer probes that come together wait, at most, for others to join them.
FLUSH_DELAY = 0.002
_STOP = object()


@dataclass(frozen=True)
class Delivery:
    """What the sinks did with one probe record: ``errors`` maps sink → error."""

    probe_id: str
    sinks: tuple[str, ...]
    errors: dict[str, str]

    @property
    def ok(self) -> bool:
        """True when every sink took the record."""
        return not self.errors


class _QueueHandler(logging.Handler):
    """Puts records on the pipeline's queue; never blocks the caller."""

    def __init__(self, pipeline: LogPipeline) -> None:
        super().__init__()
        self._pipeline = pipeline

    def emit(self, record: logging.LogRecord) -> None:
        """Render the record's arguments (they may change later) and queue it."""
        try:
            record.msg, record.args = record.getMessage(), None
            if record.exc_info:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
                record.exc_info = None
        except Exception:  # a bad log call must not break the RPC that made it
            self.handleError(record)
            return
        self._pipeline.enqueue(record)


class LogPipeline:
    """A queue, one writer thread and the sinks it writes to."""

    def __init__(self, sinks: Sequence[Sink], formatter: logging.Formatter) -> None:
        self.sinks = tuple(sinks)
        self._formatter = formatter
        # A deque, not queue.Queue: append and popleft are atomic, so a record costs no lock and no
        # condition variable; the writer is woken only when it sleeps, or when a record is urgent.
        self._queue: collections.deque[object] = collections.deque()
        self._wake = threading.Event()  # set: the writer should look now
        self._asleep = False  # the writer waits for a first record (producers then wake it)
        self._urgent = False  # a record should not wait for LINGER (a probe's flush, a warning, the stop)
        # Probe id -> the loop and future of the confirm() waiting for it.
        self._waiters: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Future[Delivery]]] = {}
        self._failure_listeners: list[Callable[[], None]] = []
        # Records lost: to a full queue (any thread, under the lock) and to
        # failed sink writes (counted per sink, by the writer thread only).
        self._dropped_lock = threading.Lock()
        self._dropped_queue = 0
        self._shed = 0
        self._write_failures = {sink.name: 0 for sink in self.sinks}
        self._id_prefix = secrets.token_hex(8)  # this pipeline's probes: unique across processes
        self._probe_numbers = itertools.count(1)
        # Set from a signal handler: a plain attribute, since taking a lock there could deadlock.
        self._reopen_requested = False
        # Flushes asked of the event loop, at once or after FLUSH_DELAY (read and set there only).
        self._flush_now = self._flush_later = False
        self._last_batch_probes = 0  # probes the writer's last batch carried (written by the writer only)
        self.handler = _QueueHandler(self)
        self._thread = threading.Thread(target=self._run, name="log-writer", daemon=True)
        self._thread.start()

    # -- producer side (any thread) -------------------------------------------------
    def enqueue(self, record: logging.LogRecord) -> None:
        """Queue ``record``; when the queue is full (half full for a sheddable one), drop and count it.

        The bound is checked, then the record appended, without a lock: producers on several threads
        may overshoot it by one record each.
        """
        waiting = len(self._queue)
        if getattr(record, SHEDDABLE_ATTR, False) and waiting >= SHED_ABOVE:
            with self._dropped_lock:
                self._shed += 1
            return
        if waiting >= QUEUE_SIZE:
            with self._dropped_lock:
                self._dropped_queue += 1
            probe_id = getattr(record, PROBE_ATTR, None)
            if probe_id is not None:
                self._resolve([probe_id], {"queue": f"log queue full ({QUEUE_SIZE} records waiting)"})
            return
        self._queue.append(record)
        # A probe's flush is asked for by confirm(), for all the probes of a moment at once.
        if record.levelno >= logging.WARNING:
            self._urgent = True
            self._wake.set()
        elif self._asleep:  # the first record after a quiet spell: the writer starts its LINGER
            self._wake.set()

    @property
    def dropped(self) -> int:
        """Records that did not reach a sink: dropped from the queue plus failed writes per sink."""
        return self._dropped_queue + self._shed + sum(self._write_failures.values())

    def dropped_unqueued(self) -> dict[str, int]:
        """Records that reached no sink, by reason: ``queue_full`` and ``shed`` (access records under load)."""
        return {"queue_full": self._dropped_queue, "shed": self._shed}

    def write_failures(self) -> dict[str, int]:
        """Per sink, the records it failed to write (any thread may read it)."""
        return dict(self._write_failures)

    def reopen(self) -> None:
        """Have every file sink reopen its path before the next write (SIGHUP, after a log rotation).

        Safe to call from a signal handler: it only sets a flag, which the
        writer thread reads before each batch.
        """
        self._reopen_requested = True

    @property
    def files(self) -> tuple[str, ...]:
        """The names of the sinks that are files (what :meth:`reopen` reopens)."""
        return tuple(sink.name for sink in self.sinks if isinstance(sink, FileSink))

    def add_failure_listener(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` (from the writer thread) when a sink starts failing."""
        self._failure_listeners.append(listener)

    async def confirm(self, timeout: float) -> Delivery:
        """Write a tagged INFO record and wait until every sink has reported on it.

        A lone confirmation is written at once; confirmations that come
        together share the writer's next batch (see :meth:`_ask_flush`).
        Raises ``TimeoutError`` naming the cause when the writer does not
        answer within ``timeout`` seconds (a stuck write or a dead thread).
        """
        if not self._thread.is_alive():
            raise TimeoutError("the log writer thread is not running")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Delivery] = loop.create_future()
        # Unique without uuid4: a counter after a random prefix, no system call per probe.
        probe_id = f"{self._id_prefix}{next(self._probe_numbers):08x}"
        self._waiters[probe_id] = (loop, future)
        try:
            # Straight into the queue: Logger.info would look up the caller's frame and thread for nothing.
            self.enqueue(probe_record(PROBE_LOGGER, probe_id))
            self._ask_flush(loop)
            async with asyncio.timeout(timeout):  # unlike wait_for, no task per call
                return await future
        except TimeoutError:
            raise TimeoutError(
                f"the log writer did not confirm probe {probe_id} within {timeout:g}s"
                " (a sink write is blocked or the writer is stuck)"
            ) from None
        finally:
            self._waiters.pop(probe_id, None)

    def _ask_flush(self, loop: asyncio.AbstractEventLoop) -> None:
        """Have the writer write soon for the probes waiting, sharing one wake-up among them.

        A probe alone (no other waiting, and the writer's last batch carried
        at most one) is written at once, and so are :data:`FLUSH_AT` waiting
        probes; fewer that come together are written :data:`FLUSH_DELAY`
        after the first.  Waking the writer for each probe made it take the
        GIL from the event loop at every SmokeTest: under load, SmokeTest ran
        at 0.7 of Check's rate, against 0.85-0.9 with these rules.
        """
        waiting = len(self._waiters)
        if waiting >= FLUSH_AT or (waiting == 1 and self._last_batch_probes <= 1):
            if not self._flush_now:
                self._flush_now = True
                loop.call_soon(self._flush)
        elif not self._flush_later:
            self._flush_later = True
            loop.call_later(FLUSH_DELAY, self._flush)

    def _flush(self) -> None:
        """End the writer's wait for more records (event loop thread): probes are waiting for it."""
        self._flush_now = self._flush_later = False
        self._urgent = True
        self._wake.set()

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued, then stop the writer and close the sinks."""
        self._queue.append(_STOP)
        self._urgent = True
        self._wake.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            # A stuck writer at exit: what is still queued is lost, and said so where it can be seen.
            stderr_line(f"petsage-grpc: {len(self._queue)} log record(s) not written at exit: "
                        f"the log writer is stuck (a sink write blocked for {timeout:g}s)")
            return
        for sink in self.sinks:
            sink.close()

    # -- writer thread ----------------------------------------------------------------
    def _run(self) -> None:
        while True:
            try:
                if not self._run_batch():
                    return
            except Exception as exc:  # the writer must outlive any bug in a batch
                stderr_line(f"petsage-grpc: log writer error: {exc!r}")

    def _run_batch(self) -> bool:
        """Write one batch; False once the stop marker is reached."""
        pending = self._queue
        if not pending:
            self._asleep = True
            if not pending:  # looked at again once producers can see the flag: no wake-up is lost
                self._wake.wait()
            self._asleep = False
            self._wake.clear()
        if len(pending) < BATCH_SIZE and not self._urgent:
            self._wake.wait(LINGER)  # let more records gather, unless a probe or a warning is waiting
            self._wake.clear()
        self._urgent = False
        batch: list[object] = []
        while len(batch) < BATCH_SIZE and pending:
            batch.append(pending.popleft())
        if pending:  # a full batch left records behind, whose flush may have been asked for already
            self._urgent = True
        records = [r for r in batch if isinstance(r, logging.LogRecord)]
        if records:
            self._write(records)
        return len(records) == len(batch)

    def _write(self, records: list[logging.LogRecord]) -> None:
        if self._reopen_requested:
            self._reopen_requested = False
            for sink in self.sinks:
                sink.reopen()
        data = "".join(self._format(r) + "\n" for r in records).encode("utf-8", "replace")
        errors: dict[str, str] = {}
        newly_failing = False
        for sink in self.sinks:
            was_failing = sink.error is not None
            written = sink.write(data)  # records its own error; never raises
            if sink.error is not None:
                errors[sink.name] = sink.error
            if not written:
                self._write_failures[sink.name] += len(records)
                newly_failing = newly_failing or not was_failing
        if newly_failing:
            for listener in self._failure_listeners:
                try:
                    listener()
                except Exception as exc:
                    stderr_line(f"petsage-grpc: log failure listener error: {exc!r}")
        probes = [getattr(record, PROBE_ATTR) for record in records if hasattr(record, PROBE_ATTR)]
        self._last_batch_probes = len(probes)
        if probes:
            self._resolve(probes, errors)

    def _format(self, record: logging.LogRecord) -> str:
        try:
            return self._formatter.format(record).replace("\n", "\n    ")
        except Exception as exc:  # a bad record must not kill the writer
            return f"{time.time():.6f} - unformattable log record from {record.name}: {exc!r}"

    def _resolve(self, probe_ids: list[str], errors: dict[str, str]) -> None:
        """Hand each probe's delivery to its waiter: one wake-up per event loop, not per probe."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Delivery], Delivery]]] = {}
        sinks = tuple(s.name for s in self.sinks)
        for probe_id in probe_ids:
            waiter = self._waiters.get(probe_id)
            if waiter is not None:
                loop, future = waiter
                by_loop.setdefault(loop, []).append((future, Delivery(probe_id, sinks, dict(errors))))
        for loop, deliveries in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, deliveries)
            except RuntimeError:  # the loop closed meanwhile: nobody waits any more
                pass


def _deliver(deliveries: list[tuple[asyncio.Future[Delivery], Delivery]]) -> None:
    for future, delivery in deliveries:
        if not future.done():  # a waiter that timed out has gone
            future.set_result(delivery)

