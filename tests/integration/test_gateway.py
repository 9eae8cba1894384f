"""``pyproxy run --gateway NAME``: an ingress proxy driven by a Gateway and the
VirtualServices bound to it (real proxy process, scripted upstreams)."""

from __future__ import annotations

import aiohttp

from tests.harness import Upstream, running_proxy, service_entry

GATEWAY = """
apiVersion: networking.istio.io/v1
kind: Gateway
metadata:
  name: shop-gateway
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 8080, name: http, protocol: HTTP}
    hosts: [{hosts}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: shop
spec:
  hosts: ["*"]
  gateways: [shop-gateway]
  http:
  - match:
    - uri: {exact: /productpage}
    - uri: {prefix: /api/}
    route:
    - destination: {host: front, port: {number: 9080}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: back-mesh
spec:
  hosts: [back]
  http:
  - route:
    - destination: {host: back}
      headers: {request: {set: {x-mesh-rule: "yes"}}}
"""


def config(front: int, back: int, hosts: str = '"*"') -> dict[str, str]:
    return {
        "registry.yaml": service_entry("front", [(front, {"app": "front"})]) + "---\n"
        + service_entry("back", [(back, {"app": "back"})]),
        "gateway.yaml": GATEWAY.replace("{hosts}", hosts),
    }


async def get(session: aiohttp.ClientSession, url: str, host: str) -> tuple[int, str]:
    async with session.get(url, headers={"Host": host}) as r:
        return r.status, await r.text()


async def test_gateway_applies_bound_virtual_services_only() -> None:
    async with Upstream("front") as front, Upstream("back") as back:
        with running_proxy(config(front.port, back.port), args=["--gateway", "shop-gateway"]) as px:
            async with aiohttp.ClientSession() as s:
                # Any host: the bound VirtualService has hosts "*".
                status, body = await get(s, px.outbound_url + "/productpage", "localhost:8080")
                assert status == 200 and '"upstream": "front"' in body
                status, _ = await get(s, px.outbound_url + "/api/v1/products", "shop.example.com")
                assert status == 200
                # A path the gateway's routes do not match: 404 (NR), not passthrough.
                status, _ = await get(s, px.outbound_url + "/admin", "localhost")
                assert status == 404
                # A registry host with only a mesh-bound VirtualService is not
                # exposed by name: the "*" VirtualService still decides.
                status, _ = await get(s, px.outbound_url + "/anything", "back")
                assert status == 404
            info = px.admin_json("/server_info")
            assert info["gateway"] == "default/shop-gateway"
    assert [seen.path for seen in front.seen] == ["/productpage", "/api/v1/products"]
    assert back.seen == []


async def test_sidecar_ignores_gateway_bound_virtual_services() -> None:
    async with Upstream("front") as front, Upstream("back") as back:
        with running_proxy(config(front.port, back.port)) as px:
            async with aiohttp.ClientSession() as s:
                # No --gateway: the "*"/shop-gateway rules do not exist here, so
                # /admin on front takes the registry's default route.
                status, _ = await get(s, px.outbound_url + "/admin", "front")
                assert status == 200
                status, _ = await get(s, px.outbound_url + "/x", "back")
                assert status == 200
    assert [seen.path for seen in front.seen] == ["/admin"]
    assert back.seen[0].headers.get("x-mesh-rule") == "yes"


async def test_gateway_server_hosts_narrow_the_virtual_service_hosts() -> None:
    async with Upstream("front") as front, Upstream("back") as back:
        cfg = config(front.port, back.port, hosts='"shop.example.com"')
        with running_proxy(cfg, args=["--gateway", "default/shop-gateway"]) as px:
            async with aiohttp.ClientSession() as s:
                status, _ = await get(s, px.outbound_url + "/productpage", "shop.example.com:8080")
                assert status == 200
                status, _ = await get(s, px.outbound_url + "/productpage", "other.example.com")
                assert status == 404
    assert len(front.seen) == 1


async def test_gateway_in_another_namespace_needs_a_qualified_reference() -> None:
    async with Upstream("front") as front, Upstream("back") as back:
        # The VirtualService is in "default", the gateway proxy in "ingress":
        # an unqualified reference means default/shop-gateway, so nothing binds.
        with running_proxy(config(front.port, back.port),
                           args=["--gateway", "shop-gateway", "--namespace", "ingress"]) as px:
            async with aiohttp.ClientSession() as s:
                status, _ = await get(s, px.outbound_url + "/productpage", "localhost")
                assert status == 404
            assert "Gateway ingress/shop-gateway (--gateway) is not in the config" in px.log()
    assert front.seen == []
