"""Rate limiting end to end with real processes and a real Redis: Istio's
task files on a gateway, two proxies sharing one Redis, ``--workers 2``
sharing one local bucket, Redis killed and restarted under load, a live
change of the ratelimit service's config, hostile descriptor values.

Each test starts its own ``redis-server`` on a free loopback port with no
persistence and stops it; without ``redis-server`` installed (CI installs
it: .ci/run) the tests skip."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import hiredis
import pytest

from tests.harness import Proxy, Upstream, free_port, service_entry, start_proxy
from tests.integration.obs_helpers import scrape, value, wait_for

REDIS = shutil.which("redis-server")
pytestmark = pytest.mark.skipif(REDIS is None, reason="redis-server is not installed (apt-get install redis-server)")

ROOT = Path(__file__).resolve().parents[2]


class Redis:
    """A throw-away redis-server on 127.0.0.1:<free port>, no persistence."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="pyproxy-redis-")
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        assert REDIS is not None
        self.proc = subprocess.Popen(
            [REDIS, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self.dir], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    def command(self, *args: str) -> Any:
        """One command's parsed reply (hiredis, as the proxy parses them)."""
        reader = hiredis.Reader()
        with socket.create_connection(("127.0.0.1", self.port), 2) as s:
            s.sendall(hiredis.pack_command(args))
            while (reply := reader.gets()) is False:
                data = s.recv(1 << 20)
                if not data:
                    raise ConnectionError("redis closed the connection")
                reader.feed(data)
        return reply

    def dbsize(self) -> int:
        return int(self.command("DBSIZE"))

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"


@pytest.fixture
def redis() -> Iterator[Redis]:
    r = Redis()
    r.start()
    try:
        yield r
    finally:
        r.stop()
        shutil.rmtree(r.dir, ignore_errors=True)


GATEWAY = """apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw, namespace: istio-system}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 8080, name: http, protocol: HTTP}
    hosts: ["*"]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: bookinfo, namespace: istio-system}
spec:
  hosts: ["*"]
  gateways: [gw]
  http:
  - route: [{destination: {host: svc.istio-system.svc.cluster.local}}]
"""

# Istio's task: the filter on the gateway (fail closed) and the vhost action.
FILTERS = """apiVersion: networking.istio.io/v1alpha3
kind: EnvoyFilter
metadata: {{name: filter-ratelimit, namespace: istio-system}}
spec:
  workloadSelector:
    labels: {{istio: ingressgateway}}
  configPatches:
    - applyTo: HTTP_FILTER
      match:
        context: GATEWAY
        listener:
          filterChain:
            filter:
              name: "envoy.filters.network.http_connection_manager"
              subFilter: {{name: "envoy.filters.http.router"}}
      patch:
        operation: INSERT_BEFORE
        value:
          name: envoy.filters.http.ratelimit
          typed_config:
            "@type": type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimit
            domain: ratelimit
            failure_mode_deny: {deny}
            timeout: 10s
            rate_limit_service:
              grpc_service:
                envoy_grpc:
                  cluster_name: outbound|8081||ratelimit.default.svc.cluster.local
                  authority: ratelimit.default.svc.cluster.local
              transport_api_version: V3
---
apiVersion: networking.istio.io/v1alpha3
kind: EnvoyFilter
metadata: {{name: filter-ratelimit-svc, namespace: istio-system}}
spec:
  workloadSelector:
    labels: {{istio: ingressgateway}}
  configPatches:
    - applyTo: VIRTUAL_HOST
      match:
        context: GATEWAY
        routeConfiguration:
          vhost:
            name: ""
            route: {{action: ANY}}
      patch:
        operation: MERGE
        value:
          rate_limits:
            - actions:
              - request_headers: {{header_name: ":path", descriptor_key: "PATH"}}
            - actions:
              - request_headers: {{header_name: "x-user", descriptor_key: "USER"}}
"""

RLS = """domain: ratelimit
descriptors:
  - key: PATH
    value: "/limited"
    rate_limit: {{unit: hour, requests_per_unit: {limited}}}
  - key: USER
    rate_limit: {{unit: second, requests_per_unit: 1000}}
"""

GATEWAY_ARGS = ["--gateway", "istio-system/gw", "--namespace", "istio-system", "--labels", "istio=ingressgateway"]


async def wait_for_fresh_hour_window(margin: float = 20.0) -> None:
    """Counting tests need all their requests in one fixed window."""
    left = 3600 - time.time() % 3600
    if left < margin:
        await asyncio.sleep(left + 0.5)


def gateway_proxy(redis: Redis, upstream_port: int, rls_dir: Path, deny: bool = False,
                  extra_args: list[str] | None = None) -> Proxy:
    mesh = GATEWAY + "---\n" + service_entry("svc", [(upstream_port, {})], namespace="istio-system").replace(
        "hosts: [svc]", "hosts: [svc.istio-system.svc.cluster.local]")
    return start_proxy({"mesh.yaml": mesh, "ef.yaml": FILTERS.format(deny=str(deny).lower())},
                       args=[*GATEWAY_ARGS, "--ratelimit-config", str(rls_dir), "--ratelimit-redis", redis.url,
                             "--watch-interval", "0.2", *(extra_args or [])])


def rls_dir(limited: int) -> Path:
    d = Path(tempfile.mkdtemp(prefix="pyproxy-rls-"))
    (d / "config.yaml").write_text(RLS.format(limited=limited))
    return d


async def statuses(urls: list[str], path: str = "/limited", headers: dict[str, str] | None = None) -> list[int]:
    out = []
    async with aiohttp.ClientSession() as s:
        for url in urls:
            async with s.get(url + path, headers={"Host": "bookinfo.example", **(headers or {})}) as r:
                await r.read()
                out.append(r.status)
    return out


def counter(px: Proxy, stat: str) -> float:
    return value(scrape(px), f"envoy_cluster_ratelimit_{stat}_total",
                 cluster_name="outbound|8081||ratelimit.default.svc.cluster.local")


@pytest.mark.slow
async def test_two_proxies_sharing_one_redis_enforce_one_limit(redis: Redis) -> None:
    await wait_for_fresh_hour_window()
    d = rls_dir(limited=5)
    async with Upstream() as up:
        a = gateway_proxy(redis, up.port, d)
        b = gateway_proxy(redis, up.port, d)
        try:
            got = await statuses([a.outbound_url, b.outbound_url] * 5)
            assert sorted(got) == [200] * 5 + [429] * 5, got
            assert got[:5] == [200] * 5  # the first five of the window, whichever proxy took them
            # Unlimited paths (the key-only USER rule needs the header) pass.
            assert await statuses([a.outbound_url, b.outbound_url], path="/free") == [200, 200]
            assert counter(a, "over_limit") + counter(b, "over_limit") == 5
            # /free matches no rule: no Redis call, and the answer is OK (counted, as Envoy counts it).
            assert counter(a, "ok") + counter(b, "ok") == 7
        finally:
            a.stop()
            b.stop()
    keys = redis.command("KEYS", "*")
    assert any(k.startswith(b"ratelimit_PATH_/limited_") for k in keys), keys  # the service's key scheme


@pytest.mark.slow
async def test_redis_killed_fail_open_then_deny_then_recovery(redis: Redis) -> None:
    await wait_for_fresh_hour_window()
    d = rls_dir(limited=2)
    async with Upstream() as up:
        px = gateway_proxy(redis, up.port, d)
        try:
            assert await statuses([px.outbound_url] * 3) == [200, 200, 429]
            redis.stop()
            # Redis gone: fail open (the filter's default), within the timeout, nothing hangs.
            started = time.monotonic()
            assert await statuses([px.outbound_url] * 3) == [200, 200, 200]
            assert time.monotonic() - started < 5
            assert counter(px, "failure_mode_allowed") >= 3 and counter(px, "error") >= 3
            # failure_mode_deny: 500 with flag RLSE.
            px.write_config("ef.yaml", FILTERS.format(deny="true"))
            await wait_for(lambda: _status_is(px, 500), timeout=10, what="500 while Redis is down")
            # Redis back on the same port: recovery without restarting the proxy.
            redis.start()
            await wait_for(lambda: _status_is(px, 200), timeout=15, what="recovery after Redis restart")
            assert "rate limit: connected to Redis" in px.log()
            # The restarted Redis is empty: the window counts from zero again.
            got = await statuses([px.outbound_url] * 3)
            assert got.count(429) >= 1, got
        finally:
            px.stop()


async def _status_is(px: Proxy, status: int) -> bool:
    return (await statuses([px.outbound_url]))[0] == status


@pytest.mark.slow
async def test_ratelimit_config_reload_changes_the_limit_live(redis: Redis) -> None:
    await wait_for_fresh_hour_window()
    d = rls_dir(limited=100)
    async with Upstream() as up:
        px = gateway_proxy(redis, up.port, d)
        try:
            assert await statuses([px.outbound_url] * 3) == [200, 200, 200]
            (d / ".config.yaml.tmp").write_text(RLS.format(limited=1))
            os.replace(d / ".config.yaml.tmp", d / "config.yaml")
            await wait_for(lambda: _status_is(px, 429), timeout=10, what="the lower limit")
            # A broken file is rejected with its path; the previous limit stays.
            (d / "config.yaml").write_text("domain: ratelimit\ndescriptors:\n  - key: PATH\n    valu: x\n")
            await wait_for(lambda: "rate-limit config rejected" in px.log(), timeout=10, what="rejection")
            assert f"{d / 'config.yaml'}#0: descriptors[0].valu: unknown field" in px.log()
            assert await _status_is(px, 429)
        finally:
            px.stop()


@pytest.mark.slow
async def test_hostile_descriptor_values_expire_with_their_window(redis: Redis) -> None:
    d = rls_dir(limited=100)
    async with Upstream() as up:
        # No jitter: a per-second counter lives one second.
        px = gateway_proxy(redis, up.port, d, extra_args=["--ratelimit-jitter", "0"])
        try:
            async with aiohttp.ClientSession() as s:
                for i in range(200):
                    async with s.get(px.outbound_url + "/x", headers={"Host": "h", "x-user": f"user-{i}"}) as r:
                        assert r.status == 200
                huge = "u" * 8000  # (the aiohttp upstream refuses longer header lines)
                async with s.get(px.outbound_url + "/x", headers={"Host": "h", "x-user": huge}) as r:
                    assert r.status == 200
            ttls = [redis.command("TTL", k) for k in redis.command("KEYS", "ratelimit_USER_*")]
            # Every counter expires with its one-second window (-1 would be a key that never expires).
            assert len(ttls) > 10 and all(t in (0, 1, -2) for t in ttls), ttls[:5]
            await wait_for(lambda: redis.dbsize() <= 1, timeout=10, what="counters to expire")
        finally:
            px.stop()


LOCAL = """apiVersion: networking.istio.io/v1alpha3
kind: EnvoyFilter
metadata: {name: filter-local-ratelimit-svc, namespace: istio-system}
spec:
  workloadSelector:
    labels: {app: productpage}
  configPatches:
    - applyTo: HTTP_FILTER
      match:
        context: SIDECAR_INBOUND
        listener:
          filterChain:
            filter: {name: "envoy.filters.network.http_connection_manager"}
      patch:
        operation: INSERT_BEFORE
        value:
          name: envoy.filters.http.local_ratelimit
          typed_config:
            "@type": type.googleapis.com/udpa.type.v1.TypedStruct
            type_url: type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit
            value:
              stat_prefix: http_local_rate_limiter
              token_bucket: {max_tokens: 4, tokens_per_fill: 4, fill_interval: 60s}
              filter_enabled:
                runtime_key: local_rate_limit_enabled
                default_value: {numerator: 100, denominator: HUNDRED}
              filter_enforced:
                runtime_key: local_rate_limit_enforced
                default_value: {numerator: 100, denominator: HUNDRED}
              response_headers_to_add:
                - append: false
                  header: {key: x-local-rate-limit, value: 'true'}
"""


@pytest.mark.slow
async def test_workers_share_one_local_bucket() -> None:
    async with Upstream() as app:
        px = start_proxy({"ef.yaml": LOCAL}, app_port=app.port,
                         args=["--workers", "2", "--labels", "app=productpage"])
        try:
            got = []
            for _ in range(20):
                # A new connection each time: the kernel spreads them over both workers.
                async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
                    async with s.get(px.inbound_url + "/", headers={"Host": "productpage"}) as r:
                        await r.read()
                        got.append(r.status)
                        if r.status == 429:
                            assert r.headers.get("x-local-rate-limit") == "true"
            assert got == [200] * 4 + [429] * 16, got
            fams = scrape(px)
            served = value(fams, "envoy_http_local_rate_limiter_http_local_rate_limit_enabled_total")
            limited = value(fams, "envoy_http_local_rate_limiter_http_local_rate_limit_rate_limited_total")
            assert (served, limited) == (20, 16)
        finally:
            px.stop()
    leftovers = [n for n in os.listdir("/dev/shm") if n.startswith(f"pyproxy-ratelimit-{os.getuid()}-")] \
        if os.path.isdir("/dev/shm") else []
    assert not [n for n in leftovers if n.endswith(f"-{px.process.pid}")]  # the primary removed its file


async def test_redis_flag_needs_the_service_config() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pyproxy", "run", "--config", "/nonexistent", "--ratelimit-redis", "redis://127.0.0.1:1",
        cwd=str(ROOT), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    _, err = await proc.communicate()
    assert proc.returncode == 2
    assert b"--ratelimit-redis needs --ratelimit-config" in err


@pytest.mark.slow
async def test_ratelimit_service_over_http_json() -> None:
    """--ratelimit-service: pyproxy POSTs the descriptors to /json. The
    stand-in answers as the service does (200 OK / 429 OVER_LIMIT with
    overallCode) and records what it was asked."""
    from aiohttp import web

    asked: list[dict] = []

    async def handle(request: web.Request) -> web.Response:
        body = await request.json()
        asked.append(body)
        over = len(asked) > 2
        return web.json_response({"overallCode": "OVER_LIMIT" if over else "OK"}, status=429 if over else 200)

    app = web.Application()
    app.router.add_post("/json", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        async with Upstream() as up:
            mesh = GATEWAY + "---\n" + service_entry("svc", [(up.port, {})], namespace="istio-system").replace(
                "hosts: [svc]", "hosts: [svc.istio-system.svc.cluster.local]")
            px = start_proxy({"mesh.yaml": mesh, "ef.yaml": FILTERS.format(deny="false")},
                             args=[*GATEWAY_ARGS, "--ratelimit-service", f"http://127.0.0.1:{port}"])
            try:
                assert await statuses([px.outbound_url] * 3, path="/limited?q=1") == [200, 200, 429]
            finally:
                px.stop()
    finally:
        await runner.cleanup()
    assert asked[0] == {"domain": "ratelimit", "descriptors": [{"entries": [{"key": "PATH", "value": "/limited?q=1"}]}]}
