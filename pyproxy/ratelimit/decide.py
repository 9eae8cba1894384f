"""Where a global rate-limit decision comes from.

``RedisDecider`` (``--ratelimit-redis``, the default way): the ratelimit
service's algorithm in-process against the shared Redis, with the service's
configuration (``--ratelimit-config``). ``ServiceDecider``
(``--ratelimit-service``): ask a running envoyproxy/ratelimit over its
HTTP/1.1 ``POST /json`` endpoint (pyproxy has no gRPC client).

Both call ``callback(result)`` once, with ``(code, statuses)`` or an
exception; the caller bounds the wait with the filter's timeout.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Callable
from typing import Any

from .redis import RedisClient, RedisUnavailable
from .service_config import OK, OVER_LIMIT, Check, Descriptor, ServiceConfig, Status, decide, plan

log = logging.getLogger("pyproxy.ratelimit")

Callback = Callable[[Any], None]
# The service's EXPIRATION_JITTER_MAX_SECONDS default.
DEFAULT_JITTER = 300


class RedisDecider:
    """The service's decision against Redis. What depends only on the
    request's descriptors (the matched limit, the cache key without its
    window) is remembered per (domain, descriptors), bounded; per request
    remain the window's start, one pipeline and the comparison."""

    MEMO_LIMIT = 10_000

    def __init__(self, client: RedisClient, config: ServiceConfig | None, rng: random.Random,
                 jitter_max: int = DEFAULT_JITTER, clock: Callable[[], float] = time.time,
                 prefix: bytes = b"") -> None:
        self.client = client
        self._config = config
        self.rng = rng
        self.jitter_max = jitter_max
        self.clock = clock
        self.prefix = prefix
        self.memo: dict[tuple[str, tuple[Descriptor, ...]], Check] = {}

    @property
    def config(self) -> ServiceConfig | None:
        return self._config

    @config.setter
    def config(self, config: ServiceConfig | None) -> None:  # a reload of --ratelimit-config
        self._config = config
        self.memo = {}

    def check(self, domain: str, descriptors: list[tuple[Descriptor, int | None]], callback: Callback,
              want_statuses: bool = True) -> None:
        """``callback((code, statuses))``; ``statuses`` may be [] when not ``want_statuses``."""
        config = self._config
        if config is None:
            raise RuntimeError("no rate-limit configuration loaded (--ratelimit-config)")
        now = int(self.clock())
        key = (domain, tuple([d for d, _ in descriptors]))
        check = self.memo.get(key)
        if check is None:
            # The limits and the keys of window 0; the window is appended per request.
            check = plan(config, domain, key[1], 0, self.prefix)
            if len(self.memo) >= self.MEMO_LIMIT:
                self.memo = {}
            self.memo[key] = check
        keys = check.keys
        if not keys:
            callback(decide(check, [], now))  # nothing to count (no limit, unlimited, replaced)
            return
        commands: list[tuple[Any, ...]] = []
        jitter_max = self.jitter_max
        for i, key0, _expiry, limit in keys:
            divider = limit.divider
            # key0 ends with "_0" (window 0): the same key with this window's start.
            cache_key = key0[:-1] + b"%d" % (now - now % divider)
            hits = descriptors[i][1]
            commands.append((b"INCRBY", cache_key, 1 if hits is None else hits))
            # (random() rather than randrange(): a C call instead of several Python ones)
            commands.append((b"EXPIRE", cache_key,
                             divider + (int(self.rng.random() * jitter_max) if jitter_max > 0 else 0)))

        def done(replies: Any) -> None:
            if isinstance(replies, Exception):
                callback(replies)
                return
            for reply in replies:
                if not isinstance(reply, int):
                    callback(RedisUnavailable(f"unexpected reply from Redis: {reply!r}"))
                    return
            if len(keys) == 1 and not want_statuses:
                # One counted descriptor, no x-ratelimit-* headers wanted: just the comparison.
                limit = keys[0][3]
                over = replies[0] > limit.requests_per_unit and not limit.shadow_mode
                callback((OVER_LIMIT if over else OK, []))
                return
            callback(decide(check, replies[0::2], now))

        self.client.send(commands, done)


class ServiceDecider:
    """``POST /json`` to an envoyproxy/ratelimit service (its HTTP port, 8080)."""

    def __init__(self, base_url: str, loop: asyncio.AbstractEventLoop) -> None:
        self.url = base_url.rstrip("/") + "/json"
        self.loop = loop
        self.session: Any = None

    def check(self, domain: str, descriptors: list[tuple[Descriptor, int | None]], callback: Callback,
              want_statuses: bool = True) -> None:
        body = {"domain": domain, "descriptors": [
            {"entries": [{"key": k.decode("utf-8", "replace"), "value": v.decode("utf-8", "replace")}
                         for k, v in d], **({"hitsAddend": hits} if hits is not None else {})}
            for d, hits in descriptors]}
        task = self.loop.create_task(self._post(body))

        def done(t: asyncio.Task[Any]) -> None:
            if t.cancelled():
                callback(RuntimeError("cancelled"))
                return
            exc = t.exception()
            callback(exc if exc is not None else t.result())

        task.add_done_callback(done)

    async def _post(self, body: dict) -> tuple[int, list[Status]]:
        import aiohttp

        if self.session is None:
            self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        async with self.session.post(self.url, data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json"}) as resp:
            text = await resp.read()
            if resp.status not in (200, 429):
                raise RuntimeError(f"ratelimit service answered {resp.status}")
            data = json.loads(text) if text else {}
        overall = data.get("overallCode", "OK")
        code = OVER_LIMIT if overall == "OVER_LIMIT" or resp.status == 429 else OK
        return code, []

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
