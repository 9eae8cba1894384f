"""The HTTP/1.1 engine end to end: real proxy process, real upstreams."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import aiohttp
import pytest
from aiohttp import web

from tests.harness import (
    ROOT,
    Upstream,
    raw_request,
    read_response,
    running_proxy,
    service_entry,
)
from tests.integration.hardening_helpers import downstream_stats

# Core integration: part of the fast tier (make.py test --fast).
pytestmark = pytest.mark.core


async def test_registry_routing_and_forwarding_headers() -> None:
    async with Upstream("v1") as up:
        with running_proxy(service_entry("reviews", [(up.port, {"app": "reviews", "version": "v1"})])) as px:
            async with aiohttp.ClientSession() as s:
                async with s.get(px.outbound_url + "/reviews/0?x=1", headers={"Host": "reviews:9080"}) as r:
                    assert r.status == 200
                    assert (await r.json())["upstream"] == "v1"
                    assert "x-envoy-upstream-service-time" in r.headers
    seen = up.seen[0]
    assert seen.path == "/reviews/0?x=1"
    assert seen.headers["host"] == "reviews:9080"
    # A sidecar listener appends nothing to x-forwarded-for (istiod sets
    # use_remote_address false there) and sets x-forwarded-proto when absent.
    assert "x-forwarded-for" not in seen.headers
    assert seen.headers["x-forwarded-proto"] == "http"
    assert len(seen.headers["x-request-id"]) == 36
    assert seen.headers["x-envoy-attempt-count"] == "1"


async def test_request_id_passed_through_unchanged() -> None:
    async with Upstream() as up:
        with running_proxy(service_entry("svc", [(up.port, {})])) as px:
            async with aiohttp.ClientSession() as s:
                async with s.get(px.outbound_url + "/", headers={"Host": "svc", "x-request-id": "abc-123"}) as r:
                    assert r.status == 200
    assert up.seen[0].headers["x-request-id"] == "abc-123"


async def test_keepalive_reuses_one_upstream_connection() -> None:
    connections = []

    async def handler(request: web.Request) -> web.Response:
        connections.append(request.transport.get_extra_info("peername"))
        return web.Response(text="ok")

    async with Upstream(handler=handler) as up:
        with running_proxy(service_entry("svc", [(up.port, {})])) as px:
            conn = aiohttp.TCPConnector(limit=1)
            async with aiohttp.ClientSession(connector=conn) as s:
                for _ in range(20):
                    async with s.get(px.outbound_url + "/", headers={"Host": "svc"}) as r:
                        assert await r.text() == "ok"
    assert len(connections) == 20
    assert len(set(connections)) == 1, "upstream connection was not reused"


async def test_pipelined_requests_answered_in_order() -> None:
    async def handler(request: web.Request) -> web.Response:
        n = int(request.path.strip("/"))
        await asyncio.sleep(0.05 if n % 2 == 0 else 0)  # later requests would finish first
        return web.Response(text=str(n))

    async with Upstream(handler=handler) as up:
        with running_proxy(service_entry("svc", [(up.port, {})])) as px:
            reader, writer = await asyncio.open_connection("127.0.0.1", px.outbound)
            writer.write(b"".join(b"GET /%d HTTP/1.1\r\nHost: svc\r\n\r\n" % i for i in range(8)))
            await writer.drain()
            bodies = [(await asyncio.wait_for(read_response(reader), 5)).split(b"\r\n\r\n", 1)[1] for _ in range(8)]
            writer.close()
    assert bodies == [str(i).encode() for i in range(8)]


async def test_connection_close_honoured() -> None:
    async with Upstream() as up:
        with running_proxy(service_entry("svc", [(up.port, {})])) as px:
            data = await raw_request(px.outbound, b"GET / HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n",
                                     until_close=True)
    assert data.startswith(b"HTTP/1.1 200")
    assert b"connection: close" in data.lower()


async def test_chunked_request_and_response_bodies() -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for i in range(3):
            await resp.write(body + str(i).encode())
        await resp.write_eof()
        return resp

    async with Upstream(handler=handler) as up:
        with running_proxy(service_entry("svc", [(up.port, {})])) as px:
            req = (b"POST / HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n"
                   b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
            data = await raw_request(px.outbound, req)
    head, body = data.split(b"\r\n\r\n", 1)
    assert b"transfer-encoding: chunked" in head.lower()
    assert body == b"abcde0abcde1abcde2"
    assert up.seen[0].headers["transfer-encoding"] == "chunked"
    assert up.seen[0].body == b"abcde"


async def test_head_204_304_have_no_body_and_connection_stays_usable() -> None:
    async def handler(request: web.Request) -> web.Response:
        if request.path == "/204":
            return web.Response(status=204)
        if request.path == "/304":
            return web.Response(status=304)
        return web.Response(text="x" * 100)

    async with Upstream(handler=handler) as up:
        with running_proxy(service_entry("svc", [(up.port, {})])) as px:
            reader, writer = await asyncio.open_connection("127.0.0.1", px.outbound)
            for req in (b"HEAD / HTTP/1.1\r\nHost: svc\r\n\r\n", b"GET /204 HTTP/1.1\r\nHost: svc\r\n\r\n",
                        b"GET /304 HTTP/1.1\r\nHost: svc\r\n\r\n"):
                writer.write(req)
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                assert head.startswith((b"HTTP/1.1 2", b"HTTP/1.1 3"))
                if req.startswith(b"HEAD"):
                    assert b"content-length: 100" in head.lower()
            writer.write(b"GET / HTTP/1.1\r\nHost: svc\r\n\r\n")
            data = await asyncio.wait_for(read_response(reader), 5)
            writer.close()
    assert data.endswith(b"x" * 100)


async def test_expect_100_continue() -> None:
    async with Upstream() as up:
        with running_proxy(service_entry("svc", [(up.port, {})])) as px:
            reader, writer = await asyncio.open_connection("127.0.0.1", px.outbound)
            writer.write(b"POST / HTTP/1.1\r\nHost: svc\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
            interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert interim.startswith(b"HTTP/1.1 100 Continue")
            writer.write(b"hello")
            data = await asyncio.wait_for(read_response(reader), 5)
            writer.close()
    assert data.startswith(b"HTTP/1.1 200")
    assert up.seen[0].body == b"hello"
    assert "expect" not in up.seen[0].headers


async def test_hop_by_hop_headers_removed_both_ways() -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(text="ok", headers={"Connection": "keep-alive, X-Secret-Hop", "X-Secret-Hop": "1",
                                                "Keep-Alive": "timeout=5", "X-Kept": "yes"})

    async with Upstream(handler=handler) as up:
        with running_proxy(service_entry("svc", [(up.port, {})])) as px:
            req = (b"GET / HTTP/1.1\r\nHost: svc\r\nConnection: keep-alive, X-Client-Hop\r\nX-Client-Hop: 1\r\n"
                   b"Keep-Alive: 300\r\nProxy-Connection: keep-alive\r\nTE: gzip\r\nX-Kept: yes\r\n\r\n")
            data = await raw_request(px.outbound, req)
    seen = up.seen[0].headers
    # (TE is dropped unless it says "trailers", which Envoy forwards as
    # "te: trailers": tests/integration/test_envoy_fidelity.py)
    for h in ("x-client-hop", "keep-alive", "proxy-connection", "te"):
        assert h not in seen, h
    assert seen["x-kept"] == "yes"
    head = data.split(b"\r\n\r\n")[0].lower()
    assert b"x-secret-hop" not in head
    assert b"keep-alive: timeout" not in head
    assert b"x-kept: yes" in head


async def test_absolute_form_from_a_real_client_using_http_proxy(tmp_path) -> None:
    async with Upstream("details") as up:
        with running_proxy(service_entry("details", [(up.port, {})])) as px:
            script = (
                "import urllib.request, json\n"
                "print(urllib.request.urlopen('http://details:9080/details/0', timeout=5).read().decode())\n"
            )
            env = dict(os.environ, HTTP_PROXY=px.outbound_url, http_proxy=px.outbound_url, NO_PROXY="", no_proxy="")
            proc = await asyncio.create_subprocess_exec(sys.executable, "-c", script, env=env,
                                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            out, err = await asyncio.wait_for(proc.communicate(), 15)
    assert proc.returncode == 0, err.decode()
    assert json.loads(out)["upstream"] == "details"
    assert up.seen[0].path == "/details/0"
    assert up.seen[0].headers["host"] == "details:9080"


async def test_inbound_forwards_to_app_without_routing() -> None:
    async with Upstream("app") as app:
        # A VirtualService for some host must not affect inbound traffic.
        cfg = """
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: anything}
        spec:
          hosts: [localhost]
          http:
          - directResponse: {status: 418}
        """
        with running_proxy(cfg, app_port=app.port) as px:
            async with aiohttp.ClientSession() as s:
                async with s.get(px.inbound_url + "/hello", headers={"Host": "localhost"}) as r:
                    assert r.status == 200
                    assert (await r.json())["upstream"] == "app"
    assert app.seen[0].path == "/hello"


async def test_subset_routing_selects_endpoints_by_label() -> None:
    async with Upstream("v1") as v1, Upstream("v2") as v2:
        cfg = service_entry("reviews", [(v1.port, {"version": "v1"}), (v2.port, {"version": "v2"})]) + """---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - route: [{destination: {host: reviews, subset: v2}}]
"""
        with running_proxy(cfg) as px:
            async with aiohttp.ClientSession() as s:
                for _ in range(10):
                    async with s.get(px.outbound_url + "/", headers={"Host": "reviews"}) as r:
                        assert (await r.json())["upstream"] == "v2"
    assert len(v1.seen) == 0 and len(v2.seen) == 10


async def test_service_without_virtualservice_uses_all_endpoints() -> None:
    async with Upstream("a") as a, Upstream("b") as b:
        with running_proxy(service_entry("svc", [(a.port, {}), (b.port, {})])) as px:
            async with aiohttp.ClientSession() as s:
                for _ in range(40):
                    async with s.get(px.outbound_url + "/", headers={"Host": "svc.default.svc.cluster.local"}) as r:
                        assert r.status == 200
    assert a.seen and b.seen


async def test_unknown_host_passthrough_and_registry_only() -> None:
    async with Upstream("outside") as up:
        with running_proxy(service_entry("svc", [(1, {})])) as px:
            async with aiohttp.ClientSession() as s:
                async with s.get(f"http://127.0.0.1:{up.port}/x", proxy=px.outbound_url) as r:
                    assert r.status == 200
                    assert (await r.json())["upstream"] == "outside"
            px.write_config("sidecar.yaml", """
            apiVersion: networking.istio.io/v1
            kind: Sidecar
            metadata: {name: default}
            spec:
              outboundTrafficPolicy: {mode: REGISTRY_ONLY}
            """)
            assert px.reload()["ok"]
            async with aiohttp.ClientSession() as s:
                async with s.get(f"http://127.0.0.1:{up.port}/x", proxy=px.outbound_url) as r:
                    assert r.status == 502
    assert len(up.seen) == 1


async def test_local_replies_carry_envoy_status_and_body() -> None:
    cfg = service_entry("down", [(1, {})]) + """---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: down}
spec:
  hosts: [down]
  http:
  - match: [{uri: {prefix: /nosubset}}]
    route: [{destination: {host: down, subset: missing}}]
  - match: [{uri: {prefix: /up}}]
    route: [{destination: {host: down}}]
"""
    with running_proxy(cfg) as px:
        async with aiohttp.ClientSession() as s:
            async with s.get(px.outbound_url + "/nothing", headers={"Host": "down"}) as r:
                assert r.status == 404
            async with s.get(px.outbound_url + "/nosubset", headers={"Host": "down"}) as r:
                assert r.status == 503
            async with s.get(px.outbound_url + "/up", headers={"Host": "down"}) as r:
                assert r.status == 503
                assert await r.text() == (
                    "upstream connect error or disconnect/reset before headers. retried and the latest reset "
                    "reason: remote connection failure")
        assert "subset 'missing'" in px.log()


def test_invalid_config_refuses_to_start(tmp_path) -> None:
    (tmp_path / "bad.yaml").write_text(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: x}\n"
        "spec:\n  hosts: [x]\n  http:\n  - route:\n    - destination: {host: x}\n      weight: -1\n"
    )
    proc = subprocess.run([sys.executable, "-m", "pyproxy", "run", "--config", str(tmp_path),
                           "--outbound", "127.0.0.1:0", "--inbound", "127.0.0.1:0",
                           "--admin", "127.0.0.1:0", "--stats", "127.0.0.1:0"],
                          capture_output=True, text=True, timeout=30, cwd=ROOT, check=False)
    assert proc.returncode != 0
    assert "bad.yaml#0: spec.http[0].route[0].weight" in proc.stderr


async def test_websocket_is_tunnelled() -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            await ws.send_str("echo:" + msg.data)
        return ws

    async with Upstream(handler=handler) as up:
        with running_proxy(service_entry("ws", [(up.port, {})])) as px:
            async with aiohttp.ClientSession() as s:
                async with s.ws_connect(px.outbound_url + "/ws", headers={"Host": "ws"}) as ws:
                    for i in range(3):
                        await ws.send_str(f"m{i}")
                        msg = await asyncio.wait_for(ws.receive(), 5)
                        assert msg.data == f"echo:m{i}"


async def test_idle_websocket_tunnel_is_closed_by_the_stream_idle_timeout() -> None:
    """Envoy's stream idle timeout applies to upgraded streams: a tunnel
    that moves bytes either way stays open, an idle one is closed (both
    ends) and counted as downstream_rq_idle_timeout."""

    async def handler(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(autoping=False)
        await ws.prepare(request)
        async for msg in ws:
            await ws.send_str("echo:" + msg.data)
        return ws

    async with Upstream(handler=handler) as up:
        with running_proxy(service_entry("ws", [(up.port, {})]), args=["--stream-idle-timeout", "2"]) as px:
            async with aiohttp.ClientSession() as s:
                busy = await s.ws_connect(px.outbound_url + "/busy", headers={"Host": "ws"}, autoping=False,
                                          heartbeat=None)
                idle = await s.ws_connect(px.outbound_url + "/idle", headers={"Host": "ws"}, autoping=False,
                                          heartbeat=None)
                await idle.send_str("once")
                assert (await asyncio.wait_for(idle.receive(), 5)).data == "echo:once"
                # 5 s: the busy tunnel moves a message every 0.4 s; the idle one
                # moves nothing after its first exchange.
                loop = asyncio.get_running_loop()
                end = loop.time() + 5.0
                i = 0
                while loop.time() < end:
                    await busy.send_str(f"m{i}")
                    msg = await asyncio.wait_for(busy.receive(), 5)
                    assert msg.data == f"echo:m{i}", msg
                    i += 1
                    await asyncio.sleep(0.4)
                closed = await asyncio.wait_for(idle.receive(), 5)
                assert closed.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                                       aiohttp.WSMsgType.ERROR), closed
                await busy.send_str("still")
                assert (await asyncio.wait_for(busy.receive(), 5)).data == "echo:still"
                await busy.close()
                await idle.close()
            stats = downstream_stats(px)
    assert stats["downstream_rq_idle_timeout"] == 1, stats


async def test_large_body_streams_with_bounded_memory() -> None:
    """Stream 200 MB up and down through the proxy; its RSS must stay far
    below the body size (flow control, not buffering)."""
    size = 200 * 1024 * 1024
    chunk = b"x" * (256 * 1024)
    got: list[int] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        n = 0
        async for data in request.content.iter_chunked(1 << 16):
            n += len(data)
        resp = web.StreamResponse(headers={"Content-Length": str(size)})
        await resp.prepare(request)
        for _ in range(size // len(chunk)):
            await resp.write(chunk)
        await resp.write_eof()
        got.append(n)
        return resp

    async with Upstream(handler=handler, record_body=False) as up:
        with running_proxy(service_entry("big", [(up.port, {})])) as px:
            peak = 0

            def rss() -> int:
                with open(f"/proc/{px.process.pid}/status") as f:
                    for line in f:
                        if line.startswith("VmRSS:"):
                            return int(line.split()[1]) * 1024
                return 0

            async def body():
                nonlocal peak
                for _ in range(size // len(chunk)):
                    peak = max(peak, rss())
                    yield chunk

            received = 0
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
                async with s.post(px.outbound_url + "/", data=body(), headers={"Host": "big"}) as r:
                    async for data in r.content.iter_chunked(1 << 16):
                        received += len(data)
                        peak = max(peak, rss())
    assert received == size
    assert got == [size]
    assert peak < 100 * 1024 * 1024, f"proxy RSS peaked at {peak / 1e6:.0f} MB while streaming"
