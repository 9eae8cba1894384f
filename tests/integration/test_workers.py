"""``--workers N``: processes sharing the data-plane ports, metrics merged at
scrape time, reloads reaching every worker, SIGTERM stopping all of them."""

from __future__ import annotations

import asyncio
import os
import signal

import aiohttp
import pytest

from tests.harness import Upstream, http_get, running_proxy
from tests.integration.obs_helpers import samples, scrape, value, wait_for
from tests.integration.test_reload import route_to, two_subsets


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


async def fresh_requests(px, n: int, host: str = "svc") -> list[str]:
    """n requests, each on a new connection (so the kernel spreads them)."""
    out = []
    for _ in range(n):
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
            async with s.get(px.outbound_url + "/", headers={"Host": host}) as r:
                assert r.status == 200
                out.append((await r.json())["upstream"])
    return out


@pytest.mark.slow
async def test_workers_share_ports_merge_metrics_reload_together_and_stop_together() -> None:
    async with Upstream("a") as a, Upstream("b") as b:
        cfg = {"base.yaml": two_subsets(a.port, b.port), "vs.yaml": route_to("a")}
        with running_proxy(cfg, args=["--workers", "3"], timeout=30) as px:
            info = px.admin_json("/server_info")
            assert info["workers"] == 3
            status = info["worker_status"]
            pids = [w["pid"] for w in status]
            assert len(set(pids)) == 3 and pids[0] == px.process.pid

            assert set(await fresh_requests(px, 60)) == {"a"}

            # Every worker served some of the 60 connections...
            status = px.admin_json("/server_info")["worker_status"]
            served = [w["requests_total"] for w in status]
            assert sum(served) == 60 and sum(1 for n in served if n > 0) >= 2, served
            # ...and the scrape covers all of them.
            fams = scrape(px)
            assert value(fams, "istio_requests_total") == 60
            assert (
                value(
                    fams,
                    "envoy_cluster_upstream_rq_total",
                    cluster_name="outbound|9080|a|svc.default.svc.cluster.local",
                )
                == 60
            )
            assert value(fams, "envoy_server_concurrency") == 3
            assert value(fams, "istio_request_duration_milliseconds_count") == 60
            buckets = samples(fams, "istio_request_duration_milliseconds_bucket")
            assert buckets[-1].labels["le"] == "+Inf" and buckets[-1].value == 60
            _, text = http_get(px.admin_url + "/stats")
            assert "pyproxy.istio_requests_total: 60" in text.decode()
            clusters = px.admin_json("/clusters")["cluster_statuses"]
            c = next(c for c in clusters if c["name"] == "outbound|9080|a|svc.default.svc.cluster.local")
            assert c["stats"]["upstream_rq_total"] == 60

            # A file edit reaches every worker (each watches the files).
            px.write_config("vs.yaml", route_to("b"))

            async def all_switched() -> bool:
                st = px.admin_json("/server_info")["worker_status"]
                return all(w.get("config_version") == 2 for w in st)

            await wait_for(all_switched, timeout=15, what="every worker to load version 2")
            assert set(await fresh_requests(px, 30)) == {"b"}

            # POST /reload reloads all of them.
            px.write_config("vs.yaml", route_to("a"))
            result = await asyncio.to_thread(px.reload)
            assert result["ok"] and set(result["workers"]) == {"1", "2"}
            assert all(r["ok"] for r in result["workers"].values())
            assert set(await fresh_requests(px, 30)) == {"a"}

            # A secondary that dies is restarted.
            victim = pids[1]
            os.kill(victim, signal.SIGKILL)

            async def restarted() -> bool:
                st = px.admin_json("/server_info")["worker_status"]
                return len(st) == 3 and all("pid" in w for w in st) and victim not in [w["pid"] for w in st]

            await wait_for(restarted, timeout=20, what="the killed worker to be replaced")
            pids = [w["pid"] for w in px.admin_json("/server_info")["worker_status"]]
            await wait_for(
                lambda: http_get(px.stats_url + "/healthz/ready")[0] == 200,
                timeout=20,
                what="readiness with the new worker",
            )

            # SIGTERM to the primary stops every worker.
            assert px.stop() == 0
        for pid in pids:
            await wait_for(lambda pid=pid: not alive(pid), timeout=15, what=f"worker pid {pid} to exit")
