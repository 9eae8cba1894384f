"""Traffic mirroring (VirtualService ``mirror`` / ``mirrors[]``): Envoy's
request_mirror_policies as Istio programs them.

Each mirror policy of the matched route is drawn independently per request
with its ``mirrorPercentage`` (absent: 100%; Istio drops a 0% policy at load)
from the worker's injectable RNG. A drawn mirror sends a copy of the request
as it goes upstream (after rewrites and header operations), with the
authority's host suffixed ``-shadow`` (``reviews:9080`` becomes
``reviews-shadow:9080``), to the mirror destination's cluster. Its response
is read and discarded.

A shadow request must never delay, fail or change the main request:

- it is its own upstream stream (``ShadowRequest``, the same callbacks as an
  ``Exchange``) on its own pooled connection, never the main attempt's;
- request body chunks are copied to it as they stream; it never pauses the
  client. Chunks it cannot write yet (connecting, or its upstream is slow)
  wait in a bounded buffer; past the bound the shadow is abandoned;
- at most ``max_in_flight`` shadows per worker; more are dropped at once;
- circuit breaker limits of the mirror cluster apply and never wait: an
  overflow drops the shadow;
- it ends at the route timeout, or ``DEFAULT_TIMEOUT`` when the route has
  none (Envoy would wait forever; a bounded slot pool cannot);
- every error stays inside this module.

Counters (plain ints on ``Mirror.stats``, read by the metrics module):
``mirror_rq_sent`` (written to an upstream connection),
``mirror_rq_completed`` (a full response was read), ``mirror_rq_failed`` (no
cluster/endpoint, connect failure, reset, invalid response, timeout) and
``mirror_rq_dropped`` (abandoned by pyproxy's own bounds: in-flight limit,
body buffer, circuit breaker, client gone before the body was complete).
Every drawn shadow ends in exactly one of completed, failed or dropped.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import TYPE_CHECKING, Protocol

from ..http.headers import LAST_CHUNK, chunk
from ..http.request import split_authority
from ..upstream.cluster import OVERFLOW

if TYPE_CHECKING:
    from ..routing.table import CompiledRoute, RouteTarget
    from ..upstream.cluster import Cluster, ClusterEndpoint
    from ..upstream.connection import UpstreamConnection

log = logging.getLogger("pyproxy.mirror")

MAX_IN_FLIGHT = 64
BODY_BUFFER = 1024 * 1024
DEFAULT_TIMEOUT = 30.0


class MirrorPolicy:
    """One compiled mirror policy of a route."""

    __slots__ = ("fraction", "target")

    def __init__(self, target: RouteTarget, fraction: float) -> None:
        self.target = target
        self.fraction = fraction  # (0, 1]


class MirrorStats:
    __slots__ = ("mirror_rq_completed", "mirror_rq_dropped", "mirror_rq_failed", "mirror_rq_sent")

    def __init__(self) -> None:
        self.mirror_rq_sent = 0
        self.mirror_rq_completed = 0
        self.mirror_rq_failed = 0
        self.mirror_rq_dropped = 0

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


def shadow_head(head: bytes) -> bytes:
    """The upstream request head with ``-shadow`` appended to the host part
    of the authority (Envoy's shadowAppendedHost), terminated. Like
    Envoy's shadow (checked against Envoy 1.40), it is marked internal and
    carries its (only) attempt's count."""
    before, sep, rest = head.partition(b"\r\nhost: ")
    authority, crlf, after = rest.partition(b"\r\n")
    host, port = split_authority(authority)
    if not port:
        # No port, an empty one ("host:") or a malformed one (a
        # rewrite.authority can say anything): the whole authority is the
        # host, as Envoy's parseAuthority falls back.
        host, port = authority, b""
    return (before + sep + host + b"-shadow" + (b":" + port if port else b"") + crlf
            + b"x-envoy-attempt-count: 1\r\nx-envoy-internal: true\r\n" + after + b"\r\n")


class MirroredRequest(Protocol):
    """What the mirror reads of the request it copies (the Exchange, once
    its upstream head is built)."""

    @property
    def port(self) -> int: ...  # the service port (selects the mirror's cluster)
    @property
    def method(self) -> bytes: ...
    @property
    def upstream_head(self) -> bytes: ...  # the head sent upstream (shadowed: host-shadow)
    @property
    def chunked_in(self) -> bool: ...
    @property
    def request_complete(self) -> bool: ...
    @property
    def replay(self) -> list[bytes] | None: ...  # the body so far, kept for retries
    @property
    def unsent(self) -> list[bytes]: ...  # the body not yet written upstream


class Mirror:
    """Per-worker mirroring state: the in-flight bound and the counters."""

    __slots__ = ("buffer_limit", "default_timeout", "in_flight", "loop", "max_in_flight", "rng", "stats")

    def __init__(self, loop: asyncio.AbstractEventLoop, rng: random.Random, max_in_flight: int = MAX_IN_FLIGHT,
                 buffer_limit: int = BODY_BUFFER, default_timeout: float = DEFAULT_TIMEOUT) -> None:
        self.loop = loop
        self.rng = rng
        self.max_in_flight = max_in_flight
        self.buffer_limit = buffer_limit
        self.default_timeout = default_timeout
        self.in_flight = 0
        self.stats = MirrorStats()

    def start(self, ex: MirroredRequest, route: CompiledRoute) -> tuple[ShadowRequest, ...] | None:
        """Draw and start the route's mirrors for exchange ``ex``, whose
        upstream head is built. Returns the live shadows (to receive body
        chunks) or None. Never raises."""
        try:
            return self._start(ex, route)
        except Exception:  # a mirror must never break the main request
            log.exception("mirror start failed")
            return None

    def _start(self, ex: MirroredRequest, route: CompiledRoute) -> tuple[ShadowRequest, ...] | None:
        live: list[ShadowRequest] = []
        head = b""
        stats = self.stats
        for policy in route.mirrors:
            if policy.fraction < 1.0 and self.rng.random() >= policy.fraction:
                continue
            cluster = policy.target.cluster_for(ex.port)
            if cluster is None:
                stats.mirror_rq_failed += 1  # unknown host/subset: Envoy's 503 NC
                continue
            if self.in_flight >= self.max_in_flight:
                stats.mirror_rq_dropped += 1
                continue
            if not head:
                head = shadow_head(ex.upstream_head)
            body = ex.replay if ex.replay is not None else ex.unsent
            shadow = ShadowRequest(self, cluster, ex.chunked_in, ex.method == b"HEAD")
            if shadow.begin(head, body, ex.request_complete, route.timeout or self.default_timeout):
                live.append(shadow)
        return tuple(live) if live else None


class ShadowRequest:
    """One mirrored request: an upstream stream of its own (the callbacks a
    pooled ``UpstreamConnection`` and ``ClusterEndpoint`` call)."""

    __slots__ = (
        "buffered",
        "chunked",
        "cluster",
        "complete",
        "endpoint",
        "finished",
        "head_request",
        "mirror",
        "paused",
        "pending",
        "timer",
        "upconn",
        "waiting",
    )

    def __init__(self, mirror: Mirror, cluster: Cluster, chunked: bool, head_request: bool) -> None:
        self.mirror = mirror
        self.cluster = cluster
        self.chunked = chunked
        self.head_request = head_request
        self.endpoint: ClusterEndpoint | None = None
        self.upconn: UpstreamConnection | None = None
        self.pending: list[bytes] = []  # bytes not yet written to the connection
        self.buffered = 0  # body bytes in ``pending``
        self.complete = False  # the whole request is in ``pending`` or written
        self.timer: asyncio.TimerHandle | None = None
        self.finished = False
        self.paused = False
        self.waiting = False

    # -- from Mirror / the exchange ---------------------------------------

    def begin(self, head: bytes, body: list[bytes], complete: bool, timeout: float) -> bool:
        mirror = self.mirror
        mstats = mirror.stats
        cluster = self.cluster
        stats = cluster.stats
        if stats.upstream_rq_active >= cluster.settings.max_requests:
            stats.upstream_rq_active_overflow += 1
            mstats.mirror_rq_dropped += 1
            return False
        size = sum(len(c) for c in body)
        if size > mirror.buffer_limit:
            mstats.mirror_rq_dropped += 1
            return False
        ep = cluster.lb.pick(None)  # no hash key: a shadow is not sticky (Envoy's shadow route has none)
        if ep is None:
            mstats.mirror_rq_failed += 1  # 503 UH
            return False
        pending = [head]
        if self.chunked:
            pending.extend(chunk(c) for c in body)
        else:
            pending.extend(body)
        if complete and self.chunked:
            pending.append(LAST_CHUNK)
        self.pending = pending
        self.buffered = size
        self.complete = complete
        self.endpoint = ep
        ep.active_requests += 1
        stats.upstream_rq_active += 1
        stats.upstream_rq_total += 1
        mirror.in_flight += 1
        self.timer = mirror.loop.call_later(timeout, self._on_timeout)
        result = ep.acquire(self)
        if result is None:
            self.waiting = True
        elif result is OVERFLOW:
            self._end("mirror_rq_dropped")
        else:
            self.on_upstream_connected(result)  # type: ignore[arg-type]
        return not self.finished

    def on_body(self, data: bytes) -> None:
        if self.finished:
            return
        self._send(chunk(data) if self.chunked else data, len(data))

    def on_request_complete(self) -> None:
        if self.finished:
            return
        self.complete = True
        if self.chunked:
            self._send(LAST_CHUNK, 0)

    def abandon(self) -> None:
        """The client went away before the request body was complete."""
        if not self.finished:
            self._abort("mirror_rq_dropped")

    def _send(self, piece: bytes, size: int) -> None:
        conn = self.upconn
        if conn is not None and not self.paused:
            conn.write(piece)
            return
        self.pending.append(piece)
        self.buffered += size
        if self.buffered > self.mirror.buffer_limit:
            # Falling behind the client: give up rather than hold the body.
            self._abort("mirror_rq_dropped")

    # -- upstream callbacks ---------------------------------------------------

    def on_upstream_connected(self, conn: UpstreamConnection) -> None:
        self.waiting = False
        if self.finished:
            conn.endpoint.release(conn, True)
            return
        self.upconn = conn
        conn.attach(self, head_request=self.head_request)
        data = b"".join(self.pending)
        self.pending = []
        self.buffered = 0
        self.mirror.stats.mirror_rq_sent += 1
        conn.write(data)

    def on_upstream_connect_failed(self, ep: ClusterEndpoint, reason: str) -> None:
        self.waiting = False
        if self.finished:
            return
        ep.cluster.outlier.on_local_failure(ep)
        self._end("mirror_rq_failed")

    def on_upstream_headers(self, conn: UpstreamConnection, status: int, headers: list[tuple[bytes, bytes]], keep_alive: bool) -> None:
        ep = self.endpoint
        if ep is not None:
            self.cluster.outlier.on_response(ep, status)

    def on_upstream_body(self, data: bytes) -> None:
        pass  # discarded

    def on_upstream_complete(self, conn: UpstreamConnection) -> None:
        if self.upconn is not conn:
            return
        self.upconn = None
        # Reusable only if every request byte went out before the response ended.
        conn.endpoint.release(conn, self.complete and not self.pending)
        stats = self.cluster.stats
        stats.upstream_rq_completed += 1
        self.cluster.outlier.on_local_success(conn.endpoint)
        self._end("mirror_rq_completed")

    def on_upstream_reset(self, conn: UpstreamConnection, reason: str) -> None:
        if self.upconn is not conn:
            return
        self.upconn = None
        conn.endpoint.release(conn, False)
        self.cluster.stats.upstream_rq_rx_reset += 1
        if reason != "protocol_error":
            self.cluster.outlier.on_local_failure(conn.endpoint)
        self._end("mirror_rq_failed")

    def on_upstream_upgrade(self, conn: UpstreamConnection, rest: bytes) -> None:
        self._abort("mirror_rq_failed")

    def on_upstream_write_paused(self) -> None:
        self.paused = True

    def on_upstream_write_resumed(self) -> None:
        self.paused = False
        conn = self.upconn
        if self.pending and conn is not None and not self.finished:
            data = b"".join(self.pending)
            self.pending = []
            self.buffered = 0
            conn.write(data)

    # -- the end --------------------------------------------------------------

    def _on_timeout(self) -> None:
        self.timer = None
        if not self.finished:
            self.cluster.stats.upstream_rq_timeout += 1
            self._abort("mirror_rq_failed")

    def _abort(self, outcome: str) -> None:
        conn = self.upconn
        if conn is not None:
            self.upconn = None
            conn.detach()
            conn.endpoint.release(conn, False)
        elif self.waiting and self.endpoint is not None:
            self.endpoint.cancel_pending(self)
            self.waiting = False
        self._end(outcome)

    def _end(self, outcome: str) -> None:
        if self.finished:
            return
        self.finished = True
        stats = self.mirror.stats
        setattr(stats, outcome, getattr(stats, outcome) + 1)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        ep = self.endpoint
        if ep is not None:
            self.endpoint = None
            ep.active_requests -= 1
            self.cluster.stats.upstream_rq_active -= 1
        self.pending = []
        self.mirror.in_flight -= 1
