"""Local replies: responses the proxy generates itself, with Envoy's status,
body text and response flag.

Each reply is precomputed once (status line, fixed headers, body) so sending
one on the request path is a single bytes concatenation.
"""

from __future__ import annotations

from dataclasses import dataclass
from http import HTTPStatus

# Envoy response flags (the short names shown in access logs and in Istio's
# ``response_flags`` metric label).
NO_ROUTE = "NR"
NO_CLUSTER = "NC"
NO_HEALTHY_UPSTREAM = "UH"
UPSTREAM_CONNECT_FAILURE = "UF"
UPSTREAM_OVERFLOW = "UO"
UPSTREAM_REQUEST_TIMEOUT = "UT"
UPSTREAM_RETRY_LIMIT_EXCEEDED = "URX"
UPSTREAM_CONNECTION_TERMINATION = "UC"
UPSTREAM_PROTOCOL_ERROR = "UPE"
UPSTREAM_RESET = "UR"
DOWNSTREAM_CONNECTION_TERMINATION = "DC"
DOWNSTREAM_PROTOCOL_ERROR = "DPE"
FAULT_INJECTED = "FI"
DELAY_INJECTED = "DI"
STREAM_IDLE_TIMEOUT = "SI"
OVERLOAD_MANAGER = "OM"

CONNECT_FAILURE_BODY = b"upstream connect error or disconnect/reset before headers. reset reason: connection failure"
RESET_BEFORE_HEADERS_BODY = (
    b"upstream connect error or disconnect/reset before headers. reset reason: connection termination"
)


def status_line(status: int) -> bytes:
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = "Unknown"
    return f"HTTP/1.1 {status} {reason}\r\n".encode("latin-1")


# Status lines for every code, computed once: response heads are built by
# concatenation on the hot path.
STATUS_LINES: dict[int, bytes] = {code: status_line(code) for code in range(100, 600)}


@dataclass(frozen=True, slots=True)
class LocalReply:
    status: int
    body: bytes
    flag: str
    extra_headers: tuple[tuple[bytes, bytes], ...] = ()
    content_type: bytes = b"text/plain"


NR_404 = LocalReply(404, b"", NO_ROUTE)
NR_502 = LocalReply(502, b"", NO_ROUTE)
NC_503 = LocalReply(503, b"no healthy upstream", NO_CLUSTER)
UH_503 = LocalReply(503, b"no healthy upstream", NO_HEALTHY_UPSTREAM)
UF_503 = LocalReply(503, CONNECT_FAILURE_BODY, UPSTREAM_CONNECT_FAILURE)
UC_503 = LocalReply(503, RESET_BEFORE_HEADERS_BODY, UPSTREAM_CONNECTION_TERMINATION)
UPE_502 = LocalReply(
    502,
    b"upstream connect error or disconnect/reset before headers. reset reason: protocol error",
    UPSTREAM_PROTOCOL_ERROR,
)
UO_503 = LocalReply(
    503,
    b"upstream connect error or disconnect/reset before headers. reset reason: overflow",
    UPSTREAM_OVERFLOW,
    extra_headers=((b"x-envoy-overloaded", b"true"),),
)
UT_504 = LocalReply(504, b"upstream request timeout", UPSTREAM_REQUEST_TIMEOUT)
# Stream idle timeout: 504 once the request is complete, else 408 (Envoy).
SI_504 = LocalReply(504, b"stream timeout", STREAM_IDLE_TIMEOUT)
SI_408 = LocalReply(408, b"stream timeout", STREAM_IDLE_TIMEOUT)
FI_BODY = b"fault filter abort"
