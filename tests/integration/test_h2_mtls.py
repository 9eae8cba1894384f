"""HTTP/2 over mutual TLS on the inbound listener (ALPN ``h2``), as a client
sidecar reaches an Istio server sidecar for a GRPC/HTTP2 port: real TLS
(stdlib ssl with pyproxy's mesh CA certificates), the ``h2`` library as the
client, a real pyproxy process, a real HTTP/1.1 app behind it."""

from __future__ import annotations

import asyncio
import re
import ssl
from pathlib import Path

import h2.events
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from pyproxy.security.ca import init_ca, issue_to_dir
from tests.harness import Upstream, http_get, running_proxy
from tests.integration.test_http2 import H2Client
from tests.integration.test_mtls import MESH, REVIEWS, strict

PP_URI = "spiffe://cluster.local/ns/default/sa/bookinfo-productpage"


@pytest.fixture(scope="module")
def creds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("h2-mtls")
    init_ca(base / "ca")
    for sa in ("bookinfo-productpage", "bookinfo-reviews"):
        issue_to_dir(base / "ca", base / sa, "default", sa)
    return {"client": base / "bookinfo-productpage", "server": base / "bookinfo-reviews"}


def client_context(d: Path, alpn: list[str]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_cert_chain(d / "cert-chain.pem", d / "key.pem")
    ctx.load_verify_locations(d / "root-cert.pem")
    ctx.check_hostname = False  # SPIFFE certificates carry no DNS name
    ctx.set_alpn_protocols(alpn)
    return ctx


def frame(payload: bytes) -> bytes:
    return b"\x00" + len(payload).to_bytes(4, "big") + payload


@pytest.mark.parametrize("mode", ["STRICT", "PERMISSIVE"])
async def test_h2_over_mtls_inbound(creds: dict[str, Path], mode: str) -> None:
    async def app_handler(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if request.headers.get("content-type") == "application/grpc":
            return web.Response(body=frame(b"reply"), headers={"content-type": "application/grpc",
                                                                "grpc-status": "0"})
        return web.Response(text=f"{request.path} {len(body)}")

    async with Upstream("reviews", app_handler) as app:
        with running_proxy(MESH + strict(mode=mode), app_port=app.port,
                           args=["--certs", str(creds["server"])]) as server:
            # What Istio's client sidecar offers for an HTTP/2 cluster (mtlsHTTP2ALPN + h2).
            c = await asyncio.to_thread(H2Client, server.inbound,
                                        client_context(creds["client"], ["istio-h2", "istio", "h2"]))
            try:
                assert c.sock.selected_alpn_protocol() == "h2"
                sids = [c.request(f"/s{i}", authority=REVIEWS.encode()) for i in range(10)]
                post = c.request("/pkg.Svc/Get", [(b"content-type", b"application/grpc"), (b"te", b"trailers")],
                                 end=False, authority=REVIEWS.encode())
                c.conn.send_data(post, frame(b"q1") + frame(b"q2"), end_stream=True)
                c.flush()
                evs = await asyncio.to_thread(c.events, lambda g: sum(
                    isinstance(e, h2.events.StreamEnded) for e in g) >= 11)
            finally:
                c.close()
            # The server's order wins (Istio's h2, http/1.1): a client offering both gets h2.
            ctx = client_context(creds["client"], ["istio", "http/1.1", "h2"])
            _, writer = await asyncio.open_connection("127.0.0.1", server.inbound, ssl=ctx)
            assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == "h2"
            writer.close()
            # A client sidecar carrying HTTP/1.1 (istio-http/1.1) still gets http/1.1.
            ctx = client_context(creds["client"], ["istio-http/1.1", "istio", "http/1.1"])
            reader, writer = await asyncio.open_connection("127.0.0.1", server.inbound, ssl=ctx)
            try:
                assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == "http/1.1"
                writer.write(f"GET /h1 HTTP/1.1\r\nHost: {REVIEWS}\r\n\r\n".encode())
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                assert head.startswith(b"HTTP/1.1 200"), head
            finally:
                writer.close()
            stats = http_get(server.admin_url + "/stats")[1].decode()
            prom = http_get(server.stats_url + "/stats/prometheus")[1].decode()
    by_sid: dict[int, dict] = {}
    for e in evs:
        if isinstance(e, h2.events.ResponseReceived):
            by_sid.setdefault(e.stream_id, {})["headers"] = dict(e.headers)
        elif isinstance(e, h2.events.DataReceived):
            d = by_sid.setdefault(e.stream_id, {})
            d["body"] = d.get("body", b"") + e.data
    for i, sid in enumerate(sids):
        assert by_sid[sid]["headers"][b":status"] == b"200"
        assert by_sid[sid]["body"] == f"/s{i} 0".encode()
    assert by_sid[post]["headers"][b"grpc-status"] == b"0" and by_sid[post]["body"] == frame(b"reply")
    assert sorted(s.path for s in app.seen) == sorted([f"/s{i}" for i in range(10)] + ["/pkg.Svc/Get", "/h1"])
    for seen in app.seen:
        assert seen.headers["x-forwarded-client-cert"].endswith(f"URI={PP_URI}")
    assert re.search(r"http\.downstream_cx_http2_total: 2\b", stats), stats
    # The inbound reporter: mTLS identity, gRPC labels, message counts.
    fams = list(text_string_to_metric_families(prom))
    reqs = [s for f in fams for s in f.samples if s.name == "istio_requests_total"]
    grpc_rows = [s for s in reqs if s.labels["request_protocol"] == "grpc"]
    assert len(grpc_rows) == 1 and grpc_rows[0].value == 1
    labels = grpc_rows[0].labels
    assert labels["reporter"] == "destination" and labels["connection_security_policy"] == "mutual_tls"
    assert labels["source_principal"] == PP_URI and labels["grpc_response_status"] == "0"
    assert sum(s.value for s in reqs if s.labels["request_protocol"] == "http") == 11
    msgs = {s.name: s.value for f in fams for s in f.samples if s.name.endswith("_messages_total")}
    assert msgs == {"istio_request_messages_total": 2, "istio_response_messages_total": 1}, msgs
