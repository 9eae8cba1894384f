"""A small HTTP/1.1 server for the admin and stats endpoints.

Why not aiohttp (which the tests and demo apps use): importing
``aiohttp.web`` adds about 11 MB to every sidecar's RSS, a sixth of the
process, for two listeners that answer a handful of fixed paths a few times
a minute. This server parses with httptools (already loaded for the data
path), serves one request at a time per connection (pipelined requests
queue in order), and answers with ``Content-Length`` bodies only.

It is deliberately strict and bounded, like the data path: a malformed
request gets 400 and the connection closes; an over-long target 414; too
many or too large header fields 431; a body over 64 KiB 413; a connection
idle for a minute is closed. No handler runs for a refused request.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qsl, unquote

import httptools

from ..http.headers import HTTP_DATE

log = logging.getLogger("pyproxy.admin")

MAX_URL = 8192
MAX_HEADERS = 100
MAX_HEADER_BYTES = 64 * 1024
MAX_BODY = 64 * 1024
IDLE_TIMEOUT = 60.0

_REASONS = {
    200: b"OK", 400: b"Bad Request", 403: b"Forbidden", 404: b"Not Found", 405: b"Method Not Allowed",
    413: b"Payload Too Large", 414: b"URI Too Long", 431: b"Request Header Fields Too Large",
    500: b"Internal Server Error", 503: b"Service Unavailable",
}


class Request:
    """What a handler sees: method, decoded path, query (first value of each
    name wins), the caller's address, lowercased header names."""

    __slots__ = ("headers", "method", "path", "query", "remote")

    def __init__(self, method: str, path: str, query: dict[str, str], remote: str,
                 headers: dict[str, str]) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.remote = remote
        self.headers = headers


class Response:
    __slots__ = ("body", "content_type", "headers", "status")

    def __init__(self, text: str | None = None, status: int = 200, body: bytes | None = None,
                 content_type: str = "text/plain", headers: dict[str, str] | None = None) -> None:
        self.status = status
        if body is None:
            body = (text or "").encode("utf-8")
            if content_type.startswith("text/") or content_type == "application/json":
                content_type += "; charset=utf-8"
        self.body = body
        self.content_type = content_type
        self.headers = headers or {}


Handler = Callable[[Request], Awaitable[Response]]
# Runs before the handler; a Response refuses the request.
Guard = Callable[[Request], "Response | None"]


class Router:
    def __init__(self, guard: Guard | None = None) -> None:
        self.routes: dict[str, dict[str, Handler]] = {}
        self.guard = guard

    def add_get(self, path: str, handler: Handler) -> None:
        methods = self.routes.setdefault(path, {})
        methods["GET"] = handler
        methods["HEAD"] = handler

    def add_post(self, path: str, handler: Handler) -> None:
        self.routes.setdefault(path, {})["POST"] = handler

    async def dispatch(self, request: Request) -> Response:
        methods = self.routes.get(request.path)
        if methods is None:
            return Response("404: Not Found\n", status=404)
        handler = methods.get(request.method)
        if handler is None:
            return Response("405: Method Not Allowed\n", status=405,
                            headers={"allow": ", ".join(sorted(methods))})
        if self.guard is not None:
            refused = self.guard(request)
            if refused is not None:
                return refused
        return await handler(request)


class _Refused(Exception):
    """A limit was crossed while parsing (raised out of a parser callback)."""


class _Connection(asyncio.Protocol):
    def __init__(self, server: AdminHTTPServer) -> None:
        self.server = server
        self.router = server.router
        self.loop = server.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.remote = ""
        self.queue: deque[tuple[Request, bool]] = deque()
        self.task: asyncio.Task | None = None
        self.closing = False
        self.idle: asyncio.TimerHandle | None = None
        self.refusal = 400
        self._reset()

    def _reset(self) -> None:
        self.url = b""
        self.headers: dict[str, str] = {}
        self.header_count = 0
        self.header_bytes = 0
        self.body_bytes = 0

    # -- asyncio.Protocol ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.remote = peer[0] if isinstance(peer, tuple) else ""
        self.server.connections.add(self)
        self._arm_idle()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        self._arm_idle()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            self._refuse(self.refusal if isinstance(exc.__context__, _Refused) else 500)
        except httptools.HttpParserUpgrade:
            self._refuse(400)
        except httptools.HttpParserError:
            self._refuse(400)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.server.connections.discard(self)
        if self.idle is not None:
            self.idle.cancel()
        if self.task is not None:
            self.task.cancel()

    # -- httptools callbacks ------------------------------------------------

    def on_message_begin(self) -> None:
        self._reset()

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > MAX_URL:
            self.refusal = 414
            raise _Refused()

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_count += 1
        self.header_bytes += len(name) + len(value)
        if self.header_count > MAX_HEADERS or self.header_bytes > MAX_HEADER_BYTES:
            self.refusal = 431
            raise _Refused()
        key = name.decode("latin-1").lower()
        if key not in self.headers:
            self.headers[key] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self.body_bytes += len(body)
        if self.body_bytes > MAX_BODY:
            self.refusal = 413
            raise _Refused()

    def on_message_complete(self) -> None:
        parsed = httptools.parse_url(self.url)
        query: dict[str, str] = {}
        if parsed.query:
            for k, v in parse_qsl(parsed.query.decode("latin-1"), keep_blank_values=True):
                query.setdefault(k, v)
        path = unquote((parsed.path or b"/").decode("latin-1"))
        method = self.parser.get_method().decode("ascii")
        request = Request(method, path, query, self.remote, self.headers)
        self.queue.append((request, self.parser.should_keep_alive()))
        if self.task is None:
            self.task = self.loop.create_task(self._serve())

    # -- serving ------------------------------------------------------------

    async def _serve(self) -> None:
        try:
            while self.queue and not self.closing:
                request, keep_alive = self.queue.popleft()
                try:
                    response = await self.router.dispatch(request)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("admin: %s %s failed", request.method, request.path)
                    response = Response("500: Internal Server Error\n", status=500)
                self._write(response, head_only=request.method == "HEAD", close=not keep_alive)
                if not keep_alive:
                    return
        finally:
            self.task = None

    def _write(self, response: Response, head_only: bool = False, close: bool = False) -> None:
        t = self.transport
        if t is None or self.closing:
            return
        status = response.status
        lines = [b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Unknown")),
                 b"content-type: " + response.content_type.encode("latin-1") + b"\r\n",
                 b"content-length: %d\r\n" % len(response.body),
                 b"date: " + HTTP_DATE.get() + b"\r\n"]
        for name, value in response.headers.items():
            if name.lower() in ("content-type", "content-length"):
                continue
            lines.append(name.encode("latin-1") + b": " + value.encode("latin-1") + b"\r\n")
        if close:
            lines.append(b"connection: close\r\n")
        lines.append(b"\r\n")
        if not head_only:
            lines.append(response.body)
        t.write(b"".join(lines))
        if close:
            self.closing = True
            t.close()

    def _refuse(self, status: int) -> None:
        """Answer a request that could not be parsed or crossed a limit, then
        close (the rest of the byte stream cannot be trusted)."""
        self.queue.clear()
        if self.task is not None:
            self.task.cancel()
            self.task = None
        reason = _REASONS.get(status, b"Bad Request").decode()
        self._write(Response(f"{status}: {reason}\n", status=status), close=True)

    def _arm_idle(self) -> None:
        if self.idle is not None:
            self.idle.cancel()
        self.idle = self.loop.call_later(IDLE_TIMEOUT, self._on_idle)

    def _on_idle(self) -> None:
        self.idle = None
        if self.task is None and self.transport is not None:
            self.closing = True
            self.transport.close()
        else:
            self._arm_idle()  # a handler is still working (e.g. a reload)

    def close(self) -> None:
        self.closing = True
        if self.task is not None:
            self.task.cancel()
        if self.transport is not None:
            self.transport.close()


class AdminHTTPServer:
    """One listening socket serving ``router``."""

    def __init__(self, router: Router, loop: asyncio.AbstractEventLoop) -> None:
        self.router = router
        self.loop = loop
        self.connections: set[_Connection] = set()
        self.server: asyncio.base_events.Server | None = None

    async def start(self, host: str, port: int) -> None:
        self.server = await self.loop.create_server(  # type: ignore[assignment]
            lambda: _Connection(self), host, port, reuse_address=True)

    @property
    def sockets(self) -> list:
        return list(self.server.sockets) if self.server is not None else []

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        for conn in list(self.connections):
            conn.close()
        if self.server is not None:
            await self.server.wait_closed()
            self.server = None
