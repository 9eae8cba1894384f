"""Workload certificates and mutual TLS with real proxies, real sockets and
real TLS (stdlib ssl, certificates from pyproxy's own CA)."""

from __future__ import annotations

import datetime
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pyproxy.security.ca import init_ca, issue_to_dir
from tests.harness import ROOT, http_get, running_proxy

MESH = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: nothing, namespace: default}
spec:
  hosts: [nothing.example]
  location: MESH_INTERNAL
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints: [{address: 127.0.0.1}]
"""


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("mesh-ca")
    init_ca(d)
    return d


def _metric(text: str, name: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(name)]


def test_run_with_certs_exposes_expiry_and_reloads_on_rotation(ca: Path, tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    first = issue_to_dir(ca, creds, "bookinfo", "productpage")
    with running_proxy(MESH, args=["--certs", str(creds)]) as proxy:
        status, body = http_get(proxy.stats_url + "/stats/prometheus")
        assert status == 200
        text = body.decode()
        (line,) = _metric(text, "pyproxy_workload_cert_expiry_timestamp_seconds{")
        assert 'spiffe_id="spiffe://cluster.local/ns/bookinfo/sa/productpage"' in line
        assert float(line.rsplit(" ", 1)[1]) == first.not_valid_after_utc.timestamp()
        assert _metric(text, "envoy_server_days_until_first_cert_expiring ") == [
            "envoy_server_days_until_first_cert_expiring 0.0"]
        # The namespace defaults to the certificate's.
        assert proxy.admin_json("/server_info")["namespace"] == "bookinfo"
        second = issue_to_dir(ca, creds, "bookinfo", "productpage", ttl=datetime.timedelta(hours=48))
        deadline = time.monotonic() + 10
        while True:
            text = http_get(proxy.stats_url + "/stats/prometheus")[1].decode()
            (line,) = _metric(text, "pyproxy_workload_cert_expiry_timestamp_seconds{")
            if float(line.rsplit(" ", 1)[1]) == second.not_valid_after_utc.timestamp():
                break
            assert time.monotonic() < deadline, line
            time.sleep(0.1)
        assert 'pyproxy_workload_cert_reloads_total{result="success"} 1.0' in text
        # A broken file keeps the previous certificate and says why.
        (creds / "key.pem").write_text("not a key")
        deadline = time.monotonic() + 10
        while "workload certificate reload failed" not in proxy.log():
            assert time.monotonic() < deadline, proxy.log()
            time.sleep(0.1)
        assert "key.pem: not a PEM private key" in proxy.log()
        text = http_get(proxy.stats_url + "/stats/prometheus")[1].decode()
        (line,) = _metric(text, "pyproxy_workload_cert_expiry_timestamp_seconds{")
        assert float(line.rsplit(" ", 1)[1]) == second.not_valid_after_utc.timestamp()
        assert proxy.alive()


@pytest.mark.parametrize("flags,message", [
    (["--service-account", "reviews"], "disagrees with --service-account reviews"),
    (["--trust-domain", "example.org"], "disagrees with --trust-domain example.org"),
    (["--namespace", "prod"], "disagrees with --namespace prod"),
])
def test_identity_mismatch_refuses_to_start(ca: Path, tmp_path: Path, flags: list[str], message: str) -> None:
    issue_to_dir(ca, tmp_path / "creds", "default", "productpage")
    (tmp_path / "mesh.yaml").write_text(MESH)
    res = subprocess.run([sys.executable, "-m", "pyproxy", "run", "--config", str(tmp_path / "mesh.yaml"),
                          "--certs", str(tmp_path / "creds"), *flags],
                         check=False, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert res.returncode == 1
    assert message in res.stderr
    assert "spiffe://cluster.local/ns/default/sa/productpage" in res.stderr


def test_missing_certs_dir_refuses_to_start(tmp_path: Path) -> None:
    (tmp_path / "mesh.yaml").write_text(MESH)
    res = subprocess.run([sys.executable, "-m", "pyproxy", "run", "--config", str(tmp_path / "mesh.yaml")],
                         check=False, capture_output=True, text=True, timeout=60, cwd=ROOT,
                         env={"PYPROXY_CERTS": str(tmp_path / "nope"), "PATH": "/usr/bin:/bin"})
    assert res.returncode == 1
    assert f"{tmp_path / 'nope'}/cert-chain.pem" in res.stderr and "not starting" in res.stderr
