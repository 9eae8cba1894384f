"""Asynchronous DNS for ``resolution: DNS`` endpoints.

Names are resolved when a snapshot is built (before it is swapped in) and
re-resolved periodically in the background; a connection attempt only reads
the cache, never resolves on the request path. A name whose lookup fails
keeps its last good addresses; a name never resolved is handed to the
connect call as is (the loop resolves it off-thread), so a slow DNS server
delays only new connections to that name.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Iterable

log = logging.getLogger("pyproxy.dns")

DEFAULT_REFRESH = 5.0  # Envoy's dns_refresh_rate default


class Resolver:
    def __init__(self, loop: asyncio.AbstractEventLoop, refresh: float = DEFAULT_REFRESH) -> None:
        self.loop = loop
        self.refresh_interval = refresh
        self.cache: dict[str, list[str]] = {}
        self._next: dict[str, int] = {}
        self.failures = 0

    def __call__(self, host: str) -> str:
        """Cached address for ``host`` (rotating over several), else ``host``."""
        ips = self.cache.get(host)
        if not ips:
            return host
        if len(ips) == 1:
            return ips[0]
        i = self._next.get(host, 0)
        self._next[host] = (i + 1) % len(ips)
        return ips[i % len(ips)]

    async def resolve_all(self, names: Iterable[str], timeout: float = 5.0) -> None:
        names = list(names)
        if not names:
            return
        await asyncio.gather(*(self._resolve(n, timeout) for n in names))

    async def _resolve(self, name: str, timeout: float) -> None:
        try:
            infos = await asyncio.wait_for(
                self.loop.getaddrinfo(name, None, type=socket.SOCK_STREAM), timeout
            )
        except (OSError, asyncio.TimeoutError) as exc:
            self.failures += 1
            log.warning("dns: cannot resolve %s: %s (keeping %s)", name, exc, self.cache.get(name) or "nothing")
            return
        ips: list[str] = []
        for family, _, _, _, sockaddr in infos:
            ip = str(sockaddr[0])
            if ip not in ips:
                ips.append(ip)
        if ips:
            if self.cache.get(name) != ips:
                log.debug("dns: %s -> %s", name, ips)
            self.cache[name] = ips

    async def run(self, names_provider) -> None:  # type: ignore[no-untyped-def]
        """Background refresh loop; ``names_provider()`` returns the current names."""
        while True:
            await asyncio.sleep(self.refresh_interval)
            try:
                await self.resolve_all(names_provider())
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("dns refresh failed")
