"""Hand-made gRPC calls over raw HTTP/2 (the h2 library): the requests real clients never send.

``incomplete_calls`` opens one connection and starts many calls whose request
never completes (or whose bytes are wrong), then reads until each has its
status, the connection ends, or the time is up.  Used by the hostile-caller
tests; loopback only.
"""

from __future__ import annotations

import asyncio
import socket
import time

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings

CHECK = "/grpc.health.v1.Health/Check"
#: A call that got no status: still open when the time ran out.
NO_STATUS = "none"


def _headers(path: str, host: str) -> list[tuple[str, str]]:
    return [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", host),
            ("content-type", "application/grpc"), ("te", "trailers")]


async def incomplete_calls(host: str, port: int, calls: int, body: bytes, *, end_stream: bool,
                           seconds: float, path: str = CHECK) -> list[str]:
    """Start ``calls`` calls on one connection, each sending ``body``; each call's grpc-status (or an outcome).

    An outcome is ``NO_STATUS`` (still open after ``seconds``), ``reset``
    (RST_STREAM) or ``closed`` (the connection ended first).
    """
    reader, writer = await asyncio.open_connection(host, port)
    connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    connection.initiate_connection()
    writer.write(connection.data_to_send())
    statuses: dict[int, str] = {}
    streams: list[int] = []
    deadline = time.monotonic() + seconds
    try:
        while len(streams) < calls or len(statuses) < calls:
            room = connection.remote_settings.max_concurrent_streams - connection.open_outbound_streams
            while len(streams) < calls and room > 0:
                room -= 1
                stream = connection.get_next_available_stream_id()
                connection.send_headers(stream, _headers(path, f"{host}:{port}"), end_stream=not body and end_stream)
                if body:
                    connection.send_data(stream, body, end_stream=end_stream)
                streams.append(stream)
            writer.write(connection.data_to_send())
            await writer.drain()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                data = await asyncio.wait_for(reader.read(65536), remaining)
            except TimeoutError:
                break
            if not data:
                break
            for event in connection.receive_data(data):
                if isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                    # header_encoding="utf-8": names and values arrive as str.
                    headers = {str(name): str(value) for name, value in event.headers or ()}
                    if "grpc-status" in headers and event.stream_id is not None:
                        statuses[event.stream_id] = headers["grpc-status"]
                elif isinstance(event, h2.events.StreamReset) and event.stream_id is not None:
                    statuses.setdefault(event.stream_id, "reset")
                elif isinstance(event, h2.events.ConnectionTerminated):
                    return [statuses.get(s, "closed") for s in streams] + ["closed"] * (calls - len(streams))
            writer.write(connection.data_to_send())
    finally:
        writer.close()
    return [statuses.get(s, NO_STATUS) for s in streams] + [NO_STATUS] * (calls - len(streams))


def leave_before_the_answer(host: str, port: int, path: str, user_agent: str, timeout: float = 5.0) -> None:
    """Make one call and cancel it once the server has answered, before the answer can reach us.

    The connection's flow-control window is 0, so the server can send its
    headers but not its message; the stream is then reset, as a client that
    gives up at the wrong moment does.
    """
    with socket.create_connection((host, port), timeout=timeout) as sock:
        connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        connection.local_settings = h2.settings.Settings(
            client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
        connection.initiate_connection()
        stream = connection.get_next_available_stream_id()
        connection.send_headers(stream, [*_headers(path, f"{host}:{port}"), ("user-agent", user_agent)])
        connection.send_data(stream, b"\x00\x00\x00\x00\x00", end_stream=True)  # an empty request message
        sock.sendall(connection.data_to_send())
        answered = False
        while not answered:
            data = sock.recv(65536)
            assert data, "the server closed the connection"
            answered = any(isinstance(event, h2.events.ResponseReceived) for event in connection.receive_data(data))
            sock.sendall(connection.data_to_send())
        connection.reset_stream(stream, h2.errors.ErrorCodes.CANCEL)
        sock.sendall(connection.data_to_send())
