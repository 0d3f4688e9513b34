"""The HTTP listener (server/http/listener.py) on a loopback port, with handlers of the test's own."""

from __future__ import annotations

import asyncio
import logging

import pytest

from petsage_grpc.server.http.listener import HttpListener, Reply, Request
from tests.support import RPC_TIMEOUT, http_request
from tests.support.aio import run


def test_a_handler_that_raises_answers_500_logs_the_traceback_and_the_listener_keeps_serving(
        caplog: pytest.LogCaptureFixture) -> None:
    """A bug in one route (it was a metrics collector) used to close the connection without a word."""

    async def handle(request: Request) -> Reply:
        if request.path == "/broken":
            raise RuntimeError("a bug in a route")
        return Reply(200, b"fine\n")

    async def scenario() -> list[tuple[int, bytes]]:
        listener = HttpListener(handle, max_connections=4)
        address = await listener.start("127.0.0.1:0")
        await listener.start_serving()
        try:
            answers = []
            for path in ("/broken", "/fine"):
                answer = await asyncio.to_thread(http_request, f"http://{address}{path}", timeout=RPC_TIMEOUT)
                answers.append((answer.status, answer.body))
            return answers
        finally:
            await listener.close(0)

    with caplog.at_level(logging.ERROR, "petsage_grpc.server.http"):
        assert run(scenario) == [(500, b"internal error: see the server's log\n"), (200, b"fine\n")]
    [record] = caplog.records
    assert record.getMessage() == "HTTP GET /broken failed"
    assert record.exc_info is not None and "a bug in a route" in str(record.exc_info[1])
