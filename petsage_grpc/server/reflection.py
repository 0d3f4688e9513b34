"""Server reflection in both versions, ``grpc.reflection.v1`` and ``v1alpha``, over the served files only.

grpcio-reflection serves only v1alpha (grpcurl 1.8.6 and most tools), while
newer grpcurl, Postman and grpcui ask for v1 first.  The two versions are the
same messages under two package names, so the v1 file is derived here from
the v1alpha one (same fields, same numbers: the same bytes on the wire) and
both are answered by one servicer.

Two things are done differently from grpcio-reflection:

- a method symbol (``petsage.smoke.v1.SmokeTestService.SmokeTest``, what
  ``grpcurl describe`` sends for a method) resolves to its service's file;
- only the files of the served services and their imports are exposed, not
  every file that happens to be loaded in the process.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterable
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import FileDescriptor
from grpc_reflection.v1alpha import reflection_pb2 as _v1alpha_pb2

_LOGGER = logging.getLogger(__package__)
_POOL = descriptor_pool.Default()
V1ALPHA_SERVICE = _v1alpha_pb2.DESCRIPTOR.services_by_name["ServerReflection"].full_name
V1_PACKAGE = "grpc.reflection.v1"
V1_SERVICE = f"{V1_PACKAGE}.ServerReflection"


def _v1_file() -> FileDescriptor:
    """The v1 reflection file: v1alpha's messages and service renamed into the v1 package."""
    name = "grpc/reflection/v1/reflection.proto"
    try:
        return _POOL.FindFileByName(name)  # already loaded, e.g. by a newer grpcio-reflection
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    _v1alpha_pb2.DESCRIPTOR.CopyToProto(proto)
    old, new = f".{_v1alpha_pb2.DESCRIPTOR.package}.", f".{V1_PACKAGE}."
    proto.name, proto.package = name, V1_PACKAGE
    proto.ClearField("options")  # language options name the v1alpha package
    for message in proto.message_type:
        for field in message.field:
            if field.HasField("type_name"):  # proto2: assigning "" would add the field
                field.type_name = field.type_name.replace(old, new)
    for method in proto.service[0].method:
        method.input_type = method.input_type.replace(old, new)
        method.output_type = method.output_type.replace(old, new)
    return _POOL.AddSerializedFile(proto.SerializeToString())


def _closure(files: Iterable[FileDescriptor]) -> dict[str, FileDescriptor]:
    """``files`` and everything they import, by file name."""
    found: dict[str, FileDescriptor] = {}
    pending = list(files)
    while pending:
        file = pending.pop()
        if file.name not in found:
            found[file.name] = file
            pending.extend(file.dependencies)
    return found


class _Index:
    """What reflection may show: the served services, their files and those files' imports."""

    def __init__(self, service_names: Iterable[str]) -> None:
        self.services = tuple(sorted(set(service_names)))
        self._files = _closure(_POOL.FindServiceByName(name).file for name in self.services)
        self._serialized: dict[str, bytes] = {}
        for name, file in self._files.items():
            proto = descriptor_pb2.FileDescriptorProto()
            file.CopyToProto(proto)
            self._serialized[name] = proto.SerializeToString()

    def file_set(self, file: FileDescriptor | None) -> list[bytes] | None:
        """The serialized file with its imports, or None if it is not exposed."""
        if file is None or file.name not in self._files:
            return None
        return [self._serialized[name] for name in _closure([file])]

    def file_named(self, name: str) -> FileDescriptor | None:
        """The exposed file called ``name``."""
        return self._files.get(name)

    def file_of_symbol(self, symbol: str) -> FileDescriptor | None:
        """The file defining ``symbol``: a type, a service, or a service's method."""
        try:
            return _POOL.FindFileContainingSymbol(symbol)
        except KeyError:
            pass
        service, _, method = symbol.rpartition(".")
        try:
            found = _POOL.FindServiceByName(service)
        except KeyError:
            return None
        return found.file if method in found.methods_by_name else None

    def message(self, name: str) -> Any:
        """The exposed message type ``name``, or None (also for a service, enum or method name)."""
        file = self.file_of_symbol(name)
        if file is None or file.name not in self._files:
            return None
        try:
            return _POOL.FindMessageTypeByName(name)
        except KeyError:
            return None

    def extension_numbers(self, message: Any) -> list[int]:
        """Extension numbers of ``message`` defined in exposed files."""
        return sorted(
            e.number for e in _POOL.FindAllExtensions(message)
            if _POOL.FindFileContainingSymbol(e.full_name).name in self._files
        )


class _Version:
    """One reflection version: its service name and message classes."""

    def __init__(self, service: str, file: FileDescriptor) -> None:
        self.service = service
        self.request: Any = message_factory.GetMessageClass(file.message_types_by_name["ServerReflectionRequest"])
        self.response: Any = message_factory.GetMessageClass(file.message_types_by_name["ServerReflectionResponse"])


def _answer(index: _Index, version: _Version, request: Any) -> Any:
    """The response to one reflection request."""
    response = version.response(original_request=request)
    kind = request.WhichOneof("message_request")
    files: list[bytes] | None = None
    if kind == "list_services":
        for name in index.services:
            response.list_services_response.service.add(name=name)
        return response
    if kind == "file_by_filename":
        files, missing = index.file_set(index.file_named(request.file_by_filename)), "file"
    elif kind == "file_containing_symbol":
        files, missing = index.file_set(index.file_of_symbol(request.file_containing_symbol)), "symbol"
    elif kind == "file_containing_extension":
        wanted = request.file_containing_extension
        message, missing = index.message(wanted.containing_type), "extension"
        if message is not None and wanted.extension_number in index.extension_numbers(message):
            extension = _POOL.FindExtensionByNumber(message, wanted.extension_number)
            files = index.file_set(_POOL.FindFileContainingSymbol(extension.full_name))
    elif kind == "all_extension_numbers_of_type":
        message = index.message(request.all_extension_numbers_of_type)
        if message is not None:
            response.all_extension_numbers_response.base_type_name = message.full_name
            response.all_extension_numbers_response.extension_number.extend(index.extension_numbers(message))
            return response
        missing = "type"
    else:
        response.error_response.error_code = grpc.StatusCode.INVALID_ARGUMENT.value[0]
        response.error_response.error_message = "no known request in ServerReflectionRequest"
        return response
    if files is None:
        response.error_response.error_code = grpc.StatusCode.NOT_FOUND.value[0]
        response.error_response.error_message = f"{missing} not found"
    else:
        response.file_descriptor_response.file_descriptor_proto.extend(files)
    return response


class _Malformed:
    """Stands for a stream message that is not a ServerReflectionRequest."""


_MALFORMED = _Malformed()


def _handler(index: _Index, version: _Version) -> grpc.GenericRpcHandler:
    """The ``ServerReflectionInfo`` handler of one version: one answer per request, in order."""

    def parse(data: bytes) -> Any:
        # grpcio ends the whole stream with UNKNOWN when a deserializer raises:
        # a malformed message gets its own error answer instead, like any bad request.
        try:
            return version.request.FromString(data)
        except Exception:
            return _MALFORMED

    async def server_reflection_info(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
        async for request in requests:
            if request is _MALFORMED:
                yield version.response(error_response={
                    "error_code": grpc.StatusCode.INVALID_ARGUMENT.value[0],
                    "error_message": f"malformed {version.request.DESCRIPTOR.full_name}",
                })
                continue
            try:
                yield _answer(index, version, request)
            except Exception:  # one bad request gets an error answer; the stream goes on
                _LOGGER.exception("reflection request failed: %s", request)
                yield version.response(
                    original_request=request,
                    error_response={"error_code": grpc.StatusCode.INTERNAL.value[0],
                                    "error_message": "internal error answering this request"},
                )

    method = grpc.stream_stream_rpc_method_handler(
        server_reflection_info,
        request_deserializer=parse,
        response_serializer=version.response.SerializeToString,
    )
    return grpc.method_handlers_generic_handler(version.service, {"ServerReflectionInfo": method})


def add_to_server(service_names: Iterable[str], server: Any) -> None:
    """Serve both reflection versions for ``service_names`` (plus themselves) on ``server``.

    ``server`` is anything with ``add_generic_rpc_handlers``.
    """
    v1 = _Version(V1_SERVICE, _v1_file())
    v1alpha = _Version(V1ALPHA_SERVICE, _v1alpha_pb2.DESCRIPTOR)
    index = _Index([*service_names, V1_SERVICE, V1ALPHA_SERVICE])
    server.add_generic_rpc_handlers((_handler(index, v1), _handler(index, v1alpha)))
