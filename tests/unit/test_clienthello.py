"""The TLS inspector's ClientHello parse, on real ClientHellos made by
OpenSSL (ssl.MemoryBIO), whole, split at every byte, garbled and oversized."""

from __future__ import annotations

import ssl

import pytest

from pyproxy.security.clienthello import MAX_CLIENT_HELLO, NEED_MORE, NOT_TLS, TOO_LARGE, ClientHello, inspect


def client_hello(sni: str | None = "outbound_.9080_._.reviews.default.svc.cluster.local",
                 alpn: list[str] | None = None) -> bytes:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def test_sni_and_offered_alpn() -> None:
    data = client_hello(alpn=["istio-http/1.1", "istio", "http/1.1"])
    assert inspect(data) == ClientHello("outbound_.9080_._.reviews.default.svc.cluster.local",
                                        ("istio-http/1.1", "istio", "http/1.1"))
    assert inspect(client_hello(sni=None)) == ClientHello("", ())


def test_split_at_every_byte_needs_more_until_complete() -> None:
    data = client_hello(alpn=["h2"])
    for cut in range(1, len(data)):
        assert inspect(data[:cut]) == NEED_MORE, cut
    assert inspect(data) == ClientHello("outbound_.9080_._.reviews.default.svc.cluster.local", ("h2",))


def test_hello_split_over_two_records() -> None:
    data = client_hello(alpn=["istio"])
    body = data[5:]
    half = len(body) // 2
    rec = (lambda b: b"\x16\x03\x01" + len(b).to_bytes(2, "big") + b)
    assert inspect(rec(body[:half]) + rec(body[half:])) == inspect(data)
    assert inspect(rec(body[:half])) == NEED_MORE


@pytest.mark.parametrize("data", [
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"PRI * HTTP/2.0\r\n",
    b"\x16\x02\x00\x00\x10",  # not TLS 1.x
    b"\x16\x03\x01\x00\x00",  # empty record
    b"\x16\x03\x01\x00\x04\x02\x00\x00\x00",  # a ServerHello
    b"\x15\x03\x03\x00\x02\x02\x28",  # an alert
])
def test_not_tls(data: bytes) -> None:
    assert inspect(data) == NOT_TLS


def test_garbage_inside_a_complete_hello_is_not_tls() -> None:
    data = bytearray(client_hello(alpn=["istio"]))
    # Claim a session id longer than the message.
    data[5 + 4 + 34] = 0xFF
    assert inspect(bytes(data)) == NOT_TLS
    garbage = b"\x16\x03\x01\x00\x30\x01\x00\x00\x2c" + b"\xff" * 0x2c
    assert inspect(garbage) == NOT_TLS


def test_oversize() -> None:
    # A handshake claiming 1 MiB: refused as soon as its length is known.
    assert inspect(b"\x16\x03\x01\x40\x00\x01\x10\x00\x00") == TOO_LARGE
    # Many full records that never complete a claimed 60 KiB hello.
    record = b"\x16\x03\x01\x40\x00" + b"\x01\x00\xf0\x00" + b"\x00" * (0x4000 - 4)
    more = b"\x16\x03\x01\x40\x00" + b"\x00" * 0x4000
    data = record + more * 4
    assert len(data) > MAX_CLIENT_HELLO
    assert inspect(data) == TOO_LARGE
    assert inspect(data[:20000]) == NEED_MORE
