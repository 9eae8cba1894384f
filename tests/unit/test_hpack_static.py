"""The cache-friendly HPACK encoder (pyproxy/http/hpack_static.py) checked
against hpack's own decoder: every field comes back as it was sent, in
order, across many header blocks on one connection (the decoder's dynamic
table state included), and credentials are never indexed."""

from __future__ import annotations

import random

from hpack import Decoder
from hpack.struct import NeverIndexedHeaderTuple

from pyproxy.http.hpack_static import _CACHE, MAX_CACHED, StaticEncoder, encode_field


def test_round_trip_through_hpack_decoder() -> None:
    rng = random.Random(3)
    enc, dec = StaticEncoder(), Decoder()
    names = [b":status", b"content-type", b"content-length", b"server", b"date", b"x-request-id",
             b"x-envoy-upstream-service-time", b"grpc-status", b"grpc-message", b"set-cookie", b"vary",
             b"authorization", b"cookie", b"x-" + b"long" * 40, b"accept-encoding"]
    values = [b"", b"200", b"404", b"text/plain", b"application/grpc", b"envoy", b"gzip, deflate",
              b"\x00\x7f\xff binary", "caf\u00e9".encode(), b"v" * 300, b"100"]
    for _ in range(300):
        headers = [(rng.choice(names), rng.choice(values)) for _ in range(rng.randrange(1, 12))]
        got = dec.decode(enc.encode(headers), raw=True)
        assert [(n, v) for n, v in got] == headers
    assert 0 < len(_CACHE) <= MAX_CACHED


def test_representations() -> None:
    assert encode_field(b":status", b"200") == b"\x88"  # indexed static entry 8
    assert encode_field(b"content-length", b"100")[:2] == b"\x0f\x0d"  # literal without indexing, static name 28
    assert encode_field(b"authorization", b"Bearer x")[0] & 0xF0 == 0x10  # never indexed
    first = StaticEncoder().encode([(b":status", b"200")])
    assert first == b"\x20\x88"  # the table is set to 0 once, first
    dec = Decoder()
    (field,) = dec.decode(StaticEncoder().encode([(b"cookie", b"a=1")]), raw=True)
    assert isinstance(field, NeverIndexedHeaderTuple)
    assert dec.header_table_size == 0
