"""An HPACK encoder that does not use the dynamic table, so the encoding of a
header field never depends on the fields sent before it and can be cached.

The ``h2`` library's encoder (``hpack.Encoder``) searches its dynamic table
and Huffman-codes every literal in Python for every header block: in a
profile of the proxy under h2load that is the largest single cost of an
HTTP/2 response. A proxy's responses repeat the same fields (``server``,
``content-type``, ``content-length: 100``, ...) over and over, so this
encoder builds each distinct field's bytes once, from ``hpack``'s own
pieces (its static table, integer and Huffman encoders), and joins cached
bytes afterwards.

RFC 7541 representations used: an indexed static entry when name and value
are both in the static table; otherwise a literal without indexing (with
the static table's name index when it has the name), or never indexed for
credentials (``authorization``, ``proxy-authorization``, ``cookie``, as the
``h2`` library's normalisation marks them). The first header block starts
with a dynamic table size update to 0: the table is never used, whatever
SETTINGS_HEADER_TABLE_SIZE the peer announces later (RFC 7541 4.2: a
smaller maximum than the peer's limit needs no further update).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from hpack.hpack import encode_integer
from hpack.huffman import HuffmanEncoder
from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH
from hpack.table import HeaderTable

_HUFFMAN = HuffmanEncoder(REQUEST_CODES, REQUEST_CODES_LENGTH)
_STATIC = HeaderTable.STATIC_TABLE_MAPPING  # name -> (index, {value: index})
_NEVER_INDEXED = frozenset({b"authorization", b"proxy-authorization", b"cookie"})
# Encoded fields, shared by every connection of the process (the encoding
# depends on nothing else). A field with a unique value (x-request-id) is a
# miss each time; the cache is cleared when full, never grown past this.
MAX_CACHED = 4096
# Longer values are encoded each time rather than cached (bounds the cache
# to ~4 MiB; the peer-metadata header, ~300 bytes, fits).
MAX_CACHED_VALUE = 1024
_CACHE: dict[tuple[bytes, bytes], bytes] = {}
# Encoded names of fields outside the static table, kept apart: a field whose
# value is new each time (a request id echoed back) still reuses its name.
_NAMES: dict[bytes, bytes] = {}
MAX_NAMES = 1024


def _string(data: bytes) -> bytes:
    """A string literal: Huffman-coded when that is shorter (as hpack does)."""
    coded = _HUFFMAN.encode(data)
    if len(coded) < len(data):
        head = encode_integer(len(coded), 7)
        head[0] |= 0x80
        return bytes(head) + coded
    return bytes(encode_integer(len(data), 7)) + data


def encode_field(name: bytes, value: bytes) -> bytes:
    """One header field, independent of any table state."""
    static = _STATIC.get(name)
    if static is not None:
        index = static[1].get(value)
        if index is not None:
            head = encode_integer(index, 7)
            head[0] |= 0x80
            return bytes(head)
    flag = 0x10 if name in _NEVER_INDEXED else 0x00
    if static is not None:
        head = encode_integer(static[0], 4)
        head[0] |= flag
        return bytes(head) + _string(value)
    encoded = _NAMES.get(name)
    if encoded is None:
        encoded = _string(name)
        if len(name) <= MAX_CACHED_VALUE:
            if len(_NAMES) >= MAX_NAMES:
                _NAMES.clear()
            _NAMES[name] = encoded
    return bytes((flag,)) + encoded + _string(value)


class StaticEncoder:
    """Drop-in for ``hpack.Encoder`` on an ``h2`` connection
    (``H2Connection.encoder``): what ``h2`` calls is ``encode(headers)`` and
    the ``header_table_size`` attribute."""

    __slots__ = ("header_table_size", "started")

    def __init__(self) -> None:
        self.header_table_size = 4096  # the peer's limit (h2 sets it); this encoder uses 0
        self.started = False

    def encode(self, headers: Iterable[Any], huffman: bool = True) -> bytes:
        cache = _CACHE
        parts: list[bytes] = []
        if not self.started:
            self.started = True
            parts.append(b"\x20")  # dynamic table size update: 0
        for field in headers:
            name, value = field[0], field[1]
            key = (name, value)
            data = cache.get(key)
            if data is None:
                data = encode_field(name, value)
                if len(value) <= MAX_CACHED_VALUE:
                    if len(cache) >= MAX_CACHED:
                        cache.clear()
                    cache[key] = data
            parts.append(data)
        return b"".join(parts)
