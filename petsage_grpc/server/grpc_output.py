"""What grpc itself says, brought into the server's own log: one line where grpc writes a traceback.

When a caller leaves before its answer is delivered, grpcio logs
``ExecuteBatchError raised in core by servicer method [...]`` at ERROR with a
multi-line traceback (logger ``grpc._cython.cygrpc``), and the handler has
already returned: the call looks like a success.  :class:`UndeliveredFilter`
drops that record and marks the call it belongs to (found through a context
variable the handler set, since grpc logs from the call's own task), so the
access log and the metrics record the call as CANCELLED, in one line.
"""

from __future__ import annotations

import contextvars
import logging
from typing import Protocol

#: grpcio's logger for what happens in its call handling.
GRPC_LOGGER = "grpc._cython.cygrpc"


class Undeliverable(Protocol):
    """A call that can be told its answer did not reach the caller."""

    undelivered: bool


#: The call whose handler runs in this task (set by the handler wrapper).
CURRENT_CALL: contextvars.ContextVar[Undeliverable | None] = contextvars.ContextVar("petsage_call", default=None)


class UndeliveredFilter(logging.Filter):
    """Turns grpc's "ExecuteBatchError raised in core" tracebacks into a mark on the call; counts them."""

    def __init__(self) -> None:
        super().__init__()
        self.undelivered = 0

    def filter(self, record: logging.LogRecord) -> bool:
        """False (drop) for an answer that could not be delivered; True for anything else."""
        error = record.exc_info[1] if record.exc_info else None
        if type(error).__name__ != "ExecuteBatchError" or "raised in core by servicer method" not in record.msg:
            return True
        self.undelivered += 1
        call = CURRENT_CALL.get()
        if call is not None:
            call.undelivered = True
        return False


def install() -> UndeliveredFilter:
    """Put the filter on grpc's logger (once per process); return it."""
    logger = logging.getLogger(GRPC_LOGGER)
    for existing in logger.filters:
        if isinstance(existing, UndeliveredFilter):
            return existing
    installed = UndeliveredFilter()
    logger.addFilter(installed)
    return installed
