"""Robustness past the loader: any config the loader accepts builds into a
runtime snapshot, first and on a reload over the previous one, without an
exception (``build_snapshot`` promises warnings, never errors, for valid
config; ``Worker.apply`` would otherwise reject the reload as an internal
error). The loader's own fuzzing is in test_config_fuzz.py."""

from __future__ import annotations

import random
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyproxy.config.loader import load_text
from pyproxy.snapshot import BuildContext, ProxyIdentity, build_snapshot
from tests.unit.fakes import StubLoop
from tests.unit.test_config_fuzz import VALID_OBJECTS, deleted, leaf_paths, replaced

# Hypothesis over the snapshot builder: the full run only.
pytestmark = pytest.mark.slow

# Values a real config could hold, so that many mutations stay valid and
# reach the builder (random junk is the loader's fuzzer's job).
STRINGS = ["reviews", "ratings", "v1", "v2", "v3", "*", "*.example.com", "10.0.0.1", "fd00::1",
           "unix:///tmp/x.sock", "/", "/api", "", "5s", "0s", "1ms", "reviews.default.svc.cluster.local",
           "5xx,reset", "ROUND_ROBIN", "LEAST_REQUEST", "RANDOM", "REGISTRY_ONLY", "ALLOW_ANY", "DNS", "STATIC",
           "NONE", "http", "HTTP", "mesh", "GET", "x-user", "^/a(b+)$", "\\1", "istio-system"]
EXTRA_DOCS = [
    yaml.safe_load("""
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: reviews}
spec:
  hosts: [reviews]
  ports: [{number: 9080, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints:
  - {address: 10.0.0.1, labels: {version: v1}}
  - {address: 10.0.0.2, labels: {version: v2}, weight: 3}
"""),
    yaml.safe_load("""
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: shadow}
spec:
  hosts: [shadow]
  ports: [{number: 9080, name: http}]
  resolution: DNS
"""),
]


def same_kind(value: Any) -> st.SearchStrategy[Any]:
    if isinstance(value, bool):
        return st.booleans()
    if isinstance(value, int):
        return st.integers(-5, 70000)
    if isinstance(value, float):
        return st.floats(-1, 200)
    if isinstance(value, str):
        return st.sampled_from(STRINGS) | st.text(max_size=8)
    if isinstance(value, list):
        return st.just(value[:-1]) | st.just(value + value[-1:])
    if isinstance(value, dict):
        return st.just(dict(list(value.items())[:-1]))
    return st.none()


def build(text: str) -> int:
    loaded = load_text(text, "mesh.yaml")
    if not loaded.ok:
        return 0
    ctx = BuildContext(StubLoop(now=100.0), random.Random(0), None, None)  # type: ignore[arg-type]
    first = build_snapshot(loaded, ProxyIdentity(labels=(("app", "productpage"),)), ctx)
    # A reload over the previous snapshot (clusters carried over or retired).
    build_snapshot(loaded, ProxyIdentity(labels=(("app", "productpage"),)), ctx, first, 2)
    return 1


built = {"ok": 0, "total": 0}


# 6 units of the Hypothesis profile (tests/conftest.py): 600 examples in ci, 150 in dev.
# Derandomised in both: test_the_fuzzer_reaches_the_builder checks a share of
# these examples, which on a random draw of 150 falls short now and then.
@settings(max_examples=6 * settings.default.max_examples, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_configs_the_loader_accepts_always_build(data: st.DataObject) -> None:
    docs = [*VALID_OBJECTS, *EXTRA_DOCS]
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(docs) - 1))
        paths = [p for p in leaf_paths(docs[i]) if p]
        path = data.draw(st.sampled_from(paths))
        current: Any = docs[i]
        for step in path:
            current = current[step]
        if data.draw(st.integers(0, 4)) == 0:
            docs[i] = deleted(docs[i], path)
        else:
            docs[i] = replaced(docs[i], path, data.draw(same_kind(current)))
    text = yaml.safe_dump_all(docs, sort_keys=False)
    built["total"] += 1
    built["ok"] += build(text)


def test_the_fuzzer_reaches_the_builder() -> None:
    # Runs after the property test in file order: a fuzzer whose mutations
    # all fail validation would test nothing.
    if built["total"]:
        assert built["ok"] >= built["total"] // 4, built


def test_unmutated_mesh_builds() -> None:
    assert build(yaml.safe_dump_all([*VALID_OBJECTS, *EXTRA_DOCS], sort_keys=False)) == 1
