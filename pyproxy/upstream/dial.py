"""Plaintext TCP connects to an upstream, started in the caller's turn.

Envoy's connection pool makes the connect() system call inside the call
that needs the connection: when a connection that reached
``maxRequestsPerConnection`` closes with a request queued, the replacement
is created in that same close event (``ConnPoolImplBase::onConnectionEvent``
→ ``tryCreateNewConnections``), before the response that freed the slot is
flushed to the client, and the queued request is attached in the event that
reports the connection up (``onUpstreamReady``). ``loop.create_connection``
run as a task makes the system call one loop pass later, after that
response went out, and uvloop reports the connection one pass after the
connect completed; at Python's cost per pass, the client's next request
then finds the queued one still pending and is refused (Istio's
circuit-breaking task: load-tests/circuit_breaking.py, docs/differences.md).

A ``Dial`` makes the non-blocking connect() itself, at once. When the
connection is already established as connect() returns (loopback: the
kernel completes the handshake inside the call), the transport is created
right away, so ``connection_made`` (which hands the connection to the queued
request) runs at the start of the next loop pass, before any socket event
read after it. A connect still in progress is watched with ``add_writer``
and bounded by the connect timeout. Failures are always reported from a
later loop callback, never from inside the caller (which may be
``ClusterEndpoint.acquire``, whose stream is not queued yet).

(Always waiting for writability, as Envoy waits for its Connected event,
was tried: libuv adds a new descriptor to epoll only at its next poll, so
the already-connected socket is reported after the client data that
arrived meanwhile, and the task's 503 share stayed at ~40% for 2 clients.)
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Callable
from typing import Any


def numeric_address(host: str, port: int) -> tuple[int, tuple[Any, ...]] | None:
    """(family, sockaddr) for an IPv4/IPv6 literal, else None (a DNS name or
    a unix:// path: ``loop.create_connection`` handles those)."""
    try:
        socket.inet_pton(socket.AF_INET, host)
        return socket.AF_INET, (host, port)
    except OSError:
        pass
    try:
        socket.inet_pton(socket.AF_INET6, host)
        return socket.AF_INET6, (host, port, 0, 0)
    except OSError:
        return None


class Dial:
    """One connect of ``conn`` (an ``UpstreamConnection``, not imported:
    it depends on the cluster, which depends on this): on success the
    transport calls ``conn.connection_made``; on failure ``failed(reason)``
    runs, with reason ``connection failure`` or ``connection timeout``."""

    __slots__ = ("loop", "conn", "failed", "sock", "timer", "coro")

    def __init__(self, loop: asyncio.AbstractEventLoop, conn: asyncio.Protocol,
                 failed: Callable[[str], None]) -> None:
        self.loop = loop
        self.conn = conn
        self.failed = failed
        self.sock: socket.socket | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.coro: Any = None

    def start(self, family: int, address: tuple[Any, ...], timeout: float) -> None:
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            self.loop.call_soon(self.failed, "connection failure")
            return
        self.sock = sock
        sock.setblocking(False)
        err = sock.connect_ex(address)
        if err == 0 or (err == errno.EINPROGRESS and _established(sock)):
            self._open()
        elif err == errno.EINPROGRESS:
            self.loop.add_writer(sock.fileno(), self._on_writable)
            self.timer = self.loop.call_later(timeout, self._on_timeout)
        else:
            sock.close()
            self.loop.call_soon(self.failed, "connection failure")

    def _on_writable(self) -> None:
        sock = self.sock
        assert sock is not None
        self.loop.remove_writer(sock.fileno())
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            sock.close()
            self.failed("connection failure")
            return
        self._open()

    def _on_timeout(self) -> None:
        self.timer = None
        sock = self.sock
        assert sock is not None
        self.loop.remove_writer(sock.fileno())
        sock.close()
        self.failed("connection timeout")

    def _open(self) -> None:
        """Wrap the connected socket in a transport. ``create_connection``
        with ``sock=`` is a coroutine that creates the transport (and
        schedules ``connection_made``) before its only await, on the waiter
        that ``connection_made`` resolves: it is stepped here directly,
        rather than as a task, so the transport exists before this call
        returns instead of one loop pass later."""
        conn = self.conn
        self.coro = self.loop.create_connection(lambda: conn, sock=self.sock)
        self._step(None)

    def _step(self, _waited: Any) -> None:
        coro = self.coro
        try:
            waiter = coro.send(None)
        except StopIteration:
            self.coro = None
            return
        except (OSError, ValueError, RuntimeError):  # the transport could not be made
            self.coro = None
            self.loop.call_soon(self.failed, "connection failure")
            return
        waiter.add_done_callback(self._step)


def _established(sock: socket.socket) -> bool:
    try:
        sock.getpeername()
    except OSError:  # ENOTCONN: still connecting (or refused: SO_ERROR says which)
        return False
    return True
