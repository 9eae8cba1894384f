"""The image's HEALTHCHECK script against a real proxy process."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.harness import ROOT, running_proxy, service_entry

SCRIPT = ROOT / "docker" / "healthcheck.py"


def healthcheck(stats: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYPROXY_")}
    env["PYPROXY_STATS"] = stats
    env["HTTP_PROXY"] = env["http_proxy"] = "http://127.0.0.1:9"  # must be ignored
    return subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=20,
                          check=False)


def test_healthcheck_follows_the_proxy_readiness() -> None:
    with running_proxy(service_entry("svc", [(9, {})])) as px:
        assert healthcheck(f"127.0.0.1:{px.stats}").returncode == 0
        # A wildcard listener address is checked on loopback, as inside a container.
        assert healthcheck(f"0.0.0.0:{px.stats}").returncode == 0
        stats = px.stats
    result = healthcheck(f"127.0.0.1:{stats}")
    assert result.returncode == 1
    assert f"http://127.0.0.1:{stats}/healthz/ready" in result.stderr
