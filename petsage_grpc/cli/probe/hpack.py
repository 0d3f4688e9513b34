"""HPACK (RFC 7541), as much as a gRPC client needs: encode plainly, decode everything a server may send.

The probe speaks HTTP/2 itself (:mod:`petsage_grpc.cli.probe.transport`)
instead of importing grpc, whose import alone took 60 ms of its start-up.
Requests are encoded as literals that are never indexed and never Huffman
coded (a server must accept them); responses may use the static and dynamic
tables and Huffman coding, so the decoder implements all of RFC 7541 section 6.
"""

from __future__ import annotations

TYPE_CHECKING = False  # not typing's: the probe is timed as a whole process
if TYPE_CHECKING:
    from collections.abc import Sequence

#: RFC 7541 Appendix A: the static table, entries 1..61.
STATIC_TABLE: tuple[tuple[str, str], ...] = (
    (":authority", ""), (":method", "GET"), (":method", "POST"), (":path", "/"), (":path", "/index.html"),
    (":scheme", "http"), (":scheme", "https"), (":status", "200"), (":status", "204"), (":status", "206"),
    (":status", "304"), (":status", "400"), (":status", "404"), (":status", "500"), ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"), ("accept-language", ""), ("accept-ranges", ""), ("accept", ""),
    ("access-control-allow-origin", ""), ("age", ""), ("allow", ""), ("authorization", ""),
    ("cache-control", ""), ("content-disposition", ""), ("content-encoding", ""), ("content-language", ""),
    ("content-length", ""), ("content-location", ""), ("content-range", ""), ("content-type", ""),
    ("cookie", ""), ("date", ""), ("etag", ""), ("expect", ""), ("expires", ""), ("from", ""), ("host", ""),
    ("if-match", ""), ("if-modified-since", ""), ("if-none-match", ""), ("if-range", ""),
    ("if-unmodified-since", ""), ("last-modified", ""), ("link", ""), ("location", ""), ("max-forwards", ""),
    ("proxy-authenticate", ""), ("proxy-authorization", ""), ("range", ""), ("referer", ""), ("refresh", ""),
    ("retry-after", ""), ("server", ""), ("set-cookie", ""), ("strict-transport-security", ""),
    ("transfer-encoding", ""), ("user-agent", ""), ("vary", ""), ("via", ""), ("www-authenticate", ""),
)

#: RFC 7541 Appendix B: the length in bits of the Huffman code of each symbol 0..256 (256 is EOS).
#: The code is canonical: sorted by (length, symbol), each code is the previous one plus one, shifted
#: left by the growth in length; so the lengths alone define it.
HUFFMAN_LENGTHS: tuple[int, ...] = (
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 30, 28, 28, 28, 28, 28,
    28, 28, 28, 28, 6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6, 5, 5, 5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15,
    6, 12, 10, 13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6,
    15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6, 6, 5, 6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28, 20, 22,
    20, 20, 22, 22, 22, 23, 22, 23, 23, 23, 23, 23, 24, 23, 24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23,
    23, 24, 22, 21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23, 21, 21, 22, 21, 23, 22, 23, 23, 20, 22,
    22, 22, 23, 22, 22, 23, 26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25, 19, 21, 26, 27, 27, 26,
    27, 24, 21, 21, 26, 26, 28, 27, 27, 27, 20, 24, 20, 21, 22, 21, 21, 23, 22, 22, 25, 25, 24, 24, 26, 23, 26, 27,
    26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26, 30,
)
_EOS = 256
#: The dynamic table size the decoder starts with (SETTINGS_HEADER_TABLE_SIZE, left at its default).
DEFAULT_TABLE_SIZE = 4096


class HpackError(ValueError):
    """A header block that breaks RFC 7541 (a connection error: COMPRESSION_ERROR)."""


def _huffman_codes() -> dict[tuple[int, int], int]:
    """(length, code) -> symbol, built from the canonical code lengths."""
    codes: dict[tuple[int, int], int] = {}
    code, previous = -1, 0
    for symbol in sorted(range(len(HUFFMAN_LENGTHS)), key=lambda s: (HUFFMAN_LENGTHS[s], s)):
        length = HUFFMAN_LENGTHS[symbol]
        code = (code + 1) << (length - previous)
        previous = length
        codes[(length, code)] = symbol
    return codes


_CODES: dict[tuple[int, int], int] | None = None  # built on the first Huffman-coded string


def huffman_decode(data: bytes) -> bytes:
    """Decode a Huffman-coded string; padding must be fewer than 8 bits, all ones (RFC 7541 5.2)."""
    global _CODES
    if _CODES is None:
        _CODES = _huffman_codes()
    codes = _CODES
    out = bytearray()
    code = length = 0
    for byte in data:
        for shift in range(7, -1, -1):
            code, length = (code << 1) | ((byte >> shift) & 1), length + 1
            symbol = codes.get((length, code))
            if symbol is not None:
                if symbol == _EOS:
                    raise HpackError("Huffman string contains EOS")
                out.append(symbol)
                code = length = 0
            elif length > 30:
                raise HpackError("invalid Huffman code")
    if length > 7 or code != (1 << length) - 1:
        raise HpackError("invalid Huffman padding")
    return bytes(out)


def _integer(value: int, prefix: int, flags: int) -> bytes:
    """``value`` as an HPACK integer with a ``prefix``-bit prefix, ``flags`` in the first byte's other bits."""
    limit = (1 << prefix) - 1
    if value < limit:
        return bytes((flags | value,))
    out, value = bytearray((flags | limit,)), value - limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode(headers: Sequence[tuple[str, str | bytes]]) -> bytes:
    """A header block of literals never indexed, with literal names, without Huffman coding (RFC 7541 6.2.3)."""
    out = bytearray()
    for name, value in headers:
        raw_name = name.encode("ascii")
        raw_value = value if isinstance(value, bytes) else value.encode("utf-8")
        out += b"\x10" + _integer(len(raw_name), 7, 0) + raw_name + _integer(len(raw_value), 7, 0) + raw_value
    return bytes(out)


class Decoder:
    """Decodes the header blocks of one connection, in order, keeping its dynamic table."""

    def __init__(self, max_table_size: int = DEFAULT_TABLE_SIZE) -> None:
        self._limit = max_table_size  # what our SETTINGS allow the server
        self._size_now = max_table_size  # the size the server last set (at most the limit)
        self._table: list[tuple[str, str]] = []  # newest first
        self._bytes = 0

    def decode(self, block: bytes) -> list[tuple[str, str]]:
        """The headers of one whole header block (HEADERS and its CONTINUATIONs joined)."""
        headers: list[tuple[str, str]] = []
        at = 0
        while at < len(block):
            first = block[at]
            if first & 0x80:  # indexed field
                index, at = self._read_integer(block, at, 7)
                headers.append(self._entry(index))
            elif first & 0x40:  # literal with incremental indexing
                name, value, at = self._literal(block, at, 6)
                headers.append((name, value))
                self._add(name, value)
            elif first & 0x20:  # dynamic table size update
                size, at = self._read_integer(block, at, 5)
                if size > self._limit:
                    raise HpackError(f"table size update to {size} beyond {self._limit}")
                self._size_now = size
                self._evict()
            else:  # literal without indexing (0000) or never indexed (0001)
                name, value, at = self._literal(block, at, 4)
                headers.append((name, value))
        return headers

    def _entry(self, index: int) -> tuple[str, str]:
        if index == 0:
            raise HpackError("index 0")
        if index <= len(STATIC_TABLE):
            return STATIC_TABLE[index - 1]
        dynamic = index - len(STATIC_TABLE) - 1
        if dynamic >= len(self._table):
            raise HpackError(f"index {index} beyond the tables")
        return self._table[dynamic]

    def _literal(self, block: bytes, at: int, prefix: int) -> tuple[str, str, int]:
        index, at = self._read_integer(block, at, prefix)
        if index:
            name = self._entry(index)[0]
        else:
            raw, at = self._read_string(block, at)
            name = raw.decode("ascii", "replace")
        value, at = self._read_string(block, at)
        return name, value.decode("utf-8", "replace"), at

    def _add(self, name: str, value: str) -> None:
        self._table.insert(0, (name, value))
        self._bytes += len(name.encode()) + len(value.encode()) + 32
        self._evict()

    def _evict(self) -> None:
        while self._bytes > self._size_now and self._table:
            name, value = self._table.pop()
            self._bytes -= len(name.encode()) + len(value.encode()) + 32

    @staticmethod
    def _read_integer(block: bytes, at: int, prefix: int) -> tuple[int, int]:
        limit = (1 << prefix) - 1
        value, at = block[at] & limit, at + 1
        if value < limit:
            return value, at
        shift = 0
        while True:
            if at >= len(block) or shift > 28:
                raise HpackError("truncated or oversized integer")
            byte, at = block[at], at + 1
            value += (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value, at

    def _read_string(self, block: bytes, at: int) -> tuple[bytes, int]:
        if at >= len(block):
            raise HpackError("truncated string")
        huffman = bool(block[at] & 0x80)
        length, at = self._read_integer(block, at, 7)
        if at + length > len(block):
            raise HpackError("truncated string")
        raw = block[at:at + length]
        return (huffman_decode(raw) if huffman else raw), at + length
