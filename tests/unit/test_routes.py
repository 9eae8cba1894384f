"""Route tables and actions: weighted destinations, header operations,
rewrite, redirect, direct response, host index. Expected values follow
Istio's translation (pilot route.go) and Envoy's router."""

from __future__ import annotations

import math
import random

import pytest

from pyproxy.config.model import HTTPMatchRequest, HTTPRedirect, StringMatch
from pyproxy.routing.actions import Redirect
from pyproxy.routing.table import HeaderOps

from .routing_util import build, head_of, request, send, service_entry

REVIEWS = service_entry("reviews", [("10.0.0.1", 9080, {"version": "v1"}), ("10.0.0.2", 9080, {"version": "v2"}),
                                    ("10.0.0.3", 9080, {"version": "v3"})]) + """
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
  - {name: v3, labels: {version: v3}}
"""


def vs(http: str, hosts: str = "[reviews]") -> str:
    return REVIEWS + f"""
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews}}
spec:
  hosts: {hosts}
  http:
{http}
"""


def first_route(text: str):  # type: ignore[no-untyped-def]
    vh = build(text).hosts.lookup(b"reviews")
    assert vh is not None
    return vh.routes[0]


# -- weighted destinations ----------------------------------------------------


def observed_shares(route, n: int, seed: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    rng = random.Random(seed)
    counts: dict[str, int] = {}
    for _ in range(n):
        t = route.pick(rng)
        counts[t.subset] = counts.get(t.subset, 0) + 1
    return {k: v / n for k, v in counts.items()}


@pytest.mark.parametrize("weights, expected", [
    ({"v1": 90, "v2": 10}, {"v1": 0.9, "v2": 0.1}),
    ({"v1": 50, "v2": 50}, {"v1": 0.5, "v2": 0.5}),
    ({"v1": 1, "v2": 2, "v3": 7}, {"v1": 0.1, "v2": 0.2, "v3": 0.7}),  # relative, not summing to 100
    ({"v1": 99, "v3": 1}, {"v1": 0.99, "v3": 0.01}),
])
def test_weighted_choice_matches_weights_over_10000_picks(weights: dict[str, int], expected: dict[str, float]) -> None:
    dests = "\n".join(f"    - destination: {{host: reviews, subset: {s}}}\n      weight: {w}" for s, w in weights.items())
    route = first_route(vs(f"  - route:\n{dests}"))
    n = 10_000
    got = observed_shares(route, n, seed=42)
    for subset, p in expected.items():
        sd = math.sqrt(p * (1 - p) / n)
        assert abs(got.get(subset, 0.0) - p) <= 4.5 * sd, (subset, got, p)
    assert set(got) == set(expected)


def test_same_seed_same_sequence() -> None:
    route = first_route(vs("""  - route:
    - {destination: {host: reviews, subset: v1}, weight: 30}
    - {destination: {host: reviews, subset: v2}, weight: 70}"""))
    rng1, rng2 = random.Random(9), random.Random(9)
    seq = [route.pick(rng1).subset for _ in range(200)]
    assert seq == [route.pick(rng2).subset for _ in range(200)]
    assert set(seq) == {"v1", "v2"}


def test_weight_zero_destinations_are_dropped_and_a_single_destination_takes_all() -> None:
    route = first_route(vs("""  - route:
    - {destination: {host: reviews, subset: v1}, weight: 100}
    - {destination: {host: reviews, subset: v2}, weight: 0}"""))
    assert [t.subset for t in route.targets] == ["v1"]
    single = first_route(vs("""  - route:
    - {destination: {host: reviews, subset: v3}, weight: 0}"""))
    assert [t.subset for t in single.targets] == ["v3"]
    rng = random.Random(1)
    assert {single.pick(rng).subset for _ in range(100)} == {"v3"}


def test_destination_resolves_to_subset_clusters_and_unknown_subset_is_nc() -> None:
    snap = build(vs("""  - route:
    - {destination: {host: reviews, subset: v2}}"""))
    route = snap.hosts.lookup(b"reviews").routes[0]  # type: ignore[union-attr]
    cluster = route.targets[0].cluster
    assert cluster is not None and cluster.name == "outbound|9080|v2|reviews.default.svc.cluster.local"
    assert [ep.host for ep in cluster.endpoints] == ["10.0.0.2"]
    snap = build(vs("""  - route:
    - {destination: {host: reviews, subset: nope}}"""))
    assert snap.hosts.lookup(b"reviews").routes[0].targets[0].cluster is None  # type: ignore[union-attr]
    ex = send(snap, "/")
    assert ex.conn.response.startswith(b"HTTP/1.1 503") and "NC" in ex.flags  # type: ignore[attr-defined]


# -- header operations -------------------------------------------------------------------


def H(*pairs: tuple[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.encode(), v.encode()) for k, v in pairs]


def test_header_ops_remove_then_set_then_add() -> None:
    ops = HeaderOps(remove=("x-a", "x-set"), set_=(("x-set", "new"), ("x-b", "b")), add=(("x-add", "1"), ("x-b", "b2")))
    out = ops.apply(H(("x-a", "1"), ("x-set", "old"), ("x-set", "old2"), ("x-add", "0"), ("keep", "k")))
    assert out == H(("x-add", "0"), ("keep", "k"), ("x-set", "new"), ("x-b", "b"), ("x-add", "1"), ("x-b", "b2"))


def test_header_ops_set_overwrites_an_earlier_add_in_the_same_parser() -> None:
    route = HeaderOps(add=(("x", "route-add"),))
    dest = HeaderOps(set_=(("x", "dest-set"),))
    assert route.merged(dest).apply(H(("x", "client"))) == H(("x", "dest-set"))
    # Removes of one parser run before all its sets/adds: a remove never
    # deletes what the same parser adds.
    assert HeaderOps(remove=("y",)).merged(HeaderOps(add=(("y", "1"),))).apply([]) == H(("y", "1"))


def test_header_ops_chain_later_parser_wins() -> None:
    dest = HeaderOps(set_=(("x", "dest"),), add=(("z", "dest"),))
    route = HeaderOps(set_=(("x", "route"),), remove=("z",))
    assert dest.then(route).apply(H(("x", "client"))) == H(("x", "route"))


def test_host_and_authority_are_rewrites_not_headers() -> None:
    ops = HeaderOps(set_=(("host", "a.example"),), add=((":authority", "b.example"),))
    assert ops.authority == b"a.example"  # set wins over add
    assert ops.apply(H(("host", "x"))) == H(("host", "x"))
    assert not ops


HEADERS_VS = """  - headers:
      request:
        set: {x-level: route, x-route: "1"}
        remove: [x-remove-me]
      response:
        set: {x-resp: route}
    route:
    - destination: {host: reviews, subset: v1}
      headers:
        request: {set: {x-level: dest}, add: {x-dest: "1"}}
        response: {set: {x-resp: dest}}"""


def test_single_destination_headers_follow_route_headers_in_one_list() -> None:
    # Istio appends the destination's operations after the route's: the
    # destination's set wins.
    snap = build(vs(HEADERS_VS))
    ex = send(snap, "/p", {"x-remove-me": "1", "x-level": "client"})
    _, h = head_of(ex)
    assert h[b"x-level"] == [b"dest"] and h[b"x-route"] == [b"1"] and h[b"x-dest"] == [b"1"]
    assert b"x-remove-me" not in h
    assert ex.response_ops is not None and ex.response_ops.apply([]) == H(("x-resp", "dest"))


def test_weighted_destination_headers_are_applied_before_the_routes() -> None:
    # Envoy evaluates the weighted cluster's headers first, then the route's.
    text = vs(HEADERS_VS.replace("subset: v1}", "subset: v1}\n      weight: 100") +
              "\n    - {destination: {host: reviews, subset: v2}, weight: 0}")
    ex = send(build(text), "/p", {"x-level": "client"})
    _, h = head_of(ex)
    assert h[b"x-level"] == [b"route"] and h[b"x-dest"] == [b"1"]
    assert ex.response_ops is not None and ex.response_ops.apply([]) == H(("x-resp", "route"))


@pytest.mark.parametrize("route_level, dest_level, expected", [
    ("", "headers: {request: {set: {host: dest.example}}}", b"dest.example"),
    ("headers: {request: {set: {':authority': route.example}}}", "headers: {request: {set: {host: dest.example}}}",
     b"route.example"),
    ("rewrite: {authority: rw.example}", "headers: {request: {set: {host: dest.example}}}", b"rw.example"),
    ("", "", b"reviews:9080"),
])
def test_authority_precedence(route_level: str, dest_level: str, expected: bytes) -> None:
    text = vs(f"""  - {route_level + chr(10) + '    ' if route_level else ''}route:
    - destination: {{host: reviews, subset: v1}}
      {dest_level}""")
    ex = send(build(text), "/", host="reviews:9080")
    assert head_of(ex)[1][b"host"] == [expected]


# -- rewrite ---------------------------------------------------------------------------------

REWRITE_CASES = [
    # (match, rewrite, request, expected request line)
    ("[{uri: {prefix: /v1/}}]", "uri: /v2/", "/v1/items?a=1", b"GET /v2/items?a=1 HTTP/1.1"),
    ("[{uri: {prefix: /foo}}]", "uri: /", "/foo/bar", b"GET //bar HTTP/1.1"),  # Envoy's gotcha, kept
    ("[{uri: {prefix: /foo/}}]", "uri: /", "/foo/bar", b"GET /bar HTTP/1.1"),
    ("[{uri: {exact: /old}}]", "uri: /new", "/old?q", b"GET /new?q HTTP/1.1"),
    ("[{uri: {regex: '/r/[0-9]+'}}]", "uri: /fixed", "/r/42", b"GET /fixed HTTP/1.1"),
    ("[{headers: {x: {exact: '1'}}}]", "uri: /v2", "/foo", b"GET /v2foo HTTP/1.1"),  # implicit prefix "/"
    ("[{uri: {prefix: /a/}}, {uri: {prefix: /bb/}}]", "uri: /z/", "/bb/c", b"GET /z/c HTTP/1.1"),  # per entry
    ("[{uri: {prefix: /API/}, ignoreUriCase: true}]", "uri: /v2/", "/api/x", b"GET /v2/x HTTP/1.1"),
    ("[{uri: {prefix: /s}}]", r"uriRegexRewrite: {match: '^/service/([^/]+)(/.*)$', rewrite: '\2/instance/\1'}",
     "/service/foo/v1/api?k=v", b"GET /v1/api/instance/foo?k=v HTTP/1.1"),
    ("[{uri: {prefix: /}}]", "uriRegexRewrite: {match: o, rewrite: '0'}", "/foo/boo", b"GET /f00/b00 HTTP/1.1"),
]


@pytest.mark.parametrize("match, rewrite, target, line", REWRITE_CASES)
def test_rewrite(match: str, rewrite: str, target: str, line: bytes) -> None:
    text = vs(f"""  - match: {match}
    rewrite: {{{rewrite}}}
    route: [{{destination: {{host: reviews, subset: v1}}}}]""")
    ex = send(build(text), target, {"x": "1"})
    request_line, h = head_of(ex)
    assert request_line == line
    assert h[b"x-envoy-original-path"] == [target.encode()]


def test_rewrite_sets_original_path_even_when_unchanged_and_replaces_a_client_one() -> None:
    text = vs("""  - match: [{uri: {prefix: /same}}]
    rewrite: {uri: /same}
    route: [{destination: {host: reviews, subset: v1}}]""")
    ex = send(build(text), "/same/x?y", {"x-envoy-original-path": "/forged"})
    line, h = head_of(ex)
    assert line == b"GET /same/x?y HTTP/1.1"
    assert h[b"x-envoy-original-path"] == [b"/same/x?y"]


def test_authority_only_rewrite_leaves_the_path_and_sets_no_original_path() -> None:
    text = vs("""  - rewrite: {authority: new.example}
    route: [{destination: {host: reviews, subset: v1}}]""")
    line, h = head_of(send(build(text), "/p?q"))
    assert line == b"GET /p?q HTTP/1.1" and h[b"host"] == [b"new.example"]
    assert b"x-envoy-original-path" not in h


def test_absolute_form_request_original_path_is_origin_form() -> None:
    text = vs("""  - match: [{uri: {prefix: /a}}]
    rewrite: {uri: /b}
    route: [{destination: {host: reviews, subset: v1}}]""")
    line, h = head_of(send(build(text), "http://reviews:9080/a/x?q=1"))
    assert line == b"GET /b/x?q=1 HTTP/1.1"
    assert h[b"x-envoy-original-path"] == [b"/a/x?q=1"]


# -- redirect ----------------------------------------------------------------------------------

REDIRECT_CASES = [
    # (redirect spec, request target, Host, expected Location)
    ("uri: /new", "/old?a=1", "reviews:9080", b"http://reviews:9080/new?a=1"),
    ("uri: /new?b=2", "/old?a=1", "reviews:9080", b"http://reviews:9080/new?b=2"),
    ("authority: other.example", "/p", "reviews:9080", b"http://other.example/p"),  # host and port replaced
    ("scheme: https", "/p", "reviews:9080", b"https://reviews:9080/p"),
    ("scheme: https", "/p", "reviews:80", b"https://reviews/p"),  # request port was http's default
    ("scheme: https", "/p", "reviews:443", b"https://reviews:443/p"),
    ("uri: /x", "/p", "reviews:80", b"http://reviews:80/x"),  # same scheme: port kept as sent
    ("port: 8443", "/p", "reviews:9080", b"http://reviews:8443/p"),
    # Istio turns port 80 (http) / 443 (https) into "no port redirect", and
    # Envoy then keeps the request's own port: surprising, but what Istio does.
    ("port: 80", "/p", "reviews:9080", b"http://reviews:9080/p"),
    ("port: 80", "/p", "reviews", b"http://reviews/p"),
    ("{scheme: https, port: 443}", "/p", "reviews:9080", b"https://reviews:9080/p"),
    ("{scheme: https, port: 443}", "/p", "reviews:80", b"https://reviews/p"),
    ("{scheme: https, port: 80}", "/p", "reviews:9080", b"https://reviews:80/p"),
    ("{authority: a.example, port: 81}", "/p", "reviews", b"http://a.example:81/p"),
    ("derivePort: FROM_REQUEST_PORT", "/p", "reviews", b"http://reviews:9080/p"),  # the service port
    ("{scheme: https, derivePort: FROM_PROTOCOL_DEFAULT}", "/p", "reviews:80", b"https://reviews/p"),
    ("{scheme: https, derivePort: FROM_PROTOCOL_DEFAULT}", "/p", "reviews:9080", b"https://reviews:9080/p"),
    ("prefixRewrite: /v2/", "/v1/x?q", "reviews", b"http://reviews/v2/x?q"),
]


@pytest.mark.parametrize("spec, target, host, location", REDIRECT_CASES)
def test_redirect_location(spec: str, target: str, host: str, location: bytes) -> None:
    body = spec if spec.startswith("{") else "{" + spec + "}"
    text = vs(f"""  - match: [{{uri: {{prefix: /{target.split("/")[1].split("?")[0]}/}}}}, {{uri: {{prefix: /}}}}]
    redirect: {body}""")
    ex = send(build(text), target, {"host": host})
    head = ex.conn.response  # type: ignore[attr-defined]
    assert head.startswith(b"HTTP/1.1 301 Moved Permanently\r\n")
    assert b"\r\nlocation: " + location + b"\r\n" in head
    assert b"content-length: 0" in head


def test_redirect_code_and_response_headers() -> None:
    text = vs("""  - redirect: {uri: /x, redirectCode: 308}
    headers: {response: {set: {x-why: moved}}}""")
    head = send(build(text), "/").conn.response  # type: ignore[attr-defined]
    assert head.startswith(b"HTTP/1.1 308 ")
    assert b"x-why: moved\r\n" in head


def test_redirect_object_defaults() -> None:
    rd = Redirect(HTTPRedirect(uri="/a"), (HTTPMatchRequest(uri=StringMatch("prefix", "/b")),))
    assert rd.code == 301
    ex = request("/b?x", {"host": "h"})
    assert rd.location(ex, 0) == b"http://h/a?x"


# -- direct response ---------------------------------------------------------------------------


def test_direct_response_body_status_and_content_type() -> None:
    text = vs("""  - match: [{uri: {exact: /health}}]
    directResponse: {status: 418, body: {string: "short and stout"}}
    headers: {response: {add: {x-teapot: "yes"}}}
  - match: [{uri: {exact: /bytes}}]
    directResponse: {status: 200, body: {bytes: AAEC}}
  - directResponse: {status: 204}""")
    snap = build(text)
    resp = send(snap, "/health").conn.response  # type: ignore[attr-defined]
    assert resp.startswith(b"HTTP/1.1 418 ")
    assert b"content-type: text/plain\r\n" in resp and b"x-teapot: yes\r\n" in resp
    assert resp.endswith(b"\r\n\r\nshort and stout")
    raw = send(snap, "/bytes").conn.response  # type: ignore[attr-defined]
    assert b"content-length: 3\r\n" in raw and raw.endswith(b"\r\n\r\n\x00\x01\x02")
    empty = send(snap, "/other").conn.response  # type: ignore[attr-defined]
    # Envoy sends no content-length (and no content-type) with a 204.
    assert empty.startswith(b"HTTP/1.1 204 ") and b"content-length" not in empty and b"content-type" not in empty
    head_only = send(snap, "/health", method="HEAD").conn.response  # type: ignore[attr-defined]
    # HEAD: the GET's header fields (length and type of the body), no body.
    assert head_only.endswith(b"\r\n\r\n") and b"content-length: 15\r\n" in head_only
    assert b"content-type: text/plain\r\n" in head_only


def test_no_route_is_404_nr() -> None:
    ex = send(build(vs("""  - match: [{uri: {prefix: /only}}]
    route: [{destination: {host: reviews}}]""")), "/else")
    assert ex.conn.response.startswith(b"HTTP/1.1 404") and ex.flags == ["NR"]  # type: ignore[attr-defined]


# -- host index and rule bookkeeping -------------------------------------------------------------


def test_lookup_is_a_dict_hit_that_does_not_grow_with_other_virtual_services() -> None:
    n = 1000
    docs = []
    for i in range(n):
        docs.append(service_entry(f"svc{i}", [(f"10.1.{i // 250}.{i % 250 + 1}", 80, {})]))
        docs.append(f"""
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: svc{i}}}
spec:
  hosts: [svc{i}]
  http:
  - match: [{{headers: {{x-tenant: {{exact: t{i}}}}}}}]
    route: [{{destination: {{host: svc{i}}}}}]
""")
    snap = build("\n---\n".join(docs))
    index = snap.hosts
    assert not index.wildcards and index.catch_all is None  # nothing is scanned
    # Count every matcher evaluation: a request for one host must touch only
    # that host's rules, whatever the number of VirtualServices.
    calls = {"n": 0}
    for vh in {id(v): v for v in index.exact.values()}.values():
        for route in vh.routes:
            route.conditions = tuple(tuple(_counting(c, calls) for c in checks) for checks in route.conditions)
    for i in (0, 499, 999):
        host = f"svc{i}".encode()
        vh = index.lookup(host)
        assert vh is index.exact[host] and vh.name == f"svc{i}.default.svc.cluster.local"
        for alias in (b".default", b".default.svc", b".default.svc.cluster.local"):
            assert index.lookup(host + alias) is vh
        calls["n"] = 0
        ex = request("/", {"x-tenant": f"t{i}"}, host=f"svc{i}")
        route = vh.match(ex)
        assert route is not None and route.targets[0].cluster is not None
        assert calls["n"] == 1
    assert index.lookup(b"unknown-host") is None
    assert len(index.exact) == n * 4  # every service under its 4 names


def _counting(check, calls):  # type: ignore[no-untyped-def]
    def counted(ex):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        return check(ex)

    return counted


def test_rules_after_a_catch_all_are_reported_unreachable() -> None:
    snap = build(vs("""  - match: [{uri: {prefix: /}}]
    route: [{destination: {host: reviews}}]
  - match: [{uri: {prefix: /never}}]
    route: [{destination: {host: reviews}}]"""))
    assert any("unreachable" in w for w in snap.warnings)
    snap = build(vs("""  - match: [{uri: {prefix: /}, headers: {x: {exact: '1'}}}]
    route: [{destination: {host: reviews}}]
  - route: [{destination: {host: reviews}}]"""))
    assert not any("unreachable" in w for w in snap.warnings)
