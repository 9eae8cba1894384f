"""Access log lines written by the real proxy: Envoy's default format, JSON,
stdout, and escaping of hostile request data."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import aiohttp

from tests.harness import Upstream, raw_request, running_proxy, service_entry
from tests.integration.obs_helpers import wait_for

# Envoy's default format, one field per group.
LINE = re.compile(
    r'\[(?P<start>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z)\] '
    r'"(?P<method>\S+) (?P<path>\S+) (?P<proto>HTTP/1\.[01])" '
    r"(?P<code>\d+) (?P<flags>\S+) (?P<rx>\d+) (?P<tx>\d+) (?P<dur>\d+) (?P<ust>\d+|-) "
    r'"(?P<xff>[^"\\]*(?:\\.[^"\\]*)*)" "(?P<ua>[^"\\]*(?:\\.[^"\\]*)*)" "(?P<rid>[^"]*)" '
    r'"(?P<authority>[^"\\]*(?:\\.[^"\\]*)*)" "(?P<upstream>[^"]*)"$'
)


def lines_of(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


async def test_text_lines_in_envoy_default_format(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    async with Upstream() as up:
        cfg = service_entry("svc", [(up.port, {})])
        with running_proxy(cfg, args=["--access-log", str(log)]) as px:
            async with aiohttp.ClientSession() as s:
                async with s.post(
                    px.outbound_url + "/items?id=7",
                    data=b"x" * 123,
                    headers={
                        "Host": "svc:9080",
                        "User-Agent": "agent/1.0",
                        "X-Forwarded-For": "10.1.2.3",
                        "x-request-id": "rid-42",
                    },
                ) as r:
                    body = await r.read()
                    assert r.status == 200
                async with s.get(px.outbound_url + "/missing", headers={"Host": "nowhere.invalid"}) as r:
                    await r.read()
            await wait_for(lambda: len(lines_of(log)) == 2, timeout=5, what="two access log lines")
    first, second = lines_of(log)
    m = LINE.match(first)
    assert m, first
    assert (m["method"], m["path"], m["proto"], m["code"], m["flags"]) == (
        "POST",
        "/items?id=7",
        "HTTP/1.1",
        "200",
        "-",
    )
    assert (m["rx"], m["tx"]) == ("123", str(len(body)))
    assert m["ust"] != "-" and int(m["dur"]) >= int(m["ust"])
    assert (m["xff"], m["ua"], m["rid"], m["authority"]) == ("10.1.2.3", "agent/1.0", "rid-42", "svc:9080")
    assert m["upstream"] == f"127.0.0.1:{up.port}"
    m2 = LINE.match(second)
    assert m2, second
    # unknown host: passthrough to a name that does not resolve
    assert m2["code"] == "503" and "UF" in m2["flags"] and m2["ust"] == "-" and m2["xff"] == "-"
    assert len(m2["rid"]) == 36  # generated


async def test_hostile_headers_cannot_forge_or_break_lines(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    async with Upstream() as up:
        with running_proxy(service_entry("svc", [(up.port, {})]), args=["--access-log", str(log)]) as px:
            # The HTTP parser already refuses CR, LF and other control bytes in
            # header values; what it lets through (quotes, backslashes, tabs,
            # non-ASCII bytes) must still not reach the log raw.
            evil_ua = b'x" 200 "\t\xc3\xa9\\ "'
            req = (
                b"GET /a%22b HTTP/1.1\r\nHost: svc\r\nUser-Agent: "
                + evil_ua
                + b'\r\nX-Forwarded-For: 1.2.3.4\t"injected\r\n\r\n'
            )
            data = await raw_request(px.outbound, req)
            assert data.startswith(b"HTTP/1.1 200")
            await wait_for(lambda: lines_of(log), timeout=5, what="the access log line")
    raw = log.read_bytes()
    assert raw.count(b"\n") == 1 and raw.endswith(b"\n")
    assert all(32 <= c < 127 for c in raw[:-1]), raw  # printable ASCII only
    line = raw.decode().rstrip("\n")
    m = LINE.match(line)
    assert m, line
    assert m["ua"] == 'x\\" 200 \\"\\x09\\xc3\\xa9\\\\ \\"'
    assert m["xff"] == '1.2.3.4\\x09\\"injected'
    assert m["path"] == "/a%22b" and m["code"] == "200"


async def test_json_format_and_stdout(tmp_path: Path) -> None:
    async with Upstream() as up:
        with running_proxy(
            service_entry("svc", [(up.port, {})]), args=["--access-log", "-", "--access-log-format", "json"]
        ) as px:
            data = await raw_request(
                px.outbound, b'GET /j?q=1 HTTP/1.1\r\nHost: svc\r\nUser-Agent: a"\xc3\xa9\\b\tc\xff\r\n\r\n'
            )
            assert data.startswith(b"HTTP/1.1 200")

            def logged() -> list[dict]:
                out = []
                for line in px.log().splitlines():
                    if line.startswith("{"):
                        out.append(json.loads(line))
                return out

            docs = await wait_for(logged, timeout=5, what="a JSON access log line on stdout")
    doc = docs[0]
    assert doc["method"] == "GET" and doc["path"] == "/j?q=1" and doc["protocol"] == "HTTP/1.1"
    assert doc["response_code"] == 200 and doc["response_flags"] == "-"
    assert doc["user_agent"] == 'a"\u00e9\\b\tc\\xff'
    assert doc["upstream_cluster"] == "outbound|9080||svc.default.svc.cluster.local"
    assert doc["upstream_host"] == f"127.0.0.1:{up.port}" and isinstance(doc["duration"], int)
    assert doc["x_forwarded_for"] is None and len(doc["request_id"]) == 36
    assert set(doc) == {
        "start_time",
        "method",
        "path",
        "protocol",
        "response_code",
        "response_flags",
        "bytes_received",
        "bytes_sent",
        "duration",
        "upstream_service_time",
        "x_forwarded_for",
        "user_agent",
        "request_id",
        "authority",
        "upstream_host",
        "upstream_cluster",
        "rbac_policy",
        "request_auth_principal",
        "downstream_peer_uri_san",
        "upstream_peer_uri_san",
    }


async def test_access_log_lines_are_flushed_on_shutdown(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    async with Upstream() as up:
        with running_proxy(service_entry("svc", [(up.port, {})]), args=["--access-log", str(log)]) as px:
            async with aiohttp.ClientSession() as s:
                for _ in range(30):
                    async with s.get(px.outbound_url + "/", headers={"Host": "svc"}) as r:
                        assert r.status == 200
            px.stop()
            assert px.process.returncode == 0
    assert len(lines_of(log)) == 30


async def test_missing_log_directory_refuses_to_start(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.harness import ROOT

    cfg = tmp_path / "mesh.yaml"
    cfg.write_text(service_entry("svc", [(1, {})]))
    proc = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-m",
            "pyproxy",
            "run",
            "--config",
            str(cfg),
            "--outbound",
            "127.0.0.1:0",
            "--inbound",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--stats",
            "127.0.0.1:0",
            "--access-log",
            str(tmp_path / "nope" / "access.log"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert proc.returncode != 0
    assert "access log directory" in proc.stderr


async def test_requests_refused_before_routing_get_a_line_with_flag_dpe(tmp_path: Path) -> None:
    """As Envoy: a request the codec refuses (malformed, or over a header
    limit) still gets an access log line, with what was parsed and flag DPE."""
    log = tmp_path / "access.log"
    async with Upstream() as up:
        with running_proxy(service_entry("svc", [(up.port, {})]), args=["--access-log", str(log)]) as px:
            bad_header = await raw_request(px.outbound, b"GET /p?q=1 HTTP/1.1\r\nHost: svc\r\nBad Name: x\r\n\r\n",
                                           until_close=True)
            assert bad_header.startswith(b"HTTP/1.1 400")
            garbage = await raw_request(px.outbound, b"\x01\x02 nonsense\r\n\r\n", until_close=True)
            assert garbage.startswith(b"HTTP/1.1 400")
            too_long = await raw_request(px.outbound, b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: svc\r\n\r\n",
                                         until_close=True)
            assert too_long.startswith(b"HTTP/1.1 414")
            ok = await raw_request(px.outbound, b"GET /fine HTTP/1.1\r\nHost: svc\r\n\r\n")
            assert ok.startswith(b"HTTP/1.1 200")
            await wait_for(lambda: len(lines_of(log)) >= 4, timeout=5, what="four access log lines")
    lines = lines_of(log)
    assert len(lines) == 4 and len(up.seen) == 1, lines  # only the good request went upstream
    parsed = [LINE.match(line) for line in lines]
    assert all(parsed), lines
    got = sorted((m["code"], m["flags"], m["method"], m["path"][:8]) for m in parsed if m)
    assert got == [("200", "-", "GET", "/fine"),
                   ("400", "DPE", "-", "-"),  # nothing of the request line was usable
                   ("400", "DPE", "GET", "/p?q=1"),
                   ("414", "DPE", "-", "-")], lines  # the target was refused while it was read
