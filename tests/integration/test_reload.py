"""Hot reload with the real proxy process: file edits, ConfigMap-style
symlink swaps, SIGHUP, POST /reload, invalid config kept out, pools kept
across reloads, and no failed request while reloading under load."""

from __future__ import annotations

import asyncio
import os
import signal
import textwrap
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.harness import Upstream, http_get, running_proxy, service_entry
from tests.integration.obs_helpers import scrape, value, wait_for


def two_subsets(port_a: int, port_b: int) -> str:
    return (
        service_entry("svc", [(port_a, {"version": "a"}), (port_b, {"version": "b"})])
        + """---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: svc}
spec:
  host: svc
  subsets:
  - {name: a, labels: {version: a}}
  - {name: b, labels: {version: b}}
"""
    )


def route_to(subset: str) -> str:
    return f"""
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {{name: svc}}
    spec:
      hosts: [svc]
      http:
      - route: [{{destination: {{host: svc, subset: {subset}}}}}]
    """


async def who(px, session: aiohttp.ClientSession) -> str:
    async with session.get(px.outbound_url + "/", headers={"Host": "svc"}) as r:
        assert r.status == 200, await r.text()
        return (await r.json())["upstream"]


def reload_counts(px) -> tuple[float, float]:
    fams = scrape(px)
    return (
        value(fams, "pyproxy_config_reloads_total", result="success"),
        value(fams, "pyproxy_config_reloads_total", result="failure"),
    )


async def test_file_edit_is_applied_without_restart() -> None:
    async with Upstream("a") as a, Upstream("b") as b:
        cfg = {"base.yaml": two_subsets(a.port, b.port), "vs.yaml": route_to("a")}
        with running_proxy(cfg) as px:
            async with aiohttp.ClientSession() as s:
                assert await who(px, s) == "a"
                px.write_config("vs.yaml", route_to("b"))

                async def switched() -> bool:
                    return await who(px, s) == "b"

                await wait_for(switched, timeout=10, what="routing to b after the edit")
            dump = px.admin_json("/config_dump")
            assert dump["version"] == 2
            assert dump["last_reload"]["trigger"] == "file change" and dump["last_reload"]["ok"]
            assert reload_counts(px) == (1, 0)
            assert px.alive()


async def test_configmap_symlink_swap_is_applied(tmp_path: Path) -> None:
    """The kubelet's atomic update: files are symlinks into ..data, and ..data
    is swapped to a new timestamped directory in one rename."""
    async with Upstream("a") as a, Upstream("b") as b:
        mount = tmp_path / "mount"
        mount.mkdir()

        def publish(version: str, subset: str) -> None:
            d = mount / f"..{version}"
            d.mkdir()
            (d / "base.yaml").write_text(textwrap.dedent(two_subsets(a.port, b.port)))
            (d / "vs.yaml").write_text(textwrap.dedent(route_to(subset)))
            os.symlink(d.name, mount / "..data_tmp")
            os.replace(mount / "..data_tmp", mount / "..data")
            for name in ("base.yaml", "vs.yaml"):
                if not (mount / name).is_symlink():
                    os.symlink(f"..data/{name}", mount / name)

        publish("2024_01_01_00_00_00.1", "a")
        with running_proxy(None, config_dir=mount) as px:
            async with aiohttp.ClientSession() as s:
                assert await who(px, s) == "a"
                publish("2024_01_01_00_05_00.2", "b")

                async def switched() -> bool:
                    return await who(px, s) == "b"

                await wait_for(switched, timeout=10, what="routing to b after the ..data swap")
            dump = px.admin_json("/config_dump")
            files = {r["source"]["file"] for r in dump["resources"]}
            assert files == {str(mount / "base.yaml"), str(mount / "vs.yaml")}


async def test_sighup_reloads() -> None:
    async with Upstream("a") as a, Upstream("b") as b:
        cfg = {"base.yaml": two_subsets(a.port, b.port), "vs.yaml": route_to("a")}
        with running_proxy(cfg, args=["--watch-interval", "0"]) as px:
            async with aiohttp.ClientSession() as s:
                px.write_config("vs.yaml", route_to("b"))
                await asyncio.sleep(1.0)
                assert await who(px, s) == "a", "watching is off: the edit must wait for SIGHUP"
                px.process.send_signal(signal.SIGHUP)

                async def switched() -> bool:
                    return await who(px, s) == "b"

                await wait_for(switched, timeout=10, what="routing to b after SIGHUP")
            assert px.admin_json("/config_dump")["last_reload"]["trigger"] == "SIGHUP"


async def test_admin_reload_endpoint() -> None:
    async with Upstream("a") as a, Upstream("b") as b:
        cfg = {"base.yaml": two_subsets(a.port, b.port), "vs.yaml": route_to("a")}
        with running_proxy(cfg, args=["--watch-interval", "0"]) as px:
            async with aiohttp.ClientSession() as s:
                px.write_config("vs.yaml", route_to("b"))
                result = await asyncio.to_thread(px.reload)
                assert result["http_status"] == 200 and result["ok"] and result["version"] == 2
                assert await who(px, s) == "b"  # applied before /reload answered
            assert reload_counts(px) == (1, 0)


async def test_a_config_warning_is_logged_once_across_hosts_workers_and_reloads() -> None:
    async with Upstream("a") as a, Upstream("b") as b:
        # "v9" is no subset of the DestinationRule: a warning, not an error.
        cfg = {"base.yaml": two_subsets(a.port, b.port), "vs.yaml": route_to("v9")}
        with running_proxy(cfg, args=["--watch-interval", "0", "--workers", "2"]) as px:
            px.write_config("extra.yaml", route_to("a").replace("name: svc", "name: other").replace(
                "hosts: [svc]", "hosts: [other.example]"))
            result = await asyncio.to_thread(px.reload)
            assert result["ok"], result
            info = px.admin_json("/server_info")
            assert info["last_reload"]["ok"] is True and info["last_reload"]["warnings"] >= 2
            # New on the reload: logged then, once.
            assert px.log().count("VirtualService default/other: none of its hosts") == 1
        lines = [line for line in px.log().splitlines() if "subset 'v9' of svc.default.svc.cluster.local" in line]
        assert len(lines) == 1, lines


async def test_the_most_recently_modified_file_wins_and_touching_it_reloads() -> None:
    """Istio's tasks copied in order: the delay step, then the abort step,
    both ``VirtualService svc``; the later copy wins although its name sorts
    first, like ``kubectl apply`` in that order."""
    async with Upstream("a") as a, Upstream("b") as b:
        cfg = {"base.yaml": two_subsets(a.port, b.port)}
        with running_proxy(cfg) as px:

            def version_is(n: int) -> bool:
                return px.admin_json("/config_dump")["version"] == n

            async with aiohttp.ClientSession() as s:
                delay = px.write_config("step-2-delay.yaml", route_to("a"))
                os.utime(delay, (time.time() - 10, time.time() - 10))
                await wait_for(lambda: version_is(2), timeout=10, what="the first step to load")
                assert {await who(px, s) for _ in range(5)} == {"a"}
                px.write_config("step-1-abort.yaml", route_to("b"))
                await wait_for(lambda: version_is(3), timeout=10, what="the second step to load")
                assert {await who(px, s) for _ in range(5)} == {"b"}  # although its name sorts first
                dump = px.admin_json("/config_dump")
                assert any("VirtualService default/svc is defined twice" in w and "step-1-abort.yaml wins" in w
                           for w in dump["warnings"]), dump["warnings"]
                os.utime(delay)  # touch: now the delay step is the latest
                await wait_for(lambda: version_is(4), timeout=10, what="the touch to reload")
                assert {await who(px, s) for _ in range(5)} == {"a"}


async def test_reload_reparses_only_changed_files_and_drops_deleted_ones() -> None:
    """The parse cache and route reuse, seen through /config_dump's reload
    counters: an unchanged file is not parsed again, an edited one is, an
    invalid edit is still rejected whole with its path, and a deleted file's
    resources are gone."""
    async with Upstream("a") as a, Upstream("b") as b, Upstream("o") as o:
        other = service_entry("other", [(o.port, {"version": "o"})]) + "---\n" + textwrap.dedent("""\
            apiVersion: networking.istio.io/v1
            kind: VirtualService
            metadata: {name: other}
            spec:
              hosts: [other]
              http:
              - route: [{destination: {host: other}}]
            """)
        cfg = {"base.yaml": two_subsets(a.port, b.port), "vs.yaml": route_to("a"), "other.yaml": other}
        with running_proxy(cfg, args=["--watch-interval", "0"]) as px:
            async with aiohttp.ClientSession() as s:
                last = px.admin_json("/config_dump")["last_reload"]
                assert (last["files_parsed"], last["files_reused"]) == (3, 0)

                # Nothing changed: nothing parsed, every route set reused.
                assert (await asyncio.to_thread(px.reload))["ok"]
                last = px.admin_json("/config_dump")["last_reload"]
                assert (last["files_parsed"], last["files_reused"]) == (0, 3)
                assert (last["routes_compiled"], last["routes_reused"]) == (0, 2)

                # One file edited: only it is parsed; its route is compiled again.
                px.write_config("vs.yaml", route_to("b"))
                assert (await asyncio.to_thread(px.reload))["ok"]
                assert await who(px, s) == "b"
                last = px.admin_json("/config_dump")["last_reload"]
                assert (last["files_parsed"], last["files_reused"]) == (1, 2)
                assert (last["routes_compiled"], last["routes_reused"]) == (1, 1)

                # An invalid edit: rejected whole, with its path; b stays.
                px.write_config("vs.yaml", route_to("b").replace("subset: b}}", "subset: b}, weight: -5}"))
                result = await asyncio.to_thread(px.reload)
                assert result["http_status"] == 400 and not result["ok"]
                assert any("vs.yaml#0: spec.http[0].route[0].weight" in e for e in result["errors"]), result
                assert await who(px, s) == "b"
                dump = px.admin_json("/config_dump")
                assert dump["version"] == 3 and dump["last_reload"]["ok"] is False
                assert dump["last_reload"]["files_parsed"] == 1
                assert reload_counts(px) == (2, 1)

                # The fix, and other.yaml deleted: its resources are gone.
                px.write_config("vs.yaml", route_to("a"))
                assert await who_host(px, s, "other") == "o"
                px.remove_config("other.yaml")
                assert (await asyncio.to_thread(px.reload))["ok"]
                assert await who(px, s) == "a"
                dump = px.admin_json("/config_dump")
                assert {r["source"]["file"].rsplit("/", 1)[-1] for r in dump["resources"]} == {"base.yaml",
                                                                                               "vs.yaml"}
                assert not any(r["name"] == "other" for r in dump["resources"])
                assert (dump["last_reload"]["files_parsed"], dump["last_reload"]["files_reused"]) == (1, 1)
                async with s.get(px.outbound_url + "/", headers={"Host": "other"}) as r:
                    assert r.status != 200 or (await r.json()).get("upstream") != "o"
            assert reload_counts(px) == (3, 1)
            assert px.alive()


async def who_host(px, session: aiohttp.ClientSession, host: str) -> str:
    async with session.get(px.outbound_url + "/", headers={"Host": host}) as r:
        assert r.status == 200, await r.text()
        return (await r.json())["upstream"]


async def test_invalid_config_is_kept_out_and_a_later_fix_applies() -> None:
    async with Upstream("a") as a, Upstream("b") as b:
        cfg = {"base.yaml": two_subsets(a.port, b.port), "vs.yaml": route_to("a")}
        with running_proxy(cfg) as px:
            async with aiohttp.ClientSession() as s:
                # Valid YAML, invalid Istio: a negative weight, and a good route to b
                # in the same file: nothing of it may apply.
                px.write_config(
                    "vs.yaml",
                    """
                apiVersion: networking.istio.io/v1
                kind: VirtualService
                metadata: {name: svc}
                spec:
                  hosts: [svc]
                  http:
                  - route:
                    - destination: {host: svc, subset: b}
                      weight: -5
                """,
                )
                await wait_for(lambda: reload_counts(px)[1] == 1, timeout=10, what="a failed reload")
                for _ in range(5):
                    assert await who(px, s) == "a"
                dump = px.admin_json("/config_dump")
                assert dump["version"] == 1
                last = dump["last_reload"]
                assert last["ok"] is False
                assert any("vs.yaml#0: spec.http[0].route[0].weight" in e for e in last["errors"]), last
                assert last["last_failure"]["errors"] == last["errors"]
                assert "vs.yaml#0: spec.http[0].route[0].weight" in px.log()
                # Broken YAML too.
                px.write_config("vs.yaml", "kind: [unclosed\n")
                await wait_for(lambda: reload_counts(px)[1] == 2, timeout=10, what="a second failed reload")
                assert await who(px, s) == "a"
                # A later valid edit applies normally.
                px.write_config("vs.yaml", route_to("b"))

                async def switched() -> bool:
                    return await who(px, s) == "b"

                await wait_for(switched, timeout=10, what="the fixed config to apply")
            assert reload_counts(px) == (1, 2)
            dump = px.admin_json("/config_dump")
            assert dump["version"] == 2 and dump["last_reload"]["ok"] is True
            assert dump["last_reload"]["last_failure"] is not None  # the last error stays visible
            assert px.alive()


async def test_a_misspelt_match_field_is_rejected_and_does_not_reroute_traffic() -> None:
    """The reported incident: ``uri: {prefx: /api}`` read leniently is a
    match-all rule, and a live reload sent all traffic to the canary."""
    async with Upstream("a") as a, Upstream("b") as b:
        cfg = {"base.yaml": two_subsets(a.port, b.port), "vs.yaml": route_to("a")}
        with running_proxy(cfg) as px:
            async with aiohttp.ClientSession() as s:
                px.write_config(
                    "vs.yaml",
                    """
                apiVersion: networking.istio.io/v1
                kind: VirtualService
                metadata: {name: svc}
                spec:
                  hosts: [svc]
                  http:
                  - match: [{uri: {prefx: /api}}]
                    route: [{destination: {host: svc, subset: b}}]
                  - route: [{destination: {host: svc, subset: a}}]
                """,
                )
                await wait_for(lambda: reload_counts(px)[1] == 1, timeout=10, what="the rejected reload")
                for _ in range(5):
                    assert await who(px, s) == "a"
            info = px.admin_json("/server_info")
            assert info["config_version"] == 1 and info["last_reload_ok"] is False
            last = info["last_reload"]
            assert last["ok"] is False and last["failures"] == 1 and last["trigger"] == "file change"
            assert any(
                e.endswith("vs.yaml#0: spec.http[0].match[0].uri.prefx: unknown field 'prefx' in StringMatch "
                           "(did you mean 'prefix'?)")
                for e in last["errors"]
            ), last
            assert px.admin_json("/config_dump")["last_reload"]["errors"] == last["errors"]
            assert value(scrape(px), "pyproxy_config_update_rejected_total") == 1


async def test_unchanged_clusters_keep_their_pools_and_changed_ones_get_new_ones() -> None:
    peers: list[int] = []

    async def handler(request: web.Request) -> web.Response:
        peers.append(request.transport.get_extra_info("peername")[1])
        return web.json_response({"upstream": "a"})

    async with Upstream("a", handler=handler) as up:
        base = service_entry("svc", [(up.port, {"version": "a"})])
        vs = """
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: svc}
        spec:
          hosts: [svc]
          http:
          - match: [{uri: {prefix: /x}}]
            route: [{destination: {host: svc}}]
          - route: [{destination: {host: svc}}]
        """
        with running_proxy({"base.yaml": base}, args=["--watch-interval", "0"]) as px:
            async with aiohttp.ClientSession() as s:
                await who(px, s)
                # Routing changes only: the cluster (and its pool) carries over.
                px.write_config("vs.yaml", vs)
                assert (await asyncio.to_thread(px.reload))["ok"]
                await who(px, s)
                px.write_config("other.yaml", service_entry("other", [(1, {})]))
                assert (await asyncio.to_thread(px.reload))["ok"]
                await who(px, s)
                assert len(peers) == 3 and len(set(peers)) == 1, f"pool not kept across reloads: {peers}"
                # The cluster's own settings change: new cluster, new pool;
                # the old connection is closed as the old cluster drains.
                px.write_config(
                    "dr.yaml",
                    """
                apiVersion: networking.istio.io/v1
                kind: DestinationRule
                metadata: {name: svc}
                spec:
                  host: svc
                  trafficPolicy: {connectionPool: {http: {http1MaxPendingRequests: 77}}}
                """,
                )
                assert (await asyncio.to_thread(px.reload))["ok"]
                await who(px, s)
                await who(px, s)
            assert peers[3] != peers[0], "a changed cluster must not reuse the old pool"
            assert peers[4] == peers[3]
            fams = scrape(px)
            name = "outbound|9080||svc.default.svc.cluster.local"
            # Counters continue across the replacement (5 requests in total).
            assert value(fams, "envoy_cluster_upstream_rq_total", cluster_name=name) == 5
            assert value(fams, "envoy_cluster_upstream_cx_total", cluster_name=name) == 2


@pytest.mark.slow
async def test_no_request_fails_while_reloading_every_100ms_under_load() -> None:
    """8 keep-alive clients for 10 s while the config changes every 100 ms
    (weights flip, and every third reload replaces the clusters too): every
    request must succeed."""
    async with Upstream("a") as a, Upstream("b") as b:

        def config(i: int) -> dict[str, str]:
            wa, wb = [(90, 10), (10, 90), (50, 50)][i % 3]
            pending = 1000 + (i % 3 == 2)  # every third config changes the clusters themselves
            return {
                "vs.yaml": f"""
            apiVersion: networking.istio.io/v1
            kind: VirtualService
            metadata: {{name: svc}}
            spec:
              hosts: [svc]
              http:
              - route:
                - {{destination: {{host: svc, subset: a}}, weight: {wa}}}
                - {{destination: {{host: svc, subset: b}}, weight: {wb}}}
            """,
                "dr.yaml": f"""
            apiVersion: networking.istio.io/v1
            kind: DestinationRule
            metadata: {{name: svc}}
            spec:
              host: svc
              trafficPolicy: {{connectionPool: {{http: {{http1MaxPendingRequests: {pending}}}}}}}
              subsets:
              - {{name: a, labels: {{version: a}}}}
              - {{name: b, labels: {{version: b}}}}
            """,
            }

        files = {
            "base.yaml": service_entry("svc", [(a.port, {"version": "a"}), (b.port, {"version": "b"})]),
            **config(0),
        }
        with running_proxy(files) as px:
            duration = 10.0
            ok = 0
            failures: list[str] = []
            stop = asyncio.Event()

            async def client() -> None:
                nonlocal ok
                conn = aiohttp.TCPConnector(limit=1, force_close=False)
                async with aiohttp.ClientSession(connector=conn) as s:
                    while not stop.is_set():
                        try:
                            async with s.get(px.outbound_url + "/", headers={"Host": "svc"}) as r:
                                body = await r.read()
                                if r.status == 200:
                                    ok += 1
                                else:
                                    failures.append(
                                        f"{r.status} {r.headers.get('x-envoy-overloaded')} {body[:80]!r}"
                                    )
                        except (aiohttp.ClientError, OSError) as exc:  # a reset counts as a failure
                            failures.append(repr(exc))

            reloads = 0
            reload_errors: list[str] = []

            async def reloader() -> None:
                nonlocal reloads
                i = 1
                end = time.monotonic() + duration
                while time.monotonic() < end:
                    for name, text in config(i).items():
                        px.write_config(name, text)
                    result = await asyncio.to_thread(px.reload)
                    if result["ok"]:
                        reloads += 1
                    else:
                        reload_errors.append(str(result))
                    i += 1
                    await asyncio.sleep(0.1)
                stop.set()

            clients = [asyncio.create_task(client()) for _ in range(8)]
            await reloader()
            await asyncio.gather(*clients)
            status, _ = http_get(px.admin_url + "/ready")
            assert status == 200
        assert not reload_errors
        assert reloads >= 40, f"only {reloads} reloads in {duration}s"
        assert not failures, f"{len(failures)} failed of {ok + len(failures)}: {failures[:5]}"
        assert ok > 200
        assert a.seen and b.seen
        print(f"\n{ok} requests, 0 failed, {reloads} reloads (+ watcher reloads) in {duration:.0f}s")
