"""CORS: Envoy's CORS filter as Istio configures it (see filters/cors.py)."""

from __future__ import annotations

from pyproxy.config.model import CorsPolicy, StringMatch
from pyproxy.filters.cors import CompiledCors

from .routing_util import build, head_of, send, service_entry

BASE = service_entry("app", [("10.0.0.1", 8080, {})], ports=(8080,))


def config(cors: str, action: str = "route: [{destination: {host: app}}]") -> str:
    return BASE + f"""
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: app}}
spec:
  hosts: [app]
  http:
  - corsPolicy: {cors}
    headers: {{response: {{set: {{x-route: "1"}}}}}}
    {action}
"""


POLICY = """
      allowOrigins: [{exact: "https://a.example"}, {prefix: "https://b."}, {regex: "https://.*\\\\.c\\\\.example"}]
      allowMethods: [GET, POST]
      allowHeaders: [x-token, content-type]
      exposeHeaders: [x-trace]
      maxAge: 24h
      allowCredentials: true"""


def preflight(origin: str, method: str = "POST", extra: dict[str, str] | None = None) -> dict[str, str]:
    return {"origin": origin, "access-control-request-method": method, **(extra or {})}


def parse(resp: bytes) -> tuple[bytes, dict[bytes, bytes]]:
    head = resp.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    return head[0], dict(line.split(b": ", 1) for line in head[1:])  # type: ignore[misc]


def test_origin_matching_uses_string_matches_and_envoys_star_rule() -> None:
    c = CompiledCors(CorsPolicy(allow_origins=(StringMatch("exact", "https://a.example"),
                                               StringMatch("prefix", "https://b."))))
    assert c.origin_allowed(b"https://a.example")
    assert c.origin_allowed(b"https://b.anything")
    assert not c.origin_allowed(b"https://a.example.evil")
    assert not c.origin_allowed(b"http://a.example")
    # A matcher that accepts the literal "*" allows every origin (Envoy).
    assert CompiledCors(CorsPolicy(allow_origins=(StringMatch("exact", "*"),))).origin_allowed(b"https://x")
    assert CompiledCors(CorsPolicy(allow_origins=(StringMatch("regex", ".*"),))).origin_allowed(b"https://x")
    assert not CompiledCors(CorsPolicy()).origin_allowed(b"https://x")


def test_allowed_preflight_is_answered_locally() -> None:
    headers = preflight("https://b.example", extra={"access-control-request-headers": "x-token"})
    ex = send(build(config(POLICY)), "/api", headers,
              method="OPTIONS", host="app")
    status, h = parse(ex.conn.response)  # type: ignore[attr-defined]
    assert status == b"HTTP/1.1 200 OK"
    assert h[b"access-control-allow-origin"] == b"https://b.example"
    assert h[b"access-control-allow-methods"] == b"GET,POST"
    assert h[b"access-control-allow-headers"] == b"x-token,content-type"
    assert h[b"access-control-max-age"] == b"86400"
    assert h[b"access-control-allow-credentials"] == b"true"
    assert h[b"access-control-expose-headers"] == b"x-trace"
    assert h[b"content-length"] == b"0"
    assert b"x-route" not in h  # the CORS filter answers before the router
    assert ex.cluster is None  # nothing went upstream


def test_unmatched_preflight_is_forwarded_by_default() -> None:
    ex = send(build(config(POLICY)), "/api", preflight("https://evil.example"), method="OPTIONS", host="app")
    assert ex.conn.response == b""  # type: ignore[attr-defined]
    assert ex.cluster is not None and head_of(ex)[0] == b"OPTIONS /api HTTP/1.1"


def test_unmatched_preflight_with_ignore_is_answered_without_allow_origin() -> None:
    ex = send(build(config(POLICY + "\n      unmatchedPreflights: IGNORE")), "/api", preflight("https://evil.example"),
              method="OPTIONS", host="app")
    status, h = parse(ex.conn.response)  # type: ignore[attr-defined]
    assert status == b"HTTP/1.1 200 OK" and ex.cluster is None
    assert b"access-control-allow-origin" not in h
    # Envoy still writes the other preflight headers.
    assert h[b"access-control-allow-methods"] == b"GET,POST"


def test_options_without_request_method_is_not_a_preflight() -> None:
    ex = send(build(config(POLICY)), "/api", {"origin": "https://a.example"}, method="OPTIONS", host="app")
    assert ex.conn.response == b"" and ex.cluster is not None  # type: ignore[attr-defined]
    assert ex.cors_origin == b"https://a.example"


def test_actual_request_response_gets_cors_headers_replacing_upstreams() -> None:
    ex = send(build(config(POLICY)), "/api", {"origin": "https://x.c.example"}, host="app")
    assert ex.cors_origin == b"https://x.c.example"
    ex._commit_response(200, [(b"access-control-allow-origin", b"*"), (b"content-length", b"0")], True)
    _, h = parse(ex.conn.response)  # type: ignore[attr-defined]
    assert h[b"access-control-allow-origin"] == b"https://x.c.example"
    assert h[b"access-control-allow-credentials"] == b"true"
    assert h[b"access-control-expose-headers"] == b"x-trace"
    assert h[b"x-route"] == b"1"


def test_disallowed_origin_and_no_origin_leave_the_response_alone() -> None:
    for headers in ({"origin": "https://evil.example"}, {}):
        ex = send(build(config(POLICY)), "/api", headers, host="app")
        assert ex.cors_origin is None
        ex._commit_response(200, [(b"content-length", b"0")], True)
        assert b"access-control" not in ex.conn.response  # type: ignore[attr-defined]


def test_local_replies_of_the_route_get_cors_headers_too() -> None:
    ex = send(build(config(POLICY, action="directResponse: {status: 403, body: {string: denied}}")), "/",
              {"origin": "https://a.example"}, host="app")
    status, h = parse(ex.conn.response)  # type: ignore[attr-defined]
    assert status.startswith(b"HTTP/1.1 403")
    assert h[b"access-control-allow-origin"] == b"https://a.example" and h[b"x-route"] == b"1"


def test_star_lists_echo_the_request() -> None:
    c = CompiledCors(CorsPolicy(allow_origins=(StringMatch("exact", "*"),), allow_methods=("*",),
                                allow_headers=("*",)))
    h = dict(c.preflight_headers({b"access-control-request-method": b"PATCH",
                                  b"access-control-request-headers": b"x-a,x-b"}, b"https://o"))
    assert h[b"access-control-allow-methods"] == b"PATCH"
    assert h[b"access-control-allow-headers"] == b"x-a,x-b"
    assert b"access-control-allow-credentials" not in h and b"access-control-max-age" not in h
