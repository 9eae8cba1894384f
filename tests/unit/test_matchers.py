"""VirtualService match semantics, table-driven, against real parsed requests.

Expected results follow Istio's translation to Envoy route matchers
(pilot route.go TranslateRouteMatch) and Envoy's matching."""

from __future__ import annotations

import pytest

from pyproxy.config.model import HTTPMatchRequest, StringMatch
from pyproxy.http.exchange import Exchange
from pyproxy.routing.matchers import RegexMatch, compile_match, compile_regex
from pyproxy.routing.table import CompiledRoute, VirtualHost

from .routing_util import build, request, service_entry

E, P, R, ANY = "exact", "prefix", "regex", "present"


def sm(kind: str, value: str = "") -> StringMatch:
    return StringMatch(kind, value)  # type: ignore[arg-type]


def matches(m: HTTPMatchRequest, target: str, headers: dict[str, str] | list[tuple[str, str]] | None = None, method: str = "GET",
            port: int | None = None, host: str = "reviews") -> bool:
    ex = request(target, headers, method=method, port=port, host=host)
    return all(check(ex) for check in compile_match(m))


URI_CASES = [
    # (match, path, expected, why)
    (sm(E, "/a"), "/a", True, "exact"),
    (sm(E, "/a"), "/a?x=1", True, "uri excludes the query string"),
    (sm(E, "/a"), "/a/", False, "exact is exact"),
    (sm(E, "/a"), "/A", False, "case-sensitive by default"),
    (sm(P, "/foo"), "/foobar", True, "prefix is a plain string prefix"),
    (sm(P, "/foo"), "/foo/bar?q", True, "prefix"),
    (sm(P, "/foo"), "/fo", False, "prefix longer than path"),
    (sm(P, "/foo/"), "/foo", False, "trailing slash matters"),
    (sm(R, "/v[0-9]+/.*"), "/v12/x", True, "regex full match"),
    (sm(R, "/v[0-9]+"), "/v12/x", False, "regex must match the whole path"),
    (sm(R, "v1"), "/v1", False, "regex is anchored at the start too"),
    (sm(R, "/a.*"), "/a?b=1", True, "regex sees the path without the query"),
    (sm(R, "/a"), "/a?b", True, "the query is not part of the path"),
]


@pytest.mark.parametrize("m, path, expected, why", URI_CASES, ids=[c[3] for c in URI_CASES])
def test_uri(m: StringMatch, path: str, expected: bool, why: str) -> None:
    assert matches(HTTPMatchRequest(uri=m), path) is expected


IGNORE_CASE = [
    (sm(E, "/Api"), "/aPI", True),
    (sm(P, "/Api/"), "/API/x", True),
    (sm(P, "/api/"), "/Ap/x", False),
    # Envoy's case_sensitive=false does not apply to regex path matchers.
    (sm(R, "/api"), "/API", False),
    (sm(R, "(?i)/api"), "/API", True),
]


@pytest.mark.parametrize("m, path, expected", IGNORE_CASE)
def test_ignore_uri_case_applies_to_exact_and_prefix_only(m: StringMatch, path: str, expected: bool) -> None:
    assert matches(HTTPMatchRequest(uri=m, ignore_uri_case=True), path) is expected


HEADER_CASES = [
    # (headers matcher, request headers, expected)
    ({"end-user": sm(E, "tester")}, {"end-user": "tester"}, True),
    ({"end-user": sm(E, "tester")}, {"End-User": "tester"}, True),  # names are case-insensitive
    ({"end-user": sm(E, "tester")}, {"end-user": "Tester"}, False),  # values are not
    ({"end-user": sm(E, "tester")}, {}, False),
    ({"end-user": sm(P, "test")}, {"end-user": "tester"}, True),
    ({"end-user": sm(R, "t.*r")}, {"end-user": "tester"}, True),
    ({"end-user": sm(R, "t.*e")}, {"end-user": "tester"}, False),  # full match
    ({"end-user": sm(ANY)}, {"end-user": ""}, True),  # {} = present, even empty
    ({"end-user": sm(ANY)}, {}, False),
    ({"end-user": sm(E, "")}, {"end-user": ""}, True),
    # Envoy 1.40 matches each value of a repeated header on its own
    # (match_headers_individually; checked against Envoy): any value may match.
    ({"x": sm(E, "a,b")}, [("x", "a"), ("x", "b")], False),
    ({"x": sm(E, "b")}, [("x", "a"), ("x", "b")], True),
    ({"x": sm(E, "foo")}, [("x", "foo"), ("x", "foo")], True),
    ({"x": sm(P, "fo")}, [("x", "bar"), ("x", "foo")], True),
    ({"x": sm(R, "f.o")}, [("x", "bar"), ("x", "foo")], True),
    ({"x": sm(R, "f.o")}, [("x", "bar"), ("x", "baz")], False),
    ({"x": sm(E, "a, b")}, {"x": "a, b"}, True),  # one line is one value
    ({"a": sm(E, "1"), "b": sm(E, "2")}, {"a": "1", "b": "2"}, True),
    ({"a": sm(E, "1"), "b": sm(E, "2")}, {"a": "1"}, False),  # AND
]


@pytest.mark.parametrize("hm, headers, expected", HEADER_CASES)
def test_headers(hm: dict, headers: dict | list, expected: bool) -> None:
    assert matches(HTTPMatchRequest(headers=tuple(hm.items())), "/", headers) is expected  # type: ignore[arg-type]


WITHOUT_CASES = [
    # Istio: inverted matcher with treat_missing_header_as_empty (not for {}).
    (sm(E, "tester"), {}, True),
    (sm(E, "tester"), {"end-user": "other"}, True),
    (sm(E, "tester"), {"end-user": "tester"}, False),
    (sm(P, "test"), {"end-user": "tester"}, False),
    (sm(R, "t.*"), {"end-user": "x"}, True),
    (sm(ANY), {}, True),
    (sm(ANY), {"end-user": "x"}, False),
    (sm(R, ".*"), {}, False),  # a missing header is "", which ".*" matches
    (sm(E, ""), {}, False),
    (sm(E, ""), {"end-user": "x"}, True),
    # repeated: satisfied only when no value matches (checked against Envoy)
    (sm(E, "tester"), [("end-user", "other"), ("end-user", "tester")], False),
    (sm(E, "tester"), [("end-user", "other"), ("end-user", "else")], True),
    (sm(ANY), [("end-user", "a"), ("end-user", "b")], False),
]


@pytest.mark.parametrize("m, headers, expected", WITHOUT_CASES)
def test_without_headers(m: StringMatch, headers: dict | list, expected: bool) -> None:
    assert matches(HTTPMatchRequest(without_headers=(("end-user", m),)), "/", headers) is expected


QUERY_CASES = [
    ("?v=2", sm(E, "2"), True),
    ("?v=20", sm(E, "2"), False),
    ("?v=20", sm(P, "2"), True),
    ("?v=123", sm(R, r"\d+"), True),
    ("?v=a123", sm(R, r"\d+"), False),
    ("?a=1&v=2", sm(E, "2"), True),
    ("?v=1&v=2", sm(E, "2"), False),  # the first occurrence counts
    ("?v=%32", sm(E, "2"), False),  # values are compared undecoded
    ("?v", sm(ANY), True),
    ("?v=anything", sm(ANY), True),
    ("?w=1", sm(ANY), False),
    ("", sm(ANY), False),
    # exact "" is Envoy's exact match of the empty value (present, no value)
    ("?v", sm(E, ""), True),
    ("?v=", sm(E, ""), True),
    ("?v=1", sm(E, ""), False),
    ("", sm(E, ""), False),
]


@pytest.mark.parametrize("query, m, expected", QUERY_CASES)
def test_query_params(query: str, m: StringMatch, expected: bool) -> None:
    assert matches(HTTPMatchRequest(query_params=(("v", m),)), "/p" + query) is expected


def test_method_scheme_authority_and_port() -> None:
    assert matches(HTTPMatchRequest(method=sm(E, "POST")), "/", method="POST")
    assert not matches(HTTPMatchRequest(method=sm(E, "POST")), "/", method="GET")
    assert matches(HTTPMatchRequest(method=sm(R, "GET|HEAD")), "/", method="HEAD")
    assert matches(HTTPMatchRequest(scheme=sm(E, "http")), "/")
    assert not matches(HTTPMatchRequest(scheme=sm(E, "https")), "/")
    assert matches(HTTPMatchRequest(authority=sm(P, "reviews")), "/", host="reviews.default:9080")
    assert matches(HTTPMatchRequest(authority=sm(E, "reviews:9080")), "/", host="reviews:9080")
    assert not matches(HTTPMatchRequest(authority=sm(E, "reviews")), "/", host="reviews:9080")
    assert matches(HTTPMatchRequest(port=9080), "/", port=9080)
    assert not matches(HTTPMatchRequest(port=9080), "/", port=9081)


def test_absolute_form_request_matches_on_its_own_path_and_authority() -> None:
    m = HTTPMatchRequest(uri=sm(E, "/r/1"), authority=sm(E, "reviews:9080"))
    ex = request("http://reviews:9080/r/1?x=2", {"host": "ignored"})
    assert all(c(ex) for c in compile_match(m))


def test_pseudo_header_names_in_headers_are_ignored_as_istio_does() -> None:
    m = HTTPMatchRequest(headers=(("uri", sm(E, "/nope")), ("method", sm(E, "PUT"))))
    assert matches(m, "/anything")


def test_every_field_of_one_entry_must_hold() -> None:
    m = HTTPMatchRequest(uri=sm(P, "/api"), method=sm(E, "GET"), headers=(("x", sm(E, "1")),),
                         query_params=(("q", sm(ANY)),), without_headers=(("y", sm(ANY)),))
    assert matches(m, "/api/1?q", {"x": "1"})
    assert not matches(m, "/api/1", {"x": "1"})  # query missing
    assert not matches(m, "/api/1?q", {"x": "1", "y": "2"})  # withoutHeaders
    assert not matches(m, "/api/1?q", {"x": "1"}, method="POST")
    assert not matches(m, "/other?q", {"x": "1"})


def match_index(route: CompiledRoute, ex: Exchange) -> int:
    """The match entry ``VirtualHost.match`` records for ``route`` (-1: none matched)."""
    return ex.match_index if VirtualHost("t", (route,), None, False).match(ex) is route else -1


def test_match_entries_are_ored_and_the_first_matching_index_is_reported() -> None:
    route = CompiledRoute()
    route.conditions = (
        compile_match(HTTPMatchRequest(uri=sm(P, "/a"), headers=(("x", sm(E, "1")),))),
        compile_match(HTTPMatchRequest(uri=sm(P, "/b"))),
        compile_match(HTTPMatchRequest(headers=(("x", sm(E, "1")),))),
    )
    assert match_index(route, request("/a", {"x": "1"})) == 0
    assert match_index(route, request("/b", {"x": "1"})) == 1
    assert match_index(route, request("/c", {"x": "1"})) == 2
    assert match_index(route, request("/a")) == -1
    empty = CompiledRoute()
    assert match_index(empty, request("/anything")) == 0  # no match: matches everything


RE2_CASES = [
    # (pattern, value, expected): cases where Python's re would answer differently
    ("a{,3}", "a{,3}", True),  # RE2: literal text; Python: up to 3 a's
    ("a{,3}", "aa", False),
    (r"x\sy", "x\x0by", False),  # \s has no \v in RE2
    (r"\pL+", "héllo", True),  # Unicode classes (RE2 only)
    ("[[:digit:]]+", "123", True),  # POSIX classes (RE2 only)
    (r"\Qa.b\E", "a.b", True),
    (r"\Qa.b\E", "axb", False),
    ("(?i)abc", "ABC", True),
    ("caf.", "café", True),  # "." is one UTF-8 character in RE2
    ("a|ab", "ab", True),  # full match, not leftmost-first prefix
]


@pytest.mark.parametrize("pattern, value, expected", RE2_CASES)
def test_regex_has_re2_semantics(pattern: str, value: str, expected: bool) -> None:
    assert compile_regex(pattern)(value.encode()) is expected


def test_python_fast_path_is_taken_only_for_the_safe_subset() -> None:
    assert RegexMatch("/api/v[0-9]+/.*").rxpy is not None
    for pattern in ("a{,3}", r"\s", r"\pL", "[[:alpha:]]", r"\bword", "(?s).", r"\{x"):
        assert RegexMatch(pattern).rxpy is None, pattern


def test_invalid_regex_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="invalid RE2 regex"):
        compile_regex("(?=lookahead)")


VS_MATCHING = service_entry("reviews", [("127.0.0.1", 1, {"version": "v1"})]) + """
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - name: jason
    match:
    - name: by-header
      headers: {end-user: {exact: jason}}
    - name: by-query
      queryParams: {user: {exact: jason}}
    route: [{destination: {host: reviews}}]
  - name: not-beta
    match:
    - withoutHeaders: {beta: {regex: "*"}}
      uri: {prefix: /api}
    route: [{destination: {host: reviews}}]
  - name: rest
    route: [{destination: {host: reviews}}]
"""


def test_rules_from_yaml_first_match_wins_and_route_names_follow_istio() -> None:
    snap = build(VS_MATCHING)
    vh = snap.hosts.lookup(b"reviews")
    assert vh is not None

    def name(target: str, headers: dict | None = None) -> str:
        ex = request(target, headers)
        route = vh.match(ex)
        assert route is not None
        return route.name_for(ex.match_index)

    assert name("/x", {"end-user": "jason"}) == "jason.by-header"
    assert name("/x?user=jason") == "jason.by-query"
    assert name("/api/1") == "not-beta"
    # withoutHeaders regex "*" is Istio's special case: "header present".
    assert name("/api/1", {"beta": "1"}) == "rest"
    assert name("/other") == "rest"


def test_source_labels_and_gateways_are_decided_at_load() -> None:
    text = service_entry("reviews", [("127.0.0.1", 1, {})]) + """
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - name: from-productpage
    match: [{sourceLabels: {app: productpage}}]
    route: [{destination: {host: reviews}}]
  - name: gateway-only
    match: [{gateways: [my-gateway], uri: {prefix: /}}]
    route: [{destination: {host: reviews}}]
  - name: mesh-ignores-labels
    match: [{gateways: [mesh], sourceLabels: {app: nobody}, uri: {prefix: /m}}]
    route: [{destination: {host: reviews}}]
  - name: other-namespace
    match: [{sourceNamespace: elsewhere}]
    route: [{destination: {host: reviews}}]
  - name: rest
    route: [{destination: {host: reviews}}]
"""
    pp = build(text, labels={"app": "productpage", "version": "v1"}).hosts.lookup(b"reviews")
    other = build(text, labels={"app": "ratings"}).hosts.lookup(b"reviews")
    assert pp is not None and other is not None
    assert [r.name for r in pp.routes] == ["from-productpage", "mesh-ignores-labels", "rest"]
    assert [r.name for r in other.routes] == ["mesh-ignores-labels", "rest"]
