"""Unit tests of the HTTP/2 codec's pure parts: finding the preface after
llhttp stopped on it, translating a request to HTTP/1.1 (and what is
refused), and the Upgrade: h2c strip on HTTP/1.1."""

from __future__ import annotations

import pytest

from pyproxy.http.downstream import strip_h2c_upgrade
from pyproxy.http.h2downstream import PREFACE_HEAD, _Refused, preface_rest, translate_request

PREFACE = PREFACE_HEAD + b"SM\r\n\r\n"
FRAMES = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


@pytest.mark.parametrize("first", range(1, len(PREFACE_HEAD) + 1))
def test_preface_rest_whatever_the_read_boundaries(first: int) -> None:
    # The connection's earlier reads carried PREFACE_HEAD[:first-…]; the read
    # llhttp stopped in starts anywhere inside the 18-byte head.
    data = (PREFACE + FRAMES)[len(PREFACE_HEAD) - first:]
    assert preface_rest(data) == b"SM\r\n\r\n" + FRAMES
    # The read ends exactly where llhttp stopped: nothing after.
    assert preface_rest(PREFACE_HEAD[len(PREFACE_HEAD) - first:]) == b""


def test_preface_rest_refuses_what_is_not_the_preface() -> None:
    assert preface_rest(PREFACE_HEAD + b"XX\r\n\r\n") is None
    assert preface_rest(b"hello") is None


def req(*extra: tuple[bytes, bytes]) -> list[tuple[bytes, bytes]]:
    return [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"reviews:9080"),
            (b":path", b"/a?b=1"), *extra]


def test_translate_request() -> None:
    method, target, headers, _ = translate_request(
        req((b"cookie", b"a=1"), (b"x-y", b"z"), (b"cookie", b"b=2"), (b"te", b"trailers")), 61440, 100)
    assert method == b"GET" and target == b"/a?b=1"
    assert headers == [(b"host", b"reviews:9080"), (b"x-y", b"z"), (b"te", b"trailers"),
                       (b"cookie", b"a=1; b=2")]


def test_translate_host_when_no_authority() -> None:
    raw = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b"host", b"h:1")]
    assert translate_request(raw, 61440, 100)[2] == [(b"host", b"h:1")]
    # :authority wins over a host field; one Host goes upstream.
    assert translate_request(req((b"host", b"other")), 61440, 100)[2] == [(b"host", b"reviews:9080")]


@pytest.mark.parametrize("raw", [
    req((b"connection", b"close")),
    req((b"keep-alive", b"1")),
    req((b"proxy-connection", b"x")),
    req((b"transfer-encoding", b"chunked")),
    req((b"upgrade", b"h2c")),
    req((b"te", b"gzip")),
    req((b"Upper", b"x")),
    req((b"x y", b"x")),
    req((b"x", b"a\nb")),
    req((b"x", b"a\x00b")),
    req((b"x", b" lead")),
    req((b":path", b"/again")),
    req((b":protocol", b"websocket")),
    [(b":method", b"GET"), (b":scheme", b"http"), (b"x", b"1"), (b":path", b"/")],
    [(b":scheme", b"http"), (b":path", b"/")],
    [(b":method", b"GET"), (b":scheme", b"http")],
    [(b":method", b"CONNECT"), (b":authority", b"a:443")],
])
def test_translate_refuses_what_http1_cannot_carry(raw: list[tuple[bytes, bytes]]) -> None:
    with pytest.raises(_Refused):
        translate_request(raw, 61440, 100)


def test_translate_header_limits() -> None:
    with pytest.raises(OverflowError):
        translate_request(req((b"x", b"v" * 70000)), 61440, 100)
    with pytest.raises(OverflowError):
        translate_request(req(*[(b"x%d" % i, b"v") for i in range(100)]), 61440, 100)


def test_strip_h2c_upgrade() -> None:
    headers = [(b"host", b"a"), (b"connection", b"Upgrade, HTTP2-Settings, keep-alive"), (b"upgrade", b"h2c"),
               (b"http2-settings", b"AAMAAABkAAQCAAAAAAIAAAAA")]
    assert strip_h2c_upgrade(headers)
    assert headers == [(b"host", b"a"), (b"connection", b"keep-alive")]
    ws = [(b"connection", b"upgrade"), (b"upgrade", b"websocket")]
    assert not strip_h2c_upgrade(ws)
    assert ws == [(b"connection", b"upgrade"), (b"upgrade", b"websocket")]


def test_grpc_local_reply_mapping_and_message_encoding() -> None:
    from pyproxy.http.exchange import grpc_local_reply

    for status, code in ((400, b"13"), (401, b"16"), (403, b"7"), (404, b"12"), (429, b"14"), (502, b"14"),
                         (503, b"14"), (504, b"14"), (500, b"2"), (418, b"2")):
        got = grpc_local_reply(status, b"no healthy upstream", ((b"x", b"y"),))
        assert got == (200, b"", ((b"x", b"y"), (b"grpc-status", code), (b"grpc-message", b"no healthy upstream")),
                       b"application/grpc")
    # No body, no grpc-message; non-printable bytes and "%" percent-encoded (gRPC spec).
    assert grpc_local_reply(404, b"", ())[2] == ((b"grpc-status", b"12"),)
    assert grpc_local_reply(503, "100% é\n".encode(), ())[2][1] == (b"grpc-message", b"100%25 %C3%A9%0A")


def test_is_grpc_and_grpc_timeout() -> None:
    from pyproxy.http.exchange import is_grpc, parse_grpc_timeout

    assert is_grpc(b"application/grpc") and is_grpc(b"application/grpc+proto") and is_grpc(b"application/grpc;x=1")
    assert not is_grpc(b"application/grpc-web") and not is_grpc(b"application/grpcx") and not is_grpc(None)
    assert parse_grpc_timeout(b"200m") == pytest.approx(0.2)
    assert parse_grpc_timeout(b"1H") == 3600 and parse_grpc_timeout(b"5S") == 5
    assert parse_grpc_timeout(b"99999999n") == pytest.approx(0.099999999)
    for bad in (b"123456789S", b"S", b"10", b"1.5S", b"-1S", b"10s"):
        assert parse_grpc_timeout(bad) is None
