"""A thin Redis transport: one multiplexed connection per worker, commands
pipelined as they come, replies parsed by ``hiredis`` (the C RESP parser
redis-py itself uses).

Why not redis-py's asyncio client on the request path: measured here
(docs/load-tests/ratelimit-redis.md, ``load-tests/redis_client_cost.py``), a
rate-limit check (INCRBY + EXPIRE) costs several times more CPU through
redis-py than through this transport, which does only what the check needs:
write the packed commands, queue a future per reply, resolve futures in
order as hiredis yields replies. Concurrent checks share the connection and
go out without waiting for each other (Redis answers in order).

Failure handling, so the request path never hangs on Redis:
- a call on a connection that is down fails at once (``RedisUnavailable``)
  and starts a reconnect, with exponential backoff (0.1 s doubling to 5 s);
- a connection whose oldest reply is overdue by ``STALL`` seconds is closed
  (every pending call fails) and re-established;
- the caller bounds its own wait (the filter's timeout) and simply drops a
  late future.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import hiredis

log = logging.getLogger("pyproxy.ratelimit")

BACKOFF_MIN = 0.1
BACKOFF_MAX = 5.0
STALL = 2.0  # a reply this overdue means the connection is dead
MAX_PENDING = 100_000
PASSWORD_ENV = "PYPROXY_RATELIMIT_REDIS_PASSWORD"


class RedisUnavailable(Exception):
    """No connection (down, reconnecting) or the connection was lost."""


@dataclass(frozen=True, slots=True)
class RedisURL:
    host: str
    port: int
    db: int = 0
    tls: bool = False
    username: str = ""
    password: str = ""

    def __str__(self) -> str:  # never shows the password
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{self.host}:{self.port}/{self.db}"


def parse_redis_url(url: str, environ: dict[str, str] | None = None) -> RedisURL:
    """``redis://[user:password@]HOST[:PORT][/DB]`` or ``rediss://`` (TLS);
    the password may come from ``PYPROXY_RATELIMIT_REDIS_PASSWORD`` instead."""
    env = os.environ if environ is None else environ
    parts = urlsplit(url.strip())
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(f"invalid Redis URL {url!r}: expected redis://HOST:PORT[/DB] or rediss://...")
    if not parts.hostname:
        raise ValueError(f"invalid Redis URL {url!r}: no host")
    try:
        port = parts.port or 6379
    except ValueError:
        raise ValueError(f"invalid Redis URL {url!r}: bad port") from None
    path = parts.path.strip("/")
    if path and not path.isdigit():
        raise ValueError(f"invalid Redis URL {url!r}: the path must be a database number")
    password = unquote(parts.password) if parts.password else env.get(PASSWORD_ENV, "")
    return RedisURL(parts.hostname, port, int(path) if path else 0, parts.scheme == "rediss",
                    unquote(parts.username) if parts.username and parts.password else "", password)


class _Protocol(asyncio.Protocol):
    __slots__ = ("client", "reader", "transport")

    def __init__(self, client: RedisClient) -> None:
        self.client = client
        self.reader = hiredis.Reader()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        reader.feed(data)
        pending = self.client.pending
        while True:
            reply = reader.gets()
            if reply is False:
                return
            if not pending:
                self.client.lost("reply without a request")
                return
            # An entry: [callback, replies expected, replies so far, sent at].
            entry = pending[0]
            replies = entry[2]
            replies.append(reply)
            if len(replies) == entry[1]:
                pending.popleft()
                entry[0](replies)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.lost(str(exc) if exc else "closed by Redis", self)


class RedisClient:
    """One connection to one Redis; ``call`` sends commands and returns a
    future per reply. Counters: ``connects``, ``connect_failures``,
    ``disconnects``."""

    def __init__(self, url: RedisURL, loop: asyncio.AbstractEventLoop, connect_timeout: float = 1.0) -> None:
        self.url = url
        self.loop = loop
        self.connect_timeout = connect_timeout
        self.protocol: _Protocol | None = None
        self.ready = False  # connected, authenticated, database selected
        # One entry per send(): [callback, replies expected, replies so far,
        # sent at]; Redis answers in order, so the head is always the next.
        self.pending: deque[list[Any]] = deque()
        self.connecting: asyncio.Task[None] | None = None
        self.backoff = 0.0
        self.next_attempt = 0.0
        self.closed = False
        self.connects = 0
        self.connect_failures = 0
        self.disconnects = 0
        self._last_log = 0.0

    # -- connection -----------------------------------------------------------

    def ensure_connecting(self) -> None:
        if self.protocol is not None or self.connecting is not None or self.closed:
            return
        if time.monotonic() < self.next_attempt:
            return
        self.connecting = self.loop.create_task(self._connect())

    async def _connect(self) -> None:
        url = self.url
        try:
            ctx = ssl.create_default_context() if url.tls else None
            _transport, protocol = await asyncio.wait_for(
                self.loop.create_connection(lambda: _Protocol(self), url.host, url.port, ssl=ctx),
                self.connect_timeout)
            self.protocol = protocol
            setup: list[tuple[Any, ...]] = []
            if url.password:
                setup.append(("AUTH", url.username, url.password) if url.username else ("AUTH", url.password))
            if url.db:
                setup.append(("SELECT", url.db))
            for command in setup:
                reply = await asyncio.wait_for(self.pipeline((command,), setup=True)[0], self.connect_timeout)
                if isinstance(reply, hiredis.ReplyError):
                    raise ConnectionError(f"{command[0]} failed: {reply}")
            self.ready = True
            self.connects += 1
            self.backoff = 0.0
            log.info("rate limit: connected to Redis %s", url)
        except asyncio.CancelledError:
            self._drop()
            raise
        except Exception as exc:  # noqa: BLE001 - any failure means: retry later
            self._drop()
            self.connect_failures += 1
            self.backoff = min(BACKOFF_MAX, max(BACKOFF_MIN, self.backoff * 2))
            self.next_attempt = time.monotonic() + self.backoff
            self.log_problem(f"cannot connect to Redis {url}: {type(exc).__name__}: {exc}; "
                             f"retrying in {self.backoff:.1f}s")
        finally:
            self.connecting = None

    def _drop(self) -> None:
        self.ready = False
        protocol, self.protocol = self.protocol, None
        if protocol is not None and protocol.transport is not None:
            protocol.transport.abort()
        self._fail_pending("connection to Redis lost")

    def lost(self, why: str, protocol: _Protocol | None = None) -> None:
        if protocol is not None and protocol is not self.protocol:
            return  # an old connection's late notice
        if self.protocol is not None:
            self.disconnects += 1
            self.log_problem(f"connection to Redis {self.url} lost: {why}")
        self._drop()
        self.next_attempt = time.monotonic() + self.backoff
        self.ensure_connecting()

    def _fail_pending(self, why: str) -> None:
        pending, self.pending = self.pending, deque()
        for entry in pending:
            entry[0](RedisUnavailable(why))

    def log_problem(self, message: str) -> None:
        """At most one line per 10 s: Redis down must not flood the log."""
        now = time.monotonic()
        if now - self._last_log >= 10.0:
            self._last_log = now
            log.warning("rate limit: %s", message)

    # -- commands ---------------------------------------------------------------

    def call(self, *commands: tuple[Any, ...]) -> asyncio.Future[Any]:
        """Send the commands in one write; a future for the last reply (the
        earlier ones are parsed and dropped). Fails at once when there is no
        connection."""
        return self.pipeline(commands)[-1]

    def pipeline(self, commands: tuple[tuple[Any, ...], ...] | list[tuple[Any, ...]],
                 setup: bool = False) -> list[asyncio.Future[Any]]:
        """The commands in one write, a future per reply (setup and tools;
        the request path uses :meth:`send`)."""
        futures = [self.loop.create_future() for _ in commands]

        def done(replies: Any) -> None:
            for i, future in enumerate(futures):
                if future.done():
                    continue
                if isinstance(replies, Exception):
                    future.set_exception(replies)
                    future.exception()  # retrieved: a caller that gave up does not get "never retrieved" noise
                else:
                    future.set_result(replies[i])

        self.send(commands, done, setup)
        return futures

    def send(self, commands: tuple[tuple[Any, ...], ...] | list[tuple[Any, ...]],
             callback: Callable[[Any], None], setup: bool = False) -> None:
        """Write the commands at once; ``callback`` gets the list of their
        replies (in order) when the last is in, or a RedisUnavailable when
        the connection is lost first. Called from data_received: no future,
        no extra loop iteration. Raises RedisUnavailable at once when there
        is no connection."""
        protocol = self.protocol
        if protocol is None or protocol.transport is None or not (self.ready or setup):
            self.ensure_connecting()
            raise RedisUnavailable("not connected to Redis")
        pending = self.pending
        now = time.monotonic()
        if pending and now - pending[0][3] > STALL:
            self.lost(f"no reply for {now - pending[0][3]:.1f}s")
            raise RedisUnavailable("Redis stopped answering")
        if len(pending) >= MAX_PENDING:
            raise RedisUnavailable("too many requests waiting for Redis")
        pending.append([callback, len(commands), [], now])
        pack = hiredis.pack_command
        protocol.transport.write(b"".join([pack(c) for c in commands]))

    async def close(self) -> None:
        self.closed = True
        if self.connecting is not None:
            self.connecting.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.connecting
        self._drop()
