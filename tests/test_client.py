"""``petsage_grpc.client`` against real servers: typed results, one error type, deadlines, both flavours."""

from __future__ import annotations

import asyncio
import importlib
import re
import signal
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import grpc
import pytest

from petsage_grpc.client import (
    AsyncClient,
    CheckResult,
    Client,
    ClientError,
    ServingStatus,
    SmokeResult,
    SmokeStatus,
)
from tests.support import ROOT, ServerProcess, Start, stall, start_on_small_pipe

SERVICES = ["", "liveness", "petsage.smoke.v1.SmokeTestService", "readiness"]


def test_check_and_list_return_enums(server: ServerProcess) -> None:
    with Client(server.address) as client:
        assert client.check() is ServingStatus.SERVING
        assert client.check("readiness") is ServingStatus.SERVING
        assert client.list() == {name: ServingStatus.SERVING for name in SERVICES}


def test_smoke_returns_plain_typed_values(server: ServerProcess) -> None:
    before = datetime.now(UTC)

    with Client(server.address) as client:
        result = client.smoke()

    assert isinstance(result, SmokeResult) and result.ok and result.status is SmokeStatus.OK
    assert result.message == "PetSage services are running and logging is active."
    assert before - timedelta(seconds=5) < result.timestamp <= datetime.now(UTC)
    assert result.server is not None
    assert result.server.version == "0.1.0" and result.server.start_time <= result.timestamp
    logging = next(check for check in result.checks if check.name == "logging")
    assert isinstance(logging, CheckResult) and logging.critical and logging.status is SmokeStatus.OK
    assert timedelta(0) < logging.duration < timedelta(seconds=5)
    with pytest.raises(AttributeError):
        result.message = "changed"  # type: ignore[misc]


def test_status_only_details_give_no_server_and_no_checks_not_empty_ones(start_server: Start) -> None:
    """As reported: a ServerInfo of empty strings and the epoch, instead of no server info."""
    server = start_server("--smoke-details", "status")

    with Client(server.address) as client:
        result = client.smoke()

    assert result.ok and result.message
    assert (result.server, result.checks) == (None, ())


def test_failing_smoke_is_a_result_not_an_error(start_server: Start) -> None:
    server = start_server("--log-file", "/dev/full")

    with Client(server.address) as client:
        result = client.smoke()
        readiness = client.check("readiness")

    assert (result.ok, result.status, readiness) == (False, SmokeStatus.FAILING, ServingStatus.NOT_SERVING)


def test_unknown_service_raises_client_error_with_the_code(server: ServerProcess) -> None:
    with Client(server.address) as client, pytest.raises(ClientError) as raised:
        client.check("nope")

    assert (raised.value.code, raised.value.details) == (grpc.StatusCode.NOT_FOUND, "unknown service")
    assert str(raised.value) == "NOT_FOUND: unknown service"


def test_unreachable_server_raises_unavailable(refused_address: str) -> None:
    with Client(refused_address) as client, pytest.raises(ClientError) as raised:
        client.check(timeout=2)

    assert raised.value.code is grpc.StatusCode.UNAVAILABLE


def test_every_call_has_a_deadline(start_server: Start) -> None:
    server, _read_end, write_end = start_on_small_pipe(start_server, "--log-timeout", "30")
    stall(write_end)  # SmokeTest now waits for a log write that cannot finish

    with Client(server.address, timeout=0.5) as client, pytest.raises(ClientError) as raised:
        client.smoke()

    assert raised.value.code is grpc.StatusCode.DEADLINE_EXCEEDED


def test_watch_yields_each_change_until_the_server_stops(start_server: Start) -> None:
    server = start_server()
    seen = []

    with Client(server.address) as client, pytest.raises(ClientError) as raised:
        for status in client.watch("readiness", timeout=30):
            seen.append(status)
            if len(seen) == 1:
                server.signal(signal.SIGTERM)

    assert seen == [ServingStatus.SERVING, ServingStatus.NOT_SERVING]
    assert raised.value.code is grpc.StatusCode.UNAVAILABLE


def test_leaving_a_watch_cancels_it_and_the_channel_keeps_working(server: ServerProcess) -> None:
    with Client(server.address) as client:
        for status in client.watch("nope", timeout=30):
            assert status is ServingStatus.SERVICE_UNKNOWN
            break
        assert client.check("liveness", timeout=2) is ServingStatus.SERVING


def test_watch_ends_at_its_deadline(server: ServerProcess) -> None:
    with Client(server.address) as client, pytest.raises(ClientError) as raised:
        for _ in client.watch("liveness", timeout=0.5):
            pass

    assert raised.value.code is grpc.StatusCode.DEADLINE_EXCEEDED


def test_async_client_answers_the_same(server: ServerProcess) -> None:
    async def calls() -> tuple[ServingStatus, dict[str, ServingStatus], SmokeResult, list[ServingStatus]]:
        async with AsyncClient(server.address) as client:
            statuses = []
            async for status in client.watch("liveness", timeout=30):
                statuses.append(status)
                break
            return await client.check("readiness"), await client.list(), await client.smoke(), statuses

    readiness, listed, smoke, watched = asyncio.run(calls())

    assert readiness is ServingStatus.SERVING
    assert listed == {name: ServingStatus.SERVING for name in SERVICES}
    assert smoke.ok and smoke.timestamp.tzinfo is UTC
    assert watched == [ServingStatus.SERVING]


def test_async_errors_are_client_errors(server: ServerProcess, refused_address: str) -> None:
    async def failures() -> list[grpc.StatusCode]:
        codes = []
        async with AsyncClient(server.address) as client:
            try:
                await client.check("nope")
            except ClientError as exc:
                codes.append(exc.code)
            try:
                async for _ in client.watch("liveness", timeout=0.3):
                    pass
            except ClientError as exc:
                codes.append(exc.code)
        async with AsyncClient(refused_address, timeout=2) as unreachable:
            try:
                await unreachable.smoke()
            except ClientError as exc:
                codes.append(exc.code)
        return codes

    assert asyncio.run(failures()) == [
        grpc.StatusCode.NOT_FOUND, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE,
    ]


def test_readme_client_examples_import_what_exists() -> None:
    section = (ROOT / "README.md").read_text().split("## Python client")[1].split("\n## ")[0]
    imports = re.findall(r"^from (petsage_grpc[.\w]*) import (.+)$", section, re.MULTILINE)

    assert len(imports) == 2
    for module_name, names in imports:
        module = importlib.import_module(module_name)
        assert [name for name in names.split(", ") if not hasattr(module, name)] == []


def test_readme_client_examples_run_as_pasted_and_return(server: ServerProcess) -> None:
    """As reported: pasted, the examples ended in a watch loop that never returned."""
    section = (ROOT / "README.md").read_text().split("## Python client")[1].split("\n## ")[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 2
    for block in blocks:
        # As pasted against this server; the mTLS lines name a host of the reader's own.
        code = block.split("\ntls = ClientTLS(")[0].replace("localhost:50051", server.address)
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                              timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        assert "ServingStatus.SERVING" in done.stdout
