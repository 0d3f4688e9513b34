"""Routing every log record of the process through one :class:`~petsage_grpc.logs.pipeline.LogPipeline`.

Only the entry point (:func:`petsage_grpc.server.process.run`) calls
:func:`configure`: nothing configures logging at import time.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from petsage_grpc.logs.pipeline import PROBE_LOGGER, LogPipeline
from petsage_grpc.logs.records import TEXT_FORMAT, WORKER_TEXT_FORMAT, JsonFormatter
from petsage_grpc.logs.sinks import Sink

#: Loggers kept at INFO whatever ``--log-level`` says: the probe must reach
#: the sinks, and the few start/stop lines (which name the bound port),
#: health status changes, check transitions and lost records must stay visible.
ALWAYS_INFO = (PROBE_LOGGER, "petsage_grpc.server", "petsage_grpc.health", "petsage_grpc.logs")


def make_formatter(log_format: str, worker: str | None = None) -> logging.Formatter:
    """The formatter for ``text`` (the classic line) or ``json``; each record names ``worker`` ("1/2") if given."""
    if log_format == "json":
        return JsonFormatter(worker)
    if worker is None:
        return logging.Formatter(TEXT_FORMAT)
    return logging.Formatter(WORKER_TEXT_FORMAT.format(worker=worker.replace("%", "%%")))


def configure(sinks: Sequence[Sink], log_format: str, level: str, worker: str | None = None) -> LogPipeline:
    """Route every log record of the process through a new :class:`LogPipeline`.

    Only the entry point calls this.  Any handler already on the root logger
    is replaced, so each record is written exactly once.  ``worker`` ("1/2")
    is named in every record of a process that is one of several workers.
    """
    pipeline = LogPipeline(sinks, make_formatter(log_format, worker))
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(pipeline.handler)
    root.setLevel(level)
    for name in ALWAYS_INFO:
        logging.getLogger(name).setLevel(min(logging.INFO, root.level))
    logging.captureWarnings(True)
    return pipeline
