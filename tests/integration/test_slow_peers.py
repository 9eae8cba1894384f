"""Slow and vanishing peers (issue 8 §2): header and idle timeouts, the
connection cap, clients and upstreams that disappear mid-exchange, upstreams
that never answer, and backpressure from a slow reader."""

from __future__ import annotations

import asyncio
import time

from aiohttp import web

from tests.harness import Upstream, raw_request, read_response, running_proxy, service_entry
from tests.integration.hardening_helpers import (
    RecordingUpstream,
    access_log_lines,
    downstream_stats,
    read_until_close,
    rss_bytes,
)

H = b"Host: svc\r\n"
VALID = b"GET / HTTP/1.1\r\n" + H + b"\r\n"


async def test_slowloris_gets_408_after_the_header_timeout() -> None:
    async with RecordingUpstream() as up:
        cfg = service_entry("svc", [(up.port, {})])
        with running_proxy(cfg, args=["--request-header-timeout", "1"]) as px:
            reader, writer = await asyncio.open_connection("127.0.0.1", px.outbound)
            writer.write(b"GET / HTTP/1.1\r\n" + H)
            started = time.monotonic()
            answer = b""
            for i in range(40):  # one header line every 0.25 s, for at most 10 s
                try:
                    writer.write(b"X-Drip-%d: x\r\n" % i)
                    await writer.drain()
                except ConnectionError:
                    break
                if reader._buffer or reader.at_eof():  # type: ignore[attr-defined]
                    break
                await asyncio.sleep(0.25)
                # Other clients are served meanwhile.
                if i == 1:
                    assert (await raw_request(px.outbound, VALID)).startswith(b"HTTP/1.1 200")
            answer, closed = await read_until_close(reader, 5)
            elapsed = time.monotonic() - started
            writer.close()
            assert answer.startswith(b"HTTP/1.1 408"), answer[:100]
            assert b"connection: close" in answer.lower() and closed
            assert 0.9 < elapsed < 5, elapsed
            stats = downstream_stats(px)
    assert stats["downstream_cx_header_timeout"] == 1
    assert stats["downstream_rq_rejected_408"] == 1
    assert up.total_requests == 1  # only the other client's request


async def test_idle_keepalive_connection_is_closed_after_the_idle_timeout() -> None:
    async with RecordingUpstream() as up:
        cfg = service_entry("svc", [(up.port, {})])
        with running_proxy(cfg, args=["--idle-timeout", "1"]) as px:
            reader, writer = await asyncio.open_connection("127.0.0.1", px.outbound)
            writer.write(VALID)
            assert (await asyncio.wait_for(read_response(reader), 5)).startswith(b"HTTP/1.1 200")
            started = time.monotonic()
            rest, closed = await read_until_close(reader, 5)
            elapsed = time.monotonic() - started
            writer.close()
            # A connection that never sends a byte is idle too.
            reader2, writer2 = await asyncio.open_connection("127.0.0.1", px.outbound)
            rest2, closed2 = await read_until_close(reader2, 5)
            writer2.close()
            stats = downstream_stats(px)
    assert closed and rest == b"" and 0.9 < elapsed < 4, (closed, rest, elapsed)
    assert closed2 and rest2 == b""
    assert stats["downstream_cx_idle_timeout"] == 2


async def test_connections_over_the_cap_are_refused_and_counted() -> None:
    async with RecordingUpstream() as up:
        cfg = service_entry("svc", [(up.port, {})])
        with running_proxy(cfg, args=["--max-connections", "3"]) as px:
            conns = []
            for _ in range(3):
                r, w = await asyncio.open_connection("127.0.0.1", px.outbound)
                w.write(VALID)
                assert (await asyncio.wait_for(read_response(r), 5)).startswith(b"HTTP/1.1 200")
                conns.append((r, w))
            r4, w4 = await asyncio.open_connection("127.0.0.1", px.outbound)
            w4.write(VALID)
            data, closed = await read_until_close(r4, 5)
            w4.close()
            assert closed and data == b"", data[:100]
            # The three accepted connections still work.
            for r, w in conns:
                w.write(VALID)
                assert (await asyncio.wait_for(read_response(r), 5)).startswith(b"HTTP/1.1 200")
            # Once one closes, a new connection is accepted again.
            conns[0][1].close()
            await asyncio.sleep(0.3)
            assert (await raw_request(px.outbound, VALID)).startswith(b"HTTP/1.1 200")
            stats = downstream_stats(px)
            for _, w in conns[1:]:
                w.close()
    assert stats["downstream_cx_overflow"] == 1


async def test_client_disconnect_cancels_the_upstream_request(tmp_path) -> None:
    log = tmp_path / "access.log"
    calls = 0

    async def respond(head: bytes) -> bytes | None:
        nonlocal calls
        calls += 1
        return None if calls == 1 else b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"

    async with RecordingUpstream(respond) as up:
        cfg = service_entry("svc", [(up.port, {})])
        with running_proxy(cfg, args=["--access-log", str(log)]) as px:
            _reader, writer = await asyncio.open_connection("127.0.0.1", px.outbound)
            writer.write(VALID)
            for _ in range(100):
                if up.total_requests:
                    break
                await asyncio.sleep(0.02)
            assert up.total_requests == 1
            writer.close()
            # The proxy closes its upstream connection: the request is cancelled.
            await asyncio.wait_for(up.conns[0].closed.wait(), 5)
            # The next request does not reuse it.
            assert (await raw_request(px.outbound, VALID)).startswith(b"HTTP/1.1 200")
            assert len(up.conns) == 2
            lines = await access_log_lines(log, at_least=2)
    assert " 0 DC " in lines[0], lines


async def test_client_disconnect_mid_body_cancels_the_upstream_request() -> None:
    async with RecordingUpstream() as up:
        with running_proxy(service_entry("svc", [(up.port, {})])) as px:
            _reader, writer = await asyncio.open_connection("127.0.0.1", px.outbound)
            writer.write(b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 1000\r\n\r\n" + b"a" * 300)
            await writer.drain()
            for _ in range(100):
                if up.conns and b"a" * 300 in up.conns[0].received:
                    break
                await asyncio.sleep(0.02)
            writer.close()
            await asyncio.wait_for(up.conns[0].closed.wait(), 5)
    assert up.conns[0].requests == 0


async def test_upstream_close_mid_response_closes_the_client_connection(tmp_path) -> None:
    log = tmp_path / "access.log"

    async def respond(head: bytes):
        return b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n" + b"x" * 10, "close"

    async with RecordingUpstream(respond) as up:
        with running_proxy(service_entry("svc", [(up.port, {})]), args=["--access-log", str(log)]) as px:
            reader, writer = await asyncio.open_connection("127.0.0.1", px.outbound)
            writer.write(VALID)
            data, closed = await read_until_close(reader, 5)
            writer.close()
            lines = await access_log_lines(log)
    assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"x" * 10)
    assert closed, "client connection left hanging after the upstream went away"
    assert " 200 UPE " in lines[-1], lines  # Envoy 1.40: UPE once the response started


async def test_upstream_reset_mid_chunked_response_closes_the_client_connection(tmp_path) -> None:
    log = tmp_path / "access.log"

    async def respond(head: bytes):
        return b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n", "reset"

    async with RecordingUpstream(respond) as up:
        with running_proxy(service_entry("svc", [(up.port, {})]), args=["--access-log", str(log)]) as px:
            reader, writer = await asyncio.open_connection("127.0.0.1", px.outbound)
            writer.write(VALID)
            data, closed = await read_until_close(reader, 5)
            writer.close()
            lines = await access_log_lines(log)
    assert data.startswith(b"HTTP/1.1 200")
    assert closed
    assert not data.endswith(b"0\r\n\r\n"), "a truncated chunked body must not be terminated"
    assert " 200 UPE " in lines[-1], lines  # Envoy 1.40: UPE once the response started


async def test_upstream_reset_before_the_head_is_503_uc_or_retried_by_policy(tmp_path) -> None:
    calls = 0

    async def respond(head: bytes):
        nonlocal calls
        calls += 1
        if calls <= 2:  # the plain request's only attempt, the retried request's first
            return b"", "reset"
        return b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"

    async with RecordingUpstream(respond) as up:
        vs = """---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: svc}
spec:
  hosts: [svc]
  http:
  - match: [{uri: {prefix: /retry}}]
    retries: {attempts: 2, retryOn: reset}
    route: [{destination: {host: svc}}]
  - route: [{destination: {host: svc}}]
    retries: {attempts: 0}
"""
        with running_proxy(service_entry("svc", [(up.port, {})]) + vs) as px:
            plain = await raw_request(px.outbound, VALID)
            retried = await raw_request(px.outbound, b"GET /retry HTTP/1.1\r\n" + H + b"\r\n")
    assert plain.startswith(b"HTTP/1.1 503") and plain.endswith(b"reset reason: connection termination")
    assert retried.startswith(b"HTTP/1.1 200") and retried.endswith(b"ok")
    assert calls == 3


async def test_upstream_that_never_answers_ends_with_the_stream_idle_timeout(tmp_path) -> None:
    log = tmp_path / "access.log"

    async def respond(head: bytes) -> bytes | None:
        return None

    async with RecordingUpstream(respond) as up:
        cfg = service_entry("svc", [(up.port, {})])
        with running_proxy(cfg, args=["--stream-idle-timeout", "1", "--access-log", str(log)]) as px:
            started = time.monotonic()
            data = await raw_request(px.outbound, VALID, read_timeout=10)
            elapsed = time.monotonic() - started
            await asyncio.wait_for(up.conns[0].closed.wait(), 5)
            stats = downstream_stats(px)
            lines = await access_log_lines(log)
    assert data.startswith(b"HTTP/1.1 504") and data.endswith(b"stream timeout"), data
    assert 0.9 < elapsed < 4, elapsed
    assert stats["downstream_rq_idle_timeout"] == 1
    assert " 504 SI " in lines[-1], lines


async def test_route_timeout_wins_over_the_stream_idle_timeout() -> None:
    async def respond(head: bytes) -> bytes | None:
        return None

    async with RecordingUpstream(respond) as up:
        vs = """---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: svc}
spec:
  hosts: [svc]
  http:
  - route: [{destination: {host: svc}}]
    timeout: 0.5s
"""
        with running_proxy(service_entry("svc", [(up.port, {})]) + vs, args=["--stream-idle-timeout", "5"]) as px:
            started = time.monotonic()
            data = await raw_request(px.outbound, VALID, read_timeout=10)
            elapsed = time.monotonic() - started
    assert data.startswith(b"HTTP/1.1 504") and data.endswith(b"upstream request timeout")
    assert elapsed < 3


async def test_client_stalling_mid_body_gets_408_from_the_stream_idle_timeout(tmp_path) -> None:
    log = tmp_path / "access.log"
    async with RecordingUpstream() as up:
        cfg = service_entry("svc", [(up.port, {})])
        with running_proxy(cfg, args=["--stream-idle-timeout", "1", "--access-log", str(log)]) as px:
            reader, writer = await asyncio.open_connection("127.0.0.1", px.outbound)
            writer.write(b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 100\r\n\r\n" + b"a" * 10)
            data, closed = await read_until_close(reader, 6)
            writer.close()
            await asyncio.wait_for(up.conns[0].closed.wait(), 5)
            lines = await access_log_lines(log)
    assert data.startswith(b"HTTP/1.1 408") and b"connection: close" in data.lower() and closed, data
    assert " 408 SI " in lines[-1], lines
    assert up.conns[0].requests == 0


async def test_response_stalling_after_its_head_is_reset_by_the_stream_idle_timeout(tmp_path) -> None:
    log = tmp_path / "access.log"

    async def respond(head: bytes):
        return b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n" + b"x" * 10

    async with RecordingUpstream(respond) as up:
        cfg = service_entry("svc", [(up.port, {})])
        with running_proxy(cfg, args=["--stream-idle-timeout", "1", "--access-log", str(log)]) as px:
            reader, writer = await asyncio.open_connection("127.0.0.1", px.outbound)
            writer.write(VALID)
            data, closed = await read_until_close(reader, 6)
            writer.close()
            await asyncio.wait_for(up.conns[0].closed.wait(), 5)
            lines = await access_log_lines(log)
    assert data.startswith(b"HTTP/1.1 200") and closed
    assert " 200 SI " in lines[-1], lines


async def test_slow_reader_keeps_proxy_memory_bounded() -> None:
    """The upstream offers 1 GiB; the client reads ~1 MB/s for 4 s. Flow
    control must hold the upstream back instead of buffering in the proxy."""
    size = 1 << 30
    chunk = b"z" * (256 << 10)
    pushed = 0

    async def handler(request: web.Request) -> web.StreamResponse:
        nonlocal pushed
        resp = web.StreamResponse(headers={"Content-Length": str(size)})
        await resp.prepare(request)
        try:
            while pushed < size:
                await resp.write(chunk)
                pushed += len(chunk)
        except (ConnectionError, RuntimeError):
            pass
        return resp

    async with Upstream(handler=handler) as up:
        with running_proxy(service_entry("big", [(up.port, {})])) as px:
            base = rss_bytes(px.process.pid)
            peak = base
            reader, writer = await asyncio.open_connection("127.0.0.1", px.outbound, limit=1 << 16)
            writer.write(b"GET / HTTP/1.1\r\nHost: big\r\n\r\n")
            received = 0
            started = time.monotonic()
            while time.monotonic() - started < 4.0:
                data = await asyncio.wait_for(reader.read(64 << 10), 5)
                assert data
                received += len(data)
                peak = max(peak, rss_bytes(px.process.pid))
                await asyncio.sleep(0.064)  # ~1 MB/s
            held_back = pushed
            writer.close()
            await asyncio.sleep(0.5)
            assert px.alive()
    print(f"slow reader: received {received / 1e6:.1f} MB in 4 s, upstream pushed {held_back / 1e6:.1f} MB, "
          f"proxy RSS {base / 1e6:.1f} -> peak {peak / 1e6:.1f} MB")
    assert 2e6 < received < 8e6
    # The upstream was held back: it pushed a small fraction of the 1 GiB,
    # no more than the client read plus socket buffers.
    assert held_back < received + (48 << 20), (held_back, received)
    assert peak - base < 24 << 20, f"proxy RSS grew by {(peak - base) / 1e6:.1f} MB"
