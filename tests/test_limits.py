"""Limits on messages and connections, against a real server over real sockets.

Oversized requests get RESOURCE_EXHAUSTED, clients that ping too often are
sent away, idle connections are closed, one connection's streams are capped,
and thousands of idle connections cost bounded memory and are capped too.
The server keeps serving through all of it.
"""

from __future__ import annotations

import os
import resource
import socket
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from petsage_grpc._proto.smoke.v1 import smoke_pb2
from tests.support import RPC_TIMEOUT, SERVING, ServerProcess, Start, proc_status

#: A client's HTTP/2 connection preface followed by an empty SETTINGS frame.
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
CONNECTIONS = 5_000
#: Server memory one idle connection may cost (about 17 KiB measured with grpcio 1.85).
MAX_BYTES_PER_CONNECTION = 32 * 1024


def check_request(service: str) -> bytes:
    data: bytes = health_pb2.HealthCheckRequest(service=service).SerializeToString()
    return data


def raw_call(server: ServerProcess, method: str, payload: bytes) -> Any:
    """Send ``payload`` as the request of ``method``, untouched; the answer's bytes or the ``grpc.RpcError``."""
    try:
        answer: bytes = server.channel().unary_unary(method)(payload, timeout=RPC_TIMEOUT)
    except grpc.RpcError as exc:
        return exc
    return answer


@pytest.mark.parametrize(("flags", "limit"), [((), 16 * 1024), (("--max-receive-bytes", "2048"), 2048)])
def test_request_over_the_receive_limit_gets_resource_exhausted(
    start_server: Start, flags: tuple[str, ...], limit: int
) -> None:
    server = start_server(*flags)
    check = "/grpc.health.v1.Health/Check"
    # A service name just inside the limit is read (and unknown); one byte more is refused unread.
    # The message is a tag byte, a two-byte length and the name.
    fits = check_request("x" * (limit - 3))
    assert len(fits) == limit
    over = check_request("x" * (limit - 2))
    assert len(over) == limit + 1

    answer = raw_call(server, check, fits)
    assert isinstance(answer, grpc.RpcError) and answer.code() == grpc.StatusCode.NOT_FOUND
    for method, payload in ((check, over), ("/petsage.smoke.v1.SmokeTestService/SmokeTest", over)):
        refused = raw_call(server, method, payload)
        assert isinstance(refused, grpc.RpcError)
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"larger than max ({limit + 1} vs. {limit})" in (refused.details() or "")

    assert server.smoke().status == smoke_pb2.STATUS_OK
    assert server.health("readiness") == SERVING


def test_oversized_reflection_request_ends_only_that_stream(start_server: Start) -> None:
    server = start_server()
    method = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
    stream = server.channel().stream_stream(method)
    with pytest.raises(grpc.RpcError) as refused:
        list(stream(iter([b"\x1a" + b"\xff\x7f" + b"x" * 0x3FFF + b"x" * 2]), timeout=RPC_TIMEOUT))
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert server.health("") == SERVING


def test_client_pinging_too_often_is_sent_away(start_server: Start) -> None:
    server = start_server("--keepalive-min-interval", "5")
    pushy = grpc.insecure_channel(server.address, options=(
        ("grpc.keepalive_time_ms", 200), ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ))
    polite = health_pb2_grpc.HealthStub(server.channel())
    polite_watch = polite.Watch(health_pb2.HealthCheckRequest(service="readiness"), timeout=30)
    try:
        assert next(polite_watch).status == SERVING
        watch = health_pb2_grpc.HealthStub(pushy).Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as ended:
            for _ in watch:
                pass
        # Three pings 0.2 s apart are too many: the server answers GOAWAY too_many_pings.
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "Too many pings" in (ended.value.details() or "")
        assert time.monotonic() - started < 20
        # The polite client's stream and connection are untouched.
        response = polite.Check(health_pb2.HealthCheckRequest(service="readiness"), timeout=RPC_TIMEOUT)
        assert response.status == SERVING
        assert polite_watch.running()
    finally:
        polite_watch.cancel()
        pushy.close()


def read_until_closed(connection: socket.socket, timeout: float) -> bytes:
    """Read what the server sends until it closes the connection (fails after ``timeout``)."""
    connection.settimeout(timeout)
    received = b""
    while chunk := connection.recv(65536):
        received += chunk
    return received


def test_idle_connection_is_closed_and_one_with_a_watch_is_not(start_server: Start) -> None:
    idle_timeout = 1.0
    server = start_server("--idle-timeout", str(idle_timeout))
    host, port = server.address.rsplit(":", 1)
    states: list[grpc.ChannelConnectivity] = []
    watching = server.channel()
    watching.subscribe(states.append, try_to_connect=True)
    watch = health_pb2_grpc.HealthStub(watching).Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
    try:
        assert next(watch).status == SERVING
        with socket.create_connection((host, int(port)), timeout=RPC_TIMEOUT) as idle:
            idle.sendall(PREFACE)
            started = time.monotonic()
            received = read_until_closed(idle, timeout=idle_timeout + 10)
            closed_after = time.monotonic() - started
        # The server said goodbye properly: a GOAWAY frame (type 7) before closing.
        assert b"\x07\x00\x00\x00\x00\x00" in received
        assert idle_timeout * 0.5 <= closed_after < idle_timeout + 10
        # The connection carrying a Watch outlived the idle one: a call in flight is not idleness.
        assert watch.running()
        assert states[-1] == grpc.ChannelConnectivity.READY
    finally:
        watch.cancel()


def test_streams_beyond_the_per_connection_limit_wait(start_server: Start) -> None:
    server = start_server("--max-streams", "2")
    own = (("grpc.use_local_subchannel_pool", 1),)  # a connection of its own, not one shared by target
    channel, other = (grpc.insecure_channel(server.address, options=own) for _ in range(2))
    stub = health_pb2_grpc.HealthStub(channel)
    watches = [stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=30) for _ in range(2)]
    try:
        assert [next(w).status for w in watches] == [SERVING, SERVING]
        with pytest.raises(grpc.RpcError) as waited:
            stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
        assert waited.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        other_stub = health_pb2_grpc.HealthStub(other)  # another connection is not affected
        assert other_stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=RPC_TIMEOUT).status == SERVING

        watches.pop().cancel()  # a stream frees up: the next call goes through
        assert stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=RPC_TIMEOUT).status == SERVING
    finally:
        for watch in watches:
            watch.cancel()
        channel.close()
        other.close()


@pytest.fixture
def many_descriptors() -> Iterator[None]:
    """Room for thousands of sockets in this process and the servers it starts."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 3 * CONNECTIONS
    if hard != resource.RLIM_INFINITY and hard < wanted and os.geteuid() != 0:
        pytest.skip(f"needs {wanted} file descriptors; the hard limit is {hard} (CI runs as root)")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), max(hard, wanted)))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def open_idle(host: str, port: int, count: int) -> tuple[list[socket.socket], int]:
    """Open ``count`` HTTP/2 connections that send their preface and nothing else.

    Returns the sockets and how many the server greeted with its SETTINGS
    (the rest it closed at once).
    """
    sockets, greeted = [], 0
    for _ in range(count):
        connection = socket.create_connection((host, port), timeout=RPC_TIMEOUT)
        sockets.append(connection)
        try:
            connection.sendall(PREFACE)
            greeted += len(connection.recv(9)) == 9
        except ConnectionResetError:
            pass
    return sockets, greeted


@pytest.mark.usefixtures("many_descriptors")
def test_five_thousand_idle_connections_cost_bounded_memory_and_are_capped(start_server: Start) -> None:
    server = start_server("--max-connections", str(CONNECTIONS + 1), "--idle-timeout", "3")
    host, port = server.address.rsplit(":", 1)
    assert server.smoke().status == smoke_pb2.STATUS_OK  # our own channel: one connection
    before = proc_status(server.process.pid, "VmRSS") * 1024

    sockets, greeted = open_idle(host, int(port), CONNECTIONS + 10)
    try:
        # The cap counts our own channel too: about CONNECTIONS more accepted, the rest closed at once.
        assert CONNECTIONS - 1 <= greeted <= CONNECTIONS
        grown = proc_status(server.process.pid, "VmRSS") * 1024 - before
        assert grown / greeted < MAX_BYTES_PER_CONNECTION, f"{grown / greeted:.0f} bytes per connection"
        assert server.health("readiness") == SERVING  # still answering, over the connection it had

        # Idle for 3 s: the server closes every one of them itself.
        for connection in sockets:
            read_until_closed(connection, timeout=30.0)
    finally:
        for connection in sockets:
            connection.close()
    assert server.health("readiness") == SERVING
    assert server.smoke().status == smoke_pb2.STATUS_OK
