"""An adversarial review of the HTTP/2 upstream side (pyproxy/upstream/h2pool.py),
with real sockets: the proxy process between ``h2`` library clients (and raw
HTTP/1.1) and scripted h2c upstreams (tests/integration/h2peer.py) that
misbehave on purpose.

- Hostile upstreams (docs/http2.md "HTTP/2 to upstreams", limits table):
  header floods, HPACK bombs, over-long header sections, malformed and
  connection-specific response fields, server push, DATA beyond the window,
  PING/SETTINGS and empty-DATA floods. Each ends in a bounded way (the
  stream or the connection is reset, the client gets 502 UPE or a reset,
  counted) and the proxy serves the next client.
- Flow control end to end, both directions: a stalled reader or a stalled
  upstream holds only its own stream; the proxy's memory stays bounded.
- Lifecycle: GOAWAY with streams in flight, the connection closed mid
  stream, ``idleTimeout``, the proxy's drain.
- Smuggling across protocols: what an HTTP/2 client may not send never
  reaches the upstream; h1 -> h2 translation drops hop-by-hop fields.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import hpack
import pytest
from h2.errors import ErrorCodes
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    PushPromiseFrame,
    SettingsFrame,
)

from tests.harness import Proxy, running_proxy
from tests.integration.h2peer import H2Peer, PeerConn, h2_service_entry
from tests.integration.test_http2 import H2Client, _stats

AUTHORITY = b"h2svc:9090"
CLUSTER = "outbound|9090||h2svc.default.svc.cluster.local"


def access_lines(path: Path, at_least: int, timeout: float = 5.0) -> list[str]:
    deadline = time.monotonic() + timeout
    lines: list[str] = []
    while time.monotonic() < deadline:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= at_least:
            break
        time.sleep(0.05)
    return lines


def cluster_stat(px: Proxy, name: str) -> int:
    return _stats(px).get(f"cluster.{CLUSTER}.{name}", 0)


def h2_get(px: Proxy, path: str) -> tuple[dict[bytes, bytes] | None, bytes, object]:
    c = H2Client(px.outbound)
    try:
        sid = c.request(path, authority=AUTHORITY)
        return c.response(sid)
    finally:
        c.close()


def serve(behaviours: dict[bytes, Any]) -> Any:
    """A script answering each request by its path: ``behaviours[path](conn,
    sid)``, or 200 "ok" for a path not listed. It stops when the
    connection closes."""

    def script(conn: PeerConn) -> None:
        while True:
            req = conn.next_request(limit=30)
            if req is None:
                return
            sid, headers = req
            behaviour = behaviours.get(headers[b":path"])
            if behaviour is None:
                conn.respond(sid, b"ok")
            else:
                behaviour(conn, sid)

    return script


def linger(conn: PeerConn) -> None:
    """Read (without acknowledging anything) until the proxy closes."""
    conn.wait(lambda: False, limit=10, ack=False)


# -- hostile upstream behaviours ---------------------------------------------------

def continuation_flood(conn: PeerConn, sid: int) -> None:
    # A header block that never ends: HEADERS without END_HEADERS, then
    # CONTINUATION frames (the 2024 CONTINUATION flood).
    conn.raw(HeadersFrame(sid, data=b"\x88", flags=[]).serialize())
    frame = ContinuationFrame(sid, data=b"\x00\x01a\x01b" * 2000, flags=[]).serialize()
    for _ in range(200):
        conn.raw(frame)
    linger(conn)


def hpack_bomb(conn: PeerConn, sid: int) -> None:
    # One 4 KiB field indexed once, then referenced 100 times: 5 KiB on the
    # wire, 400 KiB decoded.
    enc = hpack.Encoder()
    block = enc.encode([(b":status", b"200"), (b"x-bomb", b"b" * 4000)])
    block += enc.encode([(b"x-bomb", b"b" * 4000)] * 100)
    conn.raw(HeadersFrame(sid, data=block, flags=["END_HEADERS"]).serialize())
    linger(conn)


def big_header_section(conn: PeerConn, sid: int) -> None:
    # 70 KiB of fields: over pyproxy's 60 KiB rule, under the HPACK bound.
    conn.h2.send_headers(sid, [(b":status", b"200")] + [(b"x-big-%d" % i, b"v" * 7000) for i in range(10)])
    conn.flush()


def bad_pseudo_header(conn: PeerConn, sid: int) -> None:
    conn.h2.send_headers(sid, [(b":status", b"200"), (b":path", b"/x"), (b"content-length", b"0")], end_stream=True)
    conn.flush()
    linger(conn)


def no_status(conn: PeerConn, sid: int) -> None:
    conn.h2.send_headers(sid, [(b"content-length", b"0"), (b"x-a", b"b")], end_stream=True)
    conn.flush()
    linger(conn)


def connection_header(conn: PeerConn, sid: int) -> None:
    conn.h2.send_headers(sid, [(b":status", b"200"), (b"connection", b"close"), (b"content-length", b"2")])
    conn.h2.send_data(sid, b"no", end_stream=True)
    conn.flush()
    linger(conn)


def transfer_encoding_header(conn: PeerConn, sid: int) -> None:
    conn.h2.send_headers(sid, [(b":status", b"200"), (b"transfer-encoding", b"chunked")])
    conn.h2.send_data(sid, b"2\r\nno\r\n0\r\n\r\n", end_stream=True)
    conn.flush()
    linger(conn)


def push_promise(conn: PeerConn, sid: int) -> None:
    block = conn.h2.encoder.encode([(b":method", b"GET"), (b":scheme", b"http"), (b":authority", AUTHORITY),
                                    (b":path", b"/pushed")])
    conn.raw(PushPromiseFrame(sid, promised_stream_id=2, data=block, flags=["END_HEADERS"]).serialize())
    linger(conn)


def ping_flood(conn: PeerConn, sid: int) -> None:
    # 20000 PINGs without reading one acknowledgement, then the answer.
    conn.raw(PingFrame(0, opaque_data=b"12345678").serialize() * 20000)
    conn.respond(sid, b"after the flood")
    linger(conn)


def settings_flood(conn: PeerConn, sid: int) -> None:
    conn.raw(SettingsFrame(0, settings={h2.settings.SettingCodes.HEADER_TABLE_SIZE: 4096}).serialize() * 20000)
    conn.respond(sid, b"after the flood")
    linger(conn)


def empty_data_flood(conn: PeerConn, sid: int) -> None:
    conn.h2.send_headers(sid, [(b":status", b"200"), (b"content-length", b"2")])
    conn.flush()
    conn.raw(DataFrame(sid, data=b"").serialize() * 20000)
    conn.raw(DataFrame(sid, data=b"ok", flags=["END_STREAM"]).serialize())
    linger(conn)


def data_beyond_window(conn: PeerConn, sid: int) -> None:
    # 2 MiB of DATA without waiting for a WINDOW_UPDATE (the proxy's
    # stream window is 1 MiB; the client below reads nothing meanwhile).
    conn.h2.send_headers(sid, [(b":status", b"200"), (b"content-length", str(4 << 20).encode())])
    conn.flush()
    frame = DataFrame(sid, data=b"d" * 16384).serialize()
    conn.raw(frame * 128)
    linger(conn)


HOSTILE = {
    # path: (behaviour, what the client gets, the GOAWAY code the upstream gets (None: the connection stays))
    b"/continuation": (continuation_flood, "502", ErrorCodes.PROTOCOL_ERROR),
    b"/hpack-bomb": (hpack_bomb, "502", ErrorCodes.ENHANCE_YOUR_CALM),
    b"/big-headers": (big_header_section, "503 UR", None),
    b"/bad-pseudo": (bad_pseudo_header, "502", ErrorCodes.PROTOCOL_ERROR),
    b"/no-status": (no_status, "502", ErrorCodes.PROTOCOL_ERROR),
    b"/connection-header": (connection_header, "502", ErrorCodes.PROTOCOL_ERROR),
    b"/transfer-encoding": (transfer_encoding_header, "502", ErrorCodes.PROTOCOL_ERROR),
    b"/push": (push_promise, "502", ErrorCodes.PROTOCOL_ERROR),
    b"/ping-flood": (ping_flood, "502", ErrorCodes.ENHANCE_YOUR_CALM),
    b"/settings-flood": (settings_flood, "502", ErrorCodes.ENHANCE_YOUR_CALM),
    b"/empty-data": (empty_data_flood, "reset", ErrorCodes.ENHANCE_YOUR_CALM),
}


FLOODS = {b"/continuation", b"/ping-flood", b"/settings-flood", b"/empty-data"}


@pytest.mark.parametrize("path", list(HOSTILE), ids=[p.decode()[1:] for p in HOSTILE])
def test_hostile_upstream_is_bounded(path: bytes, tmp_path: Path) -> None:
    """Each misbehaviour ends in a bounded way: the client gets 502 UPE
    (or, once the response began, a reset of its stream), the upstream
    connection is closed with the GOAWAY code in the table, counted as
    upstream_cx_protocol_error; or only the stream is reset (headers over
    60 KiB: 503 UR, as Envoy 1.40 answers it); and the next request is
    served. (Envoy 1.40 behind the same peer, checked by hand: the same
    status and flag in every case.)"""
    behaviour, expect, goaway = HOSTILE[path]
    log = tmp_path / "access.log"
    with H2Peer(serve({path: behaviour})) as peer, \
            running_proxy(h2_service_entry(peer.port), args=["--access-log", str(log)]) as px:
        headers, body, end = h2_get(px, path.decode())
        if expect == "502":
            assert headers is not None and headers[b":status"] == b"502", (headers, body, end)
            assert body == b"upstream connect error or disconnect/reset before headers. reset reason: protocol error"
        elif expect == "503 UR":
            assert headers is not None and headers[b":status"] == b"503", (headers, body, end)
            assert body == b"upstream connect error or disconnect/reset before headers. reset reason: remote reset"
        else:
            assert isinstance(end, h2.events.StreamReset), (headers, body, end)
        first = peer.conns[0]
        if goaway is None:
            # Only the stream was reset: the connection carries the next request.
            assert first.wait(lambda: first.was_reset(1)), first.events
            assert h2_get(px, "/ok")[1] == b"ok"
            assert len(peer.conns) == 1 and not first.closed
        else:
            assert first.wait(lambda: first.closed, limit=15)
            # One GOAWAY, with the error (not followed by a NO_ERROR one).
            # (A peer still sending when the proxy closes may get a TCP reset
            # that destroys the GOAWAY before it is read.)
            assert first.goaways == [goaway] or (path in FLOODS and not first.goaways), first.goaways
            headers, body, end = h2_get(px, "/ok")
            assert headers is not None and headers[b":status"] == b"200" and body == b"ok", (headers, body, end)
            assert len(peer.conns) == 2
        if expect == "503 UR":
            assert cluster_stat(px, "upstream_cx_protocol_error") == 0
            assert cluster_stat(px, "upstream_rq_rx_reset") == 1
            assert " 503 UR " in access_lines(log, 2)[0]
        else:
            assert cluster_stat(px, "upstream_cx_protocol_error") == 1
            lines = access_lines(log, 2)
            assert " UPE " in lines[0], lines
        assert px.alive()
    # The proxy said so before anything else: no push.
    assert first.remote_settings.get(h2.settings.SettingCodes.ENABLE_PUSH) == 0
    assert not peer.errors, peer.errors


def test_data_beyond_the_window_closes_the_connection(tmp_path: Path) -> None:
    """An upstream that sends more DATA than the stream window allows is a
    connection error (FLOW_CONTROL_ERROR): the client's response (begun)
    is reset, UPE, and the proxy reads no more of it."""
    log = tmp_path / "access.log"
    with H2Peer(serve({b"/over": data_beyond_window})) as peer, \
            running_proxy(h2_service_entry(peer.port), args=["--access-log", str(log)]) as px:
        c = H2Client(px.outbound)
        try:
            sid = c.request("/over", authority=AUTHORITY)
            first_conn = None
            deadline = time.monotonic() + 10
            while first_conn is None or not first_conn.closed:
                assert time.monotonic() < deadline
                first_conn = peer.conns[0] if peer.conns else None
                time.sleep(0.02)
            # Only now does the client read.
            headers, body, end = c.response(sid)
        finally:
            c.close()
        assert headers is not None and headers[b":status"] == b"200"
        assert isinstance(end, h2.events.StreamReset), end
        assert len(body) < 4 << 20
        # (The GOAWAY may be lost to the reset of a socket closed with the
        # peer's DATA unread.)
        assert first_conn.goaways in ([ErrorCodes.FLOW_CONTROL_ERROR], []), first_conn.goaways
        assert cluster_stat(px, "upstream_cx_protocol_error") == 1
        assert " UPE " in access_lines(log, 1)[0]
        assert h2_get(px, "/ok")[1] == b"ok"
    assert not peer.errors, peer.errors




# -- flow control end to end ------------------------------------------------------

BIG = 50 << 20
SMALL = 5 << 20
PATTERN = bytes(range(256)) * 64  # 16 KiB


def body_of(n: int) -> bytes:
    return (PATTERN * (n // len(PATTERN) + 1))[:n]


class Streaming:
    """An upstream that serves GET /big (50 MiB) and /small (5 MiB) as the
    windows admit, all streams of a connection multiplexed by one loop;
    POST /upload is read (acknowledged) at once, POST /slow-upload not
    until ``release`` is set. It records what it sent and received."""

    def __init__(self) -> None:
        self.sent: dict[bytes, int] = {}  # by path
        self.received: dict[bytes, int] = {}
        self.release = threading.Event()
        self.big_stalled = threading.Event()  # /big's window is shut

    def script(self, conn: PeerConn) -> None:
        sending: dict[int, tuple[bytes, bytes]] = {}  # sid -> (path, body)
        offsets: dict[int, int] = {}
        paths: dict[int, bytes] = {}
        held: dict[int, int] = {}
        # A 64 MiB connection window, as real servers open theirs (grpc-core,
        # Go): one unread stream must not shut it for the others.
        conn.h2.increment_flow_control_window((64 << 20) - 65535)
        conn.flush()
        while not conn.closed:
            for ev in conn.pump(timeout=0.002, ack=False):
                if isinstance(ev, h2.events.RequestReceived):
                    path = dict(ev.headers)[b":path"]
                    paths[ev.stream_id] = path
                    if path in (b"/big", b"/small"):
                        body = body_of(BIG if path == b"/big" else SMALL)
                        conn.h2.send_headers(ev.stream_id, [(b":status", b"200"),
                                                            (b"content-length", str(len(body)).encode())])
                        sending[ev.stream_id] = (path, body)
                        offsets[ev.stream_id] = 0
                    elif ev.stream_ended is not None:
                        conn.respond(ev.stream_id, b"ok")
                elif isinstance(ev, h2.events.DataReceived):
                    path = paths.get(ev.stream_id, b"")
                    self.received[path] = self.received.get(path, 0) + len(ev.data)
                    if path.startswith(b"/slow-upload") and not self.release.is_set():
                        held[ev.stream_id] = held.get(ev.stream_id, 0) + ev.flow_controlled_length
                    elif ev.flow_controlled_length:
                        conn.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, h2.events.StreamEnded):
                    path = paths.get(ev.stream_id, b"")
                    if b"upload" in path:
                        conn.respond(ev.stream_id, str(self.received.get(path, 0)).encode())
                elif isinstance(ev, h2.events.StreamReset):
                    sending.pop(ev.stream_id, None)
            if self.release.is_set() and held:
                for sid, n in held.items():
                    try:
                        conn.h2.acknowledge_received_data(n, sid)
                    except h2.exceptions.StreamClosedError:
                        pass
                held.clear()
            for sid, (path, body) in list(sending.items()):
                try:
                    window = conn.h2.local_flow_control_window(sid)
                except (h2.exceptions.StreamClosedError, KeyError):
                    del sending[sid]
                    continue
                if window <= 0 and path == b"/big":
                    self.big_stalled.set()
                budget = min(window, 256 << 10)  # (a turn for every stream)
                while budget > 0 and offsets[sid] < len(body):
                    n = min(budget, conn.h2.max_outbound_frame_size, len(body) - offsets[sid])
                    end = offsets[sid] + n == len(body)
                    conn.h2.send_data(sid, body[offsets[sid]:offsets[sid] + n], end_stream=end)
                    offsets[sid] += n
                    budget -= n
                    self.sent[path] = self.sent.get(path, 0) + n
                if offsets[sid] == len(body):
                    del sending[sid]
            conn.flush()


class Client(threading.Thread):
    """An h2 client in a thread: sends ``requests`` (path, body or None),
    reads everything, and acknowledges the DATA of every stream except
    those whose path is in ``hold`` until ``release`` is set. Its
    connection window is 64 MiB (its stream windows 64 KiB), as a client
    that reads one stream and not another would set it."""

    def __init__(self, port: int, requests: list[tuple[str, bytes | None]], hold: tuple[str, ...] = (),
                 release: threading.Event | None = None) -> None:
        super().__init__(daemon=True)
        self.c = H2Client(port)
        self.c.conn.increment_flow_control_window((64 << 20) - 65535)
        self.c.flush()
        self.requests = requests
        self.hold = hold
        self.release = release or threading.Event()
        self.bodies: dict[str, bytearray] = {}
        self.status: dict[str, bytes] = {}
        self.ended: dict[str, object] = {}
        self.sids: dict[str, int] = {}
        self.sent: dict[str, int] = {}  # request body bytes sent per path
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # noqa: BLE001 (the test reads it)
            self.error = exc

    def _run(self) -> None:
        c = self.c
        paths: dict[int, str] = {}
        uploads: dict[int, bytes] = {}
        for path, body in self.requests:
            sid = c.conn.get_next_available_stream_id()
            method = b"GET" if body is None else b"POST"
            headers = [(b":method", method), (b":scheme", b"http"), (b":authority", AUTHORITY),
                       (b":path", path.encode())]
            if body is not None:
                headers.append((b"content-length", str(len(body)).encode()))
                uploads[sid] = body
            c.conn.send_headers(sid, headers, end_stream=body is None)
            paths[sid] = path
            self.sids[path] = sid
        c.flush()
        held: dict[int, int] = {}
        c.sock.settimeout(0.005)
        while len(self.ended) < len(paths):
            for sid, body in list(uploads.items()):  # send what the windows admit
                window = min(c.conn.local_flow_control_window(sid), 256 << 10)
                if window > 0:
                    n = min(window, len(body))
                    frame = c.conn.max_outbound_frame_size
                    for at in range(0, n, frame):
                        piece = body[at:min(n, at + frame)]
                        c.conn.send_data(sid, piece, end_stream=at + len(piece) == len(body))
                    uploads[sid] = body[n:]
                    self.sent[paths[sid]] = self.sent.get(paths[sid], 0) + n
                    if not uploads[sid]:
                        del uploads[sid]
            c.flush()
            try:
                data = c.sock.recv(1 << 20)
            except TimeoutError:
                data = None
            if data == b"":
                raise ConnectionError(f"closed by the proxy; ended: {self.ended}")
            events = c.conn.receive_data(data) if data else []
            for ev in events:
                path = paths.get(getattr(ev, "stream_id", 0), "")
                if isinstance(ev, h2.events.ResponseReceived):
                    self.status[path] = dict(ev.headers)[b":status"]
                elif isinstance(ev, h2.events.DataReceived):
                    self.bodies.setdefault(path, bytearray()).extend(ev.data)
                    if path in self.hold and not self.release.is_set():
                        held[ev.stream_id] = held.get(ev.stream_id, 0) + ev.flow_controlled_length
                    else:
                        c.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, h2.events.StreamEnded):
                    self.ended[path] = "end"
                elif isinstance(ev, h2.events.StreamReset):
                    self.ended[path] = ev
            if self.release.is_set() and held:
                for sid, n in held.items():
                    c.conn.acknowledge_received_data(n, sid)
                held.clear()
            c.flush()
        c.close()


def proxy_rss(px: Proxy) -> int:
    with open(f"/proc/{px.process.pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def wait_for(cond: Any, limit: float = 60.0) -> None:
    deadline = time.monotonic() + limit
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


# What the proxy may hold of one stalled stream: the stream window (1 MiB)
# and the stream buffer (64 KiB) of the side that reads, plus one socket
# read (256 KiB) of slack.
STALL_BOUND = (1 << 20) + (64 << 10) + (256 << 10)


def test_a_client_not_reading_one_stream_stalls_only_that_stream() -> None:
    """Client X asks for 50 MiB and 5 MiB on one connection and reads only
    the 5 MiB; client Y (another connection) gets 5 MiB meanwhile, all
    over one upstream connection. The upstream sees /big's window shut
    after at most one stream window plus what the proxy passed on (X's
    64 KiB window) and buffers; the proxy's RSS does not grow by anything
    near 50 MiB. When X reads, /big resumes and arrives whole."""
    up = Streaming()
    with H2Peer(up.script) as peer, running_proxy(h2_service_entry(peer.port)) as px:
        assert h2_get(px, "/warm")[1] == b"ok"
        base = proxy_rss(px)
        x = Client(px.outbound, [("/big", None), ("/small", None)], hold=("/big",))
        x.start()
        wait_for(up.big_stalled.is_set)
        y = Client(px.outbound, [("/small", None)])
        y.start()
        wait_for(lambda: "/small" in x.ended and "/small" in y.ended)
        assert x.bodies["/small"] == body_of(SMALL) and y.bodies["/small"] == body_of(SMALL)
        assert len(peer.conns) == 1  # one upstream connection carried all four streams
        stalled = up.sent[b"/big"]
        assert stalled <= STALL_BOUND + (64 << 10), stalled  # (+ X's window)
        grown = proxy_rss(px) - base
        assert grown < 16 << 20, grown
        x.release.set()
        x.join(120)
        assert not x.is_alive() and x.error is None, (x.error, px.log()[-3000:])
        assert x.ended["/big"] == "end" and x.bodies["/big"] == body_of(BIG)
        assert y.error is None
        print(f"/big stalled after {stalled} bytes; proxy RSS +{grown >> 10} KiB")


def test_an_http11_client_not_reading_stalls_only_its_stream() -> None:
    """The same with an HTTP/1.1 client that stops reading its socket: its
    upstream stream's window shuts (what the kernel's socket buffers take
    is the only extra), another client is served meanwhile over the same
    upstream connection, and the whole 50 MiB arrives once it reads."""
    up = Streaming()
    with H2Peer(up.script) as peer, running_proxy(h2_service_entry(peer.port)) as px:
        assert h2_get(px, "/warm")[1] == b"ok"
        base = proxy_rss(px)
        sock = socket.create_connection(("127.0.0.1", px.outbound))
        sock.sendall(b"GET /big HTTP/1.1\r\nHost: h2svc:9090\r\n\r\n")
        wait_for(up.big_stalled.is_set)
        y = Client(px.outbound, [("/small", None)])
        y.start()
        y.join(60)
        assert y.bodies["/small"] == body_of(SMALL) and y.error is None
        assert len(peer.conns) == 1
        stalled = up.sent[b"/big"]
        assert stalled < BIG // 2, stalled
        grown = proxy_rss(px) - base
        assert grown < 16 << 20, grown
        received = bytearray()
        sock.settimeout(30)
        while b"\r\n\r\n" not in received or len(received) < received.index(b"\r\n\r\n") + 4 + BIG:
            chunk = sock.recv(1 << 20)
            assert chunk, received[:300]
            received += chunk
        head, _, body = bytes(received).partition(b"\r\n\r\n")
        sock.close()
        assert head.startswith(b"HTTP/1.1 200") and body == body_of(BIG)
        print(f"/big stalled after {stalled} bytes (kernel buffers included); proxy RSS +{grown >> 10} KiB")


UPLOAD = 20 << 20


def test_a_slow_upstream_reading_an_h2_upload_stalls_only_that_stream() -> None:
    """An HTTP/2 client uploads 20 MiB twice to an upstream that does not
    read them and 2 MiB on a third stream of the same connection: the 2 MiB
    gets through; each stalled upload stops at the client after the
    upstream's window (64 KiB) plus the proxy's stream window (1 MiB) and
    buffer (64 KiB). When the upstream reads, both uploads arrive whole.
    (Before the client connection's window was raised from 1 MiB to 100
    stream windows, the two stalled streams held all of it: the third
    stream never finished.)"""
    up = Streaming()
    with H2Peer(up.script) as peer, running_proxy(h2_service_entry(peer.port)) as px:
        assert h2_get(px, "/warm")[1] == b"ok"
        base = proxy_rss(px)
        x = Client(px.outbound, [("/slow-upload", body_of(UPLOAD)), ("/slow-upload2", body_of(UPLOAD)),
                                 ("/upload", body_of(2 << 20))])
        x.start()
        wait_for(lambda: "/upload" in x.ended or x.error is not None, limit=30)
        assert x.error is None and x.status["/upload"] == b"200" and bytes(x.bodies["/upload"]) == b"%d" % (2 << 20)
        stalled = x.sent["/slow-upload"]
        assert stalled <= STALL_BOUND + 65535, stalled
        assert x.sent.get("/slow-upload2", -1) <= STALL_BOUND + 65535, (x.sent, x.ended, up.received)
        assert up.received[b"/slow-upload"] <= 65535 and up.received[b"/slow-upload2"] <= 65535
        grown = proxy_rss(px) - base
        assert grown < 16 << 20, grown
        up.release.set()
        x.join(60)
        assert x.error is None and bytes(x.bodies["/slow-upload"]) == b"%d" % UPLOAD
        assert bytes(x.bodies["/slow-upload2"]) == b"%d" % UPLOAD
        assert len(peer.conns) == 1
        print(f"the upload stalled after {stalled} bytes; proxy RSS +{grown >> 10} KiB")


def test_a_slow_upstream_reading_an_http11_upload_stalls_only_that_client() -> None:
    """The same upload from an HTTP/1.1 client (content-length): the proxy
    stops reading its socket; an HTTP/2 client's upload goes through the
    same upstream connection meanwhile; the proxy's RSS stays flat."""
    up = Streaming()
    with H2Peer(up.script) as peer, running_proxy(h2_service_entry(peer.port)) as px:
        assert h2_get(px, "/warm")[1] == b"ok"
        base = proxy_rss(px)
        sock = socket.create_connection(("127.0.0.1", px.outbound))
        sock.sendall(b"POST /slow-upload HTTP/1.1\r\nHost: h2svc:9090\r\nContent-Length: %d\r\n\r\n" % UPLOAD)
        sender = threading.Thread(target=sock.sendall, args=(body_of(UPLOAD),), daemon=True)
        sender.start()
        wait_for(lambda: up.received.get(b"/slow-upload", 0) >= 65535)
        y = Client(px.outbound, [("/upload", body_of(2 << 20))])
        y.start()
        y.join(60)
        assert y.error is None and bytes(y.bodies["/upload"]) == b"%d" % (2 << 20)
        assert sender.is_alive()  # the proxy is not reading it
        assert up.received[b"/slow-upload"] == 65535
        grown = proxy_rss(px) - base
        assert grown < 16 << 20, grown
        up.release.set()
        sender.join(60)
        sock.settimeout(30)
        answer = b""
        while not answer.endswith(b"\r\n\r\n%d" % UPLOAD):
            data = sock.recv(65536)
            if not data:
                break
            answer += data
        sock.close()
        assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"%d" % UPLOAD), answer
        assert len(peer.conns) == 1
        print(f"proxy RSS +{grown >> 10} KiB")


def test_window_update_flood_from_a_client_is_bounded() -> None:
    """WINDOW_UPDATE frames are budgeted against the DATA the proxy sent
    (Envoy's rule): 5000 of them on a connection that got no DATA end it
    with GOAWAY(ENHANCE_YOUR_CALM); downloads with small windows do not
    (the tests above send ~1600 for 50 MiB). Another client is served."""
    with H2Peer(serve({})) as peer, running_proxy(h2_service_entry(peer.port)) as px:
        c = H2Client(px.outbound)
        try:
            for _ in range(5000):
                c.conn.increment_flow_control_window(1)
            c.flush()
            evs = c.events(lambda g: any(isinstance(e, h2.events.ConnectionTerminated) for e in g))
        finally:
            c.close()
        goaway = [e for e in evs if isinstance(e, h2.events.ConnectionTerminated)]
        assert goaway and goaway[0].error_code == ErrorCodes.ENHANCE_YOUR_CALM, evs[-3:]
        assert _stats(px)["http.downstream_cx_h2_flood"] == 1
        assert h2_get(px, "/ok")[1] == b"ok"


# -- lifecycle ------------------------------------------------------------------------

def test_upstream_goaway_with_streams_in_flight() -> None:
    """The upstream takes three streams, then sends GOAWAY(NO_ERROR) with
    the second one's id as last_stream_id: the first two are answered on
    that connection, the third (not processed, RFC 9113 6.8) is retried on
    a new connection (refused-stream, in Istio's default retry policy)."""
    first_conn = threading.Event()

    def script(conn: PeerConn) -> None:
        if first_conn.is_set():
            serve({})(conn)
            return
        first_conn.set()
        reqs = [conn.next_request() for _ in range(3)]
        assert all(reqs), reqs
        sids = sorted(r[0] for r in reqs if r)
        goaway = GoAwayFrame(0, last_stream_id=sids[1], error_code=0)
        conn.raw(goaway.serialize())
        for r in reqs:
            if r is not None and r[0] <= sids[1]:
                conn.respond(r[0], b"first:" + r[1][b":path"])
        linger(conn)

    with H2Peer(script) as peer, running_proxy(h2_service_entry(peer.port)) as px:
        c = H2Client(px.outbound)
        try:
            sids = [c.request(f"/r{i}", authority=AUTHORITY) for i in range(3)]
            evs = c.events(lambda g: sum(isinstance(e, h2.events.StreamEnded) for e in g) >= 3)
        finally:
            c.close()
        statuses = [dict(e.headers)[b":status"] for e in evs if isinstance(e, h2.events.ResponseReceived)]
        assert statuses == [b"200"] * 3, evs
        bodies = sorted(b"".join(e.data for e in evs if isinstance(e, h2.events.DataReceived) and e.stream_id == sid)
                        for sid in sids)
        firsts = [b for b in bodies if b.startswith(b"first:")]
        assert len(firsts) == 2 and b"ok" in bodies, bodies
        assert len(peer.conns) == 2
        assert cluster_stat(px, "upstream_rq_retry") == 1
        # The drained connection is closed by the proxy once its streams end.
        assert peer.conns[0].wait(lambda: peer.conns[0].closed)


def test_upstream_closing_mid_stream(tmp_path: Path) -> None:
    """The upstream's TCP connection closes: before the response the client
    gets 503 UC (a gRPC client: HTTP 200, grpc-status 14, UNAVAILABLE);
    after the response began, the client's stream is reset, flag UC and no
    upstream_cx_protocol_error, as Envoy 1.40 with an HTTP/2 cluster
    (checked: "200 UC upstream_reset_after_response_started
    {connection_termination}"; pyproxy said UPE before)."""
    log = tmp_path / "access.log"
    def close_now(conn: PeerConn, sid: int) -> None:
        conn.close()

    def close_mid_body(conn: PeerConn, sid: int) -> None:
        conn.h2.send_headers(sid, [(b":status", b"200"), (b"content-type", b"application/grpc")])
        conn.h2.send_data(sid, b"\x00\x00\x00\x00\x05hello")
        conn.flush()
        conn.close()

    with H2Peer(serve({b"/close": close_now, b"/grpc/close": close_now, b"/mid": close_mid_body})) as peer, \
            running_proxy(h2_service_entry(peer.port), args=["--access-log", str(log)]) as px:
        headers, body, end = h2_get(px, "/close")
        assert headers is not None and headers[b":status"] == b"503", (headers, body)
        assert body.endswith(b"reset reason: connection termination"), body
        c = H2Client(px.outbound)
        try:
            grpc_headers = [(b"content-type", b"application/grpc"), (b"te", b"trailers")]
            sid = c.request("/grpc/close", extra=grpc_headers, authority=AUTHORITY)
            headers, body, end = c.response(sid)
            assert headers is not None and end == "end", (headers, body, end)
            assert headers[b":status"] == b"200" and headers[b"grpc-status"] == b"14", headers
            sid = c.request("/mid", extra=grpc_headers, authority=AUTHORITY)
            headers, body, end = c.response(sid)
            assert headers is not None and headers[b":status"] == b"200"
            assert body == b"\x00\x00\x00\x00\x05hello" and isinstance(end, h2.events.StreamReset), end
        finally:
            c.close()
        assert h2_get(px, "/ok")[1] == b"ok"  # and the next request is served
        assert len(peer.conns) == 4
        lines = access_lines(log, 4)
        assert [line.split('" ')[1].split()[:2] for line in lines] == \
            [["503", "UC"], ["200", "UC"], ["200", "UC"], ["200", "-"]], lines
        assert cluster_stat(px, "upstream_cx_protocol_error") == 0


def test_idle_timeout_closes_the_upstream_connection_with_goaway() -> None:
    """DestinationRule connectionPool.http.idleTimeout: an upstream HTTP/2
    connection without streams for that long gets GOAWAY(NO_ERROR) and is
    closed (upstream_cx_idle_timeout); the next request opens another."""
    dr = """apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: h2svc}
spec:
  host: h2svc
  trafficPolicy:
    connectionPool:
      http: {idleTimeout: 1s}
"""
    with H2Peer(serve({})) as peer, running_proxy({"10-se.yaml": h2_service_entry(peer.port),
                                                   "20-dr.yaml": dr}) as px:
        assert h2_get(px, "/one")[1] == b"ok"
        first = peer.conns[0]
        assert first.wait(lambda: first.closed, limit=15)
        assert first.goaways == [ErrorCodes.NO_ERROR]
        assert cluster_stat(px, "upstream_cx_idle_timeout") == 1
        assert h2_get(px, "/two")[1] == b"ok"
        assert len(peer.conns) == 2


def test_drain_sends_goaway_and_finishes_streams_in_flight() -> None:
    """SIGTERM with a stream in flight: the HTTP/2 client gets GOAWAY
    (NO_ERROR) at once, its stream is still answered (the upstream stream
    completes), then the proxy exits."""
    release = threading.Event()

    def held(conn: PeerConn, sid: int) -> None:
        release.wait(20)
        conn.respond(sid, b"answered during the drain")

    with H2Peer(serve({b"/held": held})) as peer, \
            running_proxy(h2_service_entry(peer.port), env={"PYPROXY_DRAIN_GRACE": "0"},
                          args=["--drain-timeout", "10"]) as px:
        c = H2Client(px.outbound)
        try:
            sid = c.request("/held", authority=AUTHORITY)
            wait_for(lambda: bool(peer.conns) and bool(peer.conns[0].taken))
            px.process.send_signal(signal.SIGTERM)
            evs = c.events(lambda g: any(isinstance(e, h2.events.ConnectionTerminated) for e in g))
            goaway = [e for e in evs if isinstance(e, h2.events.ConnectionTerminated)]
            assert goaway and goaway[0].error_code == ErrorCodes.NO_ERROR, evs
            assert goaway[0].last_stream_id == sid
            # (The h2 library, as a client too, closes its state machine on
            # any GOAWAY; real clients read the streams still answered.)
            c.conn.state_machine.state = h2.connection.ConnectionState.CLIENT_OPEN
            release.set()
            evs += c.events(lambda g: any(isinstance(e, (h2.events.StreamEnded, h2.events.StreamReset))
                                          and e.stream_id == sid for e in g))
        finally:
            c.close()
        body = b"".join(e.data for e in evs if isinstance(e, h2.events.DataReceived) and e.stream_id == sid)
        ended = [e for e in evs if isinstance(e, (h2.events.StreamEnded, h2.events.StreamReset))]
        assert body == b"answered during the drain" and isinstance(ended[-1], h2.events.StreamEnded), evs
        assert px.process.wait(15) == 0


def test_a_clients_graceful_goaway_lets_its_streams_finish() -> None:
    """A client that sends GOAWAY(NO_ERROR) with a stream in flight (as
    grpc-core does when a channel closes) still gets that stream's answer."""
    release = threading.Event()

    def held(conn: PeerConn, sid: int) -> None:
        release.wait(20)
        conn.respond(sid, b"answered after the client's GOAWAY")

    with H2Peer(serve({b"/held": held})) as peer, running_proxy(h2_service_entry(peer.port)) as px:
        c = H2Client(px.outbound)
        try:
            sid = c.request("/held", authority=AUTHORITY)
            wait_for(lambda: bool(peer.conns) and bool(peer.conns[0].taken))
            c.conn.close_connection(ErrorCodes.NO_ERROR)
            c.conn.state_machine.state = h2.connection.ConnectionState.CLIENT_OPEN  # (see above)
            # A PING after it: its ACK says the proxy has read the GOAWAY
            # (before the fix the library refused the PING: GOAWAY(PROTOCOL_ERROR)).
            c.conn.ping(b"after-ga")
            c.flush()
            evs = c.events(lambda g: any(isinstance(e, h2.events.PingAckReceived) for e in g))
            assert any(isinstance(e, h2.events.PingAckReceived) for e in evs), evs
            release.set()
            headers, body, end = c.response(sid)
        finally:
            c.close()
        assert headers is not None and headers[b":status"] == b"200", (headers, body, end)
        assert body == b"answered after the client's GOAWAY" and end == "end"


# -- request smuggling across protocols -------------------------------------------------

REFUSED_FIELDS = [
    ("transfer-encoding", [(b"transfer-encoding", b"chunked")]),
    ("connection", [(b"connection", b"keep-alive")]),
    ("keep-alive", [(b"keep-alive", b"timeout=5")]),
    ("proxy-connection", [(b"proxy-connection", b"keep-alive")]),
    ("upgrade", [(b"upgrade", b"websocket")]),
    ("te-gzip", [(b"te", b"gzip")]),
    ("uppercase", [(b"X-Foo", b"bar")]),
    ("host-crlf", [(b"x-foo", b"a\r\nx-injected: 1")]),
]


def test_requests_http2_forbids_never_reach_an_http2_upstream() -> None:
    """Each is refused with RST_STREAM(PROTOCOL_ERROR) as Envoy's codec
    does (RFC 9113 8.2.2, 8.2.1); the upstream sees none of them, and
    the connection serves a valid request afterwards."""
    with H2Peer(serve({})) as peer, running_proxy(h2_service_entry(peer.port)) as px:
        c = H2Client(px.outbound)
        try:
            for name, extra in REFUSED_FIELDS:
                sid = c.request(f"/bad/{name}", extra=extra, authority=AUTHORITY)
                headers, _, end = c.response(sid)
                assert headers is None and isinstance(end, h2.events.StreamReset), (name, headers, end)
                assert end.error_code == ErrorCodes.PROTOCOL_ERROR, (name, end)
            sid = c.request("/valid", extra=[(b"te", b"trailers")], authority=AUTHORITY)
            assert c.response(sid)[1] == b"ok"
        finally:
            c.close()
        seen = [dict(e.headers)[b":path"] for conn in peer.conns for e in conn.events
                if isinstance(e, h2.events.RequestReceived)]
        assert seen == [b"/valid"], seen


@pytest.mark.parametrize("sent", [10, 3], ids=["more-than", "less-than"])
def test_content_length_disagreeing_with_data_is_never_completed_upstream(sent: int) -> None:
    """content-length: 5 with 10 bytes of DATA, or 3 bytes then END_STREAM:
    malformed (RFC 9113 8.1.1). The upstream may have seen the HEADERS
    (forwarding starts with them, as Envoy's), but never a complete
    request: its stream is reset and it never answers; the client gets no
    2xx."""
    with H2Peer(serve({})) as peer, running_proxy(h2_service_entry(peer.port)) as px:
        c = H2Client(px.outbound)
        try:
            sid = c.conn.get_next_available_stream_id()
            c.conn.send_headers(sid, [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", AUTHORITY),
                                      (b":path", b"/cl"), (b"content-length", b"5")])
            c.conn.send_data(sid, b"x" * sent, end_stream=True)
            c.flush()
            evs = c.events(lambda g: any(isinstance(e, (h2.events.StreamReset, h2.events.StreamEnded,
                                                        h2.events.ConnectionTerminated)) for e in g))
        finally:
            c.close()
        assert not [e for e in evs if isinstance(e, h2.events.ResponseReceived)
                    and dict(e.headers)[b":status"].startswith(b"2")], evs
        for conn in peer.conns:
            for e in conn.events:
                if isinstance(e, h2.events.RequestReceived):
                    def gone(conn: PeerConn = conn, sid_up: int = e.stream_id) -> bool:
                        return conn.was_reset(sid_up) or conn.closed
                    assert conn.wait(gone), conn.events
                    assert not conn.ended(e.stream_id), conn.events
                    assert conn.received.get(e.stream_id, 0) <= 5
        assert h2_get(px, "/ok")[1] == b"ok"


def test_http11_hop_by_hop_fields_are_not_sent_to_an_http2_upstream() -> None:
    """h1 -> h2 translation (spec 1.5): Connection, Keep-Alive,
    Proxy-Connection, Transfer-Encoding and the fields Connection nominates
    (x-foo) are not sent (the chunked body becomes DATA), TE only as
    "trailers", Host becomes :authority."""
    got: dict[str, Any] = {}

    def record(conn: PeerConn, sid: int) -> None:
        got["headers"] = next(e.headers for e in conn.events
                              if isinstance(e, h2.events.RequestReceived) and e.stream_id == sid)
        conn.wait(lambda: conn.ended(sid))
        got["body"] = conn.received.get(sid, 0)
        conn.respond(sid, b"seen")

    with H2Peer(serve({b"/h1": record})) as peer, running_proxy(h2_service_entry(peer.port)) as px:
        sock = socket.create_connection(("127.0.0.1", px.outbound))
        sock.sendall(b"POST /h1 HTTP/1.1\r\nHost: h2svc:9090\r\nConnection: keep-alive, x-foo\r\nX-Foo: bar\r\n"
                     b"Keep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nTE: trailers\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
        sock.settimeout(10)
        answer = b""
        while not answer.endswith(b"seen"):
            data = sock.recv(65536)
            assert data, answer
            answer += data
        sock.close()
        assert answer.startswith(b"HTTP/1.1 200"), answer
    assert not peer.errors
    names = [n for n, _ in got["headers"]]
    fields = dict(got["headers"])
    for hop in (b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade", b"host"):
        assert hop not in names, got["headers"]
    assert fields[b":authority"] == b"h2svc:9090" and fields[b"te"] == b"trailers"
    assert got["body"] == 5
    # A field the Connection header nominates is hop-by-hop too: removed, as
    # Envoy's HTTP/1.1 codec does (Utility::sanitizeConnectionHeader, called
    # from ServerConnectionImpl::onHeadersCompleteBase).
    assert b"x-foo" not in names, got["headers"]


def test_a_malformed_response_ends_the_connections_other_streams_as_envoy() -> None:
    """A malformed response (a connection field) on one stream while another
    stream of the same upstream connection is half answered: the malformed
    one gets 502 UPE, the other is reset after its first 5 bytes (the
    connection is gone). Envoy 1.40 behind the same peer did exactly this."""
    first = threading.Event()

    def script(conn: PeerConn) -> None:
        if first.is_set():
            serve({})(conn)
            return
        first.set()
        reqs: dict[bytes, int] = {}
        while len(reqs) < 2:
            r = conn.next_request()
            if r is None:
                return
            reqs[r[1][b":path"]] = r[0]
        slow, bad = reqs[b"/slow"], reqs[b"/bad"]
        conn.h2.send_headers(slow, [(b":status", b"200"), (b"content-length", b"10")])
        conn.h2.send_data(slow, b"hello")
        conn.flush()
        conn.wait(lambda: False, limit=0.3)
        conn.h2.send_headers(bad, [(b":status", b"200"), (b"connection", b"close"), (b"content-length", b"0")],
                             end_stream=True)
        conn.flush()
        linger(conn)

    with H2Peer(script) as peer, running_proxy(h2_service_entry(peer.port)) as px:
        c = H2Client(px.outbound)
        try:
            s1 = c.request("/slow", authority=AUTHORITY)
            wait_for(lambda: bool(peer.conns) and bool(peer.conns[0].taken))
            s2 = c.request("/bad", authority=AUTHORITY)
            evs = c.events(lambda g: sum(isinstance(e, (h2.events.StreamEnded, h2.events.StreamReset))
                                         for e in g) >= 2)
        finally:
            c.close()
        statuses = {e.stream_id: dict(e.headers)[b":status"] for e in evs if isinstance(e, h2.events.ResponseReceived)}
        ends = {e.stream_id: type(e) for e in evs if isinstance(e, (h2.events.StreamEnded, h2.events.StreamReset))}
        body1 = b"".join(e.data for e in evs if isinstance(e, h2.events.DataReceived) and e.stream_id == s1)
        assert statuses == {s1: b"200", s2: b"502"}, evs
        assert body1 == b"hello" and ends == {s1: h2.events.StreamReset, s2: h2.events.StreamEnded}, evs
        assert h2_get(px, "/ok")[1] == b"ok"


def test_content_length_mismatch_after_the_headers_went_upstream() -> None:
    """The same, with the DATA sent only once the upstream holds the
    request's HEADERS: the upstream's stream is reset (CANCEL) and never
    ends, so it never sees a complete request with the wrong length."""
    with H2Peer(serve({b"/cl": lambda conn, sid: None})) as peer, \
            running_proxy(h2_service_entry(peer.port)) as px:
        c = H2Client(px.outbound)
        try:
            sid = c.conn.get_next_available_stream_id()
            c.conn.send_headers(sid, [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", AUTHORITY),
                                      (b":path", b"/cl"), (b"content-length", b"5")])
            c.flush()
            wait_for(lambda: bool(peer.conns) and bool(peer.conns[0].taken))
            c.conn.send_data(sid, b"x" * 10, end_stream=True)
            c.flush()
            evs = c.events(lambda g: any(isinstance(e, (h2.events.StreamReset, h2.events.StreamEnded,
                                                        h2.events.ConnectionTerminated)) for e in g))
        finally:
            c.close()
        assert not [e for e in evs if isinstance(e, h2.events.ResponseReceived)], evs
        up = peer.conns[0]
        (up_sid,) = up.taken
        assert up.wait(lambda: up.was_reset(up_sid))
        assert not up.ended(up_sid) and up.received.get(up_sid, 0) == 0, up.events
        assert h2_get(px, "/ok")[1] == b"ok"


def test_an_early_response_ends_the_upload() -> None:
    """An upstream that answers before the request body is in (RFC 9113
    8.1: a complete response, then RST_STREAM(NO_ERROR), as a gRPC server
    failing a client stream does): the client gets the whole response and
    its stream is then reset with NO_ERROR (it may stop sending); the
    upload is not forwarded further."""
    def early(conn: PeerConn, sid: int) -> None:
        conn.h2.send_headers(sid, [(b":status", b"403"), (b"content-length", b"7")])
        conn.h2.send_data(sid, b"go away", end_stream=True)
        conn.h2.reset_stream(sid, ErrorCodes.NO_ERROR)
        conn.flush()

    with H2Peer(serve({b"/early": early})) as peer, running_proxy(h2_service_entry(peer.port)) as px:
        c = H2Client(px.outbound)
        try:
            sid = c.conn.get_next_available_stream_id()
            c.conn.send_headers(sid, [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", AUTHORITY),
                                      (b":path", b"/early"), (b"content-length", str(4 << 20).encode())])
            c.conn.send_data(sid, b"u" * 16000)
            c.flush()
            headers, body, end = c.response(sid)
        finally:
            c.close()
        assert headers is not None and headers[b":status"] == b"403" and body == b"go away", (headers, body, end)
        assert end == "end" or (isinstance(end, h2.events.StreamReset) and end.error_code == ErrorCodes.NO_ERROR)
        assert sum(peer.conns[0].received.values()) <= 16000
        assert h2_get(px, "/ok")[1] == b"ok"
        assert len(peer.conns) == 1  # the connection carried on


def test_connection_cannot_remove_what_the_proxy_adds() -> None:
    """The fields an HTTP/1.1 client's Connection header nominates are
    removed from what the client sent, as Envoy's codec does before the
    connection manager and the route add theirs: a client nominating the
    VirtualService's header (set by the route) or x-request-id (generated
    by the proxy) cannot strip them from the upstream request. (Before, the
    nominated names were filtered out of the finished upstream head: both
    were stripped.)"""
    vs = """apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: h2svc}
spec:
  hosts: [h2svc]
  http:
  - route: [{destination: {host: h2svc}}]
    headers:
      request:
        set: {x-route-set: "from-the-route"}
"""
    with H2Peer(serve({})) as peer, running_proxy({"10-se.yaml": h2_service_entry(peer.port),
                                                   "20-vs.yaml": vs}) as px:
        sock = socket.create_connection(("127.0.0.1", px.outbound))
        sock.settimeout(10)
        sock.sendall(b"GET /x HTTP/1.1\r\nHost: h2svc:9090\r\nConnection: keep-alive, x-route-set, x-request-id, x-mine\r\n"
                     b"X-Mine: hop\r\n\r\n")
        answer = sock.recv(65536)
        sock.close()
        assert answer.startswith(b"HTTP/1.1 200"), answer
    (req,) = [dict(e.headers) for c in peer.conns for e in c.events if isinstance(e, h2.events.RequestReceived)]
    assert req.get(b"x-route-set") == b"from-the-route", req
    assert req.get(b"x-request-id"), req
    assert b"x-mine" not in req, req  # the client's own nominated field is hop-by-hop
