"""Clusters (Envoy's word): one per (service, port, subset). A cluster owns its
endpoints, their connection pools, the circuit-breaker counters, the load
balancer and the outlier detector.

Clusters are built when config loads and reused across reloads when their
configuration did not change (same fingerprint), so pools, breaker counters
and ejection state survive a reload. A changed cluster is replaced; the old
one drains: its idle connections close, busy ones close when released.

Circuit breaking follows Envoy: limits are plain counters checked when a
request needs a connection. Nothing waits on a full breaker: overflow fails
the request at once (503 UO).
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..security.upstream import UpstreamTLS, tls_failed, tls_verified
from ..security.upstream import connect as tls_connect
from .connection import CLOSED_EVENTS, UpstreamConnection, UpstreamStream
from .dial import Dial, numeric_address
from .settings import ClusterSettings

if TYPE_CHECKING:
    from .lb import LoadBalancer
    from .outlier import OutlierDetector

log = logging.getLogger("pyproxy.upstream")

# Returned by ``ClusterEndpoint.acquire`` when a limit refuses the request.
OVERFLOW = object()


class ClusterStats:
    """Envoy-named cluster counters and gauges, plain ints on the request
    path; the metrics module reads them at scrape time.

    Names are Envoy's ``cluster.<name>.<stat>`` with ``.`` replaced by ``_``
    (so ``outlier_detection.ejections_active`` is
    ``outlier_detection_ejections_active``, as in Envoy's Prometheus output).
    Gauges: ``upstream_cx_active``, ``upstream_rq_active``,
    ``upstream_rq_pending_active``, ``outlier_detection_ejections_active``.
    ``upstream_rq_active``/``upstream_rq_total`` count requests assigned to a
    connection (Envoy counts them when the pool attaches the stream), so
    requests waiting in the pending queue are only in ``upstream_rq_pending_*``.
    """

    upstream_cx_total: int
    upstream_cx_http1_total: int
    upstream_cx_http2_total: int
    upstream_cx_active: int
    upstream_cx_connect_fail: int
    upstream_cx_connect_timeout: int
    upstream_cx_overflow: int
    upstream_cx_destroy: int
    upstream_cx_destroy_remote: int
    upstream_cx_max_requests: int
    upstream_cx_max_duration_reached: int
    upstream_cx_idle_timeout: int
    upstream_rq_total: int
    upstream_rq_active: int
    upstream_rq_pending_total: int
    upstream_rq_pending_active: int
    upstream_rq_pending_overflow: int
    upstream_rq_active_overflow: int
    upstream_rq_cancelled: int
    upstream_rq_retry: int
    upstream_rq_retry_success: int
    upstream_rq_retry_overflow: int
    upstream_rq_retry_limit_exceeded: int
    retry_or_shadow_abandoned: int
    upstream_rq_timeout: int
    upstream_rq_per_try_timeout: int
    upstream_rq_rx_reset: int
    upstream_rq_tx_reset: int
    upstream_rq_completed: int
    upstream_cx_protocol_error: int
    outlier_detection_ejections_active: int
    outlier_detection_ejections_total: int
    outlier_detection_ejections_overflow: int
    outlier_detection_ejections_enforced_total: int
    outlier_detection_ejections_enforced_consecutive_5xx: int
    outlier_detection_ejections_enforced_consecutive_gateway_failure: int
    outlier_detection_ejections_enforced_consecutive_local_origin_failure: int
    outlier_detection_ejections_detected_consecutive_5xx: int
    outlier_detection_ejections_detected_consecutive_gateway_failure: int
    outlier_detection_ejections_detected_consecutive_local_origin_failure: int

    __slots__ = tuple(__annotations__)

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


class ClusterEndpoint:
    """One endpoint of one cluster, with its HTTP/1.1 connection pool.

    ``active_requests`` feeds LEAST_REQUEST; the outlier fields are written
    on the request path (counters only) and read by the detector's timer.
    """

    __slots__ = (
        "cluster",
        "host",
        "port",
        "labels",
        "weight",
        "workload",
        "namespace",
        "idle",
        "pending",
        "connecting",
        "connections",
        "active_requests",
        # outlier detection state (see outlier.py)
        "consecutive_5xx",
        "consecutive_gateway",
        "consecutive_local",
        "ejected",
        "ejected_until",
        "ejection_count",
        "last_ejected",
        "healthy_since",
        "total_requests",
        "total_errors",
        "idle_timer",
        "label_dict",
        # security/upstream.py UpstreamTLS, or None: plaintext.
        "tls",
        # The server's verified URI SAN (ISTIO_MUTUAL), for telemetry.
        "tls_principal",
    )

    def __init__(
        self,
        cluster: Cluster,
        host: str,
        port: int,
        labels: tuple[tuple[str, str], ...] = (),
        weight: int = 1,
        workload: str = "unknown",
        namespace: str = "default",
        tls: UpstreamTLS | None = None,
    ) -> None:
        self.cluster = cluster
        self.tls = tls
        self.tls_principal = ""
        self.host = host
        self.port = port
        self.labels = labels
        self.label_dict = dict(labels)
        self.weight = weight
        self.workload = workload
        self.namespace = namespace
        self.idle: deque[UpstreamConnection] = deque()
        self.pending: deque[Any] = deque()
        self.connecting = 0
        self.connections = 0  # open or connecting, for this endpoint only
        self.active_requests = 0
        self.consecutive_5xx = 0
        self.consecutive_gateway = 0
        self.consecutive_local = 0
        self.ejected = False
        self.ejected_until = 0.0
        self.ejection_count = 0
        self.last_ejected = 0.0
        self.healthy_since = 0.0
        self.total_requests = 0
        self.total_errors = 0
        # Fires when the oldest idle connection reaches idleTimeout, so it
        # closes on time (the worker's 1 s sweep alone would be up to 1 s late).
        self.idle_timer: Any = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def __repr__(self) -> str:
        return f"<ClusterEndpoint {self.cluster.name} {self.address}>"

    # -- pool -------------------------------------------------------------

    def acquire(self, stream: Any) -> UpstreamConnection | object | None:
        """A ready connection now; or None when ``stream`` was queued (it will
        be called with ``on_upstream_connected`` or ``on_upstream_connect_failed``);
        or OVERFLOW when a circuit breaker refuses it."""
        cluster = self.cluster
        idle = self.idle
        if idle:
            now = cluster.loop.time()
            settings = cluster.settings
            while idle:
                conn = idle.pop()
                if conn.closed:
                    continue
                if now - conn.idle_since > settings.idle_timeout:
                    cluster.stats.upstream_cx_idle_timeout += 1
                    conn.close()
                    continue
                if settings.max_connection_duration and now - conn.created >= settings.max_connection_duration:
                    cluster.stats.upstream_cx_max_duration_reached += 1
                    conn.close()
                    continue
                # (stale() is the check; its poll(0) inlined: no call when idle was quiet)
                poller = conn.poller
                if poller is not None and poller.poll(0) and conn.stale():
                    continue
                return conn
        stats = cluster.stats
        # Envoy checks the pending limit only when no connection is ready;
        # over it the request fails at once (never waits for a slot).
        if stats.upstream_rq_pending_active >= cluster.settings.max_pending:
            stats.upstream_rq_pending_overflow += 1
            return OVERFLOW
        self.pending.append(stream)
        stats.upstream_rq_pending_active += 1
        stats.upstream_rq_pending_total += 1
        self._maybe_connect()
        return None

    def cancel_pending(self, stream: Any) -> None:
        """The stream gave up waiting (timeout, client gone, shutdown)."""
        try:
            self.pending.remove(stream)
        except ValueError:
            return
        stats = self.cluster.stats
        stats.upstream_rq_pending_active -= 1
        stats.upstream_rq_cancelled += 1

    def settle(self, conn: UpstreamConnection, tries: int = 0) -> None:
        """An idle TLS connection is readable but the loop has not read it
        (``UpstreamConnection.stale``): hold it, counted as a connect in
        progress so a queued request waits for it instead of paying a new
        handshake, until the loop has read those bytes (a loop pass or two).
        TLS records without application data (session tickets) leave it
        usable: it goes to the oldest queued request or back to the pool.
        Application bytes close it as on any idle connection
        (``data_received`` with no stream)."""
        self.connecting += 1
        self.cluster.loop.call_soon(self._settled, conn, tries)

    def _settled(self, conn: UpstreamConnection, tries: int) -> None:
        self.connecting -= 1
        if conn.closed:
            if self.pending:
                self._maybe_connect()
            return
        poller = conn.poller
        events = poller.poll(0) if poller is not None else None
        if events:
            if tries < 3 and not events[0][1] & CLOSED_EVENTS:
                self.settle(conn, tries + 1)
            else:
                conn.discard_stale(events[0][1])
            return
        if self.cluster.draining and not self.pending:
            conn.close()
            return
        self.hand_over(conn)

    def _maybe_connect(self) -> None:
        if len(self.pending) <= self.connecting:
            return
        cluster = self.cluster
        stats = cluster.stats
        if stats.upstream_cx_active >= cluster.settings.max_connections:
            stats.upstream_cx_overflow += 1
            # Envoy still opens one connection when this endpoint has none at
            # all, so queued requests can never be stranded here.
            if self.connections > 0:
                return
        self.connecting += 1
        self.connections += 1
        stats.upstream_cx_active += 1
        stats.upstream_cx_total += 1
        stats.upstream_cx_http1_total += 1
        loop = cluster.loop
        if self.tls is None and isinstance(loop, asyncio.AbstractEventLoop):
            # A plaintext connect to an IP address starts now, in this call,
            # as in Envoy (see dial.py: the circuit-breaking task's 503s).
            try:
                address = numeric_address(cluster.resolve(self.host), self.port)
            except OSError:
                address = None  # (_connect reports it)
            if address is not None:
                conn = UpstreamConnection(self)
                conn.created = loop.time()
                conn.on_made = self._connect_done
                Dial(loop, conn, lambda reason: self._dial_failed(conn, reason)).start(
                    address[0], address[1], cluster.settings.connect_timeout)
                return
        loop.create_task(self._connect())

    def _dial_failed(self, conn: UpstreamConnection, reason: str) -> None:
        if conn.transport is not None:
            return  # connection_made ran: already handed over, its stream owns it
        conn.on_made = None
        if reason == "connection timeout":
            self.cluster.stats.upstream_cx_connect_timeout += 1
        if log.isEnabledFor(logging.DEBUG):
            log.debug("connect to %s for %s failed: %s", self.address, self.cluster.name, reason)
        self._connect_done(None, reason)

    async def _connect(self) -> None:
        cluster = self.cluster
        conn = UpstreamConnection(self)
        conn.created = cluster.loop.time()
        reason = "connection failure"
        if self.tls is None:
            # Plaintext: connection_made hands the connection over at once
            # (a TLS connection is handed over once verified, below).
            conn.on_made = self._connect_done
        try:
            host = cluster.resolve(self.host)
            if host.startswith("unix://"):
                coro = cluster.loop.create_unix_connection(lambda: conn, host[len("unix://"):])
            elif self.tls is not None:
                coro = tls_connect(cluster.loop, lambda: conn, host, self.port, self.tls, cluster.certs,
                                   cluster.settings.connect_timeout)
            else:
                coro = cluster.loop.create_connection(lambda: conn, host, self.port)
            # (asyncio.timeout, not wait_for: wait_for runs the connect in a
            # task of its own, a loop iteration or two more before the
            # queued request is written; see load-tests/circuit_breaking.py)
            async with asyncio.timeout(cluster.settings.connect_timeout):
                await coro
        except asyncio.CancelledError:
            if self.tls is None and conn.on_made is None:
                raise  # already handed over by connection_made: its stream owns it now
            conn.on_made = None
            conn.abort()
            self._connect_done(None if conn.transport is None else conn)
            raise
        except TimeoutError:
            if self.tls is None and conn.on_made is None:
                return  # connected just as the timeout fired: already handed over
            conn.on_made = None
            cluster.stats.upstream_cx_connect_timeout += 1
            reason = "connection timeout"
            conn.abort()
            self._connect_done(None if conn.transport is None else conn, reason)
            return
        except (OSError, socket.gaierror, ValueError) as exc:
            conn.on_made = None
            if self.tls is not None:
                tls_failed(exc)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("connect to %s for %s failed: %s", self.address, cluster.name, exc)
            self._connect_done(None if conn.transport is None else conn, reason)
            return
        if self.tls is not None and not tls_verified(conn.transport, self, cluster.name):
            conn.abort()
            self._connect_done(conn, reason)
            return
        if self.tls is not None:
            self._connect_done(conn)

    def _connect_done(self, conn: UpstreamConnection | None, reason: str = "connection failure") -> None:
        self.connecting -= 1
        cluster = self.cluster
        if conn is None or conn.closed:
            if conn is None:
                # Never connected, so on_connection_closed never ran for it.
                self.connections -= 1
                cluster.stats.upstream_cx_active -= 1
            cluster.stats.upstream_cx_connect_fail += 1
            # Like Envoy, a connect failure fails every request queued on this
            # endpoint, so each can be retried elsewhere instead of waiting
            # for more connects to a host that refuses them.
            self._fail_all_pending(reason)
            return
        if cluster.draining and not self.pending:
            conn.close()
            return
        # A cluster replaced by a reload still serves the requests already
        # queued on it (they pinned the old snapshot): failing them would
        # turn a reload into 503s. release() closes the connection after.
        self.hand_over(conn)

    def _fail_all_pending(self, reason: str) -> None:
        # Detach the queue first: a stream retrying inside its callback may
        # queue itself on this endpoint again and must not be failed here.
        streams = list(self.pending)
        self.pending.clear()
        self.cluster.stats.upstream_rq_pending_active -= len(streams)
        for stream in streams:
            stream.on_upstream_connect_failed(self, reason)

    def hand_over(self, conn: UpstreamConnection) -> None:
        """A connection became free (new or released): serve the oldest
        queued request, or park it as idle."""
        if self.pending:
            stream = self.pending.popleft()
            self.cluster.stats.upstream_rq_pending_active -= 1
            stream.on_upstream_connected(conn)
        else:
            conn.idle_since = self.cluster.loop.time()
            self.idle.append(conn)
            if self.idle_timer is None:
                self._arm_idle_timer()

    def release(self, conn: UpstreamConnection, reusable: bool) -> None:
        """The stream is done with ``conn``. Reuse it only when the exchange
        completed cleanly on both sides."""
        conn.stream = None
        cluster = self.cluster
        if not reusable or not conn.reusable or conn.closed or (cluster.draining and not self.pending):
            conn.close()  # on_connection_closed opens a replacement if requests wait
            return
        settings = cluster.settings
        limit = settings.max_requests_per_connection
        if limit and conn.requests >= limit:
            cluster.stats.upstream_cx_max_requests += 1
            conn.close()
            return
        duration = settings.max_connection_duration
        if duration and cluster.loop.time() - conn.created >= duration:
            cluster.stats.upstream_cx_max_duration_reached += 1
            conn.close()
            return
        if conn.read_paused:
            # Its response ended while the client was slow (paused for it).
            conn.resume_reading()
        if self.pending:
            self.hand_over(conn)
        else:  # hand_over's idle branch, inlined: the common case
            conn.idle_since = cluster.loop.time()
            self.idle.append(conn)
            if self.idle_timer is None:
                self._arm_idle_timer()

    def on_connection_closed(self, conn: UpstreamConnection) -> None:
        if conn.counted:
            conn.counted = False
            self.connections -= 1
            self.cluster.stats.upstream_cx_active -= 1
            self.cluster.stats.upstream_cx_destroy += 1
            try:
                self.idle.remove(conn)
            except ValueError:
                pass
            if self.pending:  # queued requests are served even while draining
                self._maybe_connect()

    def _arm_idle_timer(self) -> None:
        """Envoy's idle timeout per connection, with one timer per endpoint:
        it fires when the oldest idle connection (``idle[0]``: connections are
        reused newest first) expires, closes what expired, and re-arms."""
        idle = self.idle
        if not idle:
            return
        cluster = self.cluster
        loop = cluster.loop
        delay = idle[0].idle_since + cluster.settings.idle_timeout - loop.time()
        self.idle_timer = loop.call_later(max(delay, 0.0), self._on_idle_timer)

    def _on_idle_timer(self) -> None:
        self.idle_timer = None
        # (a timer fires within the loop's clock resolution of its deadline)
        self.close_idle(self.cluster.settings.idle_timeout - 0.002)
        self._arm_idle_timer()

    def close_idle(self, older_than: float | None = None) -> None:
        now = self.cluster.loop.time()
        for conn in list(self.idle):
            if older_than is None:
                conn.close()
            elif now - conn.idle_since > older_than:
                self.cluster.stats.upstream_cx_idle_timeout += 1
                conn.close()


class Cluster:
    """A set of endpoints with shared limits, balancing and health."""

    __slots__ = (
        "name",
        "kind",
        "service",
        "service_port",
        "subset",
        "settings",
        "fingerprint",
        "endpoints",
        "healthy",
        "lb",
        "outlier",
        "stats",
        "loop",
        "rng",
        "resolver",
        "draining",
        "metric_labels",
        "metric_cache",
        "dest_info",
        "retries_active",
        "certs",
        "__weakref__",
    )

    def __init__(
        self,
        name: str,
        settings: ClusterSettings,
        fingerprint: Any,
        loop: asyncio.AbstractEventLoop,
        rng: random.Random,
        resolver: Callable[[str], str] | None = None,
        kind: str = "outbound",
        service: Any = None,
        service_port: int = 0,
        subset: str = "",
    ) -> None:
        self.name = name
        self.kind = kind
        self.service = service
        self.service_port = service_port
        self.subset = subset
        self.settings = settings
        self.fingerprint = fingerprint
        self.loop = loop
        self.rng = rng
        self.resolver = resolver
        self.endpoints: list[ClusterEndpoint] = []
        self.healthy: list[ClusterEndpoint] = []
        self.stats = ClusterStats()
        self.draining = False
        self.lb: LoadBalancer = None  # type: ignore[assignment]  # set by build()
        self.outlier: OutlierDetector = None  # type: ignore[assignment]
        # Filled by the metrics module: label values and bound children.
        self.metric_labels: Any = None
        self.metric_cache: dict[Any, Any] = {}
        self.dest_info: Any = None
        # Retries in progress (scheduled or running), bounded by maxRetries.
        self.retries_active = 0
        # The worker's CertStore (ISTIO_MUTUAL endpoints read its current credentials).
        self.certs: Any = None

    def __repr__(self) -> str:
        return f"<Cluster {self.name} endpoints={len(self.endpoints)}>"

    def resolve(self, host: str) -> str:
        if self.resolver is None:
            return host
        return self.resolver(host)

    def set_endpoints(self, endpoints: list[ClusterEndpoint]) -> None:
        self.endpoints = endpoints
        self.refresh_healthy()

    def refresh_healthy(self) -> None:
        """Recompute the set the load balancer picks from (background only)."""
        self.healthy = [ep for ep in self.endpoints if not ep.ejected]
        if self.lb is not None:
            self.lb.on_hosts_changed(self.healthy)

    def drain(self) -> None:
        """This cluster was replaced by a reload: stop reusing connections."""
        self.draining = True
        for ep in self.endpoints:
            ep.close_idle()
        if self.outlier is not None:
            self.outlier.stop()

    def sweep(self, now: float) -> None:
        """Periodic housekeeping: close connections idle past idleTimeout."""
        idle_timeout = self.settings.idle_timeout
        for ep in self.endpoints:
            if ep.idle:
                ep.close_idle(idle_timeout)


class PassthroughCluster(Cluster):
    """Envoy's PassthroughCluster: the destination is the request's original
    address (SO_ORIGINAL_DST or the authority). Endpoints are created on
    demand and kept while they have connections."""

    __slots__ = ("by_address", "endpoint_class")

    MAX_ENDPOINTS = 4096

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.by_address: dict[tuple[str, int], ClusterEndpoint] = {}
        # upstream/h2pool.py's H2Endpoint when HTTP/2 may be spoken (set by the snapshot builder).
        self.endpoint_class: type[ClusterEndpoint] = ClusterEndpoint

    def endpoint_for(self, host: str, port: int) -> ClusterEndpoint:
        key = (host, port)
        ep = self.by_address.get(key)
        if ep is None:
            if len(self.by_address) >= self.MAX_ENDPOINTS:
                self._forget_unused()
            ep = self.endpoint_class(self, host, port)
            self.by_address[key] = ep
        return ep

    def _forget_unused(self) -> None:
        for key, ep in list(self.by_address.items()):
            if ep.connections == 0 and not ep.pending:
                del self.by_address[key]

    def sweep(self, now: float) -> None:
        idle_timeout = self.settings.idle_timeout
        for ep in self.by_address.values():
            if ep.idle:
                ep.close_idle(idle_timeout)

    def drain(self) -> None:
        self.draining = True
        for ep in self.by_address.values():
            ep.close_idle()


__all__ = ["OVERFLOW", "Cluster", "ClusterEndpoint", "ClusterStats", "PassthroughCluster", "UpstreamStream"]
