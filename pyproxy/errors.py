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
RATE_LIMITED = "RL"
RATE_LIMIT_SERVICE_ERROR = "RLSE"

# Envoy's router writes "upstream connect error or disconnect/reset before
# headers. [retried and the latest ]reset reason: R" with R from
# Http::Utility::resetReasonToString: "remote connection failure" (refused,
# unreachable), "connection timeout", "connection termination", "overflow",
# "protocol error"; "retried and the latest" once a retry was made (the
# router's is_retry_). Checked against Envoy 1.40 (docs/differences.md).
_RESET_PREFIX = b"upstream connect error or disconnect/reset before headers. "


def reset_body(reason: bytes, retried: bool = False) -> bytes:
    return _RESET_PREFIX + (b"retried and the latest " if retried else b"") + b"reset reason: " + reason


CONNECT_FAILURE_BODY = reset_body(b"remote connection failure")
RESET_BEFORE_HEADERS_BODY = reset_body(b"connection termination")


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
# REGISTRY_ONLY: istiod's "block_all" virtual host is a direct response 502,
# which Envoy logs without a flag (httproute.go buildCatchAllVirtualHost).
NR_502 = LocalReply(502, b"", "")
# Envoy's cluster_not_found reply (Istio sets cluster_not_found_response_code
# SERVICE_UNAVAILABLE): an empty body.
NC_503 = LocalReply(503, b"", NO_CLUSTER)
UH_503 = LocalReply(503, b"no healthy upstream", NO_HEALTHY_UPSTREAM)
UF_503 = LocalReply(503, CONNECT_FAILURE_BODY, UPSTREAM_CONNECT_FAILURE)
UF_TIMEOUT_503 = LocalReply(503, reset_body(b"connection timeout"), UPSTREAM_CONNECT_FAILURE)
UC_503 = LocalReply(503, RESET_BEFORE_HEADERS_BODY, UPSTREAM_CONNECTION_TERMINATION)
UPE_502 = LocalReply(502, reset_body(b"protocol error"), UPSTREAM_PROTOCOL_ERROR)
# An HTTP/2 upstream reset the stream (Envoy's RemoteReset and
# RemoteRefusedStreamReset; resetReasonToString's words).
UR_503 = LocalReply(503, reset_body(b"remote reset"), UPSTREAM_RESET)
UR_REFUSED_503 = LocalReply(503, reset_body(b"remote refused stream reset"), UPSTREAM_RESET)
UO_503 = LocalReply(503, reset_body(b"overflow"), UPSTREAM_OVERFLOW,
                    extra_headers=((b"x-envoy-overloaded", b"true"),))

# The same replies after at least one retry (Envoy: "retried and the latest
# reset reason: ...").
RETRIED: dict[LocalReply, LocalReply] = {
    r: LocalReply(r.status, reset_body(r.body.rpartition(b"reset reason: ")[2], retried=True), r.flag,
                  r.extra_headers, r.content_type)
    for r in (UF_503, UF_TIMEOUT_503, UC_503, UPE_502, UO_503, UR_503, UR_REFUSED_503)
}
UT_504 = LocalReply(504, b"upstream request timeout", UPSTREAM_REQUEST_TIMEOUT)
# Stream idle timeout: 504 once the request is complete, else 408 (Envoy).
SI_504 = LocalReply(504, b"stream timeout", STREAM_IDLE_TIMEOUT)
SI_408 = LocalReply(408, b"stream timeout", STREAM_IDLE_TIMEOUT)
FI_BODY = b"fault filter abort"
