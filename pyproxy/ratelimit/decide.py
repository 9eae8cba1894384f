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

import hiredis

from .redis import RedisClient, RedisUnavailable
from .service_config import OK, OVER_LIMIT, Descriptor, ServiceConfig, Status, decide, plan

log = logging.getLogger("pyproxy.ratelimit")

Callback = Callable[[Any], None]
# The service's EXPIRATION_JITTER_MAX_SECONDS default.
DEFAULT_JITTER = 300


class RedisDecider:
    def __init__(self, client: RedisClient, config: ServiceConfig | None, rng: random.Random,
                 jitter_max: int = DEFAULT_JITTER, clock: Callable[[], float] = time.time,
                 prefix: bytes = b"") -> None:
        self.client = client
        self.config = config  # swapped by a reload of --ratelimit-config
        self.rng = rng
        self.jitter_max = jitter_max
        self.clock = clock
        self.prefix = prefix

    def _jitter(self) -> int:
        return self.rng.randrange(self.jitter_max) if self.jitter_max > 0 else 0

    def check(self, domain: str, descriptors: list[tuple[Descriptor, int | None]], callback: Callback) -> None:
        config = self.config
        if config is None:
            raise RuntimeError("no rate-limit configuration loaded (--ratelimit-config)")
        now = int(self.clock())
        jitter = (self._jitter() for _ in descriptors) if self.jitter_max > 0 else None
        check = plan(config, domain, [d for d, _ in descriptors], now, self.prefix, jitter)
        if not check.keys:
            callback(decide(check, [], now))  # nothing to count (no limit, unlimited, replaced)
            return
        commands: list[tuple[Any, ...]] = []
        for i, key, expiry, _limit in check.keys:
            hits = descriptors[i][1]
            commands.append((b"INCRBY", key, 1 if hits is None else hits))
            commands.append((b"EXPIRE", key, expiry))
        futures = self.client.pipeline(commands)
        increments = futures[0::2]

        def done(last: asyncio.Future[Any]) -> None:
            # Redis answers in order: when the last reply is in, all are.
            try:
                counts = []
                for future in increments:
                    reply = future.result()
                    if not isinstance(reply, int):
                        raise RedisUnavailable(f"unexpected reply from Redis: {reply!r}")
                    counts.append(reply)
                if isinstance(last.result(), hiredis.ReplyError):
                    raise RedisUnavailable(f"EXPIRE failed: {last.result()}")
            except Exception as exc:  # noqa: BLE001 - any failure: the filter's failure mode
                callback(exc)
                return
            callback(decide(check, counts, now))

        futures[-1].add_done_callback(done)


class ServiceDecider:
    """``POST /json`` to an envoyproxy/ratelimit service (its HTTP port, 8080)."""

    def __init__(self, base_url: str, loop: asyncio.AbstractEventLoop) -> None:
        self.url = base_url.rstrip("/") + "/json"
        self.loop = loop
        self.session: Any = None

    def check(self, domain: str, descriptors: list[tuple[Descriptor, int | None]], callback: Callback) -> None:
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
