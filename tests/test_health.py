"""grpc.health.v1 over the wire: every published name, unknown names, Watch and List."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support import NOT_SERVING, RPC_TIMEOUT, SERVICE_UNKNOWN, SERVING, ServerProcess

PUBLISHED = ("", "liveness", "readiness", "petsage.smoke.v1.SmokeTestService")


@pytest.mark.parametrize("service", PUBLISHED)
def test_check_published_service_is_serving(server: ServerProcess, service: str) -> None:
    assert server.health(service) == SERVING


@pytest.mark.parametrize("service", ["nope", "grpc.health.v1.Health", "Readiness", " "])
def test_check_unknown_service_returns_not_found(server: ServerProcess, service: str) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        server.health(service)

    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert caught.value.details() == "unknown service"


def test_list_returns_every_published_service(server: ServerProcess) -> None:
    stub = health_pb2_grpc.HealthStub(server.channel())

    answer = stub.List(health_pb2.HealthListRequest(), timeout=RPC_TIMEOUT)

    assert {name: s.status for name, s in answer.statuses.items()} == dict.fromkeys(PUBLISHED, SERVING)


def test_watch_unknown_service_answers_service_unknown_and_stays_open(server: ServerProcess) -> None:
    stub = health_pb2_grpc.HealthStub(server.channel())
    stream = stub.Watch(health_pb2.HealthCheckRequest(service="nope"), timeout=1.0)

    assert next(stream).status == SERVICE_UNKNOWN
    with pytest.raises(grpc.RpcError) as caught:
        next(stream)  # nothing more is sent: the stream ends only at its deadline
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_watch_sends_current_status_then_not_serving_on_shutdown(server: ServerProcess) -> None:
    stub = health_pb2_grpc.HealthStub(server.channel())
    stream = stub.Watch(health_pb2.HealthCheckRequest(service="readiness"), timeout=RPC_TIMEOUT)
    assert next(stream).status == SERVING

    server.signal()

    assert next(stream).status == NOT_SERVING
    with pytest.raises(grpc.RpcError) as caught:
        next(stream)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert server.wait() == 0


def test_malformed_check_request_gets_invalid_argument(server: ServerProcess) -> None:
    raw = server.channel().unary_unary(
        "/grpc.health.v1.Health/Check", request_serializer=None, response_deserializer=None
    )

    with pytest.raises(grpc.RpcError) as caught:
        raw(b"\x0a\xff", timeout=RPC_TIMEOUT)

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert server.health("readiness") == SERVING
