"""The service as people see it through real grpcurl 1.8.6 (reflection v1alpha)."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable

import pytest

from tests.support import ServerProcess, tool

RFC3339_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")


def grpcurl(server: ServerProcess, *args: str, flags: tuple[str, ...] = ()) -> str:
    """Run grpcurl with ``flags`` before the address and ``args`` after it."""
    done = subprocess.run(
        [tool("grpcurl"), "-plaintext", "-max-time", "10", *flags, server.address, *args],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_grpcurl_is_version_1_8_6() -> None:
    done = subprocess.run([tool("grpcurl"), "-version"], capture_output=True, text=True, timeout=30, check=False)
    assert "1.8.6" in done.stdout + done.stderr


def test_grpcurl_list_shows_every_service(server: ServerProcess) -> None:
    services = grpcurl(server, "list").split()

    assert services == [
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
        "petsage.smoke.v1.SmokeTestService",
    ]


def test_grpcurl_describe_resolves_a_method_symbol(server: ServerProcess) -> None:
    described = grpcurl(server, "describe", "petsage.smoke.v1.SmokeTestService.SmokeTest")

    assert "petsage.smoke.v1.SmokeTestService.SmokeTest is a method:" in described
    assert "rpc SmokeTest ( .petsage.smoke.v1.SmokeTestRequest ) returns ( .petsage.smoke.v1.SmokeTestResponse );" \
        in described


def test_grpcurl_describe_of_a_file_the_server_does_not_serve_is_not_found(server: ServerProcess) -> None:
    done = subprocess.run(
        [tool("grpcurl"), "-plaintext", "-max-time", "10", server.address, "describe",
         "google.protobuf.FileDescriptorProto"],  # loaded in every Python process, served by no service here
        capture_output=True, text=True, timeout=30, check=False,
    )

    assert done.returncode != 0
    assert "Symbol not found: google.protobuf.FileDescriptorProto" in done.stderr


def test_no_reflection_turns_reflection_off(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server("--no-reflection")
    done = subprocess.run(
        [tool("grpcurl"), "-plaintext", "-max-time", "10", server.address, "list"],
        capture_output=True, text=True, timeout=30, check=False,
    )

    assert done.returncode != 0
    assert "server does not support the reflection API" in done.stderr
    assert server.health("readiness") == 1


def test_grpcurl_describe_resolves_timestamp(server: ServerProcess) -> None:
    described = grpcurl(server, "describe", "petsage.smoke.v1.SmokeTestResponse")

    assert ".google.protobuf.Timestamp timestamp = 3;" in described
    timestamp = grpcurl(server, "describe", "google.protobuf.Timestamp")
    assert "int64 seconds = 1;" in timestamp


def test_grpcurl_calls_smoke_test(server: ServerProcess) -> None:
    answer = json.loads(grpcurl(server, "petsage.smoke.v1.SmokeTestService/SmokeTest", flags=("-d", "{}")))

    assert answer["status"] == "STATUS_OK"
    assert answer["message"] == "PetSage services are running and logging is active."
    assert RFC3339_UTC.match(answer["timestamp"]), answer["timestamp"]
    # A field at its default is left out of protobuf's JSON: "critical": false is absent.
    assert [(c["name"], c["status"], c.get("critical", False)) for c in answer["checks"]] == [
        ("logging", "STATUS_OK", True), ("event_loop", "STATUS_OK", True), ("grpc_connections", "STATUS_OK", False)
    ]
    assert set(answer["server"]) == {"version", "instance_id", "start_time"}


@pytest.mark.parametrize("service", ["", "liveness", "readiness"])
def test_grpcurl_health_check(server: ServerProcess, service: str) -> None:
    answer = json.loads(grpcurl(
        server, "grpc.health.v1.Health/Check", flags=("-d", json.dumps({"service": service}))
    ))

    assert answer == {"status": "SERVING"}
