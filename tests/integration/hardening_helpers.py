"""Helpers for the hardening tests: a recording raw upstream, stats, RSS/fd probes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Self

from tests.harness import Proxy, http_get


@dataclass
class UpConn:
    """One connection the upstream accepted: every byte it received, and
    whether the proxy closed it."""

    received: bytearray = field(default_factory=bytearray)
    requests: int = 0
    closed: asyncio.Event = field(default_factory=asyncio.Event)


class RecordingUpstream:
    """A minimal HTTP/1.1 server that records every byte per connection.

    Each request (Content-Length or chunked body) is answered by
    ``respond(head)``: bytes (keep the connection), None (stall until the
    proxy closes), or ``(bytes, "close")`` / ``(bytes, "reset")`` (send,
    then close, or abort with a TCP reset). The default answer is
    ``200 ok`` with keep-alive."""

    def __init__(self, respond: Callable[[bytes], Awaitable[Any]] | None = None) -> None:
        self.respond = respond or self.ok
        self.conns: list[UpConn] = []
        self.port = 0
        self.server: asyncio.base_events.Server | None = None

    @staticmethod
    async def ok(head: bytes) -> bytes | None:
        return b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"

    @property
    def total_bytes(self) -> int:
        return sum(len(c.received) for c in self.conns)

    @property
    def total_requests(self) -> int:
        return sum(c.requests for c in self.conns)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = UpConn()
        self.conns.append(conn)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                conn.received += head
                lower = head.lower()
                if b"transfer-encoding: chunked" in lower:
                    while True:
                        line = await reader.readuntil(b"\r\n")
                        conn.received += line
                        size = int(line.split(b";")[0], 16)
                        data = await reader.readexactly(size + 2)
                        conn.received += data
                        if size == 0:
                            break
                else:
                    for line in lower.split(b"\r\n"):
                        if line.startswith(b"content-length:"):
                            data = await reader.readexactly(int(line.split(b":")[1]))
                            conn.received += data
                conn.requests += 1
                answer = await self.respond(head)
                if answer is None:
                    # Stall: wait for the proxy to give up on us.
                    while True:
                        more = await reader.read(65536)
                        if not more:
                            break
                        conn.received += more
                    break
                after = ""
                if isinstance(answer, tuple):
                    answer, after = answer
                writer.write(answer)
                await writer.drain()
                if after == "reset":
                    sock = writer.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    writer.transport.abort()
                    break
                if after == "close":
                    break
        except (asyncio.IncompleteReadError, ConnectionError, ValueError, asyncio.LimitOverrunError):
            pass
        finally:
            # Whatever is left (a truncated request) is recorded too.
            with contextlib.suppress(Exception):
                rest = reader._buffer  # type: ignore[attr-defined]
                conn.received += bytes(rest)
            conn.closed.set()
            writer.close()

    async def __aenter__(self) -> Self:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0, limit=1 << 20)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 2)


def downstream_stats(px: Proxy) -> dict[str, int]:
    """The proxy's listener counters (``http.*`` in /stats), by stat name."""
    status, body = http_get(px.admin_url + "/stats?format=json")
    assert status == 200, body[:300]
    out = {}
    for s in json.loads(body)["stats"]:
        if s["name"].startswith("http."):
            out[s["name"][5:]] = s["value"]
    return out


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def open_fds(pid: int) -> int:
    import os

    return len(os.listdir(f"/proc/{pid}/fd"))


async def read_until_close(reader: asyncio.StreamReader, timeout: float) -> tuple[bytes, bool]:
    """Everything until EOF (or a reset); (data, closed) where closed is
    False when the timeout expired first."""
    data = bytearray()
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return bytes(data), False
        try:
            chunk = await asyncio.wait_for(reader.read(65536), left)
        except TimeoutError:
            return bytes(data), False
        except ConnectionError:
            return bytes(data), True
        if not chunk:
            return bytes(data), True
        data += chunk


async def access_log_lines(path: Any, timeout: float = 5.0, at_least: int = 1) -> list[str]:
    """The access log's lines, waiting for the writer's batch to land (the
    loop keeps serving the test's upstreams meanwhile)."""
    deadline = time.monotonic() + timeout
    lines: list[str] = []
    while time.monotonic() < deadline:
        try:
            lines = path.read_text().splitlines()
        except FileNotFoundError:
            lines = []
        if len(lines) >= at_least:
            return lines
        await asyncio.sleep(0.05)
    return lines


class ThreadedUpstream:
    """A ``RecordingUpstream`` on its own event loop in a thread, for
    synchronous tests (hypothesis drives plain functions)."""

    def __init__(self, respond: Callable[[bytes], Awaitable[Any]] | None = None) -> None:
        import threading

        self.loop = asyncio.new_event_loop()
        self.upstream = RecordingUpstream(respond)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> RecordingUpstream:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.upstream.__aenter__(), self.loop).result(10)
        return self.upstream

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.upstream.__aexit__(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
