"""The HTTP side against bad input and hostile clients, over real sockets: sizes, timeouts, the connection cap,
slow clients beside gRPC probes, TLS, workers and the kubelet's httpGet probes of the manifest."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from petsage_grpc.server.http.listener import HEAD_TIMEOUT, MAX_HEAD_BYTES
from tests.certs import make_certs
from tests.support import RPC_TIMEOUT, SERVING, ServerProcess, Start, http_request
from tests.support.deploy import PROBE_KINDS, container, kubelet_probe

HTTP = ("--http-address", "127.0.0.1:0")


def raw(server: ServerProcess, data: bytes, timeout: float = RPC_TIMEOUT) -> bytes:
    """Send ``data`` on a new connection and read until the server closes it."""
    host, port = urlsplit(server.http_url).netloc.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout) as connection:
        connection.sendall(data)
        received = b""
        while chunk := connection.recv(65536):
            received += chunk
    return received


def test_an_oversized_request_head_gets_431_and_the_connection_closes(start_server: Start) -> None:
    server = start_server(*HTTP)

    long_line = raw(server, b"GET /livez?" + b"x" * MAX_HEAD_BYTES + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    many_headers = raw(server, b"GET /livez HTTP/1.1\r\nHost: x\r\n" + b"X-Filler: yyyyyyyy\r\n" * 1000 + b"\r\n")

    for answer in (long_line, many_headers):
        assert answer.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"), answer[:80]
    assert server.http("/livez").status == 200


def test_bytes_that_are_not_http_get_400_and_the_connection_closes(start_server: Start) -> None:
    server = start_server(*HTTP)

    answer = raw(server, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n")

    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert server.http("/livez").status == 200


def test_keep_alive_serves_several_requests_on_one_connection_pipelined_or_not(start_server: Start) -> None:
    server = start_server(*HTTP)
    request = b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n"

    answer = raw(server, request * 3 + b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")

    assert answer.count(b"HTTP/1.1 200 OK\r\n") == 4
    assert answer.endswith(b"\r\n\r\nok")


def test_a_client_that_never_finishes_its_request_head_is_answered_408_and_closed(start_server: Start) -> None:
    server = start_server(*HTTP)
    started = time.monotonic()

    answer = raw(server, b"GET /livez HTTP/1.1\r\nHost: x\r\n", timeout=HEAD_TIMEOUT + 5)

    assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert HEAD_TIMEOUT <= time.monotonic() - started < HEAD_TIMEOUT + 4


def test_a_silent_connection_is_closed_after_the_head_timeout_without_an_answer(start_server: Start) -> None:
    server = start_server(*HTTP)

    assert raw(server, b"", timeout=HEAD_TIMEOUT + 5) == b""


async def _slow_clients(host: str, port: int, count: int, seconds: float) -> int:
    """``count`` clients sending a request head a few bytes at a time, reconnecting when closed; connections made."""
    made = 0
    end = time.monotonic() + seconds

    async def one() -> None:
        nonlocal made
        while time.monotonic() < end:
            try:
                reader, writer = await asyncio.open_connection(host, port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            made += 1
            try:
                writer.write(b"GET /metrics HTTP/1.1\r\n")
                while time.monotonic() < end and not reader.at_eof():
                    writer.write(b"X-Slow: 1\r\n")
                    await writer.drain()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(reader.read(1024), 0.2)
            except OSError:
                pass
            finally:
                writer.close()

    await asyncio.gather(*(one() for _ in range(count)))
    return made


@contextlib.asynccontextmanager
async def attacked(server: ServerProcess, count: int, seconds: float) -> AsyncIterator[asyncio.Task[int]]:
    """Slow HTTP clients against ``server`` for ``seconds``, while the body runs."""
    host, port = urlsplit(server.http_url).netloc.rsplit(":", 1)
    attack = asyncio.ensure_future(_slow_clients(host, int(port), count, seconds))
    await asyncio.sleep(0.5)  # let the attack take every slot first
    yield attack
    await attack


def test_slow_clients_at_the_connection_cap_keep_neither_scrapes_nor_grpc_probes_out(start_server: Start) -> None:
    server = start_server(*HTTP, "--metrics", "--http-max-connections", "50")

    async def scenario() -> tuple[list[int], list[int], int]:
        scrapes, probes = [], []
        async with attacked(server, 200, 4.0) as attack, grpc.aio.insecure_channel(server.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for _ in range(10):
                # A fresh connection each time, as Prometheus after a failed scrape and the kubelet do.
                answer = await asyncio.to_thread(http_request, server.http_url + "/metrics", "GET", None, 1.0)
                scrapes.append(answer.status)
                check = await stub.Check(health_pb2.HealthCheckRequest(service="liveness"), timeout=1.0)
                probes.append(check.status)
            made = await attack
        return scrapes, probes, made

    scrapes, probes, made = asyncio.run(scenario())
    assert made > 200  # the attackers were closed and came back
    assert scrapes == [200] * 10
    assert probes == [SERVING] * 10
    metrics = server.http("/metrics").text
    evicted = next(line for line in metrics.splitlines() if line.startswith('petsage_http_connections_closed_total{'
                                                                            'reason="evicted"}'))
    assert float(evicted.split()[-1]) > 0
    server.stdout.wait_for(r"HTTP connection cap \(50\) reached: \d+ waiting connection\(s\) closed to make room")


def test_https_with_the_grpc_certificate_and_no_client_certificate_asked(start_server: Start, tmp_path: Path) -> None:
    certs = make_certs(tmp_path)
    server = start_server(*HTTP, "--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key),
                          "--tls-client-ca", str(certs.ca))
    assert server.http_url.startswith("https://")
    port = urlsplit(server.http_url).port

    done = subprocess.run(["curl", "--silent", "--show-error", "--cacert", str(certs.ca), "--max-time", "5",
                           f"https://localhost:{port}/readyz"], capture_output=True, text=True, timeout=15, check=False)
    assert (done.returncode, done.stdout) == (0, "ok"), done.stderr
    context = ssl.create_default_context(cafile=str(certs.ca))
    assert http_request(f"https://localhost:{port}/livez", context=context).status == 200
    with pytest.raises(OSError):  # plaintext to the TLS port gets no HTTP answer
        http_request(f"http://127.0.0.1:{port}/livez", timeout=2)


def test_two_workers_share_the_http_port_too(start_server: Start) -> None:
    server = start_server("--workers", "2", *HTTP)

    instances = {server.http("/api/v1/smoke-test/").json()["server"]["instance_id"] for _ in range(20)}

    assert len(instances) == 2  # the kernel spreads new connections over both workers
    assert server.http("/readyz").status == 200
    server.signal(signal.SIGTERM)
    assert server.wait() == 0


@pytest.mark.parametrize(("log_file", "ready"), [(None, True), ("/dev/full", False)])
def test_the_manifests_http_probes_pass_and_fail_as_the_kubelet_reads_them(
    start_server: Start, log_file: str | None, ready: bool
) -> None:
    spec = container()
    server = start_server(*HTTP, *(("--log-file", log_file) if log_file else ()))

    for kind in PROBE_KINDS:
        assert kubelet_probe(server, spec[kind]) is (ready or kind != "readinessProbe"), kind
    assert not [line for line in server.stdout.lines if "kube-probe" in line]  # probes are counted, not logged
