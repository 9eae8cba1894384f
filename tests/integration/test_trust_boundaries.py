"""Trust boundaries (issue 8 §3): Envoy control headers from outside the
mesh, log forging through request data, and the admin API's loopback rule."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from aiohttp import web

from pyproxy.observability.peer import PeerInfo, encode_peer
from tests.harness import ROOT, Upstream, raw_request, running_proxy, service_entry
from tests.integration.hardening_helpers import access_log_lines

CONTROL = {
    "x-envoy-retry-on": "5xx,reset",
    "x-envoy-max-retries": "5",
    "x-envoy-upstream-rq-timeout-ms": "1",
    "x-envoy-upstream-rq-per-try-timeout-ms": "1",
    "x-envoy-fault-abort-request": "503",
    "x-envoy-fault-abort-request-percentage": "100",
    "x-envoy-fault-delay-request": "2000",
    "x-envoy-internal": "true",
}


def _request(path: str, headers: dict[str, str]) -> bytes:
    lines = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return f"GET {path} HTTP/1.1\r\nHost: app\r\n{lines}\r\n".encode()


async def test_control_headers_from_outside_the_mesh_are_stripped_inbound() -> None:
    async with Upstream("app") as app:
        with running_proxy("", app_port=app.port) as px:
            # A caller without a sidecar: no peer metadata.
            out = await raw_request(px.inbound, _request("/external", CONTROL))
            # A caller with a sidecar (valid peer metadata): passed on.
            meta = encode_peer(PeerInfo(workload="caller", namespace="default")).decode()
            mesh = await raw_request(px.inbound, _request("/mesh", {**CONTROL, "x-pyproxy-peer-metadata": meta}))
            # Invalid metadata counts as outside the mesh.
            bad = await raw_request(px.inbound, _request("/bad", {**CONTROL, "x-pyproxy-peer-metadata": "!!"}))
    for data in (out, mesh, bad):
        # Neither the fault headers nor the timeouts changed anything.
        assert data.startswith(b"HTTP/1.1 200"), data[:200]
    by_path = {s.path: s.headers for s in app.seen}
    for path in ("/external", "/bad"):
        leaked = [h for h in CONTROL if h in by_path[path]]
        assert not leaked, (path, leaked)
    assert all(by_path["/mesh"].get(h) == v for h, v in CONTROL.items()), by_path["/mesh"]
    # Peer metadata never reaches the application.
    assert not any(h.startswith("x-pyproxy-peer") for seen in by_path.values() for h in seen)


async def test_control_headers_from_the_application_are_not_honoured_outbound() -> None:
    calls = 0

    async def handler(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        if request.path == "/slow":
            await asyncio.sleep(0.5)
            return web.Response(text="slow ok")
        return web.Response(status=503, text="down")

    async with Upstream(handler=handler) as up:
        vs = """---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: svc}
spec:
  hosts: [svc]
  http:
  - route: [{destination: {host: svc}}]
    retries: {attempts: 0}
"""
        with running_proxy(service_entry("svc", [(up.port, {})]) + vs) as px:
            headers = {**CONTROL, "Host": "svc"}
            lines = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
            failing = await raw_request(px.outbound, f"GET /fail HTTP/1.1\r\n{lines}\r\n".encode())
            slow = await raw_request(px.outbound, f"GET /slow HTTP/1.1\r\n{lines}\r\n".encode())
    assert failing.startswith(b"HTTP/1.1 503") and failing.endswith(b"down")  # not retried, not faulted
    assert slow.startswith(b"HTTP/1.1 200") and slow.endswith(b"slow ok")  # no 1 ms timeout
    assert calls == 2
    # Outbound, the application's headers go on to the destination's proxy.
    assert up.seen[0].headers["x-envoy-retry-on"] == "5xx,reset"


# What llhttp lets through in a header value (it refuses CR, LF, NUL, ESC,
# DEL and other control characters): quotes, backslashes, tabs, obs-text.
HOSTILE_UA = 'evil" "forged-field\\ [31mred \t caf\xe9 \xff'


async def test_request_data_cannot_forge_or_break_access_log_lines(tmp_path) -> None:
    text_log = tmp_path / "access.log"
    async with Upstream() as up:
        with running_proxy(service_entry("svc", [(up.port, {})]), args=["--access-log", str(text_log)]) as px:
            sent = 0
            for req in (
                b"GET /a%0d%0aforged HTTP/1.1\r\nHost: svc\r\nUser-Agent: " + HOSTILE_UA.encode("latin-1")
                + b"\r\nX-Request-Id: id\"\\x\r\n\r\n",
                b"GET /quote\"path HTTP/1.1\r\nHost: svc\r\nX-Forwarded-For: 1.2.3.4\" \"5.6.7.8\r\n\r\n",
                b"GET /b HTTP/1.1\r\nHost: svc\r\nUser-Agent: \xff\xfe\x80\r\n\r\n",
            ):
                data = await raw_request(px.outbound, req)
                assert data.startswith(b"HTTP/1.1 "), data[:100]  # forwarded and answered
                sent += 1
            # CR, LF or other control characters inside a header are refused by
            # the parser: the request gets a line of its own (flag DPE, as
            # Envoy logs codec errors) that carries none of those bytes.
            for req in (b"GET / HTTP/1.1\r\nHost: svc\r\nUser-Agent: a\rb\r\n\r\n",
                        b"GET / HTTP/1.1\r\nHost: svc\r\nUser-Agent: a\nfake line\r\n\r\n",
                        b"GET / HTTP/1.1\r\nHost: svc\r\nUser-Agent: \x1b[31mred\r\n\r\n"):
                data = await raw_request(px.outbound, req, until_close=True)
                assert data.startswith(b"HTTP/1.1 400")
            lines = await access_log_lines(text_log, at_least=sent + 3)
            await asyncio.sleep(0.5)
            raw = text_log.read_bytes()
    assert len(lines) == sent + 3, lines
    assert raw.count(b"\n") == sent + 3
    assert all('"GET / HTTP/1.1" 400 DPE ' in line and '"-" "-" "-" "svc"' in line for line in lines[sent:]), lines
    # Only printable ASCII in the file; the hostile bytes are escaped.
    assert all(0x20 <= b < 0x7F for b in raw.replace(b"\n", b"")), raw
    assert '\\"' in lines[0] and "\\\\" in lines[0]
    assert "\\xe9" in lines[0] and "\\x09" in lines[0] and "\\xff" in lines[0]
    assert '"GET /a%0d%0aforged HTTP/1.1"' in lines[0]
    # Every line still has Envoy's quoting: 6 quoted fields after the status.
    for line in lines:
        unescaped_quotes = line.replace('\\"', "").count('"')
        assert unescaped_quotes == 12, line


async def test_json_access_log_round_trips_hostile_values(tmp_path) -> None:
    log = tmp_path / "access.json"
    async with Upstream() as up:
        cfg = service_entry("svc", [(up.port, {})])
        with running_proxy(cfg, args=["--access-log", str(log), "--access-log-format", "json"]) as px:
            req = b"GET /j HTTP/1.1\r\nHost: svc\r\nUser-Agent: " + HOSTILE_UA.encode("latin-1") + b"\r\n\r\n"
            assert (await raw_request(px.outbound, req)).startswith(b"HTTP/1.1 200")
            lines = await access_log_lines(log)
    assert len(lines) == 1
    assert all(0x20 <= b < 0x7F for b in lines[0].encode())
    doc = json.loads(lines[0])
    # Valid UTF-8 as is, other bytes as \xNN: quotes and tabs are JSON's business.
    assert doc["user_agent"] == 'evil" "forged-field\\ [31mred \t caf\\xe9 \\xff'


# -- admin on a non-loopback address, from another network namespace -------------

def _have_netns() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    if shutil.which("ip") is None:
        return "needs iproute2"
    return None


def _sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=20)


CLIENT = r'''
import sys, urllib.request, urllib.error
method, url = sys.argv[1], sys.argv[2]
req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
try:
    with urllib.request.urlopen(req, timeout=5) as r:
        print(r.status)
except urllib.error.HTTPError as e:
    print(e.code)
'''


@pytest.mark.netns
def test_admin_mutations_refused_to_non_loopback_callers_even_when_bound_wide() -> None:
    reason = _have_netns()
    if reason:
        pytest.skip(reason)
    p = f"pyh{os.getpid() % 100000}"
    ns_proxy, ns_client = f"{p}-px", f"{p}-cl"
    config_dir = Path(tempfile.mkdtemp(prefix="pyproxy-admin-"))
    (config_dir / "mesh.yaml").write_text(service_entry("svc", [(1, {})]))
    proc = None
    try:
        _sh("ip", "netns", "add", ns_proxy)
        _sh("ip", "netns", "add", ns_client)
        _sh("ip", "link", "add", f"{p}a", "type", "veth", "peer", "name", f"{p}b")
        _sh("ip", "link", "set", f"{p}a", "netns", ns_proxy)
        _sh("ip", "link", "set", f"{p}b", "netns", ns_client)
        _sh("ip", "-n", ns_proxy, "addr", "add", "198.18.0.21/24", "dev", f"{p}a")
        _sh("ip", "-n", ns_client, "addr", "add", "198.18.0.22/24", "dev", f"{p}b")
        for ns, dev in ((ns_proxy, f"{p}a"), (ns_client, f"{p}b")):
            _sh("ip", "-n", ns, "link", "set", dev, "up")
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        with open(config_dir / "proxy.log", "wb") as log:  # the child keeps its own descriptor
            proc = subprocess.Popen(
                ["ip", "netns", "exec", ns_proxy, sys.executable, "-m", "pyproxy", "run", "--config", str(config_dir),
                 "--admin", "0.0.0.0:15000", "--stats", "127.0.0.1:15090", "--outbound", "127.0.0.1:15001",
                 "--inbound", "127.0.0.1:15006"], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))

        def call(ns: str, method: str, url: str) -> int:
            out = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", CLIENT, method, url],
                                 capture_output=True, text=True, timeout=20, check=False)
            return int(out.stdout.strip() or 0)

        deadline = time.monotonic() + 20
        while call(ns_proxy, "GET", "http://127.0.0.1:15000/ready") != 200:
            assert proc.poll() is None, (config_dir / "proxy.log").read_text()
            assert time.monotonic() < deadline, "proxy not ready"
            time.sleep(0.2)
        wide = "http://198.18.0.21:15000"
        # Reads are served to anyone who can reach the port...
        assert call(ns_client, "GET", wide + "/ready") == 200
        assert call(ns_client, "GET", wide + "/server_info") == 200
        # ...mutations only to loopback callers.
        for path in ("/quitquitquit", "/healthcheck/fail", "/drain_listeners", "/reload", "/logging?level=debug"):
            assert call(ns_client, "POST", wide + path) == 403, path
        assert proc.poll() is None
        assert call(ns_client, "GET", wide + "/ready") == 200  # nothing was failed or drained
        assert call(ns_proxy, "POST", "http://127.0.0.1:15000/healthcheck/fail") == 200
        assert call(ns_client, "GET", wide + "/ready") == 503
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        for ns in (ns_proxy, ns_client):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20, check=False)
        shutil.rmtree(config_dir, ignore_errors=True)


def test_admin_binds_loopback_by_default() -> None:
    from pyproxy.cli import build_parser, parse_run_options

    _, run = build_parser()
    opts = parse_run_options(run.parse_args(["--config", "x"]), environ={})
    assert opts.admin.host == "127.0.0.1"
