"""Log sinks (logs/sinks.py) on real files: errors recorded, never raised; rotation and removal followed."""

from __future__ import annotations

import os
from pathlib import Path

from petsage_grpc.logs.sinks import FileSink


def test_a_failing_write_records_its_error_and_a_later_good_write_clears_it(tmp_path: Path) -> None:
    full = FileSink("/dev/full")

    assert full.write(b"line\n") is False
    assert full.error == "[Errno 28] No space left on device"
    full.close()

    good = FileSink(str(tmp_path / "app.log"))
    good.error = full.error
    assert good.write(b"line\n") is True
    assert good.error is None
    good.close()


def test_a_file_renamed_away_is_created_again_and_written(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    sink = FileSink(str(log))
    sink.write(b"first\n")
    log.rename(tmp_path / "app.log.1")  # what logrotate does before its postrotate step

    assert sink.write(b"second\n") is True
    sink.close()
    assert (tmp_path / "app.log.1").read_bytes() == b"first\n"
    assert log.read_bytes() == b"second\n"


def test_a_removed_directory_fails_the_write_until_it_is_back(tmp_path: Path) -> None:
    directory = tmp_path / "logs"
    directory.mkdir()
    sink = FileSink(str(directory / "app.log"))
    (directory / "app.log").unlink()
    directory.rmdir()

    assert sink.write(b"lost\n") is False
    assert sink.error == "[Errno 2] No such file or directory"

    directory.mkdir()
    assert sink.write(b"back\n") is True
    sink.close()
    assert (directory / "app.log").read_bytes() == b"back\n"


def test_close_releases_the_file_and_a_later_write_opens_it_again(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    sink = FileSink(str(log))
    sink.close()
    opened_before = len(os.listdir("/proc/self/fd"))

    assert sink.write(b"again\n") is True
    assert len(os.listdir("/proc/self/fd")) == opened_before + 1
    sink.close()
    assert log.read_bytes() == b"again\n"
