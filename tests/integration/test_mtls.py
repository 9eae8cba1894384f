"""Workload certificates and mutual TLS with real proxies, real sockets and
real TLS (stdlib ssl, certificates from pyproxy's own CA)."""

from __future__ import annotations

import asyncio
import datetime
import re
import shutil
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pyproxy.security.ca import init_ca, issue_to_dir
from tests.harness import ROOT, Upstream, http_get, raw_request, running_proxy

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


# -- two sidecars ---------------------------------------------------------------------------------

REVIEWS = "reviews.default.svc.cluster.local"
PP_URI = "spiffe://cluster.local/ns/default/sa/bookinfo-productpage"
REVIEWS_URI = "spiffe://cluster.local/ns/default/sa/bookinfo-reviews"


def strict(ns: str = "default", mode: str = "STRICT") -> str:
    return f"""---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: default, namespace: {ns}}}
spec:
  mtls: {{mode: {mode}}}
"""


def reviews_entry(port: int, extra: str = "", service_account: str = "bookinfo-reviews") -> str:
    sa = f", serviceAccount: {service_account}" if service_account else ""
    return f"""---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: reviews, namespace: default}}
spec:
  hosts: [{REVIEWS}]
  location: MESH_INTERNAL
  ports: [{{number: 9080, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1, ports: {{http: {port}}}, labels: {{app: reviews, version: v1}}{sa}}}]
{extra}"""


def _get(host: str, path: str = "/", headers: dict[str, str] | None = None) -> bytes:
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode()


@pytest.fixture(scope="module")
def creds(ca: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("creds")
    out = {}
    for sa in ("bookinfo-productpage", "bookinfo-reviews"):
        issue_to_dir(ca, base / sa, "default", sa)
        out[sa] = base / sa
    # A leaf from another CA (the client still trusts the mesh root, so only
    # the server has a reason to refuse).
    other = base / "other-ca"
    init_ca(other)
    issue_to_dir(other, base / "foreign-ca", "default", "bookinfo-productpage")
    shutil.copy(ca / "root-cert.pem", base / "foreign-ca" / "root-cert.pem")
    out["foreign-ca"] = base / "foreign-ca"
    issue_to_dir(ca, base / "expired", "default", "bookinfo-productpage",
                 now=datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=3))
    out["expired"] = base / "expired"
    return out


async def test_istio_mutual_between_two_sidecars(creds: dict[str, Path]) -> None:
    async with Upstream("reviews") as app:
        with running_proxy(MESH + strict(), app_port=app.port,
                           args=["--certs", str(creds["bookinfo-reviews"]), "--labels", "app=reviews,version=v1"]
                           ) as server:
            with running_proxy(reviews_entry(server.inbound), args=[
                    "--certs", str(creds["bookinfo-productpage"]), "--labels", "app=productpage,version=v1"]
                               ) as client:
                for i in range(3):
                    data = await raw_request(client.outbound, _get(REVIEWS, f"/r{i}", {
                        "x-forwarded-client-cert": "By=forged;URI=spiffe://cluster.local/ns/x/sa/admin"}))
                    assert data.startswith(b"HTTP/1.1 200"), data[:300]
                # Plaintext straight to the STRICT inbound port: refused, the app sees nothing.
                with pytest.raises((ConnectionError, asyncio.IncompleteReadError, asyncio.TimeoutError)):
                    await raw_request(server.inbound, _get(REVIEWS, "/plaintext"))
                server_metrics = http_get(server.stats_url + "/stats/prometheus")[1].decode()
                client_metrics = http_get(client.stats_url + "/stats/prometheus")[1].decode()
                client_stats = http_get(client.admin_url + "/stats")[1].decode()
                server_stats = http_get(server.admin_url + "/stats")[1].decode()
    assert [s.path for s in app.seen] == ["/r0", "/r1", "/r2"]
    xfcc = app.seen[0].headers["x-forwarded-client-cert"]
    # Istio's APPEND_FORWARD: the application's forged value never arrives (the
    # client sidecar sanitized it); the server sidecar sets By/Hash/Subject/URI.
    assert re.fullmatch(rf'By={REVIEWS_URI};Hash=[0-9a-f]{{64}};Subject="";URI={PP_URI}', xfcc), xfcc
    (inbound,) = [line for line in server_metrics.splitlines()
                  if line.startswith("istio_requests_total{") and 'reporter="destination"' in line]
    assert f'source_principal="{PP_URI}"' in inbound and f'destination_principal="{REVIEWS_URI}"' in inbound
    assert 'connection_security_policy="mutual_tls"' in inbound
    assert inbound.endswith(" 3.0")
    (outbound,) = [line for line in client_metrics.splitlines()
                   if line.startswith("istio_requests_total{") and 'reporter="source"' in line]
    assert f'source_principal="{PP_URI}"' in outbound and f'destination_principal="{REVIEWS_URI}"' in outbound
    assert 'connection_security_policy="unknown"' in outbound
    assert "ssl.handshake: 1" in client_stats  # one pooled connection for three requests
    assert "ssl.handshake: 1" in server_stats
    assert "no_filter_chain_match: 1" in server_stats


async def test_permissive_serves_mtls_and_plaintext_on_one_port(creds: dict[str, Path]) -> None:
    async with Upstream("reviews") as app:
        with running_proxy(MESH, app_port=app.port, args=["--certs", str(creds["bookinfo-reviews"])]) as server:
            with running_proxy(reviews_entry(server.inbound),
                               args=["--certs", str(creds["bookinfo-productpage"])]) as client:
                mtls = await raw_request(client.outbound, _get(REVIEWS, "/mtls"))
                plain = await raw_request(server.inbound, _get(REVIEWS, "/plain", {
                    "x-forwarded-client-cert": "By=forged", "x-envoy-retry-on": "5xx"}))
                # TLS from outside the mesh (no istio ALPN): no chain for it on an HTTP port.
                ctx = ssl.create_default_context()
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
                with pytest.raises((ConnectionError, ssl.SSLError, asyncio.IncompleteReadError)):
                    reader, writer = await asyncio.open_connection("127.0.0.1", server.inbound, ssl=ctx)
                    writer.write(_get(REVIEWS, "/non-mesh-tls"))
                    await reader.readuntil(b"\r\n\r\n")
    assert mtls.startswith(b"HTTP/1.1 200") and plain.startswith(b"HTTP/1.1 200")
    by_path = {s.path: s.headers for s in app.seen}
    assert set(by_path) == {"/mtls", "/plain"}
    assert by_path["/mtls"]["x-forwarded-client-cert"].endswith(f"URI={PP_URI}")
    # Plaintext with mTLS on: a client's XFCC is removed and control headers are
    # not trusted (no authenticated mesh peer).
    assert "x-forwarded-client-cert" not in by_path["/plain"]
    assert "x-envoy-retry-on" not in by_path["/plain"]


@pytest.mark.parametrize("case", ["wrong-san", "server-plaintext"])
async def test_failed_mtls_is_503_uf_and_retried(creds: dict[str, Path], case: str, tmp_path: Path) -> None:
    """The client side refuses the server (SAN not in the list; a server
    without TLS): 503 UF, retried by Istio's default policy (UF,URX)."""
    extra = ""
    server_args = ["--certs", str(creds["bookinfo-reviews"])]
    if case == "wrong-san":
        extra = f"""---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: reviews, namespace: default}}
spec:
  host: {REVIEWS}
  trafficPolicy: {{tls: {{mode: ISTIO_MUTUAL, subjectAltNames: ["spiffe://cluster.local/ns/default/sa/someone-else"]}}}}
"""
    else:
        server_args = ["--certs", "off"]
    log = tmp_path / "access.log"
    async with Upstream("reviews") as app:
        with running_proxy(MESH + strict(), app_port=app.port, args=server_args) as server:
            with running_proxy(reviews_entry(server.inbound, extra),
                               args=["--certs", str(creds["bookinfo-productpage"]), "--access-log", str(log)]
                               ) as client:
                data = await raw_request(client.outbound, _get(REVIEWS, "/x"))
                stats = http_get(client.admin_url + "/stats")[1].decode()
    assert data.startswith(b"HTTP/1.1 503"), data[:300]
    # The same local reply as any retried connect failure (Envoy adds
    # ", transport failure reason: TLS_error:..." with BoringSSL's text;
    # docs/differences.md).
    assert data.endswith(b"retried and the latest reset reason: remote connection failure"), data[-200:]
    assert app.seen == []
    assert " URX,UF " in log.read_text(), log.read_text()  # Envoy's order: flags as set
    if case == "wrong-san":
        assert "ssl.fail_verify_san: 3" in stats  # the first try and Istio's two retries
    else:
        assert "ssl.connection_error: 3" in stats


@pytest.mark.parametrize("case", ["foreign-ca", "expired"])
async def test_server_refuses_client_certificate(creds: dict[str, Path], case: str, tmp_path: Path) -> None:
    """The server refuses the client's certificate (another CA; expired).
    With TLS 1.3 the client has finished its handshake before the server's
    alert arrives, so the client sees its connection terminated (503 UC,
    not retried by Istio's default policy), as an Envoy client does."""
    log = tmp_path / "access.log"
    async with Upstream("reviews") as app:
        with running_proxy(MESH + strict(), app_port=app.port,
                           args=["--certs", str(creds["bookinfo-reviews"])]) as server:
            with running_proxy(reviews_entry(server.inbound),
                               args=["--certs", str(creds[case]), "--access-log", str(log)]) as client:
                data = await raw_request(client.outbound, _get(REVIEWS, "/x"))
                server_stats = http_get(server.admin_url + "/stats")[1].decode()
    assert data.startswith(b"HTTP/1.1 503"), data[:300]
    assert data.endswith(b"reset reason: connection termination"), data[-200:]
    assert " UC " in log.read_text(), log.read_text()
    assert app.seen == []
    assert "ssl.connection_error: 1" in server_stats and "ssl.fail_verify_error: 1" in server_stats
    assert "ssl.handshake: 0" in server_stats


async def test_tls_without_client_certificate_is_refused_by_strict(creds: dict[str, Path]) -> None:
    async with Upstream("reviews") as app:
        with running_proxy(MESH + strict(), app_port=app.port,
                           args=["--certs", str(creds["bookinfo-reviews"])]) as server:
            ctx = ssl.create_default_context(cafile=str(creds["bookinfo-reviews"] / "root-cert.pem"))
            ctx.check_hostname = False
            ctx.set_alpn_protocols(["istio-http/1.1", "istio", "http/1.1"])
            with pytest.raises((ConnectionError, ssl.SSLError, asyncio.IncompleteReadError)):
                reader, writer = await asyncio.open_connection("127.0.0.1", server.inbound, ssl=ctx)
                writer.write(_get(REVIEWS, "/no-cert"))
                await reader.readuntil(b"\r\n\r\n")
            # With a mesh certificate the same client is served.
            ctx.load_cert_chain(creds["bookinfo-productpage"] / "cert-chain.pem",
                                creds["bookinfo-productpage"] / "key.pem")
            reader, writer = await asyncio.open_connection("127.0.0.1", server.inbound, ssl=ctx)
            writer.write(_get(REVIEWS, "/with-cert"))
            head = await reader.readuntil(b"\r\n\r\n")
            writer.close()
            assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == "http/1.1"
    assert head.startswith(b"HTTP/1.1 200")
    assert [s.path for s in app.seen] == ["/with-cert"]
