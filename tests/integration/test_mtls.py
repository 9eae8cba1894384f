"""Workload certificates and mutual TLS with real proxies, real sockets and
real TLS (stdlib ssl, certificates from pyproxy's own CA)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import io
import json
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


async def test_istio_mutual_between_two_sidecars(creds: dict[str, Path], tmp_path: Path) -> None:
    json_log = ["--access-log-format", "json", "--access-log"]
    async with Upstream("reviews") as app:
        with running_proxy(MESH + strict(), app_port=app.port,
                           args=["--certs", str(creds["bookinfo-reviews"]), "--labels", "app=reviews,version=v1",
                                 *json_log, str(tmp_path / "server.log")]) as server:
            with running_proxy(reviews_entry(server.inbound), args=[
                    "--certs", str(creds["bookinfo-productpage"]), "--labels", "app=productpage,version=v1",
                    *json_log, str(tmp_path / "client.log")]) as client:
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
    # Envoy's %DOWNSTREAM_PEER_URI_SAN% / %UPSTREAM_PEER_URI_SAN% in the access logs.
    for side, key, uri in (("server", "downstream_peer_uri_san", PP_URI), ("client", "upstream_peer_uri_san", REVIEWS_URI)):
        path = tmp_path / f"{side}.log"
        deadline = time.monotonic() + 10
        while len(path.read_text().splitlines() if path.exists() else []) < 3:
            assert time.monotonic() < deadline, side
            await asyncio.sleep(0.1)
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        assert [line[key] for line in lines] == [uri] * 3, lines


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


# -- TLS origination (SIMPLE) ------------------------------------------------------------------------


def _server_cert(ca_dir: Path, out: Path, dns: str) -> None:
    """A plain TLS server certificate for ``dns`` from the test CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    from pyproxy.security.ca import cert_pem, key_pem, load_ca, new_key

    loaded = load_ca(ca_dir)
    key = new_key("ec")
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns)]))
            .issuer_name(loaded.cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(dns)]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(loaded.key, hashes.SHA256()))
    out.mkdir(parents=True, exist_ok=True)
    (out / "cert.pem").write_bytes(cert_pem(cert) + loaded.chain_pem)
    (out / "key.pem").write_bytes(key_pem(key))


@pytest.mark.parametrize("case", ["ok", "system-roots", "wrong-host", "insecure"])
async def test_simple_tls_origination(ca: Path, tmp_path: Path, case: str) -> None:
    """Istio's Egress TLS Origination task, locally: the app sends plain HTTP
    to port 80, the sidecar speaks TLS to the endpoint (targetPort), SNI and
    the hostname check from the destination host, roots from caCertificates
    (or the system's, which do not know the test CA)."""
    cert_host = "other.example.test" if case == "wrong-host" else "api.example.test"
    _server_cert(ca, tmp_path / "server", cert_host)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(tmp_path / "server" / "cert.pem", tmp_path / "server" / "key.pem")
    seen_sni: list[str | None] = []
    server_ctx.sni_callback = lambda obj, name, ctx: seen_sni.append(name)  # type: ignore[assignment,misc,func-returns-value]
    tls = {"ok": f"{{mode: SIMPLE, caCertificates: {ca / 'root-cert.pem'}}}",
           "system-roots": "{mode: SIMPLE}",
           "wrong-host": f"{{mode: SIMPLE, caCertificates: {ca / 'root-cert.pem'}}}",
           "insecure": "{mode: SIMPLE, insecureSkipVerify: true}"}[case]
    from aiohttp import web

    runner_app = web.Application()

    async def handler(request: web.Request) -> web.Response:
        return web.Response(text=f"tls={request.secure} host={request.host}")

    runner_app.router.add_get("/{tail:.*}", handler)
    runner = web.AppRunner(runner_app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ctx)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    config = f"""
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: api, namespace: default}}
spec:
  hosts: [api.example.test]
  ports: [{{number: 80, name: http-port, protocol: HTTP, targetPort: {port}}}]
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: api, namespace: default}}
spec:
  host: api.example.test
  trafficPolicy:
    portLevelSettings:
    - port: {{number: 80}}
      tls: {tls}
"""
    try:
        with running_proxy(config) as proxy:
            data = await raw_request(proxy.outbound, _get("api.example.test", "/politics"))
            stats = http_get(proxy.admin_url + "/stats")[1].decode()
    finally:
        await runner.cleanup()
    if case in ("ok", "insecure"):
        assert data.startswith(b"HTTP/1.1 200"), data[:300]
        assert data.endswith(b"tls=True host=api.example.test")
        assert seen_sni and set(seen_sni) == {"api.example.test"}
        assert "ssl.handshake: 1" in stats
    else:
        assert data.startswith(b"HTTP/1.1 503"), data[:300]  # UF: the certificate is not trusted / not for the host
        assert "ssl.handshake: 0" in stats and "ssl.fail_verify_error: 3" in stats


# -- hostile clients against the inbound TLS inspector ----------------------------------------------


def _client_hello() -> bytes:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["istio-http/1.1", "istio", "http/1.1"])
    obj = ctx.wrap_bio(ssl.MemoryBIO(), out := ssl.MemoryBIO(), server_hostname="x")
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


async def _closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    """The server closed (EOF or reset) the connection within ``seconds``."""
    try:
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), seconds)
            if not chunk:
                return True
    except (ConnectionError, OSError):
        return True
    except TimeoutError:
        return False


async def test_hostile_handshakes_are_cut_and_others_served(creds: dict[str, Path]) -> None:
    async with Upstream("reviews") as app:
        with running_proxy(MESH + strict(), app_port=app.port,
                           args=["--certs", str(creds["bookinfo-reviews"]), "--request-header-timeout", "1"]
                           ) as server:
            with running_proxy(reviews_entry(server.inbound),
                               args=["--certs", str(creds["bookinfo-productpage"])]) as client:
                hello = _client_hello()
                opened = []
                for _ in range(4):
                    opened.append(await asyncio.open_connection("127.0.0.1", server.inbound))
                silent, trickle, oversize, hugehello = opened
                # An oversized TLS record (over 2^14 + 2048 bytes) and a ClientHello claiming 1 MiB.
                oversize[1].write(b"\x16\x03\x01\xff\xff" + b"\x00" * 100)
                hugehello[1].write(b"\x16\x03\x01\x40\x00\x01\x10\x00\x00" + b"\x00" * 100)
                # A ClientHello trickled a byte at a time while a mesh client is served.
                served = []
                for i, byte in enumerate(hello[:200]):
                    trickle[1].write(bytes([byte]))
                    await asyncio.sleep(0.002)
                    if i % 50 == 0:
                        served.append(await raw_request(client.outbound, _get(REVIEWS, f"/during{i}")))
                assert await _closed_within(oversize[0], 5)
                assert await _closed_within(hugehello[0], 5)
                # The silent one and the one whose hello never completes are cut by the
                # header timeout (1 s); the proxy keeps serving meanwhile.
                assert await _closed_within(silent[0], 5)
                assert await _closed_within(trickle[0], 5)
                served.append(await raw_request(client.outbound, _get(REVIEWS, "/after")))
                for _, w in opened:
                    w.close()
                stats = http_get(server.admin_url + "/stats")[1].decode()
    assert all(r.startswith(b"HTTP/1.1 200") for r in served), [r[:100] for r in served]
    assert [s.path for s in app.seen] == ["/during0", "/during50", "/during100", "/during150", "/after"]
    assert "downstream_pre_cx_timeout: 2" in stats
    assert "tls_inspector.client_hello_too_large: 1" in stats
    assert "no_filter_chain_match: 1" in stats  # the oversized record is not TLS to the inspector


async def test_never_finished_handshake_is_cut(creds: dict[str, Path]) -> None:
    """A complete ClientHello, then silence: the handshake timeout (the
    header timeout) closes it."""
    async with Upstream("reviews"):
        with running_proxy(MESH + strict(), args=["--certs", str(creds["bookinfo-reviews"]),
                                                  "--request-header-timeout", "1"]) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.inbound)
            writer.write(_client_hello())
            assert await _closed_within(reader, 5)
            writer.close()
            stats = http_get(server.admin_url + "/stats")[1].decode()
    assert "downstream_pre_cx_timeout: 1" in stats and "ssl.handshake: 0" in stats


# -- rotation under load ------------------------------------------------------------------------------


async def test_rotation_under_load_fails_nothing(ca: Path, tmp_path: Path) -> None:
    """Both sidecars' certificates are re-issued several times while requests
    flow (one new mTLS connection per request): every request succeeds and
    later handshakes present the new certificates."""
    for sa in ("bookinfo-productpage", "bookinfo-reviews"):
        issue_to_dir(ca, tmp_path / sa, "default", sa)
    pool = f"""---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: reviews, namespace: default}}
spec:
  host: {REVIEWS}
  trafficPolicy: {{connectionPool: {{http: {{maxRequestsPerConnection: 1}}}}}}
"""
    results: list[bytes] = []
    async with Upstream("reviews") as app:
        with running_proxy(MESH + strict(), app_port=app.port,
                           args=["--certs", str(tmp_path / "bookinfo-reviews"), "--watch-interval", "0.1"]) as server:
            with running_proxy(reviews_entry(server.inbound, pool), args=[
                    "--certs", str(tmp_path / "bookinfo-productpage"), "--watch-interval", "0.1"]) as client:
                stop = asyncio.Event()

                async def load() -> None:
                    i = 0
                    while not stop.is_set():
                        results.append(await raw_request(client.outbound, _get(REVIEWS, f"/{i}")))
                        i += 1

                loaders = [asyncio.create_task(load()) for _ in range(4)]
                for _ in range(3):
                    await asyncio.sleep(0.4)
                    issue_to_dir(ca, tmp_path / "bookinfo-productpage", "default", "bookinfo-productpage")
                    issue_to_dir(ca, tmp_path / "bookinfo-reviews", "default", "bookinfo-reviews")
                await asyncio.sleep(0.6)
                stop.set()
                await asyncio.gather(*loaders)
                client_stats = http_get(client.stats_url + "/stats/prometheus")[1].decode()
    failed = [r[:120] for r in results if not r.startswith(b"HTTP/1.1 200")]
    assert len(results) > 20 and failed == [], failed
    hashes = {s.headers["x-forwarded-client-cert"].split(";")[1] for s in app.seen}
    assert len(hashes) >= 3  # the client's new certificates were presented
    assert 'pyproxy_workload_cert_reloads_total{result="success"} 3.0' in client_stats


# -- large bodies and WebSocket over mTLS -------------------------------------------------------------


async def test_large_bodies_and_websocket_over_mtls(creds: dict[str, Path]) -> None:
    """Flow control and tunnels are the same over TLS: an 8 MiB upload and an
    8 MiB download through two sidecars, and a WebSocket echo."""
    import aiohttp
    from aiohttp import web

    big = bytes(range(256)) * (8 * 4096)  # 8 MiB

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.path == "/ws":
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            async for msg in ws:
                await ws.send_str("echo:" + msg.data)
            return ws
        if request.method == "POST":
            body = await request.read()
            return web.Response(text=f"{len(body)} {hashlib.sha256(body).hexdigest()}")
        return web.Response(body=big)

    async with Upstream("reviews", handler=handler, record_body=False) as app:
        with running_proxy(MESH + strict(), app_port=app.port,
                           args=["--certs", str(creds["bookinfo-reviews"])]) as server:
            with running_proxy(reviews_entry(server.inbound),
                               args=["--certs", str(creds["bookinfo-productpage"])]) as client:
                async with aiohttp.ClientSession() as s:
                    url = f"http://127.0.0.1:{client.outbound}"
                    async with s.post(url + "/upload", data=io.BytesIO(big), headers={"Host": REVIEWS}) as r:
                        assert r.status == 200
                        assert await r.text() == f"{len(big)} {hashlib.sha256(big).hexdigest()}"
                    async with s.get(url + "/download", headers={"Host": REVIEWS}) as r:
                        assert r.status == 200 and await r.read() == big
                    async with s.ws_connect(url + "/ws", headers={"Host": REVIEWS}) as ws:
                        for i in range(3):
                            await ws.send_str(f"m{i}")
                            msg = await asyncio.wait_for(ws.receive(), 5)
                            assert msg.data == f"echo:m{i}"
                stats = http_get(server.admin_url + "/stats")[1].decode()
    # Everything went over mTLS connections between the sidecars.
    assert re.search(r"^ssl\.handshake: [1-9]", stats, re.MULTILINE) and "no_filter_chain_match: 0" in stats


async def test_authorization_policy_principals_match_the_mtls_identity(creds: dict[str, Path]) -> None:
    """AuthorizationPolicy `principals` see the client certificate's identity
    (Istio's source.principal): productpage is allowed, another workload's
    sidecar and a plaintext caller are denied."""
    policy = """---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: reviews-viewer, namespace: default}
spec:
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/default/sa/bookinfo-productpage"]}}]
"""
    async with Upstream("reviews") as app:
        with running_proxy(MESH + policy, app_port=app.port,
                           args=["--certs", str(creds["bookinfo-reviews"])]) as server:
            with running_proxy(reviews_entry(server.inbound),
                               args=["--certs", str(creds["bookinfo-productpage"])]) as allowed, \
                    running_proxy(reviews_entry(server.inbound),
                                  args=["--certs", str(creds["bookinfo-reviews"])]) as other:
                ok = await raw_request(allowed.outbound, _get(REVIEWS, "/allowed"))
                denied = await raw_request(other.outbound, _get(REVIEWS, "/other-identity"))
                plain = await raw_request(server.inbound, _get(REVIEWS, "/plaintext"))
    assert ok.startswith(b"HTTP/1.1 200"), ok[:200]
    assert denied.startswith(b"HTTP/1.1 403") and denied.endswith(b"RBAC: access denied"), denied[-200:]
    assert plain.startswith(b"HTTP/1.1 403"), plain[:200]
    assert [s.path for s in app.seen] == ["/allowed"]
