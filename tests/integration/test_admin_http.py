"""The admin/stats HTTP server (pyproxy/admin/http.py) on a real socket:
routing, HEAD, keep-alive and pipelining, and hostile input refused with the
right 4xx while the server keeps serving."""

from __future__ import annotations

import asyncio

import pytest

from pyproxy.admin.http import MAX_BODY, AdminHTTPServer, Request, Response, Router


async def _serve() -> tuple[AdminHTTPServer, int, list[Request]]:
    seen: list[Request] = []

    async def hello(request: Request) -> Response:
        seen.append(request)
        return Response(f"hello {request.query.get('name', '-')}\n")

    async def slow(request: Request) -> Response:
        await asyncio.sleep(0.05)
        return Response("slow\n")

    async def boom(request: Request) -> Response:
        raise RuntimeError("handler failed")

    async def mutate(request: Request) -> Response:
        return Response('{"ok": true}', content_type="application/json")

    router = Router(guard=lambda r: Response("no\n", status=403) if r.headers.get("x-deny") else None)
    router.add_get("/hello", hello)
    router.add_get("/slow", slow)
    router.add_get("/boom", boom)
    router.add_post("/mutate", mutate)
    server = AdminHTTPServer(router, asyncio.get_running_loop())
    await server.start("127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, port, seen


async def _exchange(port: int, raw: bytes, expect_close: bool = True) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    try:
        if expect_close:
            return await asyncio.wait_for(reader.read(), 5)
        data = b""
        while data.count(b"\r\n\r\n") < 1 or not data.endswith(b"\n"):
            chunk = await asyncio.wait_for(reader.read(65536), 5)
            if not chunk:
                break
            data += chunk
        return data
    finally:
        writer.close()


def _status(resp: bytes) -> int:
    return int(resp.split(b" ", 2)[1])


@pytest.mark.asyncio
async def test_get_query_head_404_405_and_errors() -> None:
    server, port, seen = await _serve()
    try:
        r = await _exchange(port, b"GET /hello?name=a%20b&name=second HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert _status(r) == 200 and r.endswith(b"hello a b\n")
        assert b"content-type: text/plain; charset=utf-8\r\n" in r and b"content-length: 10\r\n" in r
        assert seen[-1].remote == "127.0.0.1"

        r = await _exchange(port, b"HEAD /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert _status(r) == 200 and r.endswith(b"\r\n\r\n") and b"content-length: 8\r\n" in r

        r = await _exchange(port, b"GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert _status(r) == 404

        r = await _exchange(port, b"POST /hello HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        assert _status(r) == 405 and b"allow: GET, HEAD\r\n" in r

        r = await _exchange(port, b"POST /mutate HTTP/1.1\r\nHost: x\r\nx-deny: 1\r\nContent-Length: 0\r\n"
                                  b"Connection: close\r\n\r\n")
        assert _status(r) == 403

        r = await _exchange(port, b"GET /boom HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert _status(r) == 500
    finally:
        await server.stop()


@pytest.mark.asyncio
async def test_keep_alive_and_pipelined_requests_answer_in_order() -> None:
    server, port, _ = await _serve()
    try:
        raw = (b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n"
               b"GET /hello?name=2 HTTP/1.1\r\nHost: x\r\n\r\n"
               b"POST /mutate HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc")
        r = await _exchange(port, raw)
        assert r.count(b"HTTP/1.1 200 OK") == 3
        assert r.index(b"slow\n") < r.index(b"hello 2\n") < r.index(b'{"ok": true}')
        assert r.endswith(b'{"ok": true}')
    finally:
        await server.stop()


@pytest.mark.asyncio
@pytest.mark.parametrize(("raw", "status"), [
    (b"GET /hello HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n", 400),
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET /hello HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
    (b"GET /hello HTTP/1.1\r\n" + b"".join(b"h%d: v\r\n" % i for i in range(120)) + b"\r\n", 431),
    (b"POST /mutate HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY + 10)
     + b"x" * (MAX_BODY + 10), 413),
])
async def test_hostile_input_is_refused_and_the_server_keeps_serving(raw: bytes, status: int) -> None:
    server, port, seen = await _serve()
    try:
        r = await _exchange(port, raw)
        assert _status(r) == status, r[:200]
        assert b"connection: close\r\n" in r
        assert not seen, "no handler runs for a refused request"
        ok = await _exchange(port, b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert _status(ok) == 200
    finally:
        await server.stop()


@pytest.mark.asyncio
async def test_stop_closes_open_connections() -> None:
    server, port, _ = await _serve()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
    first = await asyncio.wait_for(reader.readuntil(b"hello -\n"), 5)
    assert _status(first) == 200
    await server.stop()
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
