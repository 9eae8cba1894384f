"""Dial: plaintext upstream connects made in the caller's call (as Envoy's
pool does), on a real uvloop loop with real loopback sockets, since what is
tested is when the connect() system call happens and which loop callback
reports its outcome."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import uvloop

from pyproxy.upstream.cluster import ClusterStats
from pyproxy.upstream.connection import UpstreamConnection
from pyproxy.upstream.dial import Dial, numeric_address


class _Cluster:
    def __init__(self) -> None:
        self.stats = ClusterStats()


class _Endpoint:
    def __init__(self) -> None:
        self.cluster = _Cluster()

    def on_connection_closed(self, conn: UpstreamConnection) -> None:
        pass


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    lp = uvloop.new_event_loop()
    yield lp
    lp.run_until_complete(asyncio.sleep(0.05))  # closed transports finish closing
    lp.close()


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    yield s
    s.close()


def _until(loop: asyncio.AbstractEventLoop, done: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    async def wait() -> None:
        while not done():
            await asyncio.sleep(0.01)

    try:
        loop.run_until_complete(asyncio.wait_for(wait(), timeout))
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


def _dial(loop: asyncio.AbstractEventLoop) -> tuple[Dial, UpstreamConnection, list[Any], list[str]]:
    conn = UpstreamConnection(_Endpoint())  # type: ignore[arg-type]
    made: list[Any] = []
    failed: list[str] = []
    conn.on_made = made.append
    return Dial(loop, conn, failed.append), conn, made, failed


def _full_listener() -> tuple[socket.socket, socket.socket]:
    """A listener whose accept queue is full (backlog 0, one connection
    queued): Linux drops further SYNs, so a connect to it stays in progress
    until the queue has room and the SYN is retransmitted (after 1 s)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(0)
    filler = socket.create_connection(s.getsockname(), timeout=5)
    return s, filler


def test_numeric_address_takes_ip_literals_only() -> None:
    assert numeric_address("10.1.2.3", 80) == (socket.AF_INET, ("10.1.2.3", 80))
    assert numeric_address("::1", 80) == (socket.AF_INET6, ("::1", 80, 0, 0))
    assert numeric_address("reviews.default.svc", 80) is None
    assert numeric_address("unix:///tmp/s", 0) is None


def test_connect_is_made_inside_start_and_reported_by_connection_made(
        loop: asyncio.AbstractEventLoop, listener: socket.socket) -> None:
    dial, conn, made, failed = _dial(loop)
    dial.start(socket.AF_INET, listener.getsockname(), 5.0)
    # The loop has not run at all, yet the upstream can accept the
    # connection: the connect() was made in the call.
    listener.settimeout(5)
    server, _ = listener.accept()
    with server:
        _until(loop, lambda: bool(made or failed), "the connect's outcome")
        assert made == [conn] and not failed
        assert conn.transport is not None and dial.timer is None
        conn.write(b"ping")
        server.settimeout(5)
        assert server.recv(4) == b"ping"
        conn.close()


def test_refused_connect_is_reported_from_a_loop_callback_not_from_start(loop: asyncio.AbstractEventLoop) -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, not listening: connection refused
    with closed:
        dial, conn, made, failed = _dial(loop)
        dial.start(socket.AF_INET, closed.getsockname(), 5.0)
        assert not failed, "the caller (the pool's acquire) never sees its stream failed inside the call"
        _until(loop, lambda: bool(failed), "the refusal")
    assert failed == ["connection failure"] and not made and conn.transport is None


def test_connect_in_progress_is_watched_until_the_socket_is_writable(loop: asyncio.AbstractEventLoop) -> None:
    lst, filler = _full_listener()
    with lst, filler:
        dial, conn, made, failed = _dial(loop)
        dial.start(socket.AF_INET, lst.getsockname(), 10.0)
        assert dial.timer is not None and dial.coro is None, "the SYN was dropped: still connecting"
        lst.accept()[0].close()  # room in the queue: the retransmitted SYN completes the handshake
        _until(loop, lambda: bool(made or failed), "the connect's outcome")
        assert made == [conn] and not failed
        assert conn.transport is not None and dial.timer is None
        conn.close()


def test_connect_in_progress_past_the_connect_timeout_fails_as_connection_timeout(
        loop: asyncio.AbstractEventLoop) -> None:
    lst, filler = _full_listener()
    with lst, filler:
        dial, conn, made, failed = _dial(loop)
        dial.start(socket.AF_INET, lst.getsockname(), 0.2)
        assert not failed
        _until(loop, lambda: bool(failed), "the connect timeout")
        assert failed == ["connection timeout"] and not made and conn.transport is None
        assert dial.sock is not None and dial.sock.fileno() == -1, "the socket is closed"
