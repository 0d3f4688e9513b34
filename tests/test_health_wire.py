"""The probe's own grpc.health.v1 codec agrees with the generated code, unknown fields included."""

from __future__ import annotations

import pytest
from grpc_health.v1 import health_pb2

from petsage_grpc.cli.probe import wire as _health_wire


@pytest.mark.parametrize("service", ["", "readiness", "petsage.smoke.v1.SmokeTestService", "é" * 200])
def test_check_request_is_what_protobuf_writes(service: str) -> None:
    encoded = _health_wire.encode_check_request(service)

    assert encoded == health_pb2.HealthCheckRequest(service=service).SerializeToString()
    assert health_pb2.HealthCheckRequest.FromString(encoded).service == service


@pytest.mark.parametrize("status", [0, 1, 2, 3, 300])
def test_check_response_status_is_read(status: int) -> None:
    encoded = health_pb2.HealthCheckResponse(status=status).SerializeToString()

    assert _health_wire.decode_check_response(encoded) == status


def test_list_response_map_is_read_and_unknown_fields_skipped() -> None:
    answer = health_pb2.HealthListResponse()
    for name, status in {"": 1, "readiness": 2, "x" * 300: 3, "zero": 0}.items():
        answer.statuses[name].status = status
    # Fields a later protocol version might add: a varint, a fixed64, a string and a fixed32.
    unknown = b"\x10\x05" + b"\x19" + bytes(8) + b"\x22\x02hi" + b"\x2d" + bytes(4)

    decoded = _health_wire.decode_list_response(answer.SerializeToString() + unknown)

    assert decoded == {"": 1, "readiness": 2, "x" * 300: 3, "zero": 0}


@pytest.mark.parametrize("data", [b"\x08", b"\x0a\x05ab", b"\x0b"])
def test_damaged_messages_raise(data: bytes) -> None:
    with pytest.raises(ValueError):
        _health_wire.decode_check_response(data)


def test_status_names_as_go_prints_them() -> None:
    assert [_health_wire.status_name(n) for n in (0, 1, 2, 3, 9)] == [
        "UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN", "9"]
