"""Reflection v1 and v1alpha with real clients: yagrc (v1 first) and grpcio-reflection's stubs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha_pb2
from grpc_reflection.v1alpha import reflection_pb2_grpc as v1alpha_pb2_grpc
from yagrc import reflector
from yagrc.grpc_reflection.v1 import reflection_pb2 as v1_pb2
from yagrc.grpc_reflection.v1 import reflection_pb2_grpc as v1_pb2_grpc

from tests.support import RPC_TIMEOUT, ServerProcess

VERSIONS = {"v1": (v1_pb2, v1_pb2_grpc), "v1alpha": (v1alpha_pb2, v1alpha_pb2_grpc)}
SERVED = [
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
    "petsage.smoke.v1.SmokeTestService",
]
NOT_FOUND = grpc.StatusCode.NOT_FOUND.value[0]


def ask(server: ServerProcess, version: str, **request: Any) -> Any:
    """Send one reflection request with the ``version`` stubs and return the answer."""
    messages, services = VERSIONS[version]
    stub = services.ServerReflectionStub(server.channel())
    answers = stub.ServerReflectionInfo(iter([messages.ServerReflectionRequest(**request)]), timeout=RPC_TIMEOUT)
    return next(answers)


def file_names(answer: Any) -> list[str]:
    """The names of the files in a file descriptor answer."""
    return [
        descriptor_pb2.FileDescriptorProto.FromString(raw).name
        for raw in answer.file_descriptor_response.file_descriptor_proto
    ]


@pytest.mark.parametrize("version", VERSIONS)
def test_both_versions_list_the_served_services(server: ServerProcess, version: str) -> None:
    answer = ask(server, version, list_services="")

    assert [s.name for s in answer.list_services_response.service] == SERVED


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(
    "symbol", ["petsage.smoke.v1.SmokeTestService", "petsage.smoke.v1.SmokeTestService.SmokeTest",
               "petsage.smoke.v1.CheckResult", "petsage.smoke.v1.STATUS_OK"],
)
def test_symbols_resolve_to_the_smoke_file_with_its_imports(server: ServerProcess, version: str, symbol: str) -> None:
    answer = ask(server, version, file_containing_symbol=symbol)

    names = file_names(answer)
    assert names[0] == "petsage_grpc/_proto/smoke/v1/smoke.proto"
    assert sorted(names[1:]) == ["google/protobuf/duration.proto", "google/protobuf/timestamp.proto"]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(
    "request_fields",
    [{"file_containing_symbol": "petsage.smoke.v1.SmokeTestService.Nope"},
     {"file_containing_symbol": "google.protobuf.FileDescriptorProto"},
     {"file_by_filename": "google/protobuf/descriptor.proto"},
     {"all_extension_numbers_of_type": "google.protobuf.MessageOptions"}],
)
def test_what_the_server_does_not_serve_is_not_found(
    server: ServerProcess, version: str, request_fields: dict[str, str]
) -> None:
    answer = ask(server, version, **request_fields)

    assert answer.error_response.error_code == NOT_FOUND
    assert answer.error_response.error_message.endswith("not found")


def test_v1_reflection_describes_itself(server: ServerProcess) -> None:
    answer = ask(server, "v1", file_containing_symbol="grpc.reflection.v1.ServerReflection")

    [raw] = answer.file_descriptor_response.file_descriptor_proto
    file = descriptor_pb2.FileDescriptorProto.FromString(raw)
    assert (file.name, file.package) == ("grpc/reflection/v1/reflection.proto", "grpc.reflection.v1")
    assert [m.input_type for m in file.service[0].method] == [".grpc.reflection.v1.ServerReflectionRequest"]


def test_yagrc_calls_smoke_test_from_reflection_alone(server: ServerProcess) -> None:
    assert reflector.list_services(server.channel()) == SERVED  # v1, which yagrc asks first
    client = reflector.GrpcReflectionClient()
    client.load_protocols(server.channel(), symbols=["petsage.smoke.v1.SmokeTestService"])
    stub = client.service_stub_class("petsage.smoke.v1.SmokeTestService")(server.channel())
    request = client.message_class("petsage.smoke.v1.SmokeTestRequest")()

    answer = stub.SmokeTest(request, timeout=RPC_TIMEOUT)

    assert client.enum_class("petsage.smoke.v1.Status").Name(answer.status) == "STATUS_OK"


@pytest.mark.parametrize("version", VERSIONS)
def test_no_reflection_leaves_both_versions_unimplemented(
    start_server: Callable[..., ServerProcess], version: str
) -> None:
    server = start_server("--no-reflection")

    with pytest.raises(grpc.RpcError) as caught:
        ask(server, version, list_services="")

    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


@pytest.mark.parametrize("version", VERSIONS)
def test_one_stream_answers_every_request_in_order_even_after_an_error(server: ServerProcess, version: str) -> None:
    messages, services = VERSIONS[version]
    stub = services.ServerReflectionStub(server.channel())
    requests = [
        messages.ServerReflectionRequest(all_extension_numbers_of_type="petsage.smoke.v1.SmokeTestService"),
        messages.ServerReflectionRequest(
            file_containing_extension={"containing_type": "petsage.smoke.v1.Status", "extension_number": 1}
        ),
        messages.ServerReflectionRequest(list_services=""),
    ]

    answers = list(stub.ServerReflectionInfo(iter(requests), timeout=RPC_TIMEOUT))

    assert [a.WhichOneof("message_response") for a in answers] == [
        "error_response", "error_response", "list_services_response"
    ]
    assert [a.error_response.error_code for a in answers[:2]] == [NOT_FOUND, NOT_FOUND]
    assert [a.original_request for a in answers] == requests
