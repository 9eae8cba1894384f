"""Asynchronous DNS for ``resolution: DNS`` endpoints.

Names are resolved when a snapshot is built (before it is swapped in) and
re-resolved periodically in the background; a connection attempt only reads
the cache, never resolves on the request path. A name whose lookup fails
keeps its last good addresses; a connection to a name that has never
resolved fails at once (503 UF, like a connect failure) until a background
lookup succeeds.
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
        # Names whose every lookup so far failed: never handed to a connect
        # call, which would resolve them on the request path.
        self.unresolved: set[str] = set()

    def __call__(self, host: str) -> str:
        """Cached address for ``host`` (rotating over several), else ``host``
        (an IP address or a unix:// path). Raises OSError for a DNS name that
        has not resolved yet."""
        ips = self.cache.get(host)
        if not ips:
            if host in self.unresolved:
                raise OSError(f"DNS name {host!r} has not resolved yet")
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
        except (TimeoutError, OSError) as exc:
            self.failed(name, exc)
            return
        ips: list[str] = []
        for family, _, _, _, sockaddr in infos:
            ip = str(sockaddr[0])
            if ip not in ips:
                ips.append(ip)
        if ips:
            self.resolved(name, ips)
        else:
            self.failed(name, OSError("no addresses"))

    def resolved(self, name: str, ips: list[str]) -> None:
        if self.cache.get(name) != ips:
            log.debug("dns: %s -> %s", name, ips)
        self.cache[name] = ips
        self.unresolved.discard(name)

    def failed(self, name: str, exc: BaseException) -> None:
        self.failures += 1
        log.warning("dns: cannot resolve %s: %s (keeping %s)", name, exc or type(exc).__name__,
                    self.cache.get(name) or "nothing")
        if name not in self.cache:
            self.unresolved.add(name)

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
