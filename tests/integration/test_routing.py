"""L7 routing through the real proxy: three scripted versions (v1, v2, v3)
of one service, Istio VirtualService/DestinationRule files, and what the
upstreams and the client observe."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest
from aiohttp import web

from tests.harness import Proxy, Upstream, free_port, running_proxy, service_entry

# Core integration: part of the fast tier (make.py test --fast).
pytestmark = pytest.mark.core

SUBSETS = """
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


def virtual_service(http: str) -> str:
    return f"""
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews}}
spec:
  hosts: [reviews]
  http:
{http}
"""


@contextlib.asynccontextmanager
async def versions() -> AsyncIterator[dict[str, Upstream]]:
    async with Upstream("v1") as v1, Upstream("v2") as v2, Upstream("v3") as v3:
        yield {"v1": v1, "v2": v2, "v3": v3}


def mesh(ups: dict[str, Upstream], http: str, dr: str = SUBSETS) -> dict[str, str]:
    registry = service_entry("reviews", [(u.port, {"app": "reviews", "version": v}) for v, u in ups.items()])
    return {"10-registry.yaml": registry + "---\n" + dr, "20-vs.yaml": virtual_service(http)}


@contextlib.contextmanager
def proxy_for(ups: dict[str, Upstream], http: str, dr: str = SUBSETS) -> Iterator[Proxy]:
    with running_proxy(mesh(ups, http, dr), args=["--seed", "7"]) as px:
        yield px


def session(limit: int = 20) -> aiohttp.ClientSession:
    # Keep-alive connections to the proxy; cookies handled by hand.
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit), cookie_jar=aiohttp.DummyCookieJar())


async def who(s: aiohttp.ClientSession, px: Proxy, path: str = "/", headers: dict[str, str] | None = None) -> str:
    async with s.get(px.outbound_url + path, headers={"Host": "reviews", **(headers or {})}) as r:
        assert r.status == 200, (r.status, await r.text())
        return (await r.json())["upstream"]


async def tally(px: Proxy, n: int, headers: dict[str, str] | None = None, batch: int = 20) -> Counter[str]:
    counts: Counter[str] = Counter()
    async with session(batch) as s:
        for start in range(0, n, batch):
            for name in await asyncio.gather(*(who(s, px, "/", headers) for _ in range(min(batch, n - start)))):
                counts[name] += 1
    return counts


def assert_share(counts: Counter[str], version: str, p: float, n: int) -> None:
    # 5 standard deviations of a binomial share: a false failure is ~1e-6.
    tolerance = 5 * math.sqrt(p * (1 - p) / n)
    assert abs(counts[version] / n - p) <= tolerance, (counts, version, p)


# -- traffic shifting ------------------------------------------------------------------


async def test_dark_launch_only_tester_sees_v2() -> None:
    http = """
  - match: [{headers: {end-user: {exact: tester}}}]
    route: [{destination: {host: reviews, subset: v2}}]
  - route: [{destination: {host: reviews, subset: v1}}]
"""
    async with versions() as ups:
        with proxy_for(ups, http) as px:
            assert await tally(px, 40, {"end-user": "tester"}) == {"v2": 40}
            assert await tally(px, 40, {"end-user": "Tester"}) == {"v1": 40}  # values are case-sensitive
            assert await tally(px, 40) == {"v1": 40}
    assert not ups["v3"].seen


def canary(weights: dict[str, int]) -> str:
    dests = "\n".join(f"    - destination: {{host: reviews, subset: {v}}}\n      weight: {w}" for v, w in weights.items())
    return f"  - route:\n{dests}\n"


async def test_canary_90_10_then_50_50_after_reload() -> None:
    n = 1000
    async with versions() as ups:
        with proxy_for(ups, canary({"v1": 90, "v2": 10})) as px:
            counts = await tally(px, n)
            assert sum(counts.values()) == n and set(counts) <= {"v1", "v2"}
            assert_share(counts, "v2", 0.10, n)
            px.write_config("20-vs.yaml", virtual_service(canary({"v1": 50, "v3": 50})))
            assert px.reload()["ok"]
            counts = await tally(px, n)
            assert set(counts) <= {"v1", "v3"}
            assert_share(counts, "v3", 0.5, n)


async def test_blue_green_switch_by_replacing_the_virtual_service() -> None:
    async with versions() as ups:
        with proxy_for(ups, canary({"v1": 100})) as px:
            async with session(4) as s:
                assert {await who(s, px) for _ in range(20)} == {"v1"}
                px.write_config("20-vs.yaml", virtual_service(canary({"v2": 100})))
                result = px.reload()
                assert result["ok"], result
                # The same keep-alive connections now reach green.
                assert {await who(s, px) for _ in range(20)} == {"v2"}


# -- actions observed at the upstream and the client ---------------------------------------


async def test_header_operations() -> None:
    http = """
  - headers:
      request:
        set: {x-route-set: route}
        add: {x-route-add: a}
        remove: [x-secret]
      response:
        set: {x-resp-set: route}
        remove: [x-upstream-internal]
    route:
    - destination: {host: reviews, subset: v1}
      headers:
        request: {set: {x-dest: v1, host: reviews.internal}}
        response: {add: {x-served-by: v1}}
"""

    async def handler(request: web.Request) -> web.Response:
        return web.json_response({"upstream": "v1"}, headers={"x-upstream-internal": "1", "x-resp-set": "upstream"})

    async with versions() as ups:
        ups["v1"].handler = handler
        with proxy_for(ups, http) as px:
            async with session() as s:
                async with s.get(px.outbound_url + "/h", headers={"Host": "reviews", "x-secret": "s",
                                                                  "x-route-set": "client"}) as r:
                    assert r.status == 200
                    assert r.headers["x-resp-set"] == "route"
                    assert r.headers["x-served-by"] == "v1"
                    assert "x-upstream-internal" not in r.headers
    seen = ups["v1"].seen[0].headers
    assert seen["x-route-set"] == "route" and seen["x-route-add"] == "a" and seen["x-dest"] == "v1"
    assert "x-secret" not in seen
    assert seen["host"] == "reviews.internal"  # set of host rewrites the authority


async def test_rewrite_sets_the_path_and_original_path() -> None:
    http = r"""
  - match: [{uri: {prefix: /legacy/}}]
    rewrite: {uri: /v2/}
    route: [{destination: {host: reviews, subset: v1}}]
  - match: [{uri: {prefix: /service/}}]
    rewrite: {uriRegexRewrite: {match: '^/service/([^/]+)(/.*)$', rewrite: '\2/instance/\1'}}
    route: [{destination: {host: reviews, subset: v1}}]
"""
    async with versions() as ups:
        with proxy_for(ups, http) as px:
            async with session() as s:
                await who(s, px, "/legacy/items?page=2")
                await who(s, px, "/service/foo/v1/api?k=v")
    first, second = ups["v1"].seen
    assert first.path == "/v2/items?page=2"
    assert first.headers["x-envoy-original-path"] == "/legacy/items?page=2"
    assert second.path == "/v1/api/instance/foo?k=v"
    assert second.headers["x-envoy-original-path"] == "/service/foo/v1/api?k=v"


async def test_redirect_and_direct_response() -> None:
    http = """
  - match: [{uri: {prefix: /old/}}]
    redirect: {uri: /new/place, authority: moved.example, redirectCode: 302}
  - match: [{uri: {exact: /teapot}}]
    directResponse: {status: 418, body: {string: "I'm a teapot"}}
  - route: [{destination: {host: reviews, subset: v1}}]
"""
    async with versions() as ups:
        with proxy_for(ups, http) as px:
            async with session() as s:
                async with s.get(px.outbound_url + "/old/x?q=1", headers={"Host": "reviews:9080"},
                                 allow_redirects=False) as r:
                    assert r.status == 302
                    assert r.headers["location"] == "http://moved.example/new/place?q=1"
                async with s.get(px.outbound_url + "/teapot", headers={"Host": "reviews"}) as r:
                    assert r.status == 418
                    assert await r.text() == "I'm a teapot"
                    assert r.headers["content-type"] == "text/plain"
    assert not ups["v1"].seen  # both answered by the proxy


async def test_mirror_copy_with_shadow_host_while_client_gets_the_primary() -> None:
    http = """
  - route: [{destination: {host: reviews, subset: v1}}]
    mirror: {host: reviews, subset: v3}
"""
    release = asyncio.Event()

    async def slow_shadow(request: web.Request) -> web.Response:
        await asyncio.wait_for(release.wait(), 10)  # the mirror is slow...
        return web.Response(status=500, text="shadow failure must not matter")

    async with versions() as ups:
        ups["v3"].handler = slow_shadow
        with proxy_for(ups, http) as px:
            async with session() as s:
                started = time.monotonic()
                async with s.post(px.outbound_url + "/submit?x=1", data=b"payload-123",
                                  headers={"Host": "reviews:9080"}) as r:
                    assert r.status == 200
                    assert (await r.json())["upstream"] == "v1"  # ...but the client has its answer
                elapsed = time.monotonic() - started
                for _ in range(100):  # the shadow copy arrives independently
                    if ups["v3"].seen:
                        break
                    await asyncio.sleep(0.02)
                release.set()
    assert elapsed < 5.0, elapsed  # the mirror is held for 10 s; generous bound for a shared machine
    primary, shadow = ups["v1"].seen[0], ups["v3"].seen[0]
    assert primary.headers["host"] == "reviews:9080"
    assert shadow.headers["host"] == "reviews-shadow:9080"
    assert shadow.method == "POST" and shadow.path == "/submit?x=1" and shadow.body == b"payload-123"
    assert shadow.headers["x-request-id"] == primary.headers["x-request-id"]


async def test_mirror_to_a_dead_destination_never_fails_the_request() -> None:
    dead = free_port()
    http = """
  - route: [{destination: {host: reviews, subset: v1}}]
    mirrors: [{destination: {host: shadow}}]
"""
    async with versions() as ups:
        cfg = mesh(ups, http)
        cfg["30-shadow.yaml"] = service_entry("shadow", [(dead, {})])
        with running_proxy(cfg) as px:
            counts = await tally(px, 30)
    assert counts == {"v1": 30}


async def test_cors_preflight_and_actual_request() -> None:
    http = """
  - corsPolicy:
      allowOrigins: [{exact: "https://app.example"}]
      allowMethods: [GET, POST]
      allowHeaders: [x-token]
      exposeHeaders: [x-trace]
      maxAge: 1h
      allowCredentials: true
    route: [{destination: {host: reviews, subset: v1}}]
"""
    async with versions() as ups:
        with proxy_for(ups, http) as px:
            async with session() as s:
                preflight = {"Host": "reviews", "Origin": "https://app.example",
                             "Access-Control-Request-Method": "POST"}
                async with s.options(px.outbound_url + "/api", headers=preflight) as r:
                    assert r.status == 200
                    assert r.headers["access-control-allow-origin"] == "https://app.example"
                    assert r.headers["access-control-allow-methods"] == "GET,POST"
                    assert r.headers["access-control-allow-headers"] == "x-token"
                    assert r.headers["access-control-max-age"] == "3600"
                    assert r.headers["access-control-allow-credentials"] == "true"
                assert not ups["v1"].seen  # answered locally
                async with s.get(px.outbound_url + "/api", headers={"Host": "reviews",
                                                                    "Origin": "https://app.example"}) as r:
                    assert r.status == 200
                    assert r.headers["access-control-allow-origin"] == "https://app.example"
                    assert r.headers["access-control-expose-headers"] == "x-trace"
                evil = dict(preflight, Origin="https://evil.example")
                async with s.options(px.outbound_url + "/api", headers=evil) as r:
                    assert "access-control-allow-origin" not in r.headers
    # The unmatched preflight went upstream (unmatchedPreflights: FORWARD).
    assert [x.method for x in ups["v1"].seen] == ["GET", "OPTIONS"]


async def test_consistent_hash_cookie_is_set_then_honoured() -> None:
    dr = SUBSETS + """  trafficPolicy:
    loadBalancer:
      consistentHash:
        httpCookie: {name: session, path: /, ttl: 3600s}
"""
    async with versions() as ups:
        with proxy_for(ups, "  - route: [{destination: {host: reviews}}]\n", dr=dr) as px:
            async with session() as s:
                async with s.get(px.outbound_url + "/", headers={"Host": "reviews"}) as r:
                    first = (await r.json())["upstream"]
                    cookie = r.headers.getall("set-cookie")
            assert len(cookie) == 1
            name_value, *attrs = cookie[0].split("; ")
            assert name_value.startswith('session="') and attrs == ["Max-Age=3600", "Path=/", "HttpOnly"]
            value = name_value.split("=", 1)[1]
            # Honoured on new connections, quoted as the browser sends it back.
            for _ in range(10):
                async with session(1) as s2:
                    async with s2.get(px.outbound_url + "/", headers={"Host": "reviews", "Cookie": f"session={value}"}) as r:
                        assert (await r.json())["upstream"] == first
                        assert "set-cookie" not in r.headers
            # Different sessions spread over the endpoints.
            spread = set()
            async with session() as s3:
                for i in range(60):
                    spread.add(await who(s3, px, "/", {"Cookie": f"session=user-{i}"}))
            assert spread == {"v1", "v2", "v3"}


async def test_consistent_hash_by_header_is_sticky() -> None:
    dr = SUBSETS + """  trafficPolicy:
    loadBalancer: {consistentHash: {httpHeaderName: x-user}}
"""
    async with versions() as ups:
        with proxy_for(ups, "  - route: [{destination: {host: reviews}}]\n", dr=dr) as px:
            async with session() as s:
                homes = {}
                for i in range(30):
                    homes[i] = await who(s, px, "/", {"x-user": f"u{i}"})
                for i in range(30):
                    assert await who(s, px, "/", {"x-user": f"u{i}"}) == homes[i]
    assert len(set(homes.values())) > 1


@pytest.mark.parametrize("policy", ["ROUND_ROBIN", "LEAST_REQUEST"])
async def test_simple_load_balancers_use_every_endpoint(policy: str) -> None:
    dr = SUBSETS + f"""  trafficPolicy:
    loadBalancer: {{simple: {policy}}}
"""
    async with versions() as ups:
        with proxy_for(ups, "  - route: [{destination: {host: reviews}}]\n", dr=dr) as px:
            counts = await tally(px, 90, batch=1)
    assert set(counts) == {"v1", "v2", "v3"}
    if policy == "ROUND_ROBIN":
        assert counts == {"v1": 30, "v2": 30, "v3": 30}
