"""The probe's own HTTP/2 client (cli/probe/transport.py, hpack.py) against an HTTP/2 server built on h2.

The server is python-hyper's h2 on a loopback socket, on a thread: it
answers each call as the requested service name says, with what a real
server may send (Huffman-coded and indexed headers, padding, CONTINUATION
frames, a response larger than the flow-control window, PING, RST_STREAM,
GOAWAY, an HTTP error, compression), so each path of the client is proven
against an implementation other than grpc.
"""

from __future__ import annotations

import gzip
import socket
import threading
from collections.abc import Iterator

import h2.config
import h2.connection
import h2.events
import hpack as reference
import pytest

from petsage_grpc.cli.probe import hpack, transport, wire
from petsage_grpc.cli.probe.stop import Stop

TIMEOUT = 5.0
GRPC = [(":status", "200"), ("content-type", "application/grpc")]


def _message(payload: bytes, compressed: bool = False) -> bytes:
    return bytes((int(compressed),)) + len(payload).to_bytes(4, "big") + payload


def _serving() -> bytes:
    return b"\x08\x01"  # HealthCheckResponse{status: SERVING}


class H2Server:
    """A scripted HTTP/2 server: the service name in each Check request picks the answer."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.ping_acknowledged = threading.Event()
        self.requests: list[dict[str, str]] = []
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._closing.set()
        self._thread.join(TIMEOUT)
        self.listener.close()

    def _serve(self) -> None:
        self.listener.settimeout(0.05)  # a blocked accept() would not see the listener closed
        while not self._closing.is_set():
            try:
                sock, _ = self.listener.accept()
            except TimeoutError:
                continue
            with sock:
                self._connection(sock)

    def _connection(self, sock: socket.socket) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        conn.initiate_connection()
        sock.sendall(conn.data_to_send())
        headers: dict[int, dict[str, str]] = {}
        bodies: dict[int, bytes] = {}
        pending: dict[int, bytes] = {}  # data waiting for flow-control window
        sock.settimeout(TIMEOUT)
        while True:
            try:
                data = sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    headers[event.stream_id] = {k.decode() if isinstance(k, bytes) else k:
                                                v.decode() if isinstance(v, bytes) else v
                                                for k, v in event.headers}
                elif isinstance(event, h2.events.DataReceived):
                    bodies[event.stream_id] = bodies.get(event.stream_id, b"") + event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.PingAckReceived):
                    self.ping_acknowledged.set()
                elif isinstance(event, h2.events.StreamEnded):
                    self.requests.append(headers[event.stream_id])
                    body = bodies.get(event.stream_id, b"")
                    payload = body[5:]
                    if body[:1] == b"\x01":
                        payload = gzip.decompress(payload)
                    service = payload[2:].decode() if payload else ""
                    self._answer(conn, event.stream_id, service, pending)
                elif isinstance(event, h2.events.WindowUpdated):
                    self._flush(conn, pending)
            sock.sendall(conn.data_to_send())

    def _flush(self, conn: h2.connection.H2Connection, pending: dict[int, bytes]) -> None:
        for stream_id, data in list(pending.items()):
            window = min(conn.local_flow_control_window(stream_id), conn.max_outbound_frame_size)
            while data and window > 0:
                chunk, data = data[:window], data[window:]
                conn.send_data(stream_id, chunk)
                window = min(conn.local_flow_control_window(stream_id), conn.max_outbound_frame_size)
            if data:
                pending[stream_id] = data
            else:
                del pending[stream_id]
                conn.send_headers(stream_id, [("grpc-status", "0")], end_stream=True)

    def _answer(self, conn: h2.connection.H2Connection, stream: int, service: str, pending: dict[int, bytes]) -> None:
        if service == "silent":
            return
        if service == "rst":
            conn.reset_stream(stream, error_code=7)  # REFUSED_STREAM
        elif service == "goaway":
            conn.close_connection(error_code=0, additional_data=b"going away", last_stream_id=0)
        elif service == "http404":
            conn.send_headers(stream, [(":status", "404")], end_stream=True)
        elif service == "trailers-only":
            conn.send_headers(stream, [*GRPC, ("grpc-status", "5"), ("grpc-message", "unknown%20service%3A%20%C3%A9")],
                              end_stream=True)
        elif service == "big":  # a List-sized answer beyond the 64 KiB window: flow control must flow
            conn.send_headers(stream, GRPC)
            pending[stream] = _message(b"\x08\x01" * 50_000)
            self._flush(conn, pending)
        else:
            if service == "ping":
                conn.ping(b"12345678")
            extra = [("x-long", "v" * 20_000)] if service == "continuation" else []  # one header beyond a frame
            conn.send_headers(stream, [*GRPC, *extra, *([("grpc-encoding", "gzip")] if service == "gzip" else [])])
            body = _message(gzip.compress(_serving()), True) if service == "gzip" else _message(_serving())
            conn.send_data(stream, body, pad_length=10 if service == "padded" else None)
            conn.send_headers(stream, [("grpc-status", "0"), ("grpc-message", "")], end_stream=True)


@pytest.fixture
def server() -> Iterator[H2Server]:
    running = H2Server()
    yield running
    running.close()


def _check(server: H2Server, *services: str, timeout: float = TIMEOUT, gzip_requests: bool = False,
           stop: Stop | None = None) -> list[transport.CallResult]:
    connection = transport.connect(transport.parse_target(server.address), timeout=TIMEOUT, stop=stop or Stop())
    try:
        answers = connection.unary(wire.CHECK, [wire.encode_check_request(s) for s in services], timeout=timeout,
                                   metadata=[("x-tenant", "pets"), ("x-trace-bin", b"\x00\xff")],
                                   user_agent="test-agent", gzip=gzip_requests)
    finally:
        connection.close()
    return [answer for answer, _ in answers]


@pytest.mark.parametrize("service", ["ok", "padded", "continuation", "ping", "gzip"])
def test_every_way_a_server_may_frame_a_serving_answer_decodes(server: H2Server, service: str) -> None:
    [answer] = _check(server, service)

    assert (answer.code, answer.message, answer.payload) == (transport.OK, "", _serving())
    assert answer.payload is not None and wire.decode_check_response(answer.payload) == wire.SERVING
    if service == "ping":
        assert server.ping_acknowledged.wait(TIMEOUT)


def test_requests_carry_the_grpc_headers_metadata_and_gzip(server: H2Server) -> None:
    [answer] = _check(server, "ok", gzip_requests=True)

    assert answer.code == transport.OK
    [seen] = server.requests
    assert seen[":method"] == "POST" and seen[":path"] == wire.CHECK and seen[":authority"] == server.address
    assert (seen["content-type"], seen["te"], seen["user-agent"]) == ("application/grpc", "trailers", "test-agent")
    assert seen["grpc-timeout"] == "5000m" and seen["grpc-encoding"] == "gzip"
    assert (seen["x-tenant"], seen["x-trace-bin"]) == ("pets", "AP8")  # binary metadata: base64, unpadded


def test_several_calls_share_the_connection_and_a_large_answer_gets_its_window(server: H2Server) -> None:
    answers = _check(server, "ok", "padded", "big")

    assert [a.code for a in answers] == [transport.OK] * 3
    assert answers[2].payload is not None and len(answers[2].payload) == 100_000


@pytest.mark.parametrize(("service", "code", "message"), [
    ("trailers-only", 5, "unknown service: é"),
    ("http404", transport.UNIMPLEMENTED, "unexpected HTTP status code received from server: 404"),
    ("rst", transport.UNAVAILABLE, "stream terminated by RST_STREAM with error code: REFUSED_STREAM"),
    ("goaway", transport.UNAVAILABLE, "the server sent GOAWAY (NO_ERROR: going away)"),
])
def test_errors_map_to_grpc_codes_as_grpc_maps_them(server: H2Server, service: str, code: int, message: str) -> None:
    [answer] = _check(server, service)

    assert (answer.code, answer.message) == (code, message)


def test_a_call_without_answer_ends_at_its_deadline(server: H2Server) -> None:
    [answer] = _check(server, "silent", timeout=0.3)

    assert answer.code == transport.DEADLINE_EXCEEDED


def test_a_signal_cancels_a_call_in_flight(server: H2Server) -> None:
    stop = Stop()
    threading.Timer(0.2, lambda: setattr(stop, "requested", True)).start()

    [answer] = _check(server, "silent", stop=stop)

    assert (answer.code, answer.message) == (transport.CANCELLED, "context canceled")


def test_connecting_where_nothing_listens_says_why() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
        with pytest.raises(transport.ConnectError, match="Connection refused"):
            transport.connect(transport.parse_target(f"127.0.0.1:{port}"), timeout=TIMEOUT, stop=Stop())


@pytest.mark.parametrize(("address", "host", "port", "path", "authority"), [
    ("127.0.0.1:50051", "127.0.0.1", 50051, None, "127.0.0.1:50051"),
    ("[::1]:8080", "::1", 8080, None, "[::1]:8080"),
    ("pets.internal", "pets.internal", 443, None, "pets.internal:443"),
    ("dns:///pets.internal:50051", "pets.internal", 50051, None, "pets.internal:50051"),
    ("dns://8.8.8.8/pets.internal:50051", "pets.internal", 50051, None, "pets.internal:50051"),
    ("ipv6:[::1]:9", "::1", 9, None, "[::1]:9"),
    ("unix:/run/pets.sock", "", 0, "/run/pets.sock", "localhost"),
    ("unix:///run/pets.sock", "", 0, "/run/pets.sock", "localhost"),
    ("unix-abstract:pets", "", 0, "\0pets", "localhost"),
])
def test_targets_are_read_as_grpc_reads_them(address: str, host: str, port: int, path: str | None,
                                            authority: str) -> None:
    target = transport.parse_target(address)

    assert (target.host, target.port, target.unix_path, target.authority) == (host, port, path, authority)


# --- HPACK, against the reference implementation ------------------------------------------------

def test_the_decoder_reads_what_the_reference_encoder_writes_across_blocks() -> None:
    """Huffman coding, indexing and the dynamic table evolving over blocks, as a server's encoder uses them."""
    encoder, decoder = reference.Encoder(), hpack.Decoder()
    blocks = [
        [(":status", "200"), ("content-type", "application/grpc"), ("grpc-encoding", "identity")],
        [("grpc-status", "0"), ("grpc-message", "")],
        [(":status", "200"), ("content-type", "application/grpc"), ("x-bin", "ÿ" * 300)],  # evicts entries
        [("grpc-status", "5"), ("grpc-message", "unknown service with a longer message " * 20)],
    ]
    for block in blocks:
        assert decoder.decode(encoder.encode(block, huffman=True)) == block
    encoder.header_table_size = 256  # a dynamic table size update at the head of the next block
    assert decoder.decode(encoder.encode(blocks[0], huffman=False)) == blocks[0]


def test_every_byte_survives_huffman_coding() -> None:
    text = bytes(range(256)) * 3
    encoded = reference.Encoder().encode([("x", text.decode("latin-1"))], huffman=True)

    [(name, value)] = hpack.Decoder().decode(encoded)

    assert name == "x" and value.encode("utf-8") == text.decode("latin-1").encode("utf-8")


def test_our_encoder_is_read_by_the_reference_decoder() -> None:
    headers = [(":method", "POST"), (":path", "/grpc.health.v1.Health/Check"), ("x-long", "v" * 300)]

    decoded: list[tuple[str, str]] = [(str(name), str(value)) for name, value in reference.Decoder().decode(
        hpack.encode(headers))]
    assert decoded == headers


@pytest.mark.parametrize("block", [b"\x80", b"\xff\xff\xff\xff\xff\xff\x7f", b"\x82\x3f\xe1\xff\xff", b"\x40\x81"])
def test_broken_header_blocks_are_refused_not_guessed(block: bytes) -> None:
    with pytest.raises(hpack.HpackError):
        hpack.Decoder().decode(block)
