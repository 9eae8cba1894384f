"""Header constants and small helpers shared by the downstream and upstream sides."""

from __future__ import annotations

import os
import time

# RFC 9110 7.6.1 hop-by-hop fields plus the legacy ones proxies strip.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)

# Request headers the proxy regenerates itself, so incoming copies are dropped
# before the outgoing head is built (framing and Host are re-emitted;
# Expect is answered by the proxy, as Envoy does by default).
REQUEST_DROP = HOP_BY_HOP | {b"host", b"content-length", b"expect", b"x-envoy-attempt-count",
                             b"x-envoy-expected-rq-timeout-ms",
                             # peer metadata is sidecar-to-sidecar (observability/peer.py):
                             # never shown to the application, whatever telemetry does
                             b"x-pyproxy-peer-metadata", b"x-pyproxy-peer-metadata-id",
                             b"x-envoy-peer-metadata", b"x-envoy-peer-metadata-id"}

# x-envoy-upstream-service-time is regenerated (Envoy overwrites it), so a
# chain of proxies reports one value, this hop's.
RESPONSE_DROP = HOP_BY_HOP | {b"content-length", b"x-envoy-upstream-service-time"}


def connection_tokens(value: bytes) -> frozenset[bytes]:
    """Header names listed in a Connection header (they are hop-by-hop too)."""
    return frozenset(t.strip().lower() for t in value.split(b",") if t.strip())


_hex = "0123456789abcdef"


def new_request_id() -> bytes:
    """A random UUID4, formatted without the uuid module's object overhead."""
    b = bytearray(os.urandom(16))
    b[6] = (b[6] & 0x0F) | 0x40
    b[8] = (b[8] & 0x3F) | 0x80
    h = b.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}".encode("ascii")


class HttpDate:
    """The ``Date`` header value, recomputed at most once a second."""

    __slots__ = ("_second", "_value")

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def get(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._value = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now)).encode("ascii")
        return self._value


HTTP_DATE = HttpDate()


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"
