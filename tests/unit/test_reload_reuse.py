"""Unit tests for what makes a reload of a large config cheap: the loader's
per-file parse cache (pyproxy.config.loader.ParseCache), the snapshot
builder's reuse of compiled routes and its cooperative (yielding) build
(pyproxy.snapshot), and the collector policy (pyproxy.heap)."""

from __future__ import annotations

import asyncio
import gc
import os
import random
from pathlib import Path

import pytest

from pyproxy.config.loader import ParseCache, load_paths
from pyproxy.heap import HeapPolicy
from pyproxy.snapshot import BuildContext, ProxyIdentity, Snapshot, build_snapshot, build_snapshot_async
from tests.unit.fakes import StubLoop
from tests.unit.test_snapshot import REVIEWS, REVIEWS_DR, doc, se

RATINGS = se("ratings", endpoints="- {address: 10.0.1.1, labels: {version: v1}}")


def route(host: str, subset: str = "", *, name: str | None = None) -> str:
    dest = f"{{host: {host}" + (f", subset: {subset}" if subset else "") + "}"
    return doc("VirtualService", f"""
hosts: [{host}]
http:
- name: r
  match: [{{uri: {{prefix: /a}}, headers: {{x-user: {{exact: jason}}}}}}]
  route: [{{destination: {dest}}}]
- route: [{{destination: {dest}}}]
""", name=name or host)


def write(d: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (d / name).write_text(text)


def ctx(loop: object | None = None) -> BuildContext:
    return BuildContext(loop or StubLoop(now=100.0), random.Random(0), None, None, None)  # type: ignore[arg-type]


def by_file(cfg: object, file: str) -> list[object]:
    return [r for r in cfg.resources if r.meta.source.file == file]  # type: ignore[attr-defined]


# -- parse cache ------------------------------------------------------------


def test_unchanged_files_are_not_parsed_again_and_keep_their_objects(tmp_path: Path) -> None:
    write(tmp_path, {"a.yaml": REVIEWS + "---\n" + REVIEWS_DR, "b.yaml": route("reviews", "v1")})
    cache = ParseCache()
    first = load_paths([str(tmp_path)], cache)
    assert first.ok and (cache.parsed, cache.reused) == (2, 0)
    second = load_paths([str(tmp_path)], cache)
    assert second.ok and (cache.parsed, cache.reused) == (0, 2)
    assert all(a is b for a, b in zip(first.resources, second.resources, strict=True))
    assert cache.stats() == {"files_parsed": 0, "files_reused": 2, "files_parsed_total": 2,
                             "files_reused_total": 2}


def test_a_changed_file_is_parsed_again_and_only_that_one(tmp_path: Path) -> None:
    write(tmp_path, {"a.yaml": REVIEWS + "---\n" + REVIEWS_DR, "b.yaml": route("reviews", "v1")})
    cache = ParseCache()
    first = load_paths([str(tmp_path)], cache)
    (tmp_path / "b.yaml").write_text(route("reviews", "v2"))
    second = load_paths([str(tmp_path)], cache)
    assert (cache.parsed, cache.reused) == (1, 1)
    a = str(tmp_path / "a.yaml")
    b = str(tmp_path / "b.yaml")
    assert all(x is y for x, y in zip(by_file(first, a), by_file(second, a), strict=True))
    [vs] = by_file(second, b)
    assert vs.http[0].route[0].destination.subset == "v2"  # type: ignore[attr-defined]
    # Same result as a load without a cache.
    fresh = load_paths([str(tmp_path)])
    assert second.resources == fresh.resources and second.warnings == fresh.warnings


def test_same_size_and_mtime_edit_is_still_seen(tmp_path: Path) -> None:
    """The cache keys on content, not on stat data: an edit that keeps the
    size and the mtime (1-second file systems) is not missed."""
    write(tmp_path, {"b.yaml": route("reviews", "v1")})
    path = tmp_path / "b.yaml"
    cache = ParseCache()
    load_paths([str(tmp_path)], cache)
    st = path.stat()
    path.write_text(route("reviews", "v2"))  # same length
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    again = load_paths([str(tmp_path)], cache)
    assert cache.parsed == 1
    assert again.resources[0].http[0].route[0].destination.subset == "v2"  # type: ignore[attr-defined]


def test_invalid_edit_is_reported_with_its_path_and_a_fix_loads(tmp_path: Path) -> None:
    write(tmp_path, {"a.yaml": REVIEWS + "---\n" + REVIEWS_DR, "b.yaml": route("reviews", "v1")})
    cache = ParseCache()
    load_paths([str(tmp_path)], cache)
    bad = route("reviews", "v1").replace("- route: [{destination: {host: reviews, subset: v1}}]",
                                         "- route: [{destination: {host: reviews, subset: v1}, weight: -5}]")
    (tmp_path / "b.yaml").write_text(bad)
    rejected = load_paths([str(tmp_path)], cache)
    assert not rejected.ok
    assert [str(e) for e in rejected.errors] == [
        f"{tmp_path / 'b.yaml'}#0: spec.http[1].route[0].weight: must be >= 0"]
    # Reloading the same broken bytes gives the same errors (from the cache).
    again = load_paths([str(tmp_path)], cache)
    assert cache.parsed == 0 and again.errors == rejected.errors
    (tmp_path / "b.yaml").write_text(route("reviews", "v3"))
    fixed = load_paths([str(tmp_path)], cache)
    assert fixed.ok and cache.parsed == 1


def test_a_deleted_file_drops_its_resources_and_leaves_the_cache(tmp_path: Path) -> None:
    write(tmp_path, {"a.yaml": REVIEWS + "---\n" + REVIEWS_DR, "b.yaml": route("reviews", "v1")})
    cache = ParseCache()
    load_paths([str(tmp_path)], cache)
    (tmp_path / "b.yaml").unlink()
    after = load_paths([str(tmp_path)], cache)
    assert [r.meta.kind for r in after.resources] == ["ServiceEntry", "DestinationRule"]
    assert (cache.parsed, cache.reused) == (0, 1)
    # Put back, it is parsed again (only the files of the latest load are kept).
    (tmp_path / "b.yaml").write_text(route("reviews", "v1"))
    load_paths([str(tmp_path)], cache)
    assert (cache.parsed, cache.reused) == (1, 1)


def test_same_bytes_under_another_path_are_parsed_for_that_path(tmp_path: Path) -> None:
    text = route("reviews", "v1")
    write(tmp_path, {"b.yaml": text})
    cache = ParseCache()
    load_paths([str(tmp_path)], cache)
    (tmp_path / "b.yaml").rename(tmp_path / "c.yaml")
    cfg = load_paths([str(tmp_path)], cache)
    assert cache.parsed == 1
    assert cfg.resources[0].meta.source.file == str(tmp_path / "c.yaml")  # type: ignore[attr-defined]


# -- compiled route reuse --------------------------------------------------------


def build_from(tmp_path: Path, cache: ParseCache, previous: Snapshot | None = None) -> Snapshot:
    cfg = load_paths([str(tmp_path)], cache)
    assert cfg.ok, [str(e) for e in cfg.errors]
    return build_snapshot(cfg, ProxyIdentity(), ctx(), previous,
                          version=1 if previous is None else previous.version + 1)


def vhost_routes(snap: Snapshot, host: bytes) -> tuple:
    vh = snap.hosts.lookup(host)
    assert vh is not None
    return vh.routes


def test_routes_of_unchanged_virtual_services_are_reused(tmp_path: Path) -> None:
    write(tmp_path, {"a.yaml": REVIEWS + "---\n" + REVIEWS_DR + "---\n" + RATINGS,
                     "b.yaml": route("reviews", "v1") + "---\n" + route("ratings", name="ratings"),
                     "c.yaml": route("bench.example.com")})
    cache = ParseCache()
    first = build_from(tmp_path, cache)
    assert (first.routes_compiled, first.routes_reused) == (3, 0)
    second = build_from(tmp_path, cache, first)
    assert (second.routes_compiled, second.routes_reused) == (0, 3)
    for host in (b"reviews", b"ratings", b"bench.example.com"):
        assert vhost_routes(second, host) is vhost_routes(first, host)
    # Warnings of reused routes are reported again (the host not in the registry).
    assert second.warnings == first.warnings
    assert any("bench.example.com is not in the service registry" in w for w in second.warnings)
    # One file changes: only its VirtualServices are compiled again.
    (tmp_path / "c.yaml").write_text(route("bench.example.com").replace("/a", "/b"))
    third = build_from(tmp_path, cache, second)
    assert (third.routes_compiled, third.routes_reused) == (1, 2)
    assert vhost_routes(third, b"reviews") is vhost_routes(first, b"reviews")
    assert vhost_routes(third, b"bench.example.com") is not vhost_routes(second, b"bench.example.com")


def test_routes_are_compiled_again_when_a_destination_cluster_is_replaced(tmp_path: Path) -> None:
    write(tmp_path, {"a.yaml": REVIEWS, "dr.yaml": REVIEWS_DR, "b.yaml": route("reviews", "v1")})
    cache = ParseCache()
    first = build_from(tmp_path, cache)
    # Same VirtualService object, but the subset's cluster gets new settings.
    (tmp_path / "dr.yaml").write_text(REVIEWS_DR.replace("host: reviews", "host: reviews\n  trafficPolicy: "
                                                         "{loadBalancer: {simple: RANDOM}}"))
    second = build_from(tmp_path, cache, first)
    assert second.routes_compiled == 1
    [target] = vhost_routes(second, b"reviews")[0].targets
    assert target.cluster is second.clusters["outbound|9080|v1|reviews.default.svc.cluster.local"]
    assert target.cluster is not first.clusters["outbound|9080|v1|reviews.default.svc.cluster.local"]


def test_routes_are_compiled_again_when_a_destination_disappears(tmp_path: Path) -> None:
    write(tmp_path, {"a.yaml": REVIEWS, "dr.yaml": REVIEWS_DR, "b.yaml": route("reviews", "v1")})
    cache = ParseCache()
    first = build_from(tmp_path, cache)
    (tmp_path / "dr.yaml").unlink()  # subset v1 is no longer defined
    second = build_from(tmp_path, cache, first)
    assert second.routes_compiled == 1
    [target] = vhost_routes(second, b"reviews")[0].targets
    assert target.cluster is None
    assert any("subset 'v1'" in w and "503 NC" in w for w in second.warnings)


def test_routes_are_not_reused_for_another_identity(tmp_path: Path) -> None:
    write(tmp_path, {"a.yaml": REVIEWS + "---\n" + REVIEWS_DR, "b.yaml": route("reviews", "v1")})
    cache = ParseCache()
    first = build_from(tmp_path, cache)
    cfg = load_paths([str(tmp_path)], cache)
    other = build_snapshot(cfg, ProxyIdentity(namespace="other"), ctx(), first, 2)
    assert (other.routes_compiled, other.routes_reused) == (1, 0)


# -- cooperative build -----------------------------------------------------------


async def test_async_build_lets_the_loop_run_and_changes_nothing_before_commit(tmp_path: Path) -> None:
    many = "---\n".join(se(f"svc-{i}", endpoints=f"- {{address: 10.1.0.{i}}}") for i in range(60))
    write(tmp_path, {"a.yaml": many})
    cache = ParseCache()
    loop = asyncio.get_running_loop()
    cfg = load_paths([str(tmp_path)], cache)
    first = await build_snapshot_async(cfg, ProxyIdentity(), ctx(loop), None, 1, slice_s=0)
    first.commit()
    old_cluster = first.clusters["outbound|9080||svc-1.default.svc.cluster.local"]
    old_service = old_cluster.service
    # A change that keeps the clusters (a label on the ServiceEntry's
    # metadata: same endpoints and settings) but makes new Service objects.
    write(tmp_path, {"a.yaml": many.replace("name: svc-1\n", "name: svc-1\n  labels: {team: x}\n")})
    cfg = load_paths([str(tmp_path)], cache)
    ticks = 0
    running = True

    def tick() -> None:
        nonlocal ticks
        ticks += 1
        if running:
            loop.call_soon(tick)

    loop.call_soon(tick)
    second = await build_snapshot_async(cfg, ProxyIdentity(), ctx(loop), first, 2, slice_s=0)
    running = False
    assert ticks >= 60  # the loop ran between the build's steps
    assert second.clusters["outbound|9080||svc-1.default.svc.cluster.local"] is old_cluster  # carried over
    assert old_cluster.service is old_service  # the serving snapshot is untouched until the swap
    second.commit()
    assert old_cluster.service is second.registry["svc-1.default.svc.cluster.local"]


# -- collector policy ----------------------------------------------------------


@pytest.fixture
def unfrozen() -> object:
    yield
    gc.unfreeze()


def test_heap_policy_freezes_and_collects_only_after_enough_retired_clusters(unfrozen: object) -> None:
    heap = HeapPolicy(reclaim_share=0.5, min_retired=10)
    assert heap.settle(0, 100)  # the first call collects (startup garbage)
    assert gc.get_freeze_count() > 0 and heap.reclaims == 1
    assert not heap.settle(30, 100)  # 30 < max(10, 50)
    assert not heap.settle(19, 100)  # 49
    assert heap.settle(1, 100)  # 50: collect, count starts again
    assert heap.reclaims == 2 and heap.stats()["retired_clusters_since"] == 0
    with heap.paused():
        assert not gc.isenabled()
    assert gc.isenabled()
