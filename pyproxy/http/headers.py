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
XFCC = b"x-forwarded-client-cert"

REQUEST_DROP = HOP_BY_HOP | {b"host", b"content-length", b"expect", b"x-envoy-attempt-count",
                             b"x-envoy-expected-rq-timeout-ms",
                             # peer metadata is sidecar-to-sidecar (observability/peer.py):
                             # never shown to the application, whatever telemetry does
                             b"x-pyproxy-peer-metadata", b"x-pyproxy-peer-metadata-id",
                             b"x-envoy-peer-metadata", b"x-envoy-peer-metadata-id",
                             # Envoy sanitizes a client's XFCC (SANITIZE; the inbound side
                             # of Istio's APPEND_FORWARD keeps it only from an mTLS peer).
                             XFCC}

# x-envoy-upstream-service-time is regenerated (Envoy overwrites it), so a
# chain of proxies reports one value, this hop's. ``server`` is overwritten
# too, as Istio configures every HCM (server_header_transformation OVERWRITE).
RESPONSE_DROP = HOP_BY_HOP | {b"content-length", b"x-envoy-upstream-service-time", b"server"}

# Envoy's control headers: they change how an Envoy routes, retries, times
# out or injects faults, or claim an internal origin. pyproxy honours none of
# them. Envoy sanitizes them from external requests; pyproxy strips them from
# inbound requests whose caller is not a sidecar (no valid peer metadata),
# so they never reach the application (or an Envoy behind it) from outside
# the mesh. Outbound, the application's own copies pass through: the
# destination's proxy decides.
CONTROL_HEADERS = frozenset(
    {
        b"x-envoy-retry-on",
        b"x-envoy-retry-grpc-on",
        b"x-envoy-max-retries",
        b"x-envoy-retriable-status-codes",
        b"x-envoy-retriable-header-names",
        b"x-envoy-hedge-on-per-try-timeout",
        b"x-envoy-upstream-rq-timeout-ms",
        b"x-envoy-upstream-rq-per-try-timeout-ms",
        b"x-envoy-upstream-rq-timeout-alt-response",
        b"x-envoy-upstream-alt-stat-name",
        b"x-envoy-upstream-stream-duration-ms",
        b"x-envoy-fault-abort-request",
        b"x-envoy-fault-abort-grpc-request",
        b"x-envoy-fault-abort-request-percentage",
        b"x-envoy-fault-delay-request",
        b"x-envoy-fault-delay-request-percentage",
        b"x-envoy-fault-throughput-response",
        b"x-envoy-fault-throughput-response-percentage",
        b"x-envoy-internal",
        b"x-envoy-force-trace",
        b"x-envoy-ip-tags",
        b"x-envoy-external-address",
        b"x-envoy-downstream-service-cluster",
        b"x-envoy-downstream-service-node",
        b"x-envoy-decorator-operation",
    }
)
INBOUND_EXTERNAL_DROP = REQUEST_DROP | CONTROL_HEADERS


def connection_tokens(value: bytes) -> frozenset[bytes]:
    """Header names listed in a Connection header (they are hop-by-hop too)."""
    return frozenset(t.strip().lower() for t in value.split(b",") if t.strip())


# Random bytes for request ids, fetched from the OS 4 KiB at a time: one
# getrandom() per 256 ids instead of one per request (the same randomness;
# Envoy also draws its UUIDs from a buffered generator). The version and
# variant bits are set for the whole batch at once. A forked child must not
# reuse the parent's buffer.
_RANDOM_BATCH = 4096
_random = ""  # hex digits of the current batch
_random_pos = _RANDOM_BATCH


# Byte maps that set the version (4) and the variant (RFC 4122) bits.
_VERSION_4 = bytes((x & 0x0F) | 0x40 for x in range(256))
_VARIANT = bytes((x & 0x3F) | 0x80 for x in range(256))


def _refill_random() -> None:
    global _random, _random_pos
    b = bytearray(os.urandom(_RANDOM_BATCH))
    b[6::16] = b[6::16].translate(_VERSION_4)
    b[8::16] = b[8::16].translate(_VARIANT)
    _random = b.hex()  # formatted once per batch: an id is slices of it
    _random_pos = 0


def _reset_random() -> None:
    global _random, _random_pos
    _random, _random_pos = "", _RANDOM_BATCH


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_random)


def new_request_id() -> bytes:
    """A random UUID4, formatted without the uuid module's object overhead."""
    global _random_pos
    if _random_pos >= _RANDOM_BATCH:
        _refill_random()
    pos = _random_pos * 2
    _random_pos += 16
    h = _random[pos:pos + 32]
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
