"""What Envoy's TLS inspector sees in the first bytes of a connection: is it
a TLS ClientHello, and if so the SNI and the offered ALPN list (Python's ssl
never shows the server the client's offered ALPN, and PERMISSIVE mode picks
mTLS by it).

``inspect(data)`` is called with everything peeked so far; it answers
NEED_MORE until the whole ClientHello (which may span several TLS records
and TCP segments) is there, NOT_TLS when the bytes are not a TLS handshake
(plaintext, or a malformed hello: Envoy's ``tls_not_found`` → raw_buffer),
TOO_LARGE past the cap (Envoy's ``client_hello_too_large``: the connection is
closed), or the parsed ClientHello.
"""

from __future__ import annotations

from dataclasses import dataclass

# Envoy's TLS inspector default max_client_hello_size (64 KiB).
MAX_CLIENT_HELLO = 64 * 1024

NEED_MORE = "need_more"
NOT_TLS = "not_tls"
TOO_LARGE = "too_large"

_HANDSHAKE = 0x16
_CLIENT_HELLO = 0x01
_EXT_SNI = 0
_EXT_ALPN = 16


@dataclass(frozen=True, slots=True)
class ClientHello:
    sni: str = ""
    alpn: tuple[str, ...] = ()


class _Malformed(Exception):
    pass


def inspect(data: bytes, cap: int = MAX_CLIENT_HELLO) -> ClientHello | str:
    if not data:
        return NEED_MORE
    if data[0] != _HANDSHAKE:
        return NOT_TLS
    # Reassemble the handshake message from consecutive handshake records.
    body = bytearray()
    pos = 0
    need: int | None = None  # the ClientHello's total length (4-byte header included)
    while need is None or len(body) < need:
        if len(data) - pos < 5:
            return _more_or_too_large(data, cap)
        ctype, major, length = data[pos], data[pos + 1], int.from_bytes(data[pos + 3:pos + 5], "big")
        if ctype != _HANDSHAKE or major != 3 or length == 0 or length > 16384 + 2048:
            return NOT_TLS
        if len(data) - pos - 5 < length:
            partial = body + data[pos + 5:]
            if need is None and len(partial) >= 4:
                # The handshake header is in: refuse an oversized hello now.
                if partial[0] != _CLIENT_HELLO:
                    return NOT_TLS
                if 4 + int.from_bytes(partial[1:4], "big") > cap:
                    return TOO_LARGE
            return _more_or_too_large(data, cap)
        body += data[pos + 5:pos + 5 + length]
        pos += 5 + length
        if need is None and len(body) >= 4:
            if body[0] != _CLIENT_HELLO:
                return NOT_TLS
            need = 4 + int.from_bytes(body[1:4], "big")
            if need > cap:
                return TOO_LARGE
        if pos > cap:
            return TOO_LARGE
    try:
        return _parse_hello(bytes(body[4:need]))
    except (_Malformed, IndexError, UnicodeDecodeError):
        return NOT_TLS


def _more_or_too_large(data: bytes, cap: int) -> str:
    return TOO_LARGE if len(data) >= cap else NEED_MORE


def _take(buf: bytes, pos: int, n: int) -> tuple[bytes, int]:
    if pos + n > len(buf):
        raise _Malformed
    return buf[pos:pos + n], pos + n


def _vec(buf: bytes, pos: int, size_len: int) -> tuple[bytes, int]:
    raw, pos = _take(buf, pos, size_len)
    return _take(buf, pos, int.from_bytes(raw, "big"))


def _parse_hello(hello: bytes) -> ClientHello:
    pos = 2 + 32  # legacy_version, random
    _, pos = _vec(hello, pos, 1)  # session id
    suites, pos = _vec(hello, pos, 2)
    if not suites or len(suites) % 2:
        raise _Malformed
    _, pos = _vec(hello, pos, 1)  # compression methods
    sni = ""
    alpn: tuple[str, ...] = ()
    if pos == len(hello):
        return ClientHello()  # no extensions (SSL 3.0-style hello)
    exts, pos = _vec(hello, pos, 2)
    if pos != len(hello):
        raise _Malformed
    p = 0
    while p < len(exts):
        head, p = _take(exts, p, 4)
        etype = int.from_bytes(head[:2], "big")
        data, p = _take(exts, p, int.from_bytes(head[2:], "big"))
        if etype == _EXT_SNI:
            names, _ = _vec(data, 0, 2)
            q = 0
            while q < len(names):
                kind, q = _take(names, q, 1)
                name, q = _vec(names, q, 2)
                if kind == b"\x00" and not sni:
                    sni = name.decode("ascii")
        elif etype == _EXT_ALPN:
            protos, _ = _vec(data, 0, 2)
            out = []
            q = 0
            while q < len(protos):
                proto, q = _vec(protos, q, 1)
                out.append(proto.decode("latin-1"))
            alpn = tuple(out)
    return ClientHello(sni, alpn)
