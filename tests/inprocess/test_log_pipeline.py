"""The delivery-confirming log pipeline (logs/pipeline.py) with real sinks: files, /dev/full and a stuck FIFO."""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from petsage_grpc.logs.pipeline import QUEUE_SIZE, SHED_ABOVE
from petsage_grpc.logs.records import light_record
from petsage_grpc.logs.setup import configure
from petsage_grpc.logs.sinks import FileSink
from tests.support.aio import run

TIMEOUT = 2.0


@pytest.fixture(autouse=True)
def root_logger() -> Iterator[None]:
    """The root logger as the test found it: each test routes it through a pipeline of its own."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def record(message: str, level: int = logging.INFO) -> logging.LogRecord:
    return logging.LogRecord("test", level, __file__, 1, message, None, None)


class StuckFifo:
    """A sink whose every write blocks (a FIFO filled to capacity) until :meth:`unstick` starts reading it."""

    def __init__(self, directory: Path) -> None:
        path = directory / "stuck"
        os.mkfifo(path)
        self._reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        filler = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        try:
            while True:
                os.write(filler, b"\n" * 4096)
        except BlockingIOError:
            pass
        finally:
            os.close(filler)  # what it wrote stays in the pipe
        self.sink = FileSink(str(path))
        self.received: list[bytes] = []
        self._draining = threading.Thread(target=self._drain, daemon=True)

    def unstick(self) -> None:
        """Read the FIFO from now on, to its end (once every writer has closed it)."""
        self._draining.start()

    def _drain(self) -> None:
        os.set_blocking(self._reader, True)
        while chunk := os.read(self._reader, 65536):
            self.received.append(chunk)

    def lines(self) -> list[str]:
        """What was read, once the sink is closed: the filler's empty lines left out."""
        self._draining.join(TIMEOUT * 5)
        assert not self._draining.is_alive()
        os.close(self._reader)
        return [line for line in b"".join(self.received).decode().splitlines() if line]


def test_confirm_reports_the_probe_delivered_to_every_sink(tmp_path: Path) -> None:
    sinks = [FileSink(str(tmp_path / "a.log")), FileSink(str(tmp_path / "b.log"))]
    pipeline = configure(sinks, "text", "INFO")
    try:
        delivery = run(lambda: pipeline.confirm(TIMEOUT))
    finally:
        pipeline.close()

    assert delivery.ok
    assert delivery.sinks == (f"file {tmp_path / 'a.log'}", f"file {tmp_path / 'b.log'}")
    for name in ("a.log", "b.log"):
        assert f" - petsage_grpc.logprobe - INFO - logging probe {delivery.probe_id}" in (tmp_path / name).read_text()


def test_confirm_names_the_failing_sink_and_its_error_and_the_others_still_get_the_record(tmp_path: Path) -> None:
    failures: list[str] = []
    pipeline = configure([FileSink("/dev/full"), FileSink(str(tmp_path / "ok.log"))], "json", "INFO")
    pipeline.add_failure_listener(lambda: failures.append(threading.current_thread().name))
    try:
        first = run(lambda: pipeline.confirm(TIMEOUT))
        second = run(lambda: pipeline.confirm(TIMEOUT))
    finally:
        pipeline.close()

    assert first.errors == second.errors == {"file /dev/full": "[Errno 28] No space left on device"}
    assert failures == ["log-writer"]  # once, when the sink started failing, from the writer thread
    assert pipeline.write_failures()["file /dev/full"] == 2
    probes = [json.loads(line)["probe_id"] for line in (tmp_path / "ok.log").read_text().splitlines()]
    assert probes == [first.probe_id, second.probe_id]


def test_json_records_carry_their_structured_fields_without_overwriting_the_standard_keys(tmp_path: Path) -> None:
    pipeline = configure([FileSink(str(tmp_path / "app.log"))], "json", "INFO")
    pipeline.enqueue(light_record("petsage_grpc.access", "%s %s", ("/x", "OK"),
                                  {"method": "/x", "code": "OK", "level": "forged"}))
    pipeline.close()

    [line] = (tmp_path / "app.log").read_text().splitlines()
    entry = json.loads(line)
    assert (entry["level"], entry["logger"], entry["message"]) == ("INFO", "petsage_grpc.access", "/x OK")
    assert (entry["method"], entry["code"]) == ("/x", "OK")


def test_a_stuck_sink_times_the_confirmation_out_and_nothing_is_lost_unseen(tmp_path: Path) -> None:
    access, plain = SHED_ABOVE + 100, QUEUE_SIZE
    fifo = StuckFifo(tmp_path)
    pipeline = configure([fifo.sink], "text", "INFO")
    with pytest.raises(TimeoutError, match=r"the log writer did not confirm probe \w+ within 0.2s "
                                           r"\(a sink write is blocked or the writer is stuck\)"):
        run(lambda: pipeline.confirm(0.2))
    for number in range(access):
        pipeline.enqueue(light_record("petsage_grpc.access", "access %d", (number,), {}))
    for number in range(plain):
        pipeline.enqueue(record(f"plain {number}"))
    refused = run(lambda: pipeline.confirm(TIMEOUT))  # the queue is full: answered at once
    dropped = pipeline.dropped_unqueued()
    fifo.unstick()
    pipeline.close(timeout=TIMEOUT * 5)
    lines = fifo.lines()

    assert refused.errors == {"queue": f"log queue full ({QUEUE_SIZE} records waiting)"}
    assert dropped["shed"] >= 100 and dropped["queue_full"] >= SHED_ABOVE
    # Every record was written, or counted: shed (access records) or dropped from a full queue.
    assert sum(" - INFO - access " in line for line in lines) + dropped["shed"] == access
    assert sum(" - INFO - plain " in line for line in lines) + dropped["queue_full"] - 1 == plain  # -1: the probe
    assert pipeline.dropped == dropped["shed"] + dropped["queue_full"]


def test_a_writer_still_stuck_at_close_says_how_many_records_it_leaves(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    fifo = StuckFifo(tmp_path)
    pipeline = configure([fifo.sink], "text", "INFO")
    for number in range(10):
        pipeline.enqueue(record(f"plain {number}", logging.WARNING))
    pipeline.close(timeout=0.2)
    stderr = capfd.readouterr().err
    fifo.unstick()
    pipeline.close(timeout=TIMEOUT)  # the writer, unstuck, finishes, and the sink is closed

    assert sum(line.startswith("plain ") or " - plain " in line for line in fifo.lines()) == 10
    assert stderr.startswith("petsage-grpc: ")
    assert stderr.endswith(" log record(s) not written at exit: the log writer is stuck "
                           "(a sink write blocked for 0.2s)\n")
