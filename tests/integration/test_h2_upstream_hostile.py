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

import time
from pathlib import Path
from typing import Any

import h2.events
import h2.settings
import hpack
import pytest
from h2.errors import ErrorCodes
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
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
    b"/big-headers": (big_header_section, "502", None),
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
    connection is closed with the GOAWAY code in the table (or only the
    stream is reset), it is counted as upstream_cx_protocol_error, and the
    next request is served."""
    behaviour, expect, goaway = HOSTILE[path]
    log = tmp_path / "access.log"
    with H2Peer(serve({path: behaviour})) as peer, \
            running_proxy(h2_service_entry(peer.port), args=["--access-log", str(log)]) as px:
        headers, body, end = h2_get(px, path.decode())
        if expect == "502":
            assert headers is not None and headers[b":status"] == b"502", (headers, body, end)
            assert body == b"upstream connect error or disconnect/reset before headers. reset reason: protocol error"
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


