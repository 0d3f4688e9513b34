"""SmokeTest over the wire: the answer, its timestamp, and the record it really wrote."""

from __future__ import annotations

import re
from datetime import UTC, datetime

import grpc
import pytest

from petsage_grpc._proto.smoke.v1 import smoke_pb2
from tests.support import RPC_TIMEOUT, ServerProcess


def test_smoke_test_reports_ok_with_timestamp_in_call_window(server: ServerProcess) -> None:
    before = datetime.now(UTC)
    response = server.smoke()
    after = datetime.now(UTC)

    assert response.status == smoke_pb2.STATUS_OK
    assert response.message == "PetSage services are running and logging is active."
    ran_at = response.timestamp.ToDatetime(tzinfo=UTC)
    assert before <= ran_at <= after
    assert response.server.version
    assert response.server.instance_id
    assert response.server.start_time.ToDatetime(tzinfo=UTC) <= ran_at


def test_smoke_test_logging_check_names_a_record_that_reached_stdout(server: ServerProcess) -> None:
    response = server.smoke()

    check, loop_check, connections = response.checks
    assert (check.name, check.status, check.critical) == ("logging", smoke_pb2.STATUS_OK, True)
    assert (loop_check.name, loop_check.status, loop_check.critical) == ("event_loop", smoke_pb2.STATUS_OK, True)
    assert (connections.name, connections.status, connections.critical) == (
        "grpc_connections", smoke_pb2.STATUS_OK, False)
    assert re.fullmatch(r"\d+ of 10000 gRPC connections open", connections.detail)
    assert check.duration.ToNanoseconds() > 0
    probe_id = check.detail.split()[1]
    assert check.detail == f"record {probe_id} delivered to stdout"
    # The record the server confirmed is really in its output, in the classic format.
    line = server.stdout.wait_for(probe_id).string
    assert " - petsage_grpc.logprobe - INFO - logging probe " + probe_id in line


def test_each_smoke_test_writes_its_own_record(server: ServerProcess) -> None:
    details = {server.smoke().checks[0].detail for _ in range(5)}

    assert len(details) == 5


@pytest.mark.parametrize("payload", [b"\xff\xff\xff\xff", b"\x0a\x05ab", b"\x08" + b"\xff" * 11])
def test_malformed_request_bytes_get_an_error_and_the_server_keeps_serving(
    server: ServerProcess, payload: bytes
) -> None:
    raw = server.channel().unary_unary(
        "/petsage.smoke.v1.SmokeTestService/SmokeTest",
        request_serializer=None, response_deserializer=None,
    )

    with pytest.raises(grpc.RpcError) as caught:
        raw(payload, timeout=RPC_TIMEOUT)

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == "malformed petsage.smoke.v1.SmokeTestRequest"
    assert server.smoke().status == smoke_pb2.STATUS_OK
