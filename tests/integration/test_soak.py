"""The short variant of the soak (load-tests/soak.py, issue 8 §5): 25 s of
mixed traffic with config reloads every 3 s, a chaotic upstream and
clients that hang up; no request lost, descriptors back to the count before
traffic, RSS growth after warm-up under 5%."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.harness import ROOT


@pytest.mark.slow
def test_short_soak() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "load-tests" / "soak.py"), "--seconds", "25", "--clients", "12",
                           "--reload-every", "3", "--json"], capture_output=True, text=True, timeout=180, cwd=ROOT,
                          check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(lines[-1])
    print(json.dumps(result, indent=1))
    assert result["failures"] == [], result
    assert proc.returncode == 0
    # The run exercised what it claims to.
    assert result["sent"] > 1000
    assert result["lost"] == 0
    assert result["reloads_applied"] >= 6
    behaviours = result["upstream_behaviours"]
    for kind in ("error", "stall", "reset_head", "reset_mid", "slow_body"):
        assert behaviours.get(kind, 0) > 10, behaviours
    assert result["abandoned"] > 10 and result["truncated_expected"] > 10
    assert result["fds_after"] <= result["fds_before"]
    assert result["rss_growth_pct"] < 5.0
