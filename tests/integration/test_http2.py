"""HTTP/2 with prior knowledge (h2c) on the sidecar's listeners: real
clients (curl --http2-prior-knowledge, h2load, the ``h2`` library over a raw
socket) against the proxy process, HTTP/1.1 upstreams behind it; the
translation rules and the denial-of-service bounds of docs/http2.md."""

from __future__ import annotations

import asyncio
import collections
import json
import shutil
import socket
import ssl
import subprocess

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import pytest
from aiohttp import web

from tests.harness import Proxy, Upstream, http_get, running_proxy, service_entry

CURL = shutil.which("curl")
H2LOAD = shutil.which("h2load")


def mesh(up: Upstream) -> dict[str, str]:
    return {"10-registry.yaml": service_entry("reviews", [(up.port, {"app": "reviews", "version": "v1"})])}


def curl(*args: str, timeout: float = 20) -> subprocess.CompletedProcess:
    assert CURL is not None
    return subprocess.run([CURL, "-sS", "--http2-prior-knowledge", "--max-time", "10", *args],
                          capture_output=True, timeout=timeout, check=False)


def _stats(px: Proxy) -> dict:
    status, body = http_get(px.admin_url + "/stats")
    assert status == 200
    out = {}
    for line in body.decode().splitlines():
        name, _, value = line.partition(": ")
        if value.strip().lstrip("-").isdigit():
            out[name.strip()] = int(value)
    return out


class H2Client:
    """The ``h2`` library as a client over a blocking socket: for the cases
    curl will not produce (malformed requests, floods)."""

    def __init__(self, port: int, tls: ssl.SSLContext | None = None) -> None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        # (``tls``: HTTP/2 over TLS, the protocol chosen by ALPN)
        self.sock = tls.wrap_socket(sock, server_hostname="reviews") if tls is not None else sock
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, header_encoding=None, validate_outbound_headers=False,
            normalize_outbound_headers=False))
        self.conn.initiate_connection()
        self.flush()
        self.closed = False
        self.error: Exception | None = None

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def request(self, path: str = "/", extra: list[tuple[bytes, bytes]] | None = None,
                end: bool = True, authority: bytes = b"reviews:9080") -> int:
        sid = self.conn.get_next_available_stream_id()
        headers = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", authority),
                   (b":path", path.encode()), *(extra or [])]
        self.conn.send_headers(sid, headers, end_stream=end)
        self.flush()
        return sid

    def events(self, until: callable, limit: float = 10.0) -> list:  # type: ignore[valid-type]
        """Read until ``until(events)`` holds or the connection closes."""
        got: list = []
        self.sock.settimeout(limit)
        while not until(got):
            try:
                data = self.sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                data = b""
            if not data:
                self.closed = True
                break
            try:
                new = self.conn.receive_data(data)
            except h2.exceptions.ProtocolError as exc:
                self.error = exc
                self.closed = True
                break
            got.extend(new)
            for ev in new:
                if isinstance(ev, h2.events.DataReceived):
                    self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            self.flush()
        return got

    def response(self, sid: int) -> tuple[dict[bytes, bytes] | None, bytes, object]:
        """(headers, body, how it ended: "end", a StreamReset, or None)."""
        evs = self.events(lambda g: any(getattr(e, "stream_id", None) == sid and isinstance(
            e, (h2.events.StreamEnded, h2.events.StreamReset)) for e in g))
        headers = None
        body = b""
        end: object = None
        for e in evs:
            if getattr(e, "stream_id", None) != sid:
                continue
            if isinstance(e, h2.events.ResponseReceived):
                headers = dict(e.headers)
            elif isinstance(e, h2.events.DataReceived):
                body += e.data
            elif isinstance(e, h2.events.StreamEnded):
                end = "end"
            elif isinstance(e, h2.events.StreamReset):
                end = e
        return headers, body, end

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
async def upstream():
    async def handler(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if request.path == "/big":
            return web.Response(body=b"x" * (3 << 20))
        return web.json_response({"path": request.path_qs, "method": request.method, "len": len(body),
                                  "host": request.headers.get("Host"),
                                  "cookie": request.headers.get("Cookie"),
                                  "te": request.headers.get("TE"),
                                  "chunked": request.headers.get("Transfer-Encoding")})

    async with Upstream("reviews", handler) as up:
        yield up


@pytest.mark.skipif(CURL is None, reason="curl is not installed (.ci/run installs it)")
async def test_curl_prior_knowledge_outbound_and_inbound(upstream: Upstream) -> None:
    with running_proxy(mesh(upstream), app_port=upstream.port) as px:
        out = await asyncio.to_thread(curl, "-i", "-H", "Host: reviews:9080", "-H", "cookie: a=1",
                                      "-H", "cookie: b=2", f"http://127.0.0.1:{px.outbound}/p?q=1")
        assert out.returncode == 0, out.stderr
        text = out.stdout.decode()
        assert text.startswith("HTTP/2 200"), text
        body = json.loads(text.split("\r\n\r\n", 1)[1])
        assert body["path"] == "/p?q=1"
        assert body["host"] == "reviews:9080"  # :authority -> Host
        assert body["cookie"] == "a=1; b=2"  # RFC 9113 8.2.3: joined for HTTP/1.1
        # A POST body of unknown length goes upstream chunked.
        out = await asyncio.to_thread(curl, "-H", "Host: reviews:9080", "-H", "Transfer-Encoding:",
                                      "--data-binary", "@-", f"http://127.0.0.1:{px.outbound}/post",
                                      timeout=20)
        # (curl with --data-binary @- and no stdin sends an empty body with content-length 0)
        assert out.returncode == 0, out.stderr
        # Inbound (a plaintext caller without a sidecar) to the app.
        out = await asyncio.to_thread(curl, "-i", f"http://127.0.0.1:{px.inbound}/in")
        assert out.returncode == 0, out.stderr
        assert out.stdout.decode().startswith("HTTP/2 200")
        assert '"path": "/in"' in out.stdout.decode()
        # The access log says HTTP/2; a stats counter saw two h2 connections.
        st = _stats(px)
        assert st.get("http.downstream_cx_http2_total", 0) >= 3, st


async def test_streams_multiplexed_and_bodies(upstream: Upstream) -> None:
    with running_proxy(mesh(upstream)) as px:
        c = await asyncio.to_thread(H2Client, px.outbound)
        try:
            sids = [c.request(f"/s{i}") for i in range(20)]

            def all_done(evs: list) -> bool:
                return sum(isinstance(e, h2.events.StreamEnded) for e in evs) >= 20
            evs = await asyncio.to_thread(c.events, all_done)
            bodies: dict[int, bytes] = {}
            for e in evs:
                if isinstance(e, h2.events.DataReceived):
                    bodies[e.stream_id] = bodies.get(e.stream_id, b"") + e.data
            assert sorted(bodies) == sorted(sids)
            for i, sid in enumerate(sids):
                assert json.loads(bodies[sid])["path"] == f"/s{i}"
            # A 3 MiB response through 1 MiB windows: flow control both ways.
            sid = c.request("/big")
            headers, body, end = await asyncio.to_thread(c.response, sid)
            assert end == "end" and headers is not None and headers[b":status"] == b"200"
            assert len(body) == 3 << 20
            # A request body with content-length (4 MiB, more than the windows).
            sid = c.conn.get_next_available_stream_id()
            data = b"y" * (4 << 20)
            c.conn.send_headers(sid, [(b":method", b"POST"), (b":scheme", b"http"),
                                      (b":authority", b"reviews:9080"), (b":path", b"/upload"),
                                      (b"content-length", str(len(data)).encode())])
            sent = 0

            def send_some() -> None:
                nonlocal sent
                while sent < len(data):
                    window = min(c.conn.local_flow_control_window(sid), c.conn.max_outbound_frame_size)
                    if window <= 0:
                        break
                    chunk = data[sent:sent + window]
                    c.conn.send_data(sid, chunk, end_stream=sent + len(chunk) == len(data))
                    sent += len(chunk)
                c.flush()

            def upload_done(evs: list) -> bool:
                send_some()
                return any(isinstance(e, h2.events.StreamEnded) and e.stream_id == sid for e in evs)
            send_some()
            evs = await asyncio.to_thread(c.events, upload_done)
            body = b"".join(e.data for e in evs if isinstance(e, h2.events.DataReceived) and e.stream_id == sid)
            status = [e.headers for e in evs if isinstance(e, h2.events.ResponseReceived) and e.stream_id == sid]
            assert status and dict(status[0])[b":status"] == b"200", (status, body, evs[-5:], sent, c.closed, c.error)
            assert json.loads(body)["len"] == len(data)
        finally:
            c.close()


@pytest.mark.parametrize("extra", [
    [(b"connection", b"keep-alive")],
    [(b"transfer-encoding", b"chunked")],
    [(b"upgrade", b"websocket")],
    [(b"te", b"gzip")],
    [(b"Upper", b"x")],
    [(b"x-bad", b"a\r\nb")],
])
async def test_not_representable_in_http1_is_reset(upstream: Upstream, extra: list) -> None:
    with running_proxy(mesh(upstream)) as px:
        c = await asyncio.to_thread(H2Client, px.outbound)
        try:
            sid = c.request("/smuggle", extra)
            headers, _, end = await asyncio.to_thread(c.response, sid)
            assert headers is None
            assert isinstance(end, h2.events.StreamReset) and end.error_code == 1  # PROTOCOL_ERROR
            # The connection still serves the next stream; nothing reached the upstream.
            sid = c.request("/ok", [(b"te", b"trailers")])
            headers, body, end = await asyncio.to_thread(c.response, sid)
            assert headers is not None and headers[b":status"] == b"200"
            assert json.loads(body)["te"] == "trailers"
        finally:
            c.close()
        assert [s.path for s in upstream.seen] == ["/ok"]


async def test_content_length_mismatch_is_reset(upstream: Upstream) -> None:
    with running_proxy(mesh(upstream)) as px:
        c = await asyncio.to_thread(H2Client, px.outbound)
        try:
            sid = c.conn.get_next_available_stream_id()
            c.conn.send_headers(sid, [(b":method", b"POST"), (b":scheme", b"http"),
                                      (b":authority", b"reviews:9080"), (b":path", b"/cl"),
                                      (b"content-length", b"3")])
            c.conn.send_data(sid, b"abcdefGET /x HTTP/1.1\r\n\r\n", end_stream=True)
            c.flush()
            evs = await asyncio.to_thread(c.events, lambda g: any(isinstance(
                e, (h2.events.StreamReset, h2.events.ConnectionTerminated)) for e in g))
            # The h2 library ends the connection (GOAWAY PROTOCOL_ERROR) on
            # DATA beyond content-length; Envoy resets the stream. Either way
            # nothing of it is answered or forwarded.
            ends = [e for e in evs if isinstance(e, (h2.events.StreamReset, h2.events.ConnectionTerminated))]
            assert ends and ends[0].error_code == 1, evs
            assert not any(isinstance(e, h2.events.ResponseReceived) for e in evs)
        finally:
            c.close()
        assert all(s.path not in ("/x", "/cl") or len(s.body) <= 3 for s in upstream.seen)
        assert all(s.path != "/x" for s in upstream.seen)


async def test_upgrade_h2c_is_plain_http11(upstream: Upstream) -> None:
    with running_proxy(mesh(upstream)) as px:
        reader, writer = await asyncio.open_connection("127.0.0.1", px.outbound)
        writer.write(b"GET /up HTTP/1.1\r\nHost: reviews:9080\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                     b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n")
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        writer.close()
        assert head.startswith(b"HTTP/1.1 200"), head
        assert upstream.seen[-1].headers.get("upgrade") is None


async def test_header_list_too_large_gets_431_and_others_served(upstream: Upstream) -> None:
    with running_proxy(mesh(upstream)) as px:
        c = await asyncio.to_thread(H2Client, px.outbound)
        try:
            big = [(b"x-big-%d" % i, b"v" * 4000) for i in range(20)]  # 80 KB > 60 KiB
            sid = c.request("/big-headers", big)
            headers, _, _ = await asyncio.to_thread(c.response, sid)
            assert headers is not None and headers[b":status"] == b"431"
            sid = c.request("/after")
            headers, _, _ = await asyncio.to_thread(c.response, sid)
            assert headers is not None and headers[b":status"] == b"200"
        finally:
            c.close()


async def test_too_many_streams_bounded(upstream: Upstream) -> None:
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        await release.wait()
        return web.Response(text="late")
    upstream.handler = slow
    with running_proxy(mesh(upstream)) as px:
        c = await asyncio.to_thread(H2Client, px.outbound)
        try:
            # Wait for the server's SETTINGS (max 100 streams), then ignore them.
            await asyncio.to_thread(c.events, lambda g: any(
                isinstance(e, h2.events.RemoteSettingsChanged) for e in g))
            # (the client library would hold us to them: lift its copy)
            c.conn.remote_settings._settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] = \
                collections.deque([1000])
            for _ in range(150):
                c.request("/hold")
            evs = await asyncio.to_thread(c.events, lambda g: any(
                isinstance(e, h2.events.ConnectionTerminated) for e in g), 10.0)
            assert c.closed or any(isinstance(e, h2.events.ConnectionTerminated) for e in evs)
            # Another client is served meanwhile.
            release.set()
            other = await asyncio.to_thread(H2Client, px.outbound)
            try:
                sid = other.request("/other")
                upstream.handler = Upstream.default_handler.__get__(upstream)
                headers, _, _ = await asyncio.to_thread(other.response, sid)
                assert headers is not None and headers[b":status"] == b"200"
            finally:
                other.close()
        finally:
            c.close()
        assert sum(1 for s in upstream.seen if s.path == "/hold") <= 100


async def test_rapid_reset_bounded(upstream: Upstream) -> None:
    with running_proxy(mesh(upstream)) as px:
        c = await asyncio.to_thread(H2Client, px.outbound)
        try:
            for _ in range(2000):
                sid = c.request("/rr")
                c.conn.reset_stream(sid, 8)  # CANCEL
                c.flush()
            evs = await asyncio.to_thread(c.events, lambda g: any(
                isinstance(e, h2.events.ConnectionTerminated) for e in g), 10.0)
        finally:
            c.close()
        # GOAWAY(ENHANCE_YOUR_CALM) arrives although the flood's frames were
        # still coming: the proxy half-closes and discards input for a while
        # (a close with unread input would reset the connection, and the
        # reset destroys the GOAWAY before the client reads it).
        term = [e for e in evs if isinstance(e, h2.events.ConnectionTerminated)]
        assert term and term[0].error_code == 11, (evs[-3:], c.error)
        assert _stats(px)["http.downstream_cx_h2_flood"] == 1
        other = await asyncio.to_thread(H2Client, px.outbound)
        try:
            sid = other.request("/other")
            headers, _, _ = await asyncio.to_thread(other.response, sid)
            assert headers is not None and headers[b":status"] == b"200"
        finally:
            other.close()


async def test_ping_flood_bounded(upstream: Upstream) -> None:
    with running_proxy(mesh(upstream)) as px:
        c = await asyncio.to_thread(H2Client, px.outbound)
        try:
            for i in range(3000):
                c.conn.ping(i.to_bytes(8, "big"))
            c.flush()
            evs = await asyncio.to_thread(c.events, lambda g: any(
                isinstance(e, h2.events.ConnectionTerminated) for e in g), 10.0)
            assert c.closed or any(isinstance(e, h2.events.ConnectionTerminated) and e.error_code == 11
                                   for e in evs)
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            c.close()
        assert _stats(px)["http.downstream_cx_h2_flood"] == 1
        out = await asyncio.to_thread(H2Client, px.outbound)
        try:
            sid = out.request("/other")
            headers, _, _ = await asyncio.to_thread(out.response, sid)
            assert headers is not None and headers[b":status"] == b"200"
        finally:
            out.close()


@pytest.mark.skipif(H2LOAD is None, reason="h2load (Debian nghttp2-client) is not installed (.ci/run installs it)")
async def test_h2load_through_the_sidecar(upstream: Upstream) -> None:
    with running_proxy(mesh(upstream)) as px:
        out = await asyncio.to_thread(subprocess.run, [
            H2LOAD, "-n", "400", "-c", "4", "-m", "20", "-H", ":authority: reviews:9080",
            f"http://127.0.0.1:{px.outbound}/load"], capture_output=True, timeout=120)
        text = out.stdout.decode()
        assert out.returncode == 0, text + out.stderr.decode()
        assert "400 succeeded, 0 failed, 0 errored" in text, text
        assert "status codes: 400 2xx" in text, text


async def test_gateway_listener_and_drain_goaway() -> None:
    from tests.integration.test_gateway import config as gateway_config

    async with Upstream("front") as front, Upstream("back") as back:
        with running_proxy(gateway_config(front.port, back.port), args=["--gateway", "shop-gateway"]) as px:
            c = await asyncio.to_thread(H2Client, px.outbound)
            try:
                sid = c.request("/productpage", authority=b"localhost:8080")
                headers, body, _ = await asyncio.to_thread(c.response, sid)
                assert headers is not None and headers[b":status"] == b"200", headers
                assert headers[b"server"] == b"istio-envoy"
                assert json.loads(body)["upstream"] == "front"
                # The gateway appends the peer to x-forwarded-for for h2 streams too.
                assert front.seen[-1].headers["x-forwarded-for"] == "127.0.0.1"
                # A drain: GOAWAY(NO_ERROR), then the idle connection closes.
                status, _ = await asyncio.to_thread(http_get, px.admin_url + "/drain_listeners", 5, "POST")
                assert status == 200
                evs = await asyncio.to_thread(c.events, lambda g: any(
                    isinstance(e, h2.events.ConnectionTerminated) for e in g), 10.0)
                term = [e for e in evs if isinstance(e, h2.events.ConnectionTerminated)]
                assert term and term[0].error_code == 0
            finally:
                c.close()
