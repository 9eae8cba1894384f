"""A worker's rate-limit backend: the runtime (buckets, counters), the
decision source for global limits, and the hot reload of the ratelimit
service's configuration (``--ratelimit-config``, polled like ``--config``;
a file with errors is rejected with its path and the previous configuration
stays in force)."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from .bucket import SharedBuckets
from .decide import RedisDecider, ServiceDecider
from .filter import RateLimitRuntime
from .redis import RedisClient, parse_redis_url
from .service_config import ServiceConfig, load_service_config

log = logging.getLogger("pyproxy.ratelimit")


class LazySharedRuntime(RateLimitRuntime):
    """The runtime, with the cross-worker bucket file opened on first use
    (a sidecar without a local rate limit never creates it)."""

    def __init__(self, options: Any, rng: Any) -> None:
        super().__init__(rng)
        self.options = options
        self._opened = False

    def bucket(self, key: str, spec: Any) -> Any:
        if not self._opened:
            self._opened = True
            self.shared = SharedBuckets.for_sidecar(self.options.workers, self.options.worker_index)
        return super().bucket(key, spec)

    def close(self) -> None:
        if self.shared is not None:
            # The primary removes the file; the others only unmap it.
            self.shared.close(unlink=self.options.worker_index == 0)
            self.shared = None


class Backend:
    def __init__(self, worker: Any) -> None:
        self.worker = worker
        self.options = worker.options
        self.client: RedisClient | None = None
        self.config: ServiceConfig | None = None
        self.signature: tuple | None = None
        self.reloads = 0
        self.reload_failures = 0
        self.last_errors: list[str] = []

    def load_initial(self) -> list[str]:
        """Errors of the initial ``--ratelimit-config`` load ([] when fine or unused)."""
        if not self.options.ratelimit_config:
            return []
        from ..config.watch import config_signature

        self.signature = config_signature(list(self.options.ratelimit_config))
        config, errors = load_service_config(self.options.ratelimit_config)
        if errors:
            return [str(e) for e in errors]
        self.config = config
        return []

    def start(self, runtime: RateLimitRuntime) -> list[asyncio.Task]:
        o = self.options
        loop = self.worker.loop
        tasks: list[asyncio.Task] = []
        if o.ratelimit_redis:
            self.client = RedisClient(parse_redis_url(o.ratelimit_redis), loop)
            self.client.ensure_connecting()
            runtime.decider = RedisDecider(self.client, self.config, self.worker.rng, o.ratelimit_jitter)
            if o.watch_interval > 0:
                from ..config.watch import ConfigWatcher

                watcher = ConfigWatcher(o.ratelimit_config, lambda: self.signature, self.reload, loop,
                                        interval=o.watch_interval)
                tasks.append(loop.create_task(watcher.run()))
        elif o.ratelimit_service:
            runtime.decider = ServiceDecider(o.ratelimit_service, loop)
        return tasks

    async def reload(self, trigger: str = "watch") -> bool:
        from ..config.watch import config_signature

        paths = list(self.options.ratelimit_config)
        loop = self.worker.loop
        self.signature = config_signature(paths)
        config, errors = await loop.run_in_executor(None, load_service_config, paths)
        if errors or config is None:
            self.reload_failures += 1
            self.last_errors = [str(e) for e in errors]
            for e in errors:
                log.error("rate-limit config rejected: %s", e)
            log.error("rate-limit config reload rejected; the previous configuration stays in force")
            return False
        self.config = config
        decider = self.worker.ratelimit.decider
        if isinstance(decider, RedisDecider):
            decider.config = config
        self.reloads += 1
        self.last_errors = []
        log.info("rate-limit config reloaded (%s): %d domain(s) from %s", trigger, len(config.domains),
                 ", ".join(os.path.basename(f) for f in config.files))
        return True

    def counters(self) -> dict[str, int]:
        out = {"ratelimit_config_reloads": self.reloads, "ratelimit_config_reload_failures": self.reload_failures}
        if self.client is not None:
            out.update({"ratelimit_redis_connects": self.client.connects,
                        "ratelimit_redis_connect_failures": self.client.connect_failures,
                        "ratelimit_redis_disconnects": self.client.disconnects})
        return out

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()
        decider = self.worker.ratelimit.decider if self.worker.ratelimit is not None else None
        if isinstance(decider, ServiceDecider):
            await decider.close()
