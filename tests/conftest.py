"""Fixtures: real servers in child processes, always stopped at the end of a test."""

from __future__ import annotations

import socket
import sys
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.support import APP_MODULE, App, ServerProcess


@pytest.fixture
def start_server() -> Iterator[Callable[..., ServerProcess]]:
    """Start servers with the given flags; every one is stopped after the test."""
    started: list[ServerProcess] = []

    def start(*args: str, **kwargs: Any) -> ServerProcess:
        server = ServerProcess(args, **kwargs)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def server(start_server: Callable[..., ServerProcess]) -> ServerProcess:
    """A server with default settings on a free loopback port."""
    return start_server()


@pytest.fixture
def start_app(start_server: Callable[..., ServerProcess], tmp_path: Path) -> Callable[..., App]:
    """Start the embedding test service (steered through ``tmp_path``) with extra serve flags."""

    def start(*args: str, **kwargs: Any) -> App:
        command = (sys.executable, "-m", APP_MODULE, "--control", str(tmp_path))
        return App(start_server(*args, command=command, **kwargs), tmp_path)

    return start


@pytest.fixture
def app(start_app: Callable[..., App]) -> App:
    """The embedding test service with default settings."""
    return start_app()


@pytest.fixture
def bare_server() -> Iterator[str]:
    """A real gRPC server that serves nothing at all."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(None)


@pytest.fixture
def refused_address() -> Iterator[str]:
    """An address where nothing listens: bound, so no one else takes it, but never listening."""
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{unused.getsockname()[1]}"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print the lines tests recorded with ``record_property("terminal_summary", line)``."""
    lines = [
        str(value)
        for reports in terminalreporter.stats.values()
        for report in reports
        if getattr(report, "when", None) == "call"
        for name, value in getattr(report, "user_properties", ())
        if name == "terminal_summary"
    ]
    if lines:
        terminalreporter.section("recorded by the tests")
        for line in lines:
            terminalreporter.write_line(line)
