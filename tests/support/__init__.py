"""Test support, in one place: real server processes, child programs, pipes and the steered test service."""

from tests.support.app import APP_MODULE, App
from tests.support.pipes import stall, start_on_small_pipe
from tests.support.processes import (
    NOT_SERVING,
    PROCESS_TIMEOUT,
    README,
    ROOT,
    RPC_TIMEOUT,
    SERVICE_UNKNOWN,
    SERVING,
    SERVING_LINE,
    LineLog,
    ServerProcess,
    Start,
    child,
    proc_status,
    reaped,
    run_cli,
    tool,
    wait_for_file_line,
)

__all__ = [
    "APP_MODULE",
    "NOT_SERVING",
    "PROCESS_TIMEOUT",
    "README",
    "ROOT",
    "RPC_TIMEOUT",
    "SERVICE_UNKNOWN",
    "SERVING",
    "SERVING_LINE",
    "App",
    "LineLog",
    "ServerProcess",
    "Start",
    "child",
    "proc_status",
    "reaped",
    "run_cli",
    "stall",
    "start_on_small_pipe",
    "tool",
    "wait_for_file_line",
]
