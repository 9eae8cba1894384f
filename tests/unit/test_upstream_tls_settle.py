"""An idle pooled TLS connection whose socket is readable but not read yet
(UpstreamConnection.stale over TLS): a TLS 1.3 server sends its session
tickets after the handshake, records without application data, so the
connection is held until the loop has read them and then reused; bytes of
application data still close it as on a plaintext connection. Real TLS
(pyproxy's ISTIO_MUTUAL contexts) against a blocking TLS server in a thread,
so the server's records arrive while the loop is held inside a callback."""

from __future__ import annotations

import asyncio
import random
import socket
import ssl
import threading
from typing import Any

import pytest
import uvloop

from pyproxy.security.ca import init_ca, issue_to_dir
from pyproxy.security.certs import Credentials, load_credentials
from pyproxy.security.upstream import UpstreamTLS
from pyproxy.upstream.cluster import Cluster, ClusterEndpoint
from pyproxy.upstream.connection import UpstreamConnection
from pyproxy.upstream.settings import ClusterSettings


@pytest.fixture(scope="module")
def creds(tmp_path_factory: pytest.TempPathFactory) -> tuple[Credentials, Credentials]:
    d = tmp_path_factory.mktemp("mesh")
    init_ca(d / "ca")
    issue_to_dir(d / "ca", d / "server", "default", "server")
    issue_to_dir(d / "ca", d / "client", "default", "client")
    return load_credentials(str(d / "server")), load_credentials(str(d / "client"))


class _Server:
    """TLS server in a thread (an SSLObject over a blocking socket): it
    completes the handshake, waits for ``go`` (the client has parked the
    connection idle), then sends the session tickets OpenSSL made at the end
    of its handshake (TLS 1.3) and ``after`` (application data) together."""

    def __init__(self, ctx: ssl.SSLContext, after: bytes) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.ctx = ctx
        self.after = after
        self.go = threading.Event()
        self.socks: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            self.socks.append(sock)
            try:
                self._handshake(sock)
            except (OSError, ssl.SSLError):
                return

    def _handshake(self, sock: socket.socket) -> None:
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = self.ctx.wrap_bio(incoming, outgoing, server_side=True)
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                sock.sendall(outgoing.read())
                data = sock.recv(65536)
                if not data:
                    return
                incoming.write(data)
        if self.after:
            tls.write(self.after)
            self.after = b""  # the first connection only
        self.go.wait(10)
        sock.sendall(outgoing.read())  # the session tickets (and ``after``), in one segment

    def close(self) -> None:
        self.go.set()
        self.listener.close()
        for s in self.socks:
            s.close()


class _Stream:
    def __init__(self) -> None:
        self.connected: UpstreamConnection | None = None
        self.failed: str | None = None
        self.on_connected: Any = None

    def on_upstream_connected(self, conn: UpstreamConnection) -> None:
        self.connected = conn
        if self.on_connected is not None:
            self.on_connected(conn)

    def on_upstream_connect_failed(self, ep: object, reason: str) -> None:
        self.failed = reason


class _Certs:
    def __init__(self, current: Credentials) -> None:
        self.current = current


async def _scenario(creds: tuple[Credentials, Credentials], after: bytes) -> tuple[Cluster, _Stream, UpstreamConnection]:
    server_creds, client_creds = creds
    server = _Server(server_creds.server_context, after)
    loop = asyncio.get_running_loop()
    cluster = Cluster("outbound|80||svc", ClusterSettings(), None, loop, random.Random(1))
    cluster.certs = _Certs(client_creds)
    ep = ClusterEndpoint(cluster, "127.0.0.1", server.port, tls=UpstreamTLS("ISTIO_MUTUAL", auto=True))
    cluster.endpoints = [ep]
    first, second = _Stream(), _Stream()

    def park_then_reuse(conn: UpstreamConnection) -> None:
        # The first request is done at once: the connection is parked idle
        # before the server's post-handshake records arrive.
        ep.release(conn, True)
        assert ep.idle and ep.idle[-1] is conn
        loop.call_later(0.1, reuse, conn)  # the server has our last flight by then

    def reuse(conn: UpstreamConnection) -> None:
        # Let the server send its tickets and wait, the loop held, until
        # they are in the socket: unread by the loop; then ask again.
        server.go.set()
        assert conn.poller is not None and conn.poller.poll(5000)
        assert ep.acquire(second) is None  # held (not closed, not used yet)
        assert not conn.closed

    first.on_connected = park_then_reuse
    try:
        assert ep.acquire(first) is None
        for _ in range(500):
            if second.connected is not None or second.failed is not None:
                break
            await asyncio.sleep(0.01)
        first_conn = first.connected
        assert first_conn is not None
        return cluster, second, first_conn
    finally:
        for conn in (first.connected, second.connected):
            if conn is not None:
                conn.close()
        server.close()


def _run(coro: Any) -> Any:
    loop = uvloop.new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


def test_session_tickets_on_an_idle_tls_connection_do_not_discard_it(
        creds: tuple[Credentials, Credentials]) -> None:
    cluster, second, first_conn = _run(_scenario(creds, b""))
    assert second.connected is first_conn and second.failed is None
    stats = cluster.stats
    assert stats.upstream_cx_total == 1  # no second handshake
    assert stats.upstream_cx_protocol_error == 0 and stats.upstream_cx_destroy_remote == 0


def test_application_bytes_on_an_idle_tls_connection_still_close_it(
        creds: tuple[Credentials, Credentials]) -> None:
    cluster, second, first_conn = _run(_scenario(creds, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"))
    assert first_conn.closed
    assert cluster.stats.upstream_cx_protocol_error == 1
    # The queued request got a new connection instead.
    assert second.connected is not None and second.connected is not first_conn
    assert cluster.stats.upstream_cx_total == 2
