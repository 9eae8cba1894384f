"""One ``Worker`` per event loop: the data plane of one process.

A worker owns the listeners (inbound, outbound), the current snapshot, the
cluster state, the DNS resolver and the background tasks (housekeeping
sweep, DNS refresh, outlier timers, config watching). It knows nothing of
the process around it: signals, the admin and stats servers, the supervisor
and the control socket are wired in ``process.py``, which imports this module
(never the other way round), and so do the admin server and the telemetry.

Reload: parse and validate everything, build a new snapshot on the side
(reusing unchanged clusters), resolve its DNS names, then swap one reference.
Requests in flight keep the snapshot they started with; clusters the new
snapshot does not carry over drain.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from .config.loader import ParseCache
from .config.model import LoadedConfig
from .filters.mirror import Mirror
from .heap import HEAP
from .http.downstream import DownstreamConnection, MTLSDownstreamConnection, StreamFactory
from .http.exchange import INBOUND, OUTBOUND, Exchange
from .http.h2downstream import H2Downstream
from .options import RunOptions
from .snapshot import BuildContext, ProxyIdentity, Snapshot, build_snapshot_async, retire
from .upstream.cluster import Cluster
from .upstream.dns import Resolver

if TYPE_CHECKING:
    from .observability.observer import TelemetryObserver
    from .security.certs import CertStore

log = logging.getLogger("pyproxy")


class WorkerStats:
    """Listener-level counters (Envoy's downstream_* stats).

    ``downstream_rq_rejected`` counts every request the proxy refused itself
    (malformed, over a limit, header timeout); ``downstream_rq_rejected_<status>``
    splits it by the status it got (README "Security")."""

    __slots__ = ("downstream_cx_total", "downstream_cx_active", "downstream_cx_overflow",
                 "downstream_rq_rejected", "downstream_cx_header_timeout", "downstream_cx_idle_timeout",
                 "downstream_rq_idle_timeout", "downstream_rq_rejected_400", "downstream_rq_rejected_408",
                 "downstream_rq_rejected_413", "downstream_rq_rejected_414", "downstream_rq_rejected_431",
                 "downstream_rq_rejected_426", "downstream_rq_rejected_501", "downstream_rq_rejected_500",
                 # HTTP/2 connections seen, and those closed over a flood budget (http/h2downstream.py)
                 "downstream_cx_http2_total", "downstream_cx_h2_flood")
    # Declared for the type checker; __init__ zeroes every slot.
    downstream_cx_total: int
    downstream_cx_active: int
    downstream_cx_overflow: int
    downstream_rq_rejected: int
    downstream_cx_header_timeout: int
    downstream_cx_idle_timeout: int
    downstream_rq_idle_timeout: int
    downstream_cx_http2_total: int
    downstream_cx_h2_flood: int

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}

    def reject(self, status: int) -> None:
        """A request refused with ``status`` (not on the normal path)."""
        self.downstream_rq_rejected += 1
        name = f"downstream_rq_rejected_{status}"
        if hasattr(self, name):
            setattr(self, name, getattr(self, name) + 1)


class Listener:
    def __init__(self, worker: Worker, name: str, direction: int, host: str, port: int) -> None:
        self.worker = worker
        self.name = name
        self.direction = direction
        self.host = host
        self.port = port
        self.transparent = True  # SO_ORIGINAL_DST is read on every accepted connection
        self.server: asyncio.base_events.Server | None = None
        self.connections: set[DownstreamConnection | H2Downstream] = set()
        # What a connection creates for each request it parses.
        self.new_stream: StreamFactory = Exchange
        # Inbound with a workload certificate: TLS inspector + mTLS (security/inbound.py).
        self.acceptor: Any = None

    def on_connection_made(self, conn: DownstreamConnection) -> None:
        stats = self.worker.stats
        if stats.downstream_cx_active >= self.worker.limits.max_connections:
            # Over --max-connections (all listeners of this worker): refuse
            # at once, as Envoy's connection limit does.
            stats.downstream_cx_overflow += 1
            conn.closed = True
            conn.transport.abort()
            return
        self.connections.add(conn)
        stats.downstream_cx_total += 1
        stats.downstream_cx_active += 1
        if self.worker.draining:
            # Accepted during the drain grace: served, with Connection: close.
            conn.start_drain(close_idle=False)

    def on_connection_lost(self, conn: DownstreamConnection | H2Downstream) -> None:
        if conn in self.connections:
            self.connections.discard(conn)
            self.worker.stats.downstream_cx_active -= 1

    def _new_connection(self) -> asyncio.Protocol:
        # DownstreamConnection has the asyncio.Protocol methods without
        # inheriting the class; the loop only calls those methods.
        return cast(asyncio.Protocol, DownstreamConnection(self))

    def _new_tls_connection(self, verify: Callable[[Any], Any]) -> asyncio.Protocol:
        return cast(asyncio.Protocol, MTLSDownstreamConnection(self, verify))

    async def start(self, reuse_port: bool) -> None:
        loop = self.worker.loop
        certs = self.worker.certs
        if certs is not None and self.direction == INBOUND:
            from .security.inbound import InboundAcceptor

            if self.host == "::":
                sock = dual_stack_socket(self.port, reuse_port)
            else:
                family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
                sock = socket.create_server((self.host, self.port), family=family, reuse_port=reuse_port)
            sock.listen(1024)
            if self.port == 0:
                self.port = sock.getsockname()[1]
            self.acceptor = InboundAcceptor(self, certs)
            self.acceptor.start(sock)
            return
        if self.host == "::":
            # ``[::]`` listens on IPv4 and IPv6 (IPv6-only would be asyncio's
            # default), so one listener takes both families' redirected
            # connections. Any other address binds exactly that address.
            self.server = await loop.create_server(
                self._new_connection, sock=dual_stack_socket(self.port, reuse_port), backlog=1024)
        else:
            self.server = await loop.create_server(
                self._new_connection, self.host, self.port,
                reuse_address=True, reuse_port=reuse_port or None, backlog=1024,
            )
        if self.port == 0:
            self.port = self.server.sockets[0].getsockname()[1]

    def stop_accepting(self) -> None:
        if self.server is not None:
            self.server.close()
        if self.acceptor is not None:
            self.acceptor.close()


def dual_stack_socket(port: int, reuse_port: bool) -> socket.socket:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(("::", port))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


@dataclass
class ReloadStatus:
    ok: bool = True
    version: int = 0
    at: float = 0.0
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    successes: int = 0  # reloads after the initial load
    failures: int = 0
    trigger: str = "startup"
    duration_ms: float = 0.0
    # The most recent rejected config, kept after later successes (/config_dump).
    last_failure_at: float = 0.0
    last_failure_errors: list[str] = field(default_factory=list)
    # The latest load: files parsed and validated vs. reused unchanged
    # (config/loader.py ParseCache, with running totals) and VirtualService
    # route sets compiled vs. reused from the previous snapshot.
    counts: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok, "version": self.version, "at": self.at, "trigger": self.trigger,
            "duration_ms": round(self.duration_ms, 3), "errors": list(self.errors),
            "successes": self.successes, "failures": self.failures,
            "last_failure": None if not self.last_failure_at else {
                "at": self.last_failure_at, "errors": list(self.last_failure_errors)},
            **self.counts,
        }

    def failed(self, errors: list[str]) -> None:
        self.ok = False
        self.failures += 1
        self.errors = errors
        self.last_failure_at = self.at
        self.last_failure_errors = errors


class Worker:
    def __init__(self, options: RunOptions, loop: asyncio.AbstractEventLoop | None = None,
                 rng: random.Random | None = None, observer_factory: Callable[[Worker], Any] | None = None,
                 certs: CertStore | None = None) -> None:
        self.options = options
        # Workload credentials (mTLS); None = plaintext only.
        self.certs = certs
        self.loop = loop or asyncio.get_event_loop()
        self.rng = rng or (random.Random(options.seed) if options.seed is not None else random.Random())
        self.limits = options.limits
        self.identity = ProxyIdentity(
            workload=options.workload_name,
            namespace=options.namespace,
            labels=options.labels,
            app_host=options.app.host,
            app_port=options.app.port,
            outbound_port=options.outbound.port,
            inbound_port=options.inbound.port,
            gateway=options.gateway,
            root_namespace=options.root_namespace,
        )
        self.stats = WorkerStats()
        # Shadow traffic: in-flight bound and mirror_rq_* counters (filters/mirror.py).
        self.mirror = Mirror(self.loop, self.rng)
        self.resolver = Resolver(self.loop)
        self.snapshot: Snapshot = None  # type: ignore[assignment]  # set by load()
        self.loaded: LoadedConfig | None = None
        self.reload_status = ReloadStatus()
        self.version = 0
        self.draining = False
        self.ready = False
        self.started_at = time.time()
        self.listeners: list[Listener] = []
        self.tasks: list[asyncio.Task[None]] = []
        # Typed: mypy checks every hook call of the request path, and so the
        # Exchange against the observers' ExchangeView (observability/view.py).
        self.observer: TelemetryObserver | None = None
        self._observer_factory = observer_factory
        self.cluster_listeners: list[Callable[[Cluster], None]] = []
        self.on_reload: list[Callable[[Worker], None]] = []
        self.stopped = asyncio.Event()
        # Stat signature of the config files last loaded (config/watch.py).
        self.config_signature: tuple[Any, ...] | None = None
        self._reload_lock = asyncio.Lock()
        # Per-file parse results kept between reloads: unchanged files are
        # not parsed or validated again.
        self.parse_cache = ParseCache()
        self.health_failed = False  # POST /healthcheck/fail
        # Rate limiting (EnvoyFilter local/global filters): buckets, counters,
        # the decision source; idle unless an EnvoyFilter configures it.
        # Both created on first use: a proxy without rate limits imports and
        # runs none of it.
        self.ratelimit: Any = None
        self.ratelimit_backend: Any = None
        if options.ratelimit_config or options.ratelimit_redis or options.ratelimit_service:
            from .ratelimit.backend import Backend

            self.ratelimit_backend = Backend(self)

    # -- config ------------------------------------------------------------

    def _build_context(self) -> BuildContext:
        return BuildContext(self.loop, self.rng, self.resolver, None, self._on_cluster_created, self.certs,
                            ratelimit=self.rate_limit_runtime)

    def rate_limit_runtime(self) -> Any:
        """The rate-limit runtime (buckets, counters, decision source), made
        when a snapshot first has rate limits or a backend is configured."""
        if self.ratelimit is None:
            from .ratelimit.backend import LazySharedRuntime

            self.ratelimit = LazySharedRuntime(self.options, self.rng)
        return self.ratelimit

    def _on_cluster_created(self, cluster: Cluster) -> None:
        for cb in self.cluster_listeners:
            cb(cluster)

    def load_config(self) -> LoadedConfig:
        from .config.loader import load_paths

        return load_paths(list(self.options.config), self.parse_cache)

    def _load_with_signature(self) -> tuple[tuple[Any, ...], LoadedConfig]:
        from .config.watch import config_signature

        # Signature first: a change made while the files are read is seen
        # by the watcher's next poll.
        sig = config_signature(list(self.options.config))
        return sig, self.load_config()

    async def apply(self, loaded: LoadedConfig) -> bool:
        """Validate, build and swap. On errors the previous snapshot stays."""
        status = self.reload_status
        status.at = time.time()
        if not loaded.ok:
            status.failed([str(e) for e in loaded.errors])
            for e in loaded.errors:
                log.error("config rejected: %s", e)
            if self.snapshot is not None:
                log.error("config reload rejected (%d error(s)); version %d stays in force",
                          len(loaded.errors), self.version)
            return False
        try:
            version = self.version + 1
            # Cooperative: the loop keeps serving between build steps.
            snap = await build_snapshot_async(loaded, self.identity, self._build_context(), self.snapshot,
                                              version)
        except Exception as exc:  # a builder bug must not take the proxy down
            log.exception("config rejected: snapshot build failed")
            status.failed([f"internal error building the snapshot: {exc!r}"])
            return False
        await self.resolver.resolve_all(snap.dns_names - set(self.resolver.cache))
        old = self.snapshot
        snap.commit()
        self.snapshot = snap  # the swap: one reference
        self.version = version
        self.loaded = loaded
        for c in snap.all_clusters():
            c.outlier.start()
        retired = retire(old, snap) if old is not None else []
        if retired:
            log.info("reload: %d cluster(s) replaced and draining", len(retired))
        warnings = list(dict.fromkeys([*map(str, loaded.warnings), *snap.warnings]))
        # Each finding is logged once: by the first worker only (the others
        # build the same config), and not again by a reload that still has it
        # (the full list stays in /config_dump and /server_info).
        if self.options.worker_index == 0:
            before = set(status.warnings) if old is not None else set()
            for warning in warnings:
                if warning not in before:
                    log.warning("config: %s", warning)
        status.ok = True
        status.version = version
        status.successes += 1
        status.errors = []
        status.warnings = warnings
        status.counts = {**self.parse_cache.stats(), "routes_compiled": snap.routes_compiled,
                        "routes_reused": snap.routes_reused}
        for cb in self.on_reload:
            cb(self)
        # The new config's objects leave the collector's way (pyproxy/heap.py).
        HEAP.settle(len(retired), len(snap.clusters))
        return True

    async def reload(self, trigger: str = "reload") -> bool:
        """Load and apply the config files; reloads run one at a time."""
        async with self._reload_lock:
            with HEAP.paused():
                return await self._reload(trigger)

    async def _reload(self, trigger: str) -> bool:
        started = time.perf_counter()
        self.reload_status.trigger = trigger
        try:
            # Parsing runs in a thread (only changed files are parsed at all).
            sig, loaded = await self.loop.run_in_executor(None, self._load_with_signature)
        except Exception as exc:
            log.exception("config reload failed")
            self.reload_status.at = time.time()
            self.reload_status.failed([repr(exc)])
            return False
        finally:
            self.reload_status.counts = self.parse_cache.stats()
        # Recorded for a rejected config too: the watcher then waits for
        # the next edit instead of retrying the same broken files.
        self.config_signature = sig
        ok = await self.apply(loaded)
        self.reload_status.duration_ms = (time.perf_counter() - started) * 1000
        if ok:
            log.info("config reloaded (%s): version %d in %.1f ms", trigger, self.version,
                     self.reload_status.duration_ms)
        return ok

    # -- lifecycle ------------------------------------------------------------

    async def start(self) -> None:
        if self._observer_factory is not None:
            # Before the first build: the observer binds metric state to
            # every cluster as it is created (cluster_listeners).
            self.observer = self._observer_factory(self)
        with HEAP.paused():
            rl_errors = self.ratelimit_backend.load_initial() if self.ratelimit_backend is not None else []
            if rl_errors:
                raise ConfigError(rl_errors)
            sig, loaded = self._load_with_signature()
            self.reload_status.counts = self.parse_cache.stats()
            if not await self.apply(loaded):
                raise ConfigError(self.reload_status.errors)
        if self.ratelimit_backend is not None:
            self.tasks.extend(self.ratelimit_backend.start(self.rate_limit_runtime()))
        self.config_signature = sig
        # The initial load is not a reload (pyproxy_config_reloads_total).
        self.reload_status.successes = 0
        o = self.options
        reuse = o.workers > 1
        self.listeners = [
            Listener(self, "outbound", OUTBOUND, o.outbound.host, o.outbound.port),
            Listener(self, "inbound", INBOUND, o.inbound.host, o.inbound.port),
        ]
        for listener in self.listeners:
            await listener.start(reuse)
        self.tasks.append(self.loop.create_task(self._sweep_loop()))
        self.tasks.append(self.loop.create_task(self.resolver.run(lambda: self.snapshot.dns_names)))
        if self.certs is not None:
            # Files re-checked as often as the config (at least every 5 s:
            # the expiry warning rides on the same poll).
            interval = min(self.options.watch_interval or 5.0, 5.0)
            self.tasks.append(self.loop.create_task(self.certs.watch(interval)))
        if self.options.watch_interval > 0:
            from .config.watch import ConfigWatcher

            watcher = ConfigWatcher(o.config, lambda: self.config_signature, self.reload, self.loop,
                                    interval=self.options.watch_interval)
            self.tasks.append(self.loop.create_task(watcher.run()))
        self.ready = True

    def all_connections(self) -> list[DownstreamConnection | H2Downstream]:
        out: list[DownstreamConnection | H2Downstream] = []
        for listener in self.listeners:
            out.extend(listener.connections)
        return out

    async def _sweep_loop(self) -> None:
        """The worker's one housekeeping timer (once a second) for what has
        no timer of its own: see ``sweep``."""
        while True:
            await asyncio.sleep(1.0)
            try:
                self.sweep()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("sweep failed")

    def sweep(self) -> None:
        """One tick: each cluster closes pooled connections idle past its
        idleTimeout; each downstream connection runs its own idle rules
        (``on_tick``: header, idle and stream idle timeouts; it asks its
        exchange for the last). One coarse timer for all of it instead of a
        timer per request or connection."""
        now = self.loop.time()
        for c in self.snapshot.all_clusters():
            c.sweep(now)
        stream_idle = self.limits.stream_idle_timeout
        for conn in self.all_connections():
            conn.on_tick(now, stream_idle)

    async def drain(self, timeout: float, grace: float | None = None) -> None:
        """Graceful drain (SIGTERM, /quitquitquit, /drain_listeners): not
        ready at once; every connection's next response carries
        ``Connection: close``; listeners keep accepting for ``grace``
        seconds (``--drain-grace``: clients still resolving to this proxy
        are served), then stop and idle keep-alive connections close;
        in-flight requests have until ``timeout`` (from the start) to end."""
        if grace is None:
            grace = self.options.drain_grace
        self.draining = True
        self.ready = False
        start = self.loop.time()
        deadline = start + timeout
        for conn in self.all_connections():
            conn.start_drain(close_idle=False)
        grace_end = start + min(grace, timeout)
        while self.loop.time() < grace_end:
            await asyncio.sleep(min(0.05, max(0.0, grace_end - self.loop.time())))
        for listener in self.listeners:
            listener.stop_accepting()
        for conn in self.all_connections():
            conn.start_drain()
        while self.loop.time() < deadline and any(c.current is not None or c.pipeline
                                                  for c in self.all_connections()):
            await asyncio.sleep(0.05)
        busy = sum(1 for c in self.all_connections() if c.current is not None)
        if busy:
            log.warning("drain timeout (%.1fs): %d request(s) still in flight are cut", timeout, busy)

    async def stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        # The tasks' own CancelledError comes back as a result; stop() being
        # cancelled itself still propagates.
        tasks = list(self.tasks)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for t, res in zip(tasks, results, strict=True):
            if isinstance(res, Exception):
                log.warning("background task %s had failed: %r", t.get_name(), res)
        for listener in self.listeners:
            listener.stop_accepting()
        for conn in self.all_connections():
            if conn.transport is not None:
                conn.transport.abort()
        if self.snapshot is not None:
            for c in self.snapshot.all_clusters():
                c.drain()
        if self.observer is not None:
            try:
                self.observer.close()
            except Exception:
                log.exception("observer close failed")
        if self.ratelimit_backend is not None:
            await self.ratelimit_backend.close()
        if self.ratelimit is not None:
            self.ratelimit.close()
        self.stopped.set()


class ConfigError(Exception):
    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors
