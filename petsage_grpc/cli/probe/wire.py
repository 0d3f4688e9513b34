"""``grpc.health.v1`` Check and List messages in protobuf's wire format, for the probe only.

The probe runs as an exec probe, timed as a whole process, and importing
protobuf and the generated health module took 30-60 ms of its ~300 ms.  Its
messages are tiny and frozen by the health protocol, so the probe encodes
and decodes them here (grpc takes any serializer); the typed client uses the
generated code.  Unknown fields are skipped, as protobuf does.
"""

from __future__ import annotations

from collections.abc import Iterator

CHECK = "/grpc.health.v1.Health/Check"
LIST = "/grpc.health.v1.Health/List"
SERVING = 1
#: ``HealthCheckResponse.ServingStatus`` names, by number.
STATUS_NAMES = ("UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN")
_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5


def status_name(status: int) -> str:
    """A status's name; a number the protocol does not define prints as itself, as Go does."""
    return STATUS_NAMES[status] if 0 <= status < len(STATUS_NAMES) else str(status)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _read_varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if at >= len(data):
            raise ValueError("truncated varint")
        byte = data[at]
        value, at, shift = value | (byte & 0x7F) << shift, at + 1, shift + 7
        if not byte & 0x80:
            return value, at


def _fields(data: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """Each ``(field number, wire type, value)``: an int for varints, bytes otherwise."""
    at = 0
    while at < len(data):
        key, at = _read_varint(data, at)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            value, at = _read_varint(data, at)
            yield number, wire, value
            continue
        if wire == _LENGTH:
            size, at = _read_varint(data, at)
        elif wire in (_FIXED64, _FIXED32):
            size = 8 if wire == _FIXED64 else 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if at + size > len(data):
            raise ValueError("truncated field")
        yield number, wire, data[at:at + size]
        at += size


def encode_check_request(service: str) -> bytes:
    """``HealthCheckRequest{service}`` (an empty name is the empty message)."""
    name = service.encode("utf-8")
    return b"\x0a" + _varint(len(name)) + name if name else b""


def encode_list_request(_: object = None) -> bytes:
    """``HealthListRequest{}``: no fields."""
    return b""


def decode_check_response(data: bytes) -> int:
    """The ``status`` of a ``HealthCheckResponse`` (0, UNKNOWN, when absent)."""
    status = 0
    for number, wire, value in _fields(data):
        if number == 1 and wire == _VARINT and isinstance(value, int):
            status = value
    return status


def decode_list_response(data: bytes) -> dict[str, int]:
    """The ``statuses`` map of a ``HealthListResponse``: service name to status."""
    statuses: dict[str, int] = {}
    for number, wire, entry in _fields(data):
        if number != 1 or wire != _LENGTH or not isinstance(entry, bytes):
            continue
        name, status = "", 0
        for key, key_wire, value in _fields(entry):
            if key == 1 and key_wire == _LENGTH and isinstance(value, bytes):
                name = value.decode("utf-8")
            elif key == 2 and key_wire == _LENGTH and isinstance(value, bytes):
                status = decode_check_response(value)
        statuses[name] = status
    return statuses
