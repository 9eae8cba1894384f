"""Memory stays bounded when a client does not read (issue 21).

Slow-client tests, not load tests: a few connections, a few seconds each.
RSS is read from /proc (the proxy process, plus its workers with
``--workers``); the upstream counts what it was asked for.
"""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Self

import pytest

from tests.harness import Proxy, http_get, raw_request, running_proxy, service_entry
from tests.integration.hardening_helpers import downstream_stats, rss_bytes

H = b"Host: svc\r\n"
MB = 1 << 20


class CountingUpstream:
    """Answers ``GET /small`` with ``small`` bytes and ``GET /big`` with
    ``big`` bytes (written 64 KiB at a time, each write waiting for TCP to
    take it, so what it pushed is what the proxy read, plus socket buffers)."""

    def __init__(self, small: int = 8 << 10, big: int = 0, close: bool = False) -> None:
        self.small = small
        self.close = close  # answer with connection: close (a new connection per request)
        self.big = big
        self.requests = 0
        self.big_requests = 0
        self.big_pushed = 0
        self.port = 0
        self.server: asyncio.base_events.Server | None = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        small = (b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n%s\r\n" % (
            self.small, b"connection: close\r\n" if self.close else b"") + b"s" * self.small)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.requests += 1
                if head.startswith(b"GET /big "):
                    self.big_requests += 1
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % self.big)
                    block = b"b" * (64 << 10)
                    left = self.big
                    while left > 0:
                        writer.write(block[:left])
                        await writer.drain()
                        self.big_pushed += min(left, len(block))
                        left -= len(block)
                else:
                    writer.write(small)
                    await writer.drain()
                    if self.close:
                        break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> Self:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()


def _requests_total(px: Proxy) -> int:
    """Requests the proxy answered: the sum of istio_requests_total."""
    status, body = http_get(px.stats_url + "/stats/prometheus")
    assert status == 200, body[:200]
    total = 0.0
    for line in body.decode().splitlines():
        if line.startswith("istio_requests_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


def proxy_rss(px: Proxy) -> int:
    """RSS of the proxy and, with --workers, of its worker processes."""
    total = rss_bytes(px.process.pid)
    try:
        with open(f"/proc/{px.process.pid}/task/{px.process.pid}/children") as f:
            children = [int(p) for p in f.read().split()]
    except OSError:
        children = []
    for pid in children:
        try:
            total += rss_bytes(pid)
        except OSError:
            pass
    return total


async def non_reading_connection(port: int, rcvbuf: int = 4096) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A client connection with a small receive buffer that will read nothing."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return await asyncio.open_connection(sock=sock)


async def settle(count: callable, px: Proxy, seconds: float) -> tuple[int, int]:  # type: ignore[valid-type]
    """Watch until ``count()`` stops moving for 1 s, after at least 2 s (or
    until ``seconds`` pass): (peak RSS seen, final count)."""
    peak = 0
    last, since = -1, time.monotonic()
    start = time.monotonic()
    deadline = start + seconds
    while time.monotonic() < deadline:
        peak = max(peak, proxy_rss(px))
        now_count = count()
        if now_count != last:
            last, since = now_count, time.monotonic()
        elif time.monotonic() - since > 1.0 and time.monotonic() - start > 2.0:
            break
        await asyncio.sleep(0.05)
    return peak, last


async def _warm(px: Proxy) -> None:
    for _ in range(20):
        assert (await raw_request(px.outbound, b"GET /small HTTP/1.1\r\n" + H + b"\r\n")).startswith(b"HTTP/1.1 200")


LOCAL_REPLY = """---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: svc}
spec:
  hosts: [svc]
  http:
  - directResponse: {status: 200, body: {string: "%s"}}
""" % ("d" * 4096)

MIRROR_RETRY = """---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: svc}
spec:
  hosts: [svc]
  http:
  - route: [{destination: {host: svc}}]
    retries: {attempts: 2, retryOn: "5xx,reset"}
    mirror: {host: shadow}
    mirrorPercentage: {value: 100}
"""


@pytest.mark.parametrize("variant,workers", [("upstream", 1), ("upstream", 2), ("local-reply", 1),
                                             ("mirror-retry", 1)])
async def test_pipelined_requests_whose_responses_are_never_read(variant: str, workers: int) -> None:
    """Scenario 1: 20 connections each write 272 KiB of pipelined GETs
    (8,192 requests) at once and read nothing. RSS grows by less than 1 MB
    per connection, only a bounded number of them is answered, and RSS
    comes back after the clients close. The same with two workers, with
    local replies (a 4 KiB directResponse), and on a route with a retry
    policy and a mirror."""
    conns, per_conn = 20, 8192
    async with CountingUpstream(small=4 << 10) as up, CountingUpstream(small=2) as shadow:
        cfg = service_entry("svc", [(up.port, {})])
        if variant == "local-reply":
            cfg += LOCAL_REPLY
        elif variant == "mirror-retry":
            cfg += "---\n" + service_entry("shadow", [(shadow.port, {})]) + MIRROR_RETRY
        with running_proxy(cfg, args=["--workers", str(workers)]) as px:
            await _warm(px)
            await asyncio.sleep(0.5)
            base = proxy_rss(px)
            answered_before = _requests_total(px)
            clients = [await non_reading_connection(px.outbound) for _ in range(conns)]
            pipelined = b"GET /small HTTP/1.1\r\n" + H + b"\r\n"
            blob = pipelined * per_conn
            for _, writer in clients:
                writer.write(blob)
            peak, _ = await settle(lambda: _requests_total(px), px, 20)
            served = _requests_total(px) - answered_before
            for _, writer in clients:
                writer.transport.abort()
            await asyncio.sleep(1.0)
            after = proxy_rss(px)
            # The proxy still serves everyone else.
            assert (await raw_request(px.outbound, pipelined)).startswith(b"HTTP/1.1 200")
            assert px.alive()
    growth = peak - base
    print(f"scenario 1 ({variant}, workers {workers}): RSS {base / MB:.1f} MB -> peak {peak / MB:.1f} MB "
          f"({growth / conns / MB:.2f} MB per connection), after close {after / MB:.1f} MB; "
          f"{served} of {conns * per_conn} requests answered")
    assert growth < conns * MB, f"RSS grew {growth / conns / MB:.2f} MB per connection"
    # Bounded by what the sockets hold (a few MB each way per connection),
    # not by what was sent: 4 KiB responses, so well under half of them.
    assert served < conns * per_conn // 2, served
    assert after - base < 8 * MB, f"RSS stayed {(after - base) / MB:.1f} MB above its start"


@pytest.mark.parametrize("variant", ["keep-alive", "connection-close", "local-reply"])
async def test_client_that_never_reads_then_asks_for_a_large_response(variant: str) -> None:
    """Scenario 2: one connection with a small receive buffer sends 3,000
    requests for 8 KiB answers without reading, then one for 300 MB. The
    proxy stops taking requests once the client's buffer is full: RSS grows
    by less than 32 MB and the upstream is never drained of the 300 MB."""
    big = 300 * MB
    async with CountingUpstream(small=8 << 10, big=big, close=variant == "connection-close") as up:
        cfg = service_entry("svc", [(up.port, {})]) + (LOCAL_REPLY if variant == "local-reply" else "")
        with running_proxy(cfg) as px:
            await _warm(px)
            await asyncio.sleep(0.5)
            base = proxy_rss(px)
            answered_before = _requests_total(px)
            _reader, writer = await non_reading_connection(px.outbound)
            peak = base
            for i in range(3000):
                # One request per write, 2 ms apart: each arrives in a read
                # of its own (none is a pipelined follower).
                writer.write(b"GET /small HTTP/1.1\r\n" + H + b"\r\n")
                await asyncio.sleep(0.002)
                if i % 50 == 49:
                    peak = max(peak, proxy_rss(px))
            writer.write(b"GET /big HTTP/1.1\r\n" + H + b"\r\n")
            settled_peak, _ = await settle(lambda: (_requests_total(px), up.big_pushed), px, 15)
            peak = max(peak, settled_peak)
            served = _requests_total(px) - answered_before
            writer.transport.abort()
            await asyncio.sleep(0.5)
            assert (await raw_request(px.outbound, b"GET /small HTTP/1.1\r\n" + H + b"\r\n")).startswith(
                b"HTTP/1.1 200")
    print(f"scenario 2 ({variant}): RSS {base / MB:.1f} MB -> peak {peak / MB:.1f} MB; {served} requests answered, "
          f"/big asked {up.big_requests}x, {up.big_pushed / MB:.1f} MB of it pushed")
    assert peak - base < 32 * MB, f"RSS grew {(peak - base) / MB:.1f} MB"
    assert served < 3000, served  # it stopped taking requests
    assert up.big_pushed < 64 * MB


async def test_websocket_tunnel_to_a_client_that_does_not_read() -> None:
    """An upgraded tunnel whose upstream floods a client that reads nothing:
    flow control holds the upstream back (RSS grows < 32 MB, the upstream
    pushes a bounded amount)."""
    pushed = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal pushed
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n\r\n")
            block = b"w" * (64 << 10)
            while pushed < 300 * MB:
                writer.write(block)
                await writer.drain()
                pushed += len(block)
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with running_proxy(service_entry("svc", [(port, {})])) as px:
            await asyncio.sleep(0.5)
            base = proxy_rss(px)
            _reader, writer = await non_reading_connection(px.outbound)
            writer.write(b"GET /ws HTTP/1.1\r\n" + H + b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
                         b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
            peak, _ = await settle(lambda: pushed, px, 15)
            writer.transport.abort()
            assert px.alive()
    finally:
        server.close()
    print(f"websocket: RSS {base / MB:.1f} MB -> peak {peak / MB:.1f} MB, upstream pushed {pushed / MB:.1f} MB")
    assert 0 < pushed < 64 * MB
    assert peak - base < 32 * MB


async def test_rounds_of_non_reading_clients_leave_no_lasting_growth() -> None:
    """A short soak: eight rounds of 20 connections that pipeline 8,192
    GETs, read nothing and vanish (about 14,000 requests answered per
    round). RSS climbs for the first rounds (allocator arenas and bounded
    caches filling) and then stays put: the last four rounds end within
    2 MB of the fourth."""
    async with CountingUpstream(small=4 << 10) as up:
        with running_proxy(service_entry("svc", [(up.port, {})])) as px:
            await _warm(px)
            base = proxy_rss(px)
            blob = (b"GET /small HTTP/1.1\r\n" + H + b"\r\n") * 8192
            after_round = []
            for _ in range(8):
                clients = [await non_reading_connection(px.outbound) for _ in range(20)]
                for _, writer in clients:
                    writer.write(blob)
                await settle(lambda: up.requests, px, 20)
                for _, writer in clients:
                    writer.transport.abort()
                await asyncio.sleep(1.0)
                after_round.append(proxy_rss(px))
            assert px.alive()
    print(f"RSS {base / MB:.1f} MB, after each round:", [round(r / MB, 1) for r in after_round])
    assert max(after_round[4:]) - after_round[3] < 2 * MB, after_round
    assert after_round[-1] - base < 20 * MB, after_round


async def test_a_connection_stalled_by_a_non_reading_client_is_closed_by_the_timeouts() -> None:
    """A response the client never reads is not progress: the stream idle
    timeout (when set: istiod's default is off, as Envoy's then waits too)
    ends the request in flight, the idle timeout a connection with only
    queued requests left, and the close drops what the connection held
    once the delayed close (1 s) finds the client still not reading."""
    async with CountingUpstream(small=4 << 10) as up:
        with running_proxy(service_entry("svc", [(up.port, {})]),
                           args=["--idle-timeout", "1", "--stream-idle-timeout", "1"]) as px:
            _reader, writer = await non_reading_connection(px.outbound)
            writer.write((b"GET /small HTTP/1.1\r\n" + H + b"\r\n") * 8192)
            await settle(lambda: up.requests, px, 20)
            active = None
            for _ in range(100):  # up to 10 s: sweep (1 s) + idle timeout (1 s) + delayed close (1 s)
                stats = downstream_stats(px)
                active = stats["downstream_cx_active"]
                if active == 0:
                    break
                await asyncio.sleep(0.1)
            writer.transport.abort()
    assert active == 0, stats
    # (each timeout counted once, not again at every sweep while closing)
    assert 1 <= stats["downstream_cx_idle_timeout"] + stats["downstream_rq_idle_timeout"] <= 2, stats
