"""Hostile and malformed input on both sides of the proxy (issue 8 §1).

Every malformed request must get one clear 4xx with ``Connection: close``,
the connection must then close, the upstream must not see a byte of it, a
counter must record it, and the proxy must keep serving. Every malformed
upstream response must be replaced by a 502 (UPE) and its connection
discarded.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.harness import raw_request, read_response, running_proxy, service_entry
from tests.integration.hardening_helpers import (
    RecordingUpstream,
    access_log_lines,
    downstream_stats,
    read_until_close,
    rss_bytes,
)

H = b"Host: svc\r\n"
GET = b"GET / HTTP/1.1\r\n" + H

# (name, raw request, expected status). Each request is otherwise valid and
# routed to the recording upstream, so "the upstream saw nothing" is only
# true if the proxy rejected it.
MALFORMED: list[tuple[str, bytes, int]] = [
    # request line and version
    ("garbage request line", b"GARBAGE\r\n\r\n", 400),
    ("lower-case method", b"get / HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("tab after method", b"GET\t/ HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("HTTP/1.2", b"GET / HTTP/1.2\r\n" + H + b"\r\n", 400),
    ("HTTP/2.0 on HTTP/1", b"GET / HTTP/2.0\r\n" + H + b"\r\n", 400),
    ("HTTP/0.9 version", b"GET / HTTP/0.9\r\n" + H + b"\r\n", 400),
    ("HTTP/0.9 simple request", b"GET /\r\n\r\n", 400),
    ("bare LF line endings", b"GET / HTTP/1.1\nHost: svc\n\n", 400),
    ("space in target", b"GET /a b HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("control char in target", b"GET /a\x01b HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("NUL in target", b"GET /a\x00b HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("fragment in target", b"GET /a#b HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("asterisk target on GET", b"GET * HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("https absolute-form", b"GET https://svc/ HTTP/1.1\r\n" + H + b"\r\n", 400),
    # size limits
    ("target over 8 KiB", b"GET /" + b"a" * (8 << 10) + b" HTTP/1.1\r\n" + H + b"\r\n", 414),
    ("header section over 60 KiB", GET + b"".join(b"X-F%d: %s\r\n" % (i, b"v" * 1000) for i in range(62)) + b"\r\n",
     431),
    ("one header over 60 KiB", GET + b"X-Big: " + b"v" * (61 << 10) + b"\r\n\r\n", 431),
    ("101 headers", GET + b"".join(b"X-H%d: 1\r\n" % i for i in range(100)) + b"\r\n", 431),
    # header syntax
    ("CR inside a value", GET + b"X-A: a\rb\r\n\r\n", 400),
    ("NUL inside a value", GET + b"X-A: a\x00b\r\n\r\n", 400),
    ("control char in a value", GET + b"X-A: a\x01b\r\n\r\n", 400),
    ("DEL in a value", GET + b"X-A: a\x7fb\r\n\r\n", 400),
    ("space before colon", GET + b"X-A : b\r\n\r\n", 400),
    ("tab before colon", GET + b"X-A\t: b\r\n\r\n", 400),
    ("separator in a name", GET + b"X(A): b\r\n\r\n", 400),
    ("NUL in a name", GET + b"X\x00A: b\r\n\r\n", 400),
    ("empty name", GET + b": b\r\n\r\n", 400),
    ("line without colon", GET + b"X-A\r\n\r\n", 400),
    ("obs-fold", GET + b"X-A: a\r\n b\r\n\r\n", 400),
    ("whitespace before the first header", b"GET / HTTP/1.1\r\n Host: svc\r\n\r\n", 400),
    # Host
    ("missing Host on HTTP/1.1", b"GET / HTTP/1.1\r\n\r\n", 400),
    ("two Host headers", GET + b"Host: other\r\n\r\n", 400),
    ("Host with a space", b"GET / HTTP/1.1\r\nHost: s vc\r\n\r\n", 400),
    ("Host with a slash", b"GET / HTTP/1.1\r\nHost: svc/x\r\n\r\n", 400),
    ("Host with a bad port", b"GET / HTTP/1.1\r\nHost: svc:8x\r\n\r\n", 400),
    ("Host with a port over 65535", b"GET / HTTP/1.1\r\nHost: svc:70000\r\n\r\n", 400),
    # framing (request smuggling vectors)
    ("Content-Length and Transfer-Encoding",
     b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    ("Transfer-Encoding and Content-Length",
     b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n", 400),
    ("two differing Content-Lengths",
     b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", 400),
    ("Content-Length list", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3, 4\r\n\r\nabcd", 400),
    ("negative Content-Length", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: -1\r\n\r\n", 400),
    ("signed Content-Length", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: +3\r\n\r\nabc", 400),
    ("hex Content-Length", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 0x3\r\n\r\nabc", 400),
    ("huge Content-Length", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 99999999999999999999999\r\n\r\n", 400),
    ("Transfer-Encoding gzip", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip\r\n\r\nabc", 400),
    ("Transfer-Encoding gzip, chunked",
     b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 400),
    ("Transfer-Encoding chunked, gzip",
     b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n", 400),
    ("Transfer-Encoding twice",
     b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    ("Transfer-Encoding identity", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: identity\r\n\r\n", 400),
    ("Transfer-Encoding xchunked", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n", 400),
    ("empty Transfer-Encoding", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding:\r\n\r\n", 400),
    # HTTP/1.0 is refused first, whatever else the request says (Envoy's
    # codec with accept_http_10 off, Istio's default: 426).
    ("Transfer-Encoding on HTTP/1.0",
     b"POST / HTTP/1.0\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 426),
    ("chunk size not hex",
     b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n", 400),
    ("negative chunk size",
     b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n-3\r\nabc\r\n0\r\n\r\n", 400),
    ("chunk size overflow",
     b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\nfffffffffffffffffff\r\nabc\r\n0\r\n\r\n", 400),
    ("space after chunk size",
     b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n3 \r\nabc\r\n0\r\n\r\n", 400),
    ("control char in chunk extension",
     b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n3;a\x01b\r\nabc\r\n0\r\n\r\n", 400),
    ("bare LF after chunk extension",
     b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n3;a\nabc\r\n0\r\n\r\n", 400),
    ("chunk data longer than its size",
     b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabcX\r\n0\r\n\r\n", 400),
    ("control char in a trailer",
     b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n0\r\nX: a\x01\r\n\r\n", 400),
    # not supported
    ("CONNECT", b"CONNECT svc:443 HTTP/1.1\r\nHost: svc:443\r\n\r\n", 501),
    # --max-request-body 1000 (set below)
    ("Content-Length over --max-request-body",
     b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 1001\r\n\r\n" + b"x" * 1001, 413),
    ("chunked body over --max-request-body",
     b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n" + b"258\r\n" + b"x" * 600 + b"\r\n"
     + b"258\r\n" + b"x" * 600 + b"\r\n0\r\n\r\n", 413),
]

VALID = GET + b"\r\n"


async def _valid_request_works(port: int) -> None:
    data = await raw_request(port, VALID)
    assert data.startswith(b"HTTP/1.1 200"), data[:200]


async def test_malformed_requests_are_rejected_and_never_forwarded(tmp_path) -> None:
    log = tmp_path / "access.log"
    async with RecordingUpstream() as up:
        cfg = service_entry("svc", [(up.port, {})])
        with running_proxy(cfg, args=["--max-request-body", "1000", "--access-log", str(log)]) as px:
            # Warm the pool: an idle upstream connection is waiting, so a
            # proxy that starts forwarding before the request is validated
            # would write to it at once.
            await _valid_request_works(px.outbound)
            before = downstream_stats(px)
            failures = []
            statuses: dict[int, int] = {}
            for name, raw, status in MALFORMED:
                seen_bytes, seen_conns = up.total_bytes, len(up.conns)
                try:
                    data = await raw_request(px.outbound, raw, until_close=True, read_timeout=5)
                except TimeoutError:
                    failures.append(f"{name}: connection not closed within 5 s")
                    continue
                head = data.split(b"\r\n\r\n", 1)[0].lower()
                if not data.startswith(b"HTTP/1.1 %d " % status):
                    failures.append(f"{name}: expected {status}, got {data[:60]!r}")
                elif b"\r\nconnection: close" not in head:
                    failures.append(f"{name}: no Connection: close in {head!r}")
                elif data.count(b"HTTP/1.1 ") != 1:
                    failures.append(f"{name}: more than one response: {data!r}")
                # Let any bytes a buggy proxy might have sent reach the upstream.
                await asyncio.sleep(0.05)
                if up.total_bytes != seen_bytes or len(up.conns) != seen_conns:
                    failures.append(f"{name}: the upstream received {up.total_bytes - seen_bytes} byte(s)")
                statuses[status] = statuses.get(status, 0) + 1
                # The proxy keeps serving other clients after each one.
                await _valid_request_works(px.outbound)
            assert not failures, "\n".join(failures)
            after = downstream_stats(px)
            assert px.alive()
            assert "Traceback" not in px.log(), px.log()[-3000:]
    assert after["downstream_rq_rejected"] - before["downstream_rq_rejected"] == len(MALFORMED)
    for status, count in statuses.items():
        assert after[f"downstream_rq_rejected_{status}"] - before.get(f"downstream_rq_rejected_{status}", 0) == count, \
            status
    # The valid requests reached the upstream, every one of them.
    assert up.total_requests == len(MALFORMED) + 1
    # Requests whose head was parsed leave an access log line with their status.
    lines = await access_log_lines(log, at_least=len(MALFORMED) + 1)
    assert sum(1 for line in lines if '" 413 ' in line) == 2
    assert any('"POST / HTTP/1.1" 400 DPE' in line for line in lines), lines[:5]


async def test_huge_single_header_is_cut_off_without_buffering_it() -> None:
    """httptools hands a header to the proxy only once it is complete; the
    proxy must bound the bytes of a request head itself."""
    async with RecordingUpstream() as up:
        with running_proxy(service_entry("svc", [(up.port, {})])) as px:
            rss_before = rss_bytes(px.process.pid)
            reader, writer = await asyncio.open_connection("127.0.0.1", px.outbound)
            answer_task = asyncio.ensure_future(reader.read(65536))
            writer.write(GET + b"X-Big: ")
            sent = 0
            try:
                for _ in range(400):  # up to 100 MiB, stops as soon as the proxy answers
                    if answer_task.done():
                        break
                    writer.write(b"v" * (64 << 10))
                    await writer.drain()
                    sent += 64 << 10
                    await asyncio.sleep(0)
            except ConnectionError:
                pass
            answer = await asyncio.wait_for(answer_task, 5)
            rest, closed = await read_until_close(reader, 5)
            answer += rest
            writer.close()
            assert answer.startswith(b"HTTP/1.1 431"), answer[:100]
            assert closed
            assert sent < 8 << 20, f"the proxy read {sent >> 20} MiB of one header before refusing it"
            assert rss_bytes(px.process.pid) - rss_before < 16 << 20
            await _valid_request_works(px.outbound)
    assert up.total_requests == 1  # only the valid request after it


async def test_huge_trailer_is_cut_off_without_buffering_it() -> None:
    async with RecordingUpstream() as up:
        with running_proxy(service_entry("svc", [(up.port, {})])) as px:
            rss_before = rss_bytes(px.process.pid)
            reader, writer = await asyncio.open_connection("127.0.0.1", px.outbound)
            answer_task = asyncio.ensure_future(reader.read(65536))
            writer.write(b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nX-T: ")
            sent = 0
            try:
                for _ in range(400):
                    if answer_task.done():
                        break
                    writer.write(b"v" * (64 << 10))
                    await writer.drain()
                    sent += 64 << 10
                    await asyncio.sleep(0)
            except ConnectionError:
                pass
            answer = await asyncio.wait_for(answer_task, 5)
            writer.close()
            assert answer.startswith(b"HTTP/1.1 431"), answer[:100]
            assert sent < 8 << 20, f"the proxy read {sent >> 20} MiB of one trailer before refusing it"
            assert rss_bytes(px.process.pid) - rss_before < 16 << 20
            await _valid_request_works(px.outbound)


async def test_invalid_chunk_after_the_head_was_forwarded_aborts_the_upstream_request() -> None:
    """A streamed body turns out malformed after the head went upstream:
    the client gets 400, the upstream request is abandoned (its connection
    closed, never reused) so the application never sees a complete request."""
    async with RecordingUpstream() as up:
        with running_proxy(service_entry("svc", [(up.port, {})])) as px:
            reader, writer = await asyncio.open_connection("127.0.0.1", px.outbound)
            writer.write(b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
            await writer.drain()
            for _ in range(100):
                if up.conns and b"abc" in up.conns[0].received:
                    break
                await asyncio.sleep(0.02)
            assert up.conns and b"abc" in up.conns[0].received, "head and first chunk were not streamed"
            writer.write(b"zz\r\nxyz\r\n0\r\n\r\n")
            data, closed = await read_until_close(reader, 5)
            writer.close()
            assert data.startswith(b"HTTP/1.1 400"), data[:100]
            assert b"connection: close" in data.lower() and closed
            await asyncio.wait_for(up.conns[0].closed.wait(), 5)
            assert up.conns[0].requests == 0  # never a complete request
            assert b"xyz" not in up.conns[0].received
            await _valid_request_works(px.outbound)
            assert len(up.conns) == 2  # a new connection: the aborted one was not reused


async def test_chunked_body_over_the_limit_after_forwarding_started_gets_413() -> None:
    async with RecordingUpstream() as up:
        cfg = service_entry("svc", [(up.port, {})])
        with running_proxy(cfg, args=["--max-request-body", "1000"]) as px:
            reader, writer = await asyncio.open_connection("127.0.0.1", px.outbound)
            writer.write(b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n258\r\n" + b"a" * 600
                         + b"\r\n")
            await writer.drain()
            for _ in range(100):
                if up.conns and b"a" * 600 in up.conns[0].received:
                    break
                await asyncio.sleep(0.02)
            writer.write(b"258\r\n" + b"b" * 600 + b"\r\n")
            data, closed = await read_until_close(reader, 5)
            writer.close()
            assert data.startswith(b"HTTP/1.1 413"), data[:100]
            assert closed
            await asyncio.wait_for(up.conns[0].closed.wait(), 5)
            assert up.conns[0].requests == 0
            stats = downstream_stats(px)
            assert stats["downstream_rq_rejected_413"] == 1


async def test_pipelined_body_over_the_limit_is_refused_in_order() -> None:
    async def slow(head: bytes) -> bytes:
        await asyncio.sleep(0.3)
        return b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"

    async with RecordingUpstream(slow) as up:
        cfg = service_entry("svc", [(up.port, {})])
        with running_proxy(cfg, args=["--max-request-body", "1000"]) as px:
            raw = VALID + b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 1500\r\n\r\n" + b"x" * 1500
            data = await raw_request(px.outbound, raw, until_close=True)
    # The first response complete and first, then the 413.
    assert data.startswith(b"HTTP/1.1 200 OK"), data
    first_end = data.index(b"\r\n\r\nok") + 6
    assert data[first_end:].startswith(b"HTTP/1.1 413"), data
    assert up.total_requests == 1


async def test_body_at_the_limit_is_forwarded() -> None:
    async with RecordingUpstream() as up:
        cfg = service_entry("svc", [(up.port, {})])
        with running_proxy(cfg, args=["--max-request-body", "1000"]) as px:
            data = await raw_request(px.outbound, b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 1000\r\n\r\n"
                                     + b"x" * 1000)
            assert data.startswith(b"HTTP/1.1 200")
            data = await raw_request(px.outbound, b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
                                     + b"3e8\r\n" + b"y" * 1000 + b"\r\n0\r\n\r\n")
            assert data.startswith(b"HTTP/1.1 200")
    assert up.total_requests == 2


async def test_request_trailers_never_become_headers() -> None:
    async with RecordingUpstream() as up:
        with running_proxy(service_entry("svc", [(up.port, {})])) as px:
            data = await raw_request(px.outbound, b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
                                     b"3\r\nabc\r\n0\r\nX-Trailer-Injected: evil\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 200")
    sent = bytes(up.conns[0].received).lower()
    assert b"x-trailer-injected" not in sent and b"6.6.6.6" not in sent, sent
    assert sent.endswith(b"\r\n\r\n3\r\nabc\r\n0\r\n\r\n")


async def test_pipelined_request_after_a_malformed_one_is_not_forwarded() -> None:
    """A valid request followed, in the same packet, by a malformed one: the
    first is answered, then 400 and close; nothing after the bad bytes runs."""
    async with RecordingUpstream() as up:
        with running_proxy(service_entry("svc", [(up.port, {})])) as px:
            raw = VALID + b"GET /x HTTP/1.1\r\n" + H + b"X-A: a\x01\r\n\r\n" + VALID
            data = await raw_request(px.outbound, raw, until_close=True)
    assert data.startswith(b"HTTP/1.1 200")
    assert data.count(b"HTTP/1.1 ") == 2 and b"HTTP/1.1 400" in data
    assert up.total_requests == 1


# -- upstream responses -------------------------------------------------------------

BAD_RESPONSES: list[tuple[str, bytes]] = [
    ("garbage status line", b"FOO\r\n\r\n"),
    ("HTTP/1.2", b"HTTP/1.2 200 OK\r\ncontent-length: 2\r\n\r\nok"),
    ("HTTP/2.0 on HTTP/1", b"HTTP/2.0 200 OK\r\ncontent-length: 2\r\n\r\nok"),
    ("status 600", b"HTTP/1.1 600 X\r\ncontent-length: 2\r\n\r\nok"),
    ("status 099", b"HTTP/1.1 099 X\r\ncontent-length: 2\r\n\r\nok"),
    ("four-digit status", b"HTTP/1.1 2000 OK\r\ncontent-length: 2\r\n\r\nok"),
    ("Content-Length and Transfer-Encoding",
     b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n"),
    ("two Content-Lengths", b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nok"),
    ("bad Content-Length", b"HTTP/1.1 200 OK\r\ncontent-length: 2x\r\n\r\nok"),
    ("Transfer-Encoding gzip", b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\nok"),
    ("Transfer-Encoding gzip, chunked",
     b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"),
    ("Transfer-Encoding chunked, gzip", b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked, gzip\r\n\r\nok"),
    ("NUL in a header value", b"HTTP/1.1 200 OK\r\nx-a: a\x00b\r\ncontent-length: 2\r\n\r\nok"),
    ("CR in a header value", b"HTTP/1.1 200 OK\r\nx-a: a\rb\r\ncontent-length: 2\r\n\r\nok"),
    ("space before colon", b"HTTP/1.1 200 OK\r\nx-a : b\r\ncontent-length: 2\r\n\r\nok"),
    ("obs-fold", b"HTTP/1.1 200 OK\r\nx-a: a\r\n b\r\ncontent-length: 2\r\n\r\nok"),
    ("bare LF", b"HTTP/1.1 200 OK\ncontent-length: 2\n\nok"),
    ("101 headers", b"HTTP/1.1 200 OK\r\n" + b"".join(b"x-h%d: 1\r\n" % i for i in range(101))
     + b"content-length: 2\r\n\r\nok"),
    ("header section over 60 KiB", b"HTTP/1.1 200 OK\r\nx-big: " + b"v" * (61 << 10)
     + b"\r\ncontent-length: 2\r\n\r\nok"),
    ("one 4 MiB header", b"HTTP/1.1 200 OK\r\nx-big: " + b"v" * (4 << 20) + b"\r\ncontent-length: 2\r\n\r\nok"),
]


@pytest.mark.parametrize("name,response", BAD_RESPONSES, ids=[c[0] for c in BAD_RESPONSES])
async def test_invalid_upstream_response_becomes_502_upe(name: str, response: bytes, tmp_path) -> None:
    log = tmp_path / "access.log"

    async def respond(head: bytes) -> bytes | None:
        return response

    async with RecordingUpstream(respond) as up:
        with running_proxy(service_entry("svc", [(up.port, {})]), args=["--access-log", str(log)]) as px:
            data, _closed = await _request_until_close(px.outbound, VALID)
            assert data.startswith(b"HTTP/1.1 502"), data[:200]
            assert data.endswith(b"reset reason: protocol error"), data[-200:]
            # Nothing of the invalid response reached the client.
            assert b"x-a:" not in data.lower() and b"x-h1:" not in data.lower() and b"x-big" not in data.lower()
            # The upstream connection was discarded.
            await asyncio.wait_for(up.conns[0].closed.wait(), 5)
            assert px.alive()
            lines = await access_log_lines(log)
    assert " 502 UPE " in lines[-1], lines


async def _request_until_close(port: int, raw: bytes) -> tuple[bytes, bool]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        data = await asyncio.wait_for(read_response(reader), 10)
        return data, True
    finally:
        writer.close()


async def test_invalid_body_after_the_head_closes_the_client_connection_with_upe(tmp_path) -> None:
    log = tmp_path / "access.log"

    async def respond(head: bytes) -> bytes | None:
        return b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\nzz\r\nbad\r\n0\r\n\r\n"

    async with RecordingUpstream(respond) as up:
        with running_proxy(service_entry("svc", [(up.port, {})]), args=["--access-log", str(log)]) as px:
            reader, writer = await asyncio.open_connection("127.0.0.1", px.outbound)
            writer.write(VALID)
            data, closed = await read_until_close(reader, 5)
            writer.close()
            assert data.startswith(b"HTTP/1.1 200")
            assert closed, "the client connection was left hanging"
            assert not data.endswith(b"0\r\n\r\n"), "the truncated body must not look complete"
            assert b"bad" not in data
            await asyncio.wait_for(up.conns[0].closed.wait(), 5)
            lines = await access_log_lines(log)
    assert " 200 UPE " in lines[-1], lines


async def test_huge_response_trailer_is_cut_off(tmp_path) -> None:
    log = tmp_path / "access.log"

    async def respond(head: bytes) -> bytes | None:
        return (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nx-t: "
                + b"v" * (8 << 20) + b"\r\n\r\n")

    async with RecordingUpstream(respond) as up:
        with running_proxy(service_entry("svc", [(up.port, {})]), args=["--access-log", str(log)]) as px:
            rss_before = rss_bytes(px.process.pid)
            reader, writer = await asyncio.open_connection("127.0.0.1", px.outbound)
            writer.write(VALID)
            data, closed = await read_until_close(reader, 10)
            writer.close()
            assert rss_bytes(px.process.pid) - rss_before < 16 << 20
            await asyncio.wait_for(up.conns[0].closed.wait(), 5)
            lines = await access_log_lines(log)
    assert data.startswith(b"HTTP/1.1 200") and closed
    assert not data.endswith(b"0\r\n\r\n")
    assert " 200 UPE " in lines[-1], lines


async def test_extra_bytes_after_a_response_do_not_poison_the_next_request() -> None:
    """An upstream that sends junk after a complete response: that response
    is delivered, the connection is discarded, and the next request does not
    inherit the junk (it goes out on a fresh connection)."""
    calls = 0

    async def respond(head: bytes) -> bytes | None:
        nonlocal calls
        calls += 1
        if calls == 1:
            return b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokJUNK"
        return b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nyes"

    async with RecordingUpstream(respond) as up:
        with running_proxy(service_entry("svc", [(up.port, {})])) as px:
            reader, writer = await asyncio.open_connection("127.0.0.1", px.outbound)
            writer.write(VALID)
            first = await asyncio.wait_for(read_response(reader), 5)
            await asyncio.sleep(0.2)
            writer.write(VALID)
            second = await asyncio.wait_for(read_response(reader), 5)
            writer.close()
    assert first.endswith(b"\r\n\r\nok")
    assert second.startswith(b"HTTP/1.1 200") and second.endswith(b"yes")
    assert len(up.conns) == 2
