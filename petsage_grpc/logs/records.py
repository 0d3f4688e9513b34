"""Log records and their two formats: the classic text line and one JSON object per line.

Records may carry three attributes of ours: a probe id (the logging check's
tagged record), structured fields (written as keys of the JSON object, e.g.
an access log record's method and status code), and a mark saying the
pipeline may shed the record under load (the access log's).
"""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime

TEXT_FORMAT = "%(asctime)s - %(name)s - %(levelname)s - %(message)s"
#: The text format of a process that serves as one of several workers: each line says which.
WORKER_TEXT_FORMAT = "%(asctime)s - %(name)s - %(levelname)s - worker {worker}: %(message)s"
#: Attribute of a probe record that carries its id.
PROBE_ATTR = "petsage_probe_id"
#: Attribute of a record carrying structured fields (a dict), written as keys of its JSON object.
FIELDS_ATTR = "petsage_fields"
#: Attribute marking a record the pipeline may shed under load (the access log's).
SHEDDABLE_ATTR = "petsage_sheddable"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (RFC 3339, UTC), level, logger, message.

    A record's structured fields (:data:`FIELDS_ATTR`, e.g. an access log
    record's method and status code) are added as further keys, and so is
    ``worker`` (``"1/2"``) in a process that is one of several workers.
    """

    def __init__(self, worker: str | None = None) -> None:
        super().__init__()
        self._worker = worker

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record`` as a single-line JSON object."""
        stamp = datetime.fromtimestamp(record.created, UTC)
        entry: dict[str, object] = {
            "time": stamp.isoformat(timespec="microseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self._worker is not None:
            entry["worker"] = self._worker
        probe_id = getattr(record, PROBE_ATTR, None)
        if probe_id is not None:
            entry["probe_id"] = probe_id
        fields = getattr(record, FIELDS_ATTR, None)
        if isinstance(fields, dict):
            for key, value in fields.items():
                entry.setdefault(key, value)  # never over the four standard keys
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text
        return json.dumps(entry, ensure_ascii=False)


def light_record(name: str, msg: str, args: tuple[object, ...], fields: dict[str, object]) -> logging.LogRecord:
    """A sheddable INFO record of logger ``name``, for the pipeline's ``enqueue`` to take directly.

    For the access log, one record per call: ``Logger.info`` spends most of
    its time finding the caller's file and line and filling fields no format
    of ours writes.  ``args`` must be immutable: the writer thread formats
    the message later.
    """
    record = logging.LogRecord.__new__(logging.LogRecord)
    now = time.time()
    record.__dict__.update({
        "name": name, "msg": msg, "args": args, "levelname": "INFO", "levelno": logging.INFO,
        "pathname": "", "filename": "", "module": "", "lineno": 0, "funcName": "",
        "exc_info": None, "exc_text": None, "stack_info": None,
        "created": now, "msecs": (now - int(now)) * 1000,
        "thread": None, "threadName": None, "processName": None, "process": None, "taskName": None,
        FIELDS_ATTR: fields, SHEDDABLE_ATTR: True,
    })
    return record


def probe_record(name: str, probe_id: str) -> logging.LogRecord:
    """The INFO record ``logging probe <probe_id>`` of logger ``name``, tagged for the pipeline to confirm.

    Made directly, as :func:`light_record` makes an access record, but never sheddable.
    """
    record = light_record(name, "logging probe %s", (probe_id,), {})
    record.__dict__.update({PROBE_ATTR: probe_id, SHEDDABLE_ATTR: False, FIELDS_ATTR: None})
    return record
