"""UpstreamConnection.stale(): before the pool reuses an idle connection it
polls the socket (issue 12 items 2 and 4). Real socket pairs on a real event
loop, so the bytes or the close are in the kernel but not yet delivered by
the loop: exactly the window the check exists for."""

from __future__ import annotations

import asyncio
import socket

import pytest
import uvloop

from pyproxy.upstream.cluster import ClusterStats
from pyproxy.upstream.connection import UpstreamConnection


class _Cluster:
    def __init__(self) -> None:
        self.stats = ClusterStats()


class _Endpoint:
    def __init__(self) -> None:
        self.cluster = _Cluster()
        self.tls = None  # plaintext (TLS endpoints: test_upstream_tls_settle.py)
        self.closed: list[UpstreamConnection] = []

    def on_connection_closed(self, conn: UpstreamConnection) -> None:
        self.closed.append(conn)


async def _pair() -> tuple[UpstreamConnection, _Endpoint, socket.socket]:
    ours, peer = socket.socketpair()
    ep = _Endpoint()
    conn = UpstreamConnection(ep)  # type: ignore[arg-type]
    await asyncio.get_running_loop().create_connection(lambda: conn, sock=ours)
    return conn, ep, peer


@pytest.mark.parametrize("loop_kind", ["uvloop", "asyncio"])
@pytest.mark.parametrize("what", ["nothing", "bytes", "close", "reset"])
def test_stale_sees_what_the_loop_has_not_delivered(what: str, loop_kind: str) -> None:
    loop = uvloop.new_event_loop() if loop_kind == "uvloop" else asyncio.new_event_loop()
    try:
        loop.run_until_complete(_check(what))
    finally:
        loop.close()


async def _check(what: str) -> None:
    conn, ep, peer = await _pair()
    assert conn.poller is not None
    try:
        if what == "bytes":
            peer.send(b"HTTP/1.1 200 OK\r\n")
        elif what == "close":
            peer.shutdown(socket.SHUT_WR)
        elif what == "reset":
            peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            peer.close()
        # No await in between: the loop has not run, data_received and
        # connection_lost have not been called.
        stale = conn.stale()
        stats = ep.cluster.stats
        if what == "nothing":
            assert not stale and not conn.closed
            assert stats.upstream_cx_protocol_error == stats.upstream_cx_destroy_remote == 0
        else:
            assert stale and conn.closed and ep.closed == [conn]
            if what == "bytes":
                assert (stats.upstream_cx_protocol_error, stats.upstream_cx_destroy_remote) == (1, 0)
            else:
                assert (stats.upstream_cx_protocol_error, stats.upstream_cx_destroy_remote) == (0, 1)
        await asyncio.sleep(0.01)  # connection_lost after our own close() counts nothing more
        assert stats.upstream_cx_destroy_remote == (0 if what in ("nothing", "bytes") else 1)
    finally:
        conn.close()
        if what != "reset":
            peer.close()
