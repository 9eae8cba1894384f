"""The admin API against the real proxy: every endpoint returns what it claims."""

from __future__ import annotations

import asyncio
import json
import socket

import aiohttp
import pytest
from aiohttp import web

from tests.harness import Upstream, free_port, http_get, running_proxy, service_entry, start_proxy
from tests.integration.obs_helpers import scrape, value, wait_for

# Core integration: part of the fast tier (make.py test --fast).
pytestmark = pytest.mark.core


def post(px, path: str) -> tuple[int, bytes]:
    return http_get(px.admin_url + path, method="POST", data=b"")


async def test_clusters_shows_an_ejected_endpoint() -> None:
    async def failing(request: web.Request) -> web.Response:
        return web.Response(status=500, text="boom")

    async with Upstream("good") as good, Upstream("bad", handler=failing) as bad:
        cfg = (
            service_entry("svc", [(good.port, {"version": "v1"}), (bad.port, {"version": "v1"})])
            + """---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: svc}
spec:
  host: svc
  trafficPolicy:
    connectionPool: {tcp: {maxConnections: 7}, http: {http1MaxPendingRequests: 11}}
    outlierDetection: {consecutive5xxErrors: 1, interval: 30s, baseEjectionTime: 60s, maxEjectionPercent: 50}
"""
        )
        with running_proxy(cfg) as px:
            async with aiohttp.ClientSession() as s:
                for _ in range(20):
                    async with s.get(px.outbound_url + "/", headers={"Host": "svc"}) as r:
                        await r.read()
                    if bad.seen:
                        break
            assert bad.seen, "the failing endpoint was never picked"
            name = "outbound|9080||svc.default.svc.cluster.local"

            def ejected() -> dict | None:
                view = px.admin_json("/clusters")["cluster_statuses"]
                c = next(c for c in view if c["name"] == name)
                eps = {ep["port"]: ep for ep in c["endpoints"]}
                return c if eps[bad.port]["ejected"] else None

            c = await wait_for(ejected, timeout=5, what="the 500-returning endpoint to be ejected")
            eps = {ep["port"]: ep for ep in c["endpoints"]}
            assert eps[bad.port]["health"] == "ejected" and eps[bad.port]["ejection_count"] == 1
            assert 0 < eps[bad.port]["ejection_remaining_s"] <= 60
            assert eps[good.port]["health"] == "healthy"
            assert eps[good.port]["labels"] == {"version": "v1"}
            assert c["circuit_breakers"]["max_connections"] == 7
            assert c["circuit_breakers"]["max_pending_requests"] == 11
            assert c["outlier_detection"]["consecutive_5xx"] == 1
            assert c["outlier_detection"]["ejections_active"] == 1
            assert c["stats"]["outlier_detection_ejections_total"] == 1
            # Traffic now avoids it.
            before = len(bad.seen)
            async with aiohttp.ClientSession() as s:
                for _ in range(10):
                    async with s.get(px.outbound_url + "/", headers={"Host": "svc"}) as r:
                        assert r.status == 200
            assert len(bad.seen) == before
            status, text = http_get(px.admin_url + "/clusters?format=text")
            assert status == 200
            lines = text.decode().splitlines()
            assert f"{name}::127.0.0.1:{bad.port}::health_flags::/failed_outlier_check" in lines
            assert f"{name}::127.0.0.1:{good.port}::health_flags::healthy" in lines
            assert f"{name}::default_priority::max_connections::7" in lines
            fams = scrape(px)
            assert value(fams, "envoy_cluster_outlier_detection_ejections_active", cluster_name=name) == 1
            assert value(fams, "envoy_cluster_membership_healthy", cluster_name=name) == 1


async def test_server_info_config_dump_and_stats() -> None:
    aliased = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: svc, labels: {team: &team payments}}
spec:
  hosts: [svc]
  http:
  - match: [{headers: {x-team: {exact: *team}}}]
    route: [{destination: {host: svc}}]
  - route: &default [{destination: {host: svc}}]
"""
    with running_proxy(
        {"a-se.yaml": service_entry("svc", [(1, {})]), "b-vs.yaml": aliased},
        args=["--workload", "details-v1", "--labels", "app=details,version=v1"],
    ) as px:
        info = px.admin_json("/server_info")
        assert info["state"] == "LIVE" and info["version"]
        assert info["workload"] == "details-v1" and info["namespace"] == "default"
        assert info["labels"] == {"app": "details", "version": "v1"}
        assert info["config_version"] == 1 and info["uptime_seconds"] >= 0

        dump = px.admin_json("/config_dump")
        assert dump["version"] == 1 and dump["last_reload"]["ok"] is True
        kinds = {(r["kind"], r["name"]): r for r in dump["resources"]}
        assert set(kinds) == {("ServiceEntry", "svc"), ("VirtualService", "svc")}
        vs = kinds[("VirtualService", "svc")]
        assert vs["source"] == {"file": str(px.config_dir / "b-vs.yaml"), "document": 0}
        assert vs["resource"]["metadata"]["labels"] == {"team": "payments"}
        assert vs["resource"]["spec"]["http"][0]["match"][0]["headers"]["x-team"] == {"exact": "payments"}
        assert dump["files"] == [str(px.config_dir / "a-se.yaml"), str(px.config_dir / "b-vs.yaml")]

        status, text = http_get(px.admin_url + "/stats")
        assert status == 200
        lines = text.decode().splitlines()
        assert "cluster.outbound|9080||svc.default.svc.cluster.local.upstream_rq_total: 0" in lines
        assert "server.live: 1" in lines and "pyproxy.config_version: 1" in lines
        status, text = http_get(px.admin_url + "/stats?filter=upstream_cx_total$")
        got = text.decode().splitlines()
        assert got and all(line.split(":")[0].endswith("upstream_cx_total") for line in got)
        status, _ = http_get(px.admin_url + "/stats?filter=(")
        assert status == 400
        status, text = http_get(px.admin_url + "/stats?format=json")
        assert {"name": "server.live", "value": 1} in json.loads(text)["stats"]
        status, text = http_get(px.admin_url + "/")
        assert status == 200 and b"/quitquitquit" in text


async def test_logging_level_can_be_changed() -> None:
    with running_proxy(service_entry("svc", [(1, {})])) as px:
        status, body = post(px, "/logging?level=debug")
        assert status == 200, body
        assert px.admin_json("/server_info")["command_line_options"]["log_level"] == "debug"
        async with aiohttp.ClientSession() as s:
            async with s.get(px.outbound_url + "/", headers={"Host": "svc"}) as r:
                await r.read()
        await wait_for(lambda: " DEBUG " in px.log(), timeout=5, what="debug lines in the log")
        status, body = post(px, "/logging?level=loud")
        assert status == 400 and b"unknown level" in body
        assert post(px, "/logging?level=warning")[0] == 200
        assert px.admin_json("/server_info")["command_line_options"]["log_level"] == "warning"


async def test_healthcheck_fail_and_ok() -> None:
    with running_proxy(service_entry("svc", [(1, {})])) as px:
        assert http_get(px.admin_url + "/ready")[0] == 200
        assert post(px, "/healthcheck/fail")[0] == 200
        assert http_get(px.admin_url + "/ready")[0] == 503
        assert http_get(px.stats_url + "/healthz/ready")[0] == 503
        assert post(px, "/healthcheck/ok")[0] == 200
        assert http_get(px.admin_url + "/ready") == (200, b"LIVE\n")
        assert http_get(px.stats_url + "/healthz/ready")[0] == 200


async def test_drain_listeners_stops_accepting_and_quitquitquit_exits() -> None:
    async with Upstream() as up:
        with running_proxy(service_entry("svc", [(up.port, {})]), args=["--drain-timeout", "30"]) as px:
            reader, writer = await asyncio.open_connection("127.0.0.1", px.outbound)
            writer.write(b"GET / HTTP/1.1\r\nHost: svc\r\n\r\n")
            assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).startswith(b"HTTP/1.1 200")
            assert post(px, "/drain_listeners")[0] == 200
            # The idle keep-alive connection is closed and new ones are refused.
            await asyncio.wait_for(reader.read(), 5)  # the rest of the body, then EOF
            assert reader.at_eof()
            writer.close()

            def refused() -> bool:
                try:
                    socket.create_connection(("127.0.0.1", px.outbound), timeout=1).close()
                except OSError:
                    return True
                return False

            await wait_for(refused, timeout=5, what="the outbound listener to stop accepting")
            assert http_get(px.admin_url + "/ready")[0] == 503
            assert px.alive()
            assert post(px, "/quitquitquit")[0] == 200
            px.process.wait(15)
            assert px.process.returncode == 0


def _non_loopback_address() -> str | None:
    """An address of this host that is not loopback, if any."""
    for target in ("192.0.2.1", "198.51.100.1"):
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.connect((target, 9))
                addr = s.getsockname()[0]
        except OSError:
            continue
        if not addr.startswith("127."):
            return addr
    return None


async def test_mutating_endpoints_refuse_non_loopback_callers() -> None:
    addr = _non_loopback_address()
    if addr is None:
        pytest.skip("this host has no non-loopback IPv4 address to call the admin port from")
    admin_port = free_port("0.0.0.0")
    # The harness binds admin to 127.0.0.1; the later --admin wins.
    px = start_proxy(service_entry("svc", [(1, {})]), args=["--admin", f"0.0.0.0:{admin_port}"])
    try:
        wide = f"http://{addr}:{admin_port}"
        assert http_get(wide + "/ready")[0] == 200  # reads are served
        for path in (
            "/quitquitquit",
            "/healthcheck/fail",
            "/reload",
            "/logging?level=debug",
            "/drain_listeners",
        ):
            status, body = http_get(wide + path, method="POST", data=b"")
            assert status == 403, (path, status, body)
        assert px.alive()
        assert http_get(f"http://127.0.0.1:{admin_port}/ready")[0] == 200  # nothing was failed or drained
        assert http_get(f"http://127.0.0.1:{admin_port}/healthcheck/fail", method="POST", data=b"")[0] == 200
    finally:
        px.stop()
