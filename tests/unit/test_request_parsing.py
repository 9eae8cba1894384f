"""Request parsing and validation as pure functions (pyproxy/http/request.py):
no socket, no loop, no Exchange. The same functions run on the request path
(Exchange.__init__ and Exchange.start call them)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from pyproxy.http.request import (
    PLAIN_PATHS,
    RefusedRequest,
    host_and_port,
    index_headers,
    normalize_request_path,
    split_absolute_target,
    split_authority,
    validate,
)

# (authority, (host, port)) for split_authority: port b"" none, None malformed.
AUTHORITIES = [
    (b"reviews", (b"reviews", b"")),
    (b"reviews:9080", (b"reviews", b"9080")),
    (b"Reviews.Default:80", (b"Reviews.Default", b"80")),  # as written: not lower-cased
    (b"reviews:", (b"reviews", b"")),  # RFC 3986: an empty port is no port
    (b"", (b"", b"")),
    (b"reviews:http", (b"reviews", None)),
    (b"reviews:+80", (b"reviews", None)),  # int() would take it
    (b"reviews: 80", (b"reviews", None)),
    (b"reviews:8_0", (b"reviews", None)),
    (b"a:b:80", (b"a", None)),  # a name has no colon
    (b"::1", (b"", None)),  # IPv6 without brackets
    (b"[::1]", (b"[::1]", b"")),
    (b"[::1]:8080", (b"[::1]", b"8080")),
    (b"[::1]:", (b"[::1]", b"")),
    (b"[fe80::1%25eth0]:80", (b"[fe80::1%25eth0]", b"80")),
    (b"[::1]8080", (b"[::1]", None)),  # no colon after the bracket
    (b"[::1]x80", (b"[::1]", None)),
    (b"[::1]:x", (b"[::1]", None)),
    (b"[::1", (b"[::1", None)),  # unterminated literal
    # Istio >= 1.27: the absolute FQDN keeps its dot (the route lookup matches it).
    (b"reviews.default.svc.cluster.local.", (b"reviews.default.svc.cluster.local.", b"")),
    (b"reviews.default.svc.cluster.local.:9080", (b"reviews.default.svc.cluster.local.", b"9080")),
]


@pytest.mark.parametrize(("authority", "expected"), AUTHORITIES)
def test_split_authority_table(authority: bytes, expected: tuple[bytes, bytes | None]) -> None:
    assert split_authority(authority) == expected


@pytest.mark.parametrize(("authority", "expected"), [
    (b"reviews", (b"reviews", 0)),
    (b"Reviews.Default:9080", (b"reviews.default", 9080)),
    (b"[::1]:443", (b"[::1]", 443)),
    (b"reviews:", (b"reviews", 0)),
    (b"reviews:http", (b"reviews", -1)),
    (b"a:b:80", (b"a", -1)),
    (b"reviews:99999", (b"reviews", 99999)),  # out of range: validate refuses it
    (b"Bench.:80", (b"bench.", 80)),
])
def test_host_and_port_is_what_the_exchange_routes_on(authority: bytes, expected: tuple[bytes, int]) -> None:
    assert host_and_port(authority) == expected
    assert host_and_port(authority) == expected  # memoised: the same answer


@pytest.mark.parametrize(("target", "expected"), [
    (b"http://reviews:9080/a/b?x=1", (b"reviews:9080", b"/a/b", b"x=1")),
    (b"http://reviews", (b"reviews", b"/", b"")),
    (b"http://reviews/", (b"reviews", b"/", b"")),
    (b"http://reviews?x=1", (b"reviews", b"", b"x=1")),  # no path: validate answers 404
    (b"http://[::1]:80/p", (b"[::1]:80", b"/p", b"")),
])
def test_split_absolute_target(target: bytes, expected: tuple[bytes, bytes, bytes]) -> None:
    assert split_absolute_target(target) == expected


def test_index_headers_joins_repeated_fields_and_keeps_each_value() -> None:
    hdict, repeated, malformed = index_headers([(b"host", b"a"), (b"x", b"1"), (b"x", b"2"), (b"x", b"3")])
    assert hdict == {b"host": b"a", b"x": b"1,2,3"}
    assert repeated == {b"x": [b"1", b"2", b"3"]}
    assert malformed is None


def test_index_headers_finds_several_host_fields() -> None:
    _, _, malformed = index_headers([(b"host", b"a"), (b"host", b"b")])
    assert malformed == b"multiple host headers"


def test_normalize_request_path_remembers_plain_paths_and_refuses_nul() -> None:
    PLAIN_PATHS.discard(b"/plain/one")
    assert normalize_request_path(b"/plain/one", 1) == b"/plain/one"
    assert b"/plain/one" in PLAIN_PATHS
    assert normalize_request_path(b"/a/./b/../c", 1) == b"/a/c"
    assert b"/a/c" not in PLAIN_PATHS and b"/a/./b/../c" not in PLAIN_PATHS
    assert normalize_request_path(b"/a//b", 1) == b"/a//b"  # BASE keeps double slashes
    assert normalize_request_path(b"/a//b", 2) == b"/a/b"  # MERGE_SLASHES
    assert normalize_request_path(b"/a%00b", 1) is None


@dataclass
class Req:
    """A parsed request as validate reads it (the Exchange's fields)."""

    method: bytes = b"GET"
    target: bytes = b"/"
    path: bytes = b"/"
    authority: bytes = b"reviews"
    port: int = 0
    version: str = "1.1"
    malformed: bytes | None = None
    content_length: int = -1
    chunked_in: bool = False
    hdict: dict[bytes, bytes] = field(default_factory=dict)


@dataclass
class Limits:
    accept_http10: bool = False
    max_request_body: int = 0


def refusal(req: Req, limits: Limits | None = None) -> tuple[int, bytes, str | None, str] | None:
    bad = validate(req, limits or Limits())
    return None if bad is None else (bad.status, bad.body, bad.flag, bad.reason)


def test_validate_accepts_an_ordinary_request() -> None:
    assert validate(Req(), Limits()) is None
    assert validate(Req(method=b"OPTIONS", target=b"*", path=b"*"), Limits()) is None
    assert validate(Req(target=b"http://reviews/x", path=b"/x"), Limits()) is None
    assert validate(Req(version="1.0", authority=b""), Limits(accept_http10=True)) is None
    assert validate(Req(content_length=100), Limits(max_request_body=100)) is None


@pytest.mark.parametrize(("req", "limits", "expected"), [
    (Req(malformed=b"multiple host headers"), None, (400, b"multiple host headers", "DPE", "malformed")),
    (Req(version="0.9"), None, (400, b"unsupported HTTP version", "DPE", "http_version")),
    (Req(version="1.0"), None, (426, b"Upgrade Required", "DPE", "http10_not_accepted")),
    (Req(content_length=-2), None, (400, b"invalid content-length", "DPE", "invalid_content_length")),
    (Req(chunked_in=True, content_length=5, hdict={b"transfer-encoding": b"chunked"}), None,
     (400, b"both content-length and transfer-encoding", "DPE", "content_length_and_chunked")),
    (Req(chunked_in=True, hdict={b"transfer-encoding": b"gzip, chunked"}), None,
     (400, b"unsupported transfer-encoding", "DPE", "invalid_transfer_encoding")),
    (Req(version="1.0", chunked_in=True, hdict={b"transfer-encoding": b"chunked"}), Limits(accept_http10=True),
     (400, b"transfer-encoding in an HTTP/1.0 request", "DPE", "transfer_encoding_in_http10")),
    # Envoy's 413 (buffer limit) and its pathless-absolute-URL 404 carry no flag.
    (Req(content_length=101), Limits(max_request_body=100), (413, b"Payload Too Large", None, "request_body_too_large")),
    (Req(method=b"CONNECT"), None, (501, b"CONNECT is not supported", "DPE", "connect_not_supported")),
    (Req(authority=b""), None, (400, b"missing host", "DPE", "missing_host_header")),
    (Req(port=-1), None, (400, b"invalid port in authority", "DPE", "invalid_port")),
    (Req(port=65536), None, (400, b"invalid port in authority", "DPE", "invalid_port")),
    (Req(authority=b"user@reviews"), None, (400, b"invalid host", "DPE", "invalid_authority")),
    (Req(authority=b"re views"), None, (400, b"invalid host", "DPE", "invalid_authority")),
    (Req(target=b"reviews/x"), None, (400, b"invalid request target", "DPE", "invalid_target")),
    (Req(target=b"*"), None, (400, b"invalid request target", "DPE", "invalid_target")),
    (Req(target=b"/a#b"), None, (400, b"fragment in request target", "DPE", "fragment_in_target")),
    (Req(target=b"http://reviews?x", path=b""), None, (404, b"", None, "absolute_path_rejected")),
])
def test_validate_refusals(req: Req, limits: Limits | None, expected: tuple[int, bytes, str | None, str]) -> None:
    assert refusal(req, limits) == expected


def test_validate_checks_in_envoys_order() -> None:
    # HTTP/1.0 is refused (426) before anything else about the request is looked at.
    assert refusal(Req(version="1.0", method=b"CONNECT", authority=b"")) == (
        426, b"Upgrade Required", "DPE", "http10_not_accepted")
    # A parse defect comes first of all.
    assert refusal(Req(malformed=b"path normalization failed", version="0.9"))[:2] == (  # type: ignore[index]
        400, b"path normalization failed")


def test_a_refused_request_is_a_frozen_record() -> None:
    bad = RefusedRequest(400, b"x", "DPE", "r")
    with pytest.raises(AttributeError):
        bad.status = 200  # type: ignore[misc]
