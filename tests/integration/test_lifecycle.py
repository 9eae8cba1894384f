"""Graceful lifecycle (issue 8 §4): SIGTERM and /quitquitquit drain the
proxy: not ready at once, new connections accepted only during the grace,
keep-alive connections told to close, in-flight requests completed up to
--drain-timeout, exit 0; a second signal exits at once."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest
from aiohttp import web

from tests.harness import Proxy, Upstream, http_get, read_response, service_entry, start_proxy
from tests.integration.hardening_helpers import RecordingUpstream, read_until_close


async def _slow_upstream(seconds: float) -> Upstream:
    async def handler(request: web.Request) -> web.Response:
        if request.path.startswith("/slow"):
            await asyncio.sleep(float(request.query.get("s", seconds)))
            return web.Response(text="slow done")
        return web.Response(text="fast")

    return await Upstream(handler=handler).start()


async def _wait_exit(px: Proxy, timeout: float) -> int | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code = px.process.poll()
        if code is not None:
            return code
        await asyncio.sleep(0.02)
    return None


def _ready(px: Proxy) -> int:
    try:
        return http_get(px.stats_url + "/healthz/ready", timeout=2)[0]
    except OSError:
        return -1


async def _get(port: int, path: str = "/", timeout: float = 10) -> tuple[bytes, asyncio.StreamReader,
                                                                        asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: svc\r\n\r\n".encode())
    return await asyncio.wait_for(read_response(reader), timeout), reader, writer


async def _drain_scenario(trigger: str) -> None:
    up = await _slow_upstream(2.0)
    px = start_proxy(service_entry("svc", [(up.port, {})]), args=["--drain-grace", "1", "--drain-timeout", "5"])
    try:
        # A keep-alive connection that is idle when the drain begins.
        first, ka_reader, ka_writer = await _get(px.outbound)
        assert first.endswith(b"fast")
        slow = asyncio.ensure_future(_get(px.outbound, "/slow"))
        await asyncio.sleep(0.3)  # the slow request is in flight
        t0 = time.monotonic()
        if trigger == "sigterm":
            px.process.send_signal(signal.SIGTERM)
        else:
            assert http_get(px.admin_url + "/quitquitquit", method="POST", data=b"")[0] == 200
        # Not ready at once.
        assert await asyncio.to_thread(_ready, px) == 503
        assert time.monotonic() - t0 < 0.8
        # During the grace: a new connection is served and told to close...
        during, r2, w2 = await _get(px.outbound)
        assert during.endswith(b"fast") and b"\r\nconnection: close" in during.lower()
        _, closed = await read_until_close(r2, 3)
        assert closed
        w2.close()
        # ...and so is the next response on the idle keep-alive connection.
        ka_writer.write(b"GET / HTTP/1.1\r\nHost: svc\r\n\r\n")
        again = await asyncio.wait_for(read_response(ka_reader), 5)
        assert again.endswith(b"fast") and b"\r\nconnection: close" in again.lower()
        _, closed = await read_until_close(ka_reader, 3)
        assert closed
        ka_writer.close()
        # After the grace the listeners are closed.
        await asyncio.sleep(max(0.0, 1.3 - (time.monotonic() - t0)))
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", px.outbound)
        # The request in flight at the signal completes.
        data, _r, w = await asyncio.wait_for(slow, 10)
        w.close()
        assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"slow done")
        code = await _wait_exit(px, 5)
        elapsed = time.monotonic() - t0
        assert code == 0, px.log()[-2000:]
        # It left as soon as the request was done, not at the drain timeout.
        assert elapsed < 4.0, elapsed
    finally:
        px.stop(signal.SIGKILL)
        await up.stop()


async def test_sigterm_drains_gracefully_and_exits_0() -> None:
    await _drain_scenario("sigterm")


async def test_quitquitquit_drains_gracefully_and_exits_0() -> None:
    await _drain_scenario("quitquitquit")


async def _never_answers(head: bytes) -> None:
    return None


async def test_request_still_running_at_the_drain_timeout_is_cut() -> None:
    up = await RecordingUpstream(_never_answers).__aenter__()
    px = start_proxy(service_entry("svc", [(up.port, {})]), args=["--drain-timeout", "1"])
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", px.outbound)
        writer.write(b"GET /slow HTTP/1.1\r\nHost: svc\r\n\r\n")
        await asyncio.sleep(0.3)
        t0 = time.monotonic()
        px.process.send_signal(signal.SIGTERM)
        data, closed = await read_until_close(reader, 6)
        cut_after = time.monotonic() - t0
        writer.close()
        code = await _wait_exit(px, 5)
        assert closed and data == b"", data[:100]
        assert 0.8 < cut_after < 3.5, cut_after
        assert code == 0
        assert "still in flight are cut" in px.log()
        await asyncio.wait_for(up.conns[0].closed.wait(), 5)  # the upstream request went too
    finally:
        px.stop(signal.SIGKILL)
        await up.__aexit__()


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_second_signal_exits_at_once(second: int) -> None:
    up = await RecordingUpstream(_never_answers).__aenter__()
    px = start_proxy(service_entry("svc", [(up.port, {})]), args=["--drain-timeout", "30"])
    try:
        _reader, writer = await asyncio.open_connection("127.0.0.1", px.outbound)
        writer.write(b"GET /slow HTTP/1.1\r\nHost: svc\r\n\r\n")
        await asyncio.sleep(0.3)
        px.process.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.5)
        assert px.process.poll() is None  # draining: waits for the request
        t0 = time.monotonic()
        px.process.send_signal(second)
        code = await _wait_exit(px, 3)
        assert code is not None, "still running after the second signal"
        assert time.monotonic() - t0 < 1.5
        writer.close()
    finally:
        px.stop(signal.SIGKILL)
        await up.__aexit__()
