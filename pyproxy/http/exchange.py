"""One request/response exchange through the proxy: Envoy's router filter
as a callback-driven state machine (no task per request).

Lifecycle (see the README diagram):

    headers parsed ─► start(): route lookup ─► local reply?  (NR)
                          │
                          ▼
                     the route's filter chain (filters/chain.py: fault, CORS, ...):
                     continue, answer locally, or pause and resume_chain()
                          │
                          ▼
                     _route_action(): redirect / direct response, or
                     _forward(): pick destination, mutate headers, mirrors (NC)
                          │
                          ▼
                     _attempt(): LB pick ─► pool acquire ─┬─ idle connection: send now
                          ▲                               ├─ queued/connecting: wait (pending)
                          │                               └─ overflow: 503 UO
                     retry (backoff) ◄── connect failure / reset / per-try timeout / retriable status
                          │
                          ▼
                     response headers ─► commit ─► body streamed ─► complete ─► _finish()

The exchange pins the snapshot it started with, so a reload never changes a
request half way. Everything on this path reads compiled objects only.
"""

from __future__ import annotations

import hashlib
import logging
from time import monotonic
from typing import TYPE_CHECKING, Any

from .. import errors
from ..errors import STATUS_LINES, LocalReply
from ..observability.peer import PEER_METADATA, UNKNOWN_PEER, decode_peer
from ..routing.matchers import parse_query
from ..routing.table import DIRECT_RESPONSE, REDIRECT, ROUTE
from ..upstream.cluster import OVERFLOW, PassthroughCluster
from ..upstream.retry import CONNECT_FAILURE, PER_TRY_TIMEOUT, REFUSED_STREAM, RESET
from .grpc import call_for, is_grpc
from .headers import (
    HTTP_DATE,
    INBOUND_EXTERNAL_DROP,
    LAST_CHUNK,
    REQUEST_DROP,
    RESPONSE_DROP,
    XFCC,
    chunk,
    connection_tokens,
    new_request_id,
)
from .request import (
    HOST_PORTS,
    PLAIN_PATHS,
    host_and_port,
    index_headers,
    normalize_request_path,
    refusal_flag,
    split_absolute_target,
    validate,
)
from .response import local_reply

if TYPE_CHECKING:
    from collections.abc import Callable

    from ..filters.chain import HttpFilter, ResponseFilter
    from ..routing.table import CompiledRoute, HeaderOps, RouteTarget, VirtualHost
    from ..upstream.cluster import Cluster, ClusterEndpoint
    from ..upstream.connection import UpstreamConnection
    from .downstream import DownstreamConnection

log = logging.getLogger("pyproxy.exchange")

OUTBOUND = 0
INBOUND = 1

CONTINUE_100 = b"HTTP/1.1 100 Continue\r\n\r\n"
_TEXT_PLAIN = b"text/plain"
_SERVER_ENVOY = b"server: envoy\r\n"
_SERVER_ISTIO_ENVOY = b"server: istio-envoy\r\n"

# A response to an upgrade (101) keeps its Upgrade and Connection fields.
_UPGRADE_FIELDS = frozenset({b"upgrade", b"connection"})
# Connection tokens that do not remove a field: Upgrade and Connection are
# handled with the upgrade; x-request-id is the proxy's (generated when the
# client sent none).
_NOT_NOMINATABLE = frozenset({b"upgrade", b"connection", b"x-request-id"})
# Connection values that name no field beyond the hop-by-hop ones (the common case).
_PLAIN_CONNECTION = frozenset({b"keep-alive", b"close"})

# Reset reasons of an HTTP/2 upstream stream (upstream/h2pool.py).
_STREAM_RESETS = frozenset({"remote_reset", "refused_stream"})

# Envoy's Grpc::Utility::httpToGrpcStatus (source/common/grpc/status.cc), from
# the gRPC spec's HTTP-to-gRPC table; anything else is 2 (UNKNOWN).
_HTTP_TO_GRPC = {400: b"13", 401: b"16", 403: b"7", 404: b"12", 429: b"14", 502: b"14", 503: b"14",
                 504: b"14"}
# Envoy's Grpc::Utility::grpcToHttpStatus; any other code is 500.
_GRPC_TO_HTTP = {b"0": 200, b"1": 499, b"2": 500, b"3": 400, b"4": 504, b"5": 404, b"6": 409, b"7": 403,
                 b"8": 429, b"9": 400, b"10": 409, b"11": 400, b"12": 501, b"13": 500, b"14": 503, b"15": 500,
                 b"16": 401}


def _grpc_outlier_status(status: int, headers: list[tuple[bytes, bytes]]) -> int:
    """What Envoy's router reports to outlier detection for a gRPC
    request's response: a ``grpc-status`` in the response headers (a
    trailers-only response) mapped to HTTP, else the HTTP status; a status
    in trailers after a body never counts (spec §2.6, router.cc)."""
    for name, value in headers:
        if name == b"grpc-status":
            return _GRPC_TO_HTTP.get(value.strip(), 500)
    return status


_GRPC_CONTENT_TYPE = b"application/grpc"
# grpc-message is percent-encoded: bytes outside printable ASCII, and "%".
_GRPC_MESSAGE_SAFE = frozenset(range(0x20, 0x7F)) - {0x25}


# grpc-timeout units (the gRPC HTTP/2 protocol spec): hours ... nanoseconds.
_GRPC_TIMEOUT_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}


def parse_grpc_timeout(value: bytes) -> float | None:
    """``grpc-timeout``: 1 to 8 ASCII digits and a unit; None if malformed
    (Envoy then ignores it)."""
    digits, unit = value[:-1], value[-1:]
    if not (1 <= len(digits) <= 8 and digits.isdigit()) or unit not in _GRPC_TIMEOUT_UNITS:
        return None
    return int(digits) * _GRPC_TIMEOUT_UNITS[unit]


def grpc_local_reply(status: int, body: bytes, extra: tuple[tuple[bytes, bytes], ...]
                     ) -> tuple[int, bytes, tuple[tuple[bytes, bytes], ...], bytes]:
    """A local reply to a gRPC request, as Envoy's sendLocalReply makes it
    (verified on Envoy 1.40, spec §2.3): trailers-only, HTTP 200,
    ``grpc-status`` mapped from the HTTP status, ``grpc-message`` the body
    text, no body. (status, body, extra fields, content type)."""
    fields = [(b"grpc-status", _HTTP_TO_GRPC.get(status, b"2"))]
    if body:
        msg = body if all(b in _GRPC_MESSAGE_SAFE for b in body) else b"".join(
            bytes((b,)) if b in _GRPC_MESSAGE_SAFE else b"%%%02X" % b for b in body)
        fields.append((b"grpc-message", msg))
    return 200, b"", (*extra, *fields), _GRPC_CONTENT_TYPE


class Exchange:
    __slots__ = (
        "conn", "worker", "snapshot", "loop", "direction",
        # request
        "method", "target", "path", "query", "scheme", "authority", "host", "port",
        "version", "keep_alive", "headers", "hdict", "repeated", "request_id", "_query_params",
        "has_body", "chunked_in", "content_length", "expect_continue", "upgrade",
        "request_complete", "request_bytes", "replay", "unsent", "unsent_bytes", "started",
        # routing
        "route", "match_index", "target_choice", "cluster", "upstream_head", "upstream_path",
        "response_ops",
        # attempts
        "attempt", "endpoint", "upconn", "tried", "retries_done", "retry_active", "retry_timer",
        "per_try_timer", "global_timer", "waiting_pending", "attempt_started", "head_sent",
        "last_failure", "last_local_reply",
        # response
        "status", "response_started", "response_chunked", "response_close_delimited",
        "response_bytes", "response_complete", "close_after", "upstream_latency",
        # bookkeeping
        "start_time", "end_time", "flags", "finished", "downstream_paused_by_us",
        "obs", "hash_cookie",
        # filter chain: the filter that stopped it last, filters that see the
        # response, the allowed CORS origin to echo; live mirror streams
        "filter_pos", "encoders", "cors_origin", "shadows",
        # the rate-limit filter's x-ratelimit-* response headers (set only by it)
        "rl_headers",
        # the matched virtual host (None inbound): set only when the route
        # has filters, before they run (the rate-limit filter reads it)
        "vhost",
        # telemetry: the endpoint of the last attempt, the peer's identity
        # (metadata exchange), the current attempt's response status
        "upstream_host", "peer", "attempt_status",
        # stream idle timeout (on_tick): progress seen last, and since when
        "idle_mark", "idle_since",
        # a defect found while indexing the headers (refused by request.validate)
        "malformed",
        # security filters (authz/guard.py): the verified JWT identity, the deciding policy
        "auth", "authz_policy",
        # a gRPC call's telemetry (http/grpc.py); None for any other request
        "grpc",
    )

    def __init__(self, conn: DownstreamConnection, method: bytes, target: bytes,
                 headers: list[tuple[bytes, bytes]], version: str, keep_alive: bool,
                 upgrade: bool) -> None:
        self.conn = conn
        worker = conn.worker
        self.worker = worker
        self.snapshot = worker.snapshot  # pinned for the whole exchange
        self.loop = worker.loop
        self.direction = conn.direction
        self.method = method
        self.target = target
        self.version = version
        self.keep_alive = keep_alive
        self.upgrade = upgrade
        self.headers = headers
        # Measurement times use time.monotonic(): uvloop's loop.time() has
        # 1 ms granularity and is cached per loop iteration, fine for timers
        # but not for durations, upstream service time or span timestamps.
        self.start_time = monotonic()
        self.end_time = 0.0
        self.flags: list[str] = []
        self.finished = False
        self.started = False
        self.request_complete = False
        self.request_bytes = 0
        self.replay: list[bytes] | None = []
        self.unsent: list[bytes] = []
        self.unsent_bytes = 0
        self.route: CompiledRoute | None = None
        self.match_index = 0
        self.target_choice: RouteTarget | None = None
        self.cluster: Cluster | None = None
        self.upstream_head = b""
        self.upstream_path = b""
        self.response_ops: HeaderOps | None = None
        self.attempt = 0
        self.endpoint: ClusterEndpoint | None = None
        self.upconn: UpstreamConnection | None = None
        self.tried: list[ClusterEndpoint] = []
        self.retries_done = 0
        self.retry_active = False
        self.retry_timer = None
        self.per_try_timer = None
        self.global_timer = None
        self.waiting_pending = False
        self.attempt_started = 0.0
        self.head_sent = False
        self.last_failure: LocalReply | None = None
        self.last_local_reply: LocalReply | None = None
        self.status = 0
        self.response_started = False
        self.response_chunked = False
        self.response_close_delimited = False
        self.response_bytes = 0
        self.response_complete = False
        self.close_after = False
        self.upstream_latency = -1.0
        self.downstream_paused_by_us = False
        self.obs: Any = None
        self.hash_cookie: tuple[str, str] | None = None
        self.filter_pos = 0
        self.encoders: tuple[ResponseFilter, ...] = ()
        self.cors_origin: bytes | None = None
        self.shadows: Any = None
        self.upstream_host: ClusterEndpoint | None = None
        self.peer: Any = None
        self.attempt_status = 0
        self.idle_mark = -1
        self.idle_since = 0.0
        self.malformed: bytes | None = None
        self.auth: Any = None
        self.authz_policy = ""
        self._query_params: dict[str, str] | None = None

        # Header map: the common no-duplicate case stays a single C-level
        # dict() call; a repeated field (``repeated``: each of its values, for
        # the route matchers) is indexed by http/request.py.
        hdict = dict(headers)
        self.repeated: dict[bytes, list[bytes]] | None = None
        if len(hdict) != len(headers):
            hdict, self.repeated, self.malformed = index_headers(headers)
        self.hdict = hdict
        self.request_id = hdict.get(b"x-request-id") or b""

        te = hdict.get(b"transfer-encoding")
        cl = hdict.get(b"content-length")
        self.chunked_in = te is not None
        self.content_length = -1
        if cl is not None:
            try:
                self.content_length = int(cl)
            except ValueError:
                self.content_length = -2  # invalid; rejected in start()
        self.has_body = has_body = self.chunked_in or self.content_length > 0
        # gRPC (and gRPC-Web) requests have a body (a message prefix at least): a request
        # without one pays nothing for gRPC telemetry. (An HTTP/2 stream
        # with no DATA is checked by h2downstream.)
        self.grpc = call_for(hdict.get(b"content-type")) if has_body else None
        exp = hdict.get(b"expect")
        self.expect_continue = exp is not None and exp.lower() == b"100-continue"

        # The request's scheme: Envoy sets :scheme from a valid x-forwarded-proto
        # (sidecar listeners trust it, use_remote_address false); a gateway
        # overwrites XFP first (see _prepare_upstream), so it stays "http".
        self.scheme = b"http"
        xfp = hdict.get(b"x-forwarded-proto")
        if xfp is not None:
            xfp = xfp.lower()
            if xfp == b"https" and not self.snapshot.identity.gateway:
                self.scheme = xfp
        # Parsing and validation rules live in http/request.py; the common
        # cases (origin-form target, a path or authority seen before) stay
        # inline here.
        if target[:1] == b"/":
            path, _, query = target.partition(b"?")
            self.authority = hdict.get(b"host", b"")
        elif target[:7].lower() == b"http://":
            self.authority, path, query = split_absolute_target(target)
        else:
            path, query = target, b""
            self.authority = hdict.get(b"host", b"")
        mode = conn.limits.path_normalization
        if mode and path not in PLAIN_PATHS:
            normalized = normalize_request_path(path, mode)
            if normalized is None:
                self.malformed = b"path normalization failed"  # %00: 400, as Envoy
            else:
                if normalized != path and target[:1] == b"/":
                    # The query is kept.
                    self.target = normalized + b"?" + query if query else normalized
                path = normalized
        self.path = path
        self.query = query
        # (host_and_port's memo looked up here: no call for an authority seen before)
        hp = HOST_PORTS.get(self.authority)
        self.host, self.port = hp if hp is not None else host_and_port(self.authority)

    # ------------------------------------------------------------------
    # helpers used by matchers and balancers

    def query_params(self) -> dict[str, str]:
        qp = self._query_params
        if qp is None:
            qp = self._query_params = parse_query(self.query)
        return qp

    def cookie(self, name: str) -> str | None:
        """A request cookie's value as Envoy parses it: every Cookie header,
        pairs split on ";", a value in double quotes unquoted."""
        if b"cookie" not in self.hdict:
            return None
        for hname, raw in self.headers:
            if hname != b"cookie":
                continue
            for part in raw.decode("latin-1").split(";"):
                k, eq, v = part.strip(" ").partition("=")
                if eq and k == name:
                    if len(v) >= 2 and v[0] == '"' and v[-1] == '"':
                        v = v[1:-1]
                    return v
        return None

    def new_hash_cookie(self, name: str) -> str:
        """The consistent-hash cookie is absent and its policy has a ttl:
        generate a value and set it on the response. Like Envoy, the value is
        16 hex digits derived from the connection's addresses, so requests
        racing on one connection get the same cookie."""
        if self.hash_cookie is None:
            transport = self.conn.transport
            seed = repr((transport.get_extra_info("peername"), transport.get_extra_info("sockname")))
            value = hashlib.blake2b(seed.encode(), digest_size=8).hexdigest()
            self.hash_cookie = (name, value)
        return self.hash_cookie[1]

    @property
    def flag_string(self) -> str:
        # Envoy (>= 1.30, StreamInfoImpl::setResponseFlag) keeps the flags in
        # the order they were set, each once: a request whose retries ran out
        # on connect failures logs "URX,UF" (checked against Envoy 1.40).
        if not self.flags:
            return "-"
        return ",".join(dict.fromkeys(self.flags))

    # ------------------------------------------------------------------
    # start: routing decisions (all synchronous)

    def start(self) -> None:
        self.started = True
        worker = self.worker
        obs = worker.observer
        if obs is not None:
            obs.on_request_start(self)
        bad = validate(self, worker.limits)
        if bad is not None:
            self.reject(bad.status, bad.body)
            return
        if not self.request_id:
            self.request_id = new_request_id()
            self.headers.append((b"x-request-id", self.request_id))
        if self.has_body:
            # Envoy decides on a request at its headers, before reading the
            # body: a reply it makes then (route not found, direct response,
            # redirect, fault abort, NC/UH/UO) leaves the body unread and the
            # connection closes after it. Forwarding (_attempt) or waiting
            # (pause_chain) clears this again.
            self.close_after = True
            if self.expect_continue:
                self.conn.write(CONTINUE_100)
        # jwt_authn and RBAC (authz/guard.py): before the route lookup;
        # inbound, or every request at a gateway; never a sidecar's outbound.
        snap = self.snapshot
        security = snap.security_filters[self.direction]
        if security:
            if not self._run_filters(security, 0):
                self._route_and_filter()
            return
        # _route_and_filter and the router's forward branch, inlined: this
        # runs per request, and a route without filters runs no chain code.
        if self.direction == INBOUND:
            route = snap.inbound_route
            vh = None
        else:
            hosts = snap.hosts
            vh = hosts.exact.get(self.host) or hosts.lookup(self.host)
            if vh is None:
                self._passthrough()
                return
            self.port = self.service_port(vh)
            route = vh.match(self)
            if route is None:
                self.send_reply(errors.NR_404)
                return
        self.route = route
        filters = route.filters
        if filters:
            # (_run_filters, inlined)
            self.vhost = vh
            for i, f in enumerate(filters):
                self.filter_pos = i
                if f.on_request(self):
                    return
        if route.kind == ROUTE:
            self._forward()
        else:
            self._route_action()

    def _route_and_filter(self) -> None:
        """Route lookup, the route's filter chain, then the router (after
        the security filters; ``start`` has the same steps inlined)."""
        snap = self.snapshot
        if self.direction == INBOUND:
            route = snap.inbound_route
            self.match_index = 0
            vh = None
        else:
            hosts = snap.hosts
            vh = hosts.exact.get(self.host) or hosts.lookup(self.host)
            if vh is None:
                self._passthrough()
                return
            self.port = self.service_port(vh)
            route = vh.match(self)
            if route is None:
                self.send_reply(errors.NR_404)
                return
        self.route = route
        filters = route.filters
        if filters:
            self.vhost = vh
            if self._run_filters(filters, 0):
                return
        self._route_action()

    # ------------------------------------------------------------------
    # the filter chain (filters/chain.py)

    def _run_filters(self, filters: tuple[HttpFilter[Exchange], ...], first: int) -> bool:
        """Run ``filters[first:]``; True when one stopped the chain."""
        for i in range(first, len(filters)):
            self.filter_pos = i
            if filters[i].on_request(self):
                return True
        return False

    def resume_chain(self) -> None:
        """A filter that stopped the chain to wait goes on: the filters after
        it, then the router. Nothing happens when the request has ended."""
        if self.finished:
            return
        route = self.route
        if route is None:
            # Paused before the route lookup (a security filter).
            if not self._run_filters(self.snapshot.security_filters[self.direction], self.filter_pos + 1):
                self._route_and_filter()
        elif not self._run_filters(route.filters, self.filter_pos + 1):
            self._route_action()

    def pause_chain(self, delay: float, callback: Callable[[], None]) -> None:
        """Call ``callback`` in ``delay`` seconds unless the request ends
        first (the timer is cancelled with the request's others)."""
        if self.has_body and self.attempt == 0:
            self.close_after = False  # decided later, after the body (see start())
        self.retry_timer = self.loop.call_later(delay, self._chain_timer, callback)

    def _chain_timer(self, callback: Callable[[], None]) -> None:
        self.retry_timer = None
        if not self.finished:
            callback()

    def add_encoder(self, f: ResponseFilter) -> None:
        """``f.on_response_headers`` runs on this request's response head."""
        self.encoders = (*self.encoders, f)

    def _route_action(self) -> None:
        """The router: the chain's last step."""
        route = self.route
        assert route is not None
        kind = route.kind
        if kind == REDIRECT:
            loc = route.redirect.location(self, self.match_index)
            self.send_local_reply(route.redirect.code, b"", extra=((b"location", loc),))
        elif kind == DIRECT_RESPONSE:
            status = route.direct.status
            extra: tuple[tuple[bytes, bytes], ...] = ()
            if status == 201 or 300 <= status < 400:
                # Envoy's router adds Location (the request's own URL) to a
                # 201 or 3xx direct response (RFC 9110 10.2.2).
                extra = ((b"location", self.scheme + b"://" + self.authority + self.path
                          + (b"?" + self.query if self.query else b"")),)
            self.send_local_reply(status, route.direct.body, extra=extra)
        else:
            self._forward()

    def service_port(self, vh: VirtualHost) -> int:
        """The service port this outbound request addresses on ``vh``."""
        orig = self.conn.original_dst
        if orig is not None and (orig[1] in vh.ports or not vh.ports):
            # Redirected by iptables: like Istio's per-port listeners, the
            # port the app connected to selects the service port (a Host
            # header often carries none).
            return orig[1]
        port = self.port
        # No port, or the sidecar's own listener port (an app configured to
        # call ``details:15001``): that names the service, not one of its
        # ports, and so does a port the service does not declare.
        if port > 0 and port != self.conn.listen_port and (port in vh.ports or not vh.ports):
            return port
        return vh.default_port

    def reject(self, status: int, body: bytes, counted: bool = False) -> None:
        """Refuse this request (malformed, or over a limit): answer with
        ``Connection: close`` and close. Nothing more goes upstream: an
        attempt already under way is abandoned and its connection discarded;
        if the response had already started, the connection is reset."""
        if self.finished:
            return
        if not counted:
            self.worker.stats.reject(status)
        # Nothing after a refused request is parsed or started (issue 12).
        self.conn.stopped = True
        if not self.started:
            self.started = True
            obs = self.worker.observer
            if obs is not None:
                obs.on_request_start(self)
        self.close_after = True
        # Envoy marks codec-level refusals DPE; its 413 (buffer limit) and the
        # 404 for an absolute URL without a path have no flag.
        self.send_local_reply(status, body, flag=refusal_flag(status))

    def on_tick(self, now: float, stream_idle: float) -> None:
        """The worker's once-a-second housekeeping, through the connection
        (``stream_idle`` > 0): Envoy's stream idle timeout without a timer
        per request. The request's progress (bytes both ways, the response
        status) must move at least once per ``stream_idle`` seconds."""
        if not self.started or self.finished:
            return
        mark = self.request_bytes + self.response_bytes + self.status
        if mark != self.idle_mark:
            self.idle_mark = mark
            self.idle_since = now
        elif now - self.idle_since >= stream_idle:
            self.on_stream_idle_timeout()

    def on_stream_idle_timeout(self) -> None:
        """Nothing moved either way for ``--stream-idle-timeout`` (Envoy's
        stream_idle_timeout, checked by the worker's sweep): 504 when the
        request was complete (the upstream never answered), 408 when the
        client stalled mid-request (Envoy's codes), a reset when the
        response had started. Flag SI."""
        if self.finished:
            return
        self.worker.stats.downstream_rq_idle_timeout += 1
        self.flags.append(errors.STREAM_IDLE_TIMEOUT)
        if self.response_started:
            self._fail_downstream()
        elif self.request_complete:
            self.send_reply(errors.SI_504, flag_already=True)
        else:
            self.send_reply(errors.SI_408, flag_already=True)

    def _passthrough(self) -> None:
        snap = self.snapshot
        if snap.registry_only:
            self.send_reply(errors.NR_502)
            return
        self.cluster = snap.passthrough
        self.route = None
        self._prepare_upstream(None)
        self._attempt()

    def _forward(self) -> None:
        route = self.route
        assert route is not None
        # (a rate-limit destination_cluster action may have picked it already)
        target = self.target_choice or route.pick(self.worker.rng)
        self.target_choice = target
        by_port = target.by_port  # RouteTarget.cluster_for, inlined
        cluster = by_port.get(self.port, target.cluster) if by_port else target.cluster
        if cluster is None:
            # Envoy still applies the route's (and this destination's)
            # response header operations to the cluster_not_found reply.
            self.response_ops = target.response_ops
            self.send_reply(errors.NC_503)
            return
        self.cluster = cluster
        self._prepare_upstream(route)
        if route.mirrors and not self.upgrade:
            self.shadows = self.worker.mirror.start(self, route)
        if self.request_complete and (route.timeout or b"grpc-timeout" in self.hdict):
            # Envoy's route timeout starts when the router has the whole
            # request (after any fault delay); else on_request_complete arms it.
            self._arm_global_timer()
        self._attempt()

    # ------------------------------------------------------------------
    # the upstream request head (built once, reused by every attempt)

    def _prepare_upstream(self, route: CompiledRoute | None) -> None:
        headers = self.headers
        conn_hdr = self.hdict.get(b"connection")
        if conn_hdr is not None:
            # The fields the client's Connection header nominates are
            # hop-by-hop: removed from what the client sent, before anything
            # is added, as Envoy's HTTP/1.1 codec does ahead of the connection
            # manager (Utility::sanitizeConnectionHeader). Filtered out of the
            # finished head instead, a client could strip the route's header
            # operations and the x-request-id generated for it.
            tokens = connection_tokens(conn_hdr) - _NOT_NOMINATABLE
            if tokens:
                headers = [h for h in headers if h[0] not in tokens]
        authority = self.authority
        path = self.path
        target = self.target_choice
        conn = self.conn
        # x-forwarded-for / -proto as Envoy's HCM sets them before the router
        # (ConnectionManagerUtility::mutateRequestHeaders) with istiod's
        # listener settings: sidecar listeners have use_remote_address false,
        # so XFF passes unchanged (no peer appended) and XFP is kept, or set
        # to "http" when absent; a gateway has use_remote_address true and
        # xff_num_trusted_hops 0 (MeshConfig numTrustedProxies' default), so
        # the peer is appended to XFF and XFP is overwritten.
        add_xfp = b"x-forwarded-proto" not in self.hdict
        if self.snapshot.identity.gateway:
            xff = self.hdict.get(b"x-forwarded-for")
            peer = conn.peer_ip_bytes
            headers = [h for h in headers if h[0] != b"x-forwarded-for" and h[0] != b"x-forwarded-proto"]
            headers.append((b"x-forwarded-for", xff + b", " + peer if xff else peer))
            add_xfp = True
        if route is not None and target is not None:
            # The route's and the destination's operations, combined at load
            # in Envoy's order, and the authority they (or rewrite) set.
            ops = target.request_ops
            if ops is not None:
                headers = ops.apply(headers)
                if add_xfp and b"x-forwarded-proto" in ops.drop:
                    add_xfp = False  # the route removes (or sets) what the HCM added
            if target.authority is not None:
                authority = target.authority
                # Envoy's router keeps the authority it rewrote.
                headers = [h for h in headers if h[0] != b"x-envoy-original-host"]
                headers.append((b"x-envoy-original-host", self.authority))
            rw = route.rewrite
            if rw is not None and rw.rewrites_path:
                new_path = rw.new_path(path, self.match_index)
                if new_path is not None:
                    original = self.target if self.target[:1] == b"/" else path + (b"?" + self.query if self.query
                                                                                  else b"")
                    headers = [h for h in headers if h[0] != b"x-envoy-original-path"]
                    headers.append((b"x-envoy-original-path", original))
                    path = new_path
            self.response_ops = target.response_ops
        upgrade = self.upgrade
        parts = [self.method, b" ", path, b"?" + self.query if self.query else b"", b" HTTP/1.1\r\nhost: ",
                 authority, b"\r\n"]
        append = parts.append
        drop = REQUEST_DROP
        if self.direction == INBOUND and not self._from_sidecar():
            drop = INBOUND_EXTERNAL_DROP
        xfcc = None
        for name, value in headers:
            if name in drop:
                if upgrade and name in (b"upgrade", b"connection"):
                    append(name + b": " + value + b"\r\n")
                elif name == XFCC:
                    xfcc = value
                continue
            append(name + b": " + value + b"\r\n")
        if add_xfp:
            append(b"x-forwarded-proto: http\r\n")
        tls_peer = conn.tls_peer
        if tls_peer is not None:
            # Istio's inbound APPEND_FORWARD: the mTLS peer's XFCC kept, ours appended.
            append(XFCC + b": " + (xfcc + b"," + tls_peer.xfcc if xfcc else tls_peer.xfcc) + b"\r\n")
        te = self.hdict.get(b"te")
        if te is not None and b"trailers" in te.lower():
            # Envoy forwards TE reduced to "trailers" (sanitizeTEHeader).
            append(b"te: trailers\r\n")
        if self.chunked_in:
            append(b"transfer-encoding: chunked\r\n")
        elif self.content_length >= 0 and (self.content_length > 0 or self.method not in (b"GET", b"HEAD")):
            append(b"content-length: " + str(self.content_length).encode() + b"\r\n")
        self.upstream_head = b"".join(parts)
        self.upstream_path = path

    def _from_sidecar(self) -> bool:
        """Inbound: did the caller send valid peer metadata (a sidecar)?
        Without a workload certificate this is unauthenticated, as Istio's
        plaintext metadata exchange; with one (mTLS on) only a caller
        authenticated by mTLS counts. It decides whether Envoy control
        headers are stripped."""
        conn = self.conn
        if conn.tls_peer is None and conn.worker.certs is not None:
            # With mTLS on, only an authenticated mesh peer is a sidecar.
            return False
        peer = self.peer
        if peer is None:
            raw = self.hdict.get(PEER_METADATA)
            if raw is None:
                return False
            peer = decode_peer(raw)  # no telemetry observer decoded it
        return peer is not None and peer is not UNKNOWN_PEER

    # ------------------------------------------------------------------
    # timers

    def _arm_global_timer(self) -> None:
        """The route timeout: from the end of the downstream request to the
        end of the response, across every attempt and back-off."""
        route = self.route
        if route is None or self.global_timer is not None or self.finished:
            return
        timeout = route.timeout
        grpc_timeout = self.hdict.get(b"grpc-timeout")
        if grpc_timeout is not None and is_grpc(self.hdict.get(b"content-type")):
            # Istio sets the route's max_grpc_timeout to the VirtualService
            # timeout (0: no cap): a gRPC request's deadline is its
            # grpc-timeout, capped by the route timeout (Envoy's finalTimeout).
            seconds = parse_grpc_timeout(grpc_timeout)
            if seconds is not None and (not timeout or seconds < timeout):
                timeout = seconds
        if timeout:
            self.global_timer = self.loop.call_later(timeout, self._on_global_timeout)

    def _arm_per_try_timer(self) -> None:
        """Envoy starts an attempt's timer once it has a connection and the
        downstream request is complete, whichever comes last."""
        route = self.route
        if route is not None and route.retry.per_try_timeout and self.per_try_timer is None:
            self.per_try_timer = self.loop.call_later(route.retry.per_try_timeout, self._on_per_try_timeout)

    def _on_global_timeout(self) -> None:
        self.global_timer = None
        if self.finished:
            return
        cluster = self.cluster
        if cluster is not None:
            cluster.stats.upstream_rq_timeout += 1
            if self.upconn is not None and not self.response_started and self.endpoint is not None:
                cluster.outlier.on_local_failure(self.endpoint, True)
        self.flags.append(errors.UPSTREAM_REQUEST_TIMEOUT)
        self._abort_attempt(reusable=False)
        if self.response_started:
            # Envoy resets a stream whose response outlives the route timeout.
            self._fail_downstream()
        else:
            self.send_reply(errors.UT_504, flag_already=True)

    def _on_per_try_timeout(self) -> None:
        self.per_try_timer = None
        if self.finished or self.response_started:
            return
        cluster = self.cluster
        assert cluster is not None
        cluster.stats.upstream_rq_per_try_timeout += 1
        ep = self.endpoint
        if ep is not None:
            cluster.outlier.on_local_failure(ep, True)
        self._abort_attempt(reusable=False)
        self._on_attempt_failed(PER_TRY_TIMEOUT, errors.UT_504)

    def _cancel_timers(self) -> None:
        if self.per_try_timer is not None:
            self.per_try_timer.cancel()
            self.per_try_timer = None
        if self.global_timer is not None:
            self.global_timer.cancel()
            self.global_timer = None
        if self.retry_timer is not None:
            self.retry_timer.cancel()
            self.retry_timer = None

    # ------------------------------------------------------------------
    # attempts

    def _attempt(self) -> None:
        cluster = self.cluster
        assert cluster is not None
        if isinstance(cluster, PassthroughCluster):
            ep = self._original_destination(cluster)
            if ep is None:
                self.send_reply(errors.NR_404)
                return
        else:
            route = self.route
            lb = cluster.lb
            if not self.tried and lb.hosts:
                ep = lb.choose(self)  # what pick() does with nothing to avoid
            else:
                ep = lb.pick(self, self.tried if route is None or route.retry.avoid_previous_hosts else None)
            if ep is None:
                self._give_up(errors.UH_503)
                return
        stats = cluster.stats
        if stats.upstream_rq_active >= cluster.settings.max_requests:
            # http2MaxRequests (Envoy's max_requests): Envoy applies it to
            # HTTP/1.1 pools too; Envoy 1.40 counts it upstream_rq_active_overflow.
            stats.upstream_rq_active_overflow += 1
            self._give_up(errors.UO_503)
            return
        self.attempt += 1
        self.endpoint = ep
        self.attempt_status = 0
        self.tried.append(ep)
        self.attempt_started = monotonic()
        self.head_sent = False
        ep.active_requests += 1
        result = ep.acquire(self)
        if result is OVERFLOW:
            self._end_attempt_counters()
            self._give_up(errors.UO_503)
            return
        if self.has_body and self.attempt == 1:
            self.close_after = False  # forwarded: start()'s early-reply close no longer applies
        if result is None:
            self.waiting_pending = True
        else:
            self.on_upstream_connected(result)  # type: ignore[arg-type]

    def _original_destination(self, cluster: PassthroughCluster) -> ClusterEndpoint | None:
        orig = self.conn.original_dst
        if orig is not None:
            return cluster.endpoint_for(orig[0], orig[1])
        if not self.host:
            return None
        host = self.host.decode("idna" if not self.host.isascii() else "ascii")
        if host.startswith("["):
            host = host[1:-1]
        return cluster.endpoint_for(host, self.port if self.port > 0 else 80)

    def _end_attempt_counters(self) -> None:
        ep = self.endpoint
        if ep is not None:
            st = self.obs
            if st is not None and st.record:
                # (only a tracer sets ex.obs; it needs the call only for recorded spans)
                self.worker.observer.on_attempt_end(self)
            self.upstream_host = ep
            ep.active_requests -= 1
            self.endpoint = None
            if self.head_sent:  # counted active once a connection took it
                assert self.cluster is not None
                self.cluster.stats.upstream_rq_active -= 1
        if self.per_try_timer is not None:
            self.per_try_timer.cancel()
            self.per_try_timer = None

    def _abort_attempt(self, reusable: bool) -> None:
        """Stop the current attempt without a callback from it."""
        conn = self.upconn
        if conn is not None:
            self.upconn = None
            conn.detach()
            ep = conn.endpoint
            ep.release(conn, reusable)
        elif self.waiting_pending and self.endpoint is not None:
            self.endpoint.cancel_pending(self)
        self.waiting_pending = False
        self._end_attempt_counters()
        if self.retry_timer is not None:
            self.retry_timer.cancel()
            self.retry_timer = None

    def on_upstream_connected(self, conn: UpstreamConnection) -> None:
        self.waiting_pending = False
        if self.finished:
            conn.endpoint.release(conn, True)
            return
        self.upconn = conn
        conn.attach(self, self.method == b"HEAD", self.conn)
        if self.conn.write_paused:
            # The client is not reading (a retry, or a request whose body
            # was still arriving): do not read a response it cannot take.
            conn.pause_reading()
        cluster = conn.endpoint.cluster
        stats = cluster.stats
        stats.upstream_rq_total += 1
        stats.upstream_rq_active += 1
        if conn.endpoint.consecutive_local:  # (only the detector's reset, so skip the call at 0)
            cluster.outlier.on_local_success(conn.endpoint)
        route = self.route
        head = self.upstream_head + b"x-envoy-attempt-count: " + str(self.attempt).encode() + b"\r\n"
        if route is not None and (route.timeout or route.retry.per_try_timeout):
            if self.request_complete:
                self._arm_per_try_timer()
            expected = self._expected_timeout_ms()
            if expected:
                head += b"x-envoy-expected-rq-timeout-ms: " + expected + b"\r\n"
        obs = self.worker.observer
        if obs is not None:
            # Trace context differs per attempt (one client span each).
            head += obs.attempt_headers(self)
        head += b"\r\n"
        body = self.replay if self.replay is not None else self.unsent
        if body:
            if self.chunked_in:
                data = head + b"".join(chunk(c) for c in body)
            else:
                data = head + b"".join(body)
        else:
            data = head
        if self.request_complete and self.chunked_in:
            data += LAST_CHUNK if self.version != "2" else self._last_request_chunk()
        conn.write(data)
        self.head_sent = True
        if self.unsent:
            self.unsent = []
            self.unsent_bytes = 0
            if self.downstream_paused_by_us:
                self.downstream_paused_by_us = False
                self.conn.resume_reading_for(self)

    def _expected_timeout_ms(self) -> bytes:
        """Envoy's x-envoy-expected-rq-timeout-ms: the per-try timeout, else
        the route timeout; a retry gets no more than what is left of the route
        timeout (at least 1 ms). Envoy computes the first attempt's value when
        the request arrives, so time spent connecting is not deducted."""
        route = self.route
        if route is None:
            return b""
        expected = route.retry.per_try_timeout or route.timeout
        if not expected:
            return b""
        if self.attempt > 1 and route.timeout and self.global_timer is not None:
            expected = min(expected, self.global_timer.when() - self.loop.time())
        return str(max(1, int(expected * 1000))).encode()

    def on_upstream_connect_failed(self, ep: ClusterEndpoint, reason: str) -> None:
        self.waiting_pending = False
        if self.finished:
            return
        if reason == "overflow":
            # http2MaxRequests reached when the pool could attach it (an
            # HTTP/2 pool serving its waiting streams): 503 UO, never retried.
            self._end_attempt_counters()
            self._give_up(errors.UO_503)
            return
        cluster = ep.cluster
        cluster.outlier.on_local_failure(ep)
        self._end_attempt_counters()
        self._on_attempt_failed(CONNECT_FAILURE,
                                errors.UF_TIMEOUT_503 if reason == "connection timeout" else errors.UF_503)

    def _on_attempt_failed(self, kind: str, reply: LocalReply) -> None:
        """An attempt ended without a response: retry or reply locally."""
        self.last_failure = reply
        route = self.route
        if route is not None and route.retry.retries_failure(kind) and self._schedule_retry():
            return
        self._give_up(reply)

    def _retry_allowed(self) -> bool:
        """The retry policy wants to retry this attempt's outcome: may it?
        Sets the flags and counts the reasons Envoy does."""
        route = self.route
        cluster = self.cluster
        assert cluster is not None
        # A retry needs the whole request at hand (Envoy skips it otherwise)
        # and a body that fitted the replay buffer (retry_or_shadow_abandoned
        # was counted when it did not).
        if self.replay is None or self.response_started or self.conn.closed or not self.request_complete:
            return False
        max_retries = route.retry.num_retries if route is not None else 0
        if self.retries_done >= max_retries:
            if max_retries:
                self.flags.append(errors.UPSTREAM_RETRY_LIMIT_EXCEEDED)
                cluster.stats.upstream_rq_retry_limit_exceeded += 1
            return False
        # maxRetries bounds retries in progress per cluster; a request keeps
        # its slot from one retry to the next (Envoy releases and re-takes it).
        if not self.retry_active and cluster.retries_active >= cluster.settings.max_retries:
            cluster.stats.upstream_rq_retry_overflow += 1
            self.flags.append(errors.UPSTREAM_OVERFLOW)
            return False
        return True

    def _schedule_retry(self) -> bool:
        if not self._retry_allowed():
            return False
        route = self.route
        cluster = self.cluster
        assert cluster is not None
        if not self.retry_active:
            self.retry_active = True
            cluster.retries_active += 1
        self.retries_done += 1
        cluster.stats.upstream_rq_retry += 1
        rng = self.worker.rng
        delay = route.retry.backoff(self.retries_done, rng) if route is not None else 0.0
        self.retry_timer = self.loop.call_later(delay, self._retry_now)
        return True

    def _retry_now(self) -> None:
        self.retry_timer = None
        if self.finished:
            return
        self._attempt()

    def _release_retry_slot(self) -> None:
        if self.retry_active:
            self.retry_active = False
            assert self.cluster is not None
            self.cluster.retries_active -= 1

    def _give_up(self, reply: LocalReply) -> None:
        if self.retries_done:
            reply = errors.RETRIED.get(reply, reply)
        self.send_reply(reply)

    # ------------------------------------------------------------------
    # upstream callbacks (UpstreamStream)

    def on_upstream_headers(self, conn: UpstreamConnection, status: int, headers: list[tuple[bytes, bytes]], keep_alive: bool) -> None:
        if self.per_try_timer is not None:
            self.per_try_timer.cancel()
            self.per_try_timer = None
        cluster = self.cluster
        ep = self.endpoint
        assert cluster is not None
        self.attempt_status = status
        seen = status if self.grpc is None else _grpc_outlier_status(status, headers)
        if ep is not None and (seen >= 500 or ep.consecutive_5xx or ep.consecutive_gateway):
            # (a success below 500 only resets these counters: no call when they are 0)
            cluster.outlier.on_response(ep, seen)
        route = self.route
        # The response's header map, built once (by the HTTP/1.1 connection,
        # for its framing check): the retry check, the observer and the
        # framing in _commit_response look names up in it instead of a pass
        # over the fields each.
        hd = getattr(conn, "header_map", None)
        if hd is None:
            hd = dict(headers)
        retriable = False
        if route is not None:
            retry = route.retry
            # (Istio's default policy looks only for grpc-status: no call when the map has none)
            if retry.any_response and (not retry.grpc_only or b"grpc-status" in hd):
                retriable = retry.retries_response(status, headers, hd)
        if retriable and self._retry_allowed():
            # Discard this response: the connection cannot be reused with an
            # unread body, exactly as Envoy resets the upstream stream.
            self.upconn = None
            conn.detach()
            conn.endpoint.release(conn, False)
            self._end_attempt_counters()
            self._schedule_retry()
            return
        if self.retry_active:
            # The retry is over. Envoy (RetryStateImpl::shouldRetry) counts
            # upstream_rq_retry_success only when this response would not be
            # retried at all, not when the retries ran out on it.
            if not retriable:
                cluster.stats.upstream_rq_retry_success += 1
            self._release_retry_slot()
        self.upstream_latency = monotonic() - self.attempt_started
        self.status = status
        if status == 101 and self.upgrade:
            self._commit_response(status, headers, keep_alive=True, upgraded=True, hd=hd)
            return
        self._commit_response(status, headers, keep_alive, hd=hd)

    def _commit_response(self, status: int, headers: list[tuple[bytes, bytes]], keep_alive: bool, upgraded: bool = False,
                         hd: dict[bytes, bytes] | None = None) -> None:
        self.response_started = True
        if self.upgrade and not upgraded:
            self.close_after = True  # the parser is in upgrade mode: no further requests
        if self.global_timer is not None and upgraded:
            self.global_timer.cancel()
            self.global_timer = None
        conn = self.conn
        received = headers
        obs = self.worker.observer
        if obs is not None:
            headers = obs.on_upstream_response(self, headers, hd)
        ops = self.response_ops
        drop = RESPONSE_DROP
        added = b""
        if ops is not None:
            if ops.fused_drop is not None and not self.encoders:
                drop = ops.fused_drop  # applied by the serialising pass below
                added = ops.added_lines
            else:
                headers = ops.apply(headers)
        if self.encoders:
            for f in self.encoders:
                headers = f.on_response_headers(self, headers)
        http10 = self.version == "1.0"
        # Framing and hop-by-hop fields, found with one C-level dict() (last
        # value wins, as the loop this replaced did) instead of a Python loop;
        # the one on_upstream_headers built, unless a step changed the fields.
        if hd is None or headers is not received:
            hd = dict(headers)
        content_length = hd.get(b"content-length")
        if self.grpc is not None:
            self.grpc.header_status = hd.get(b"grpc-status")
        chunked_up = b"transfer-encoding" in hd
        if upgraded:
            drop = drop - _UPGRADE_FIELDS  # Upgrade and Connection go through
        else:
            connection = hd.get(b"connection")
            if connection is not None:
                if len(hd) != len(headers):
                    connection = b",".join([v for n, v in headers if n == b"connection"])
                if connection.lower() not in _PLAIN_CONNECTION:
                    # Connection names more hop-by-hop fields: drop them too.
                    tokens = connection_tokens(connection)
                    if not tokens <= drop:
                        drop = drop | tokens
        parts = [name + b": " + value + b"\r\n" for name, value in headers if name not in drop]
        append = parts.append
        if added:
            append(added)
        # (_server_line, inlined; the upstream's own ``server`` is in RESPONSE_DROP)
        append(_SERVER_ISTIO_ENVOY if self.direction == INBOUND or self.snapshot.identity.gateway
               else _SERVER_ENVOY)
        if self.upstream_latency >= 0:
            append(b"x-envoy-upstream-service-time: " + str(int(self.upstream_latency * 1000)).encode() + b"\r\n")
        if self.hash_cookie is not None:
            append(self._hash_cookie_header())
        no_body = self.method == b"HEAD" or status in (204, 304) or 100 <= status < 200
        if upgraded:
            pass
        elif content_length is not None and not chunked_up:
            append(b"content-length: " + content_length + b"\r\n")
        elif no_body:
            pass
        elif http10:
            self.close_after = True
            self.response_close_delimited = True
        else:
            append(b"transfer-encoding: chunked\r\n")
            self.response_chunked = True
        if not upgraded:
            if not self.keep_alive or not self.request_complete or conn.draining or self.close_after:
                self.close_after = True
                append(b"connection: close\r\n")
            elif http10:
                append(b"connection: keep-alive\r\n")
        append(b"\r\n")
        conn.write((STATUS_LINES.get(status) or errors.status_line(status)) + b"".join(parts))
        if upgraded:
            self._start_tunnel()

    def _hash_cookie_header(self) -> bytes:
        """Envoy's makeSetCookieValue: name="value"; Max-Age=N (omitted for a
        zero ttl: a session cookie); Path=P; attributes; HttpOnly."""
        assert self.hash_cookie is not None  # only called with a generated cookie
        name, value = self.hash_cookie
        cfg = None
        cluster = self.cluster
        if cluster is not None and cluster.settings.consistent_hash is not None:
            cfg = cluster.settings.consistent_hash.http_cookie
        attrs = ""
        if cfg is not None:
            if cfg.ttl and int(cfg.ttl):
                attrs += f"; Max-Age={int(cfg.ttl)}"
            if cfg.path:
                attrs += f"; Path={cfg.path}"
            for attr_name, attr_value in cfg.attributes:
                attrs += f"; {attr_name}={attr_value}" if attr_value else f"; {attr_name}"
        return f"set-cookie: {name}=\"{value}\"{attrs}; HttpOnly\r\n".encode("latin-1")

    def on_upstream_body(self, data: bytes) -> None:
        if not self.response_started:
            return
        self.response_bytes += len(data)
        if self.grpc is not None:
            self.grpc.responses.feed(data)
        if self.response_chunked:
            self.conn.write(chunk(data))
        else:
            self.conn.write(data)

    def on_upstream_trailers(self, trailers: list[tuple[bytes, bytes]]) -> None:
        """Response trailers from an HTTP/2 upstream (gRPC's grpc-status),
        just before its on_upstream_complete. An HTTP/2 client gets them: they
        are written as the last chunk's trailer fields, which its stream
        (http/h2downstream.py) sends as a trailers HEADERS frame. An HTTP/1.1
        client does not (spec §1.5): Envoy's HTTP/1.1 codec encodes trailers
        only with enable_trailers, which Istio leaves off."""
        if self.grpc is not None:
            self.grpc.on_trailers(trailers)  # grpc_response_status (http/grpc.py)
        if self.version != "2" or not self.response_chunked or self.finished:
            return
        self.response_chunked = False  # (the last chunk goes here, not in on_upstream_complete)
        self.conn.write(b"0\r\n" + b"".join([n + b": " + v + b"\r\n" for n, v in trailers]) + b"\r\n")

    def _last_request_chunk(self) -> bytes:
        """The request body's last chunk, for an HTTP/2 client's request: with
        its trailers when the upstream speaks HTTP/2 too (an HTTP/1.1
        upstream gets none, as from Envoy)."""
        trailers = getattr(self.conn, "request_trailers", None)
        if trailers and getattr(self.upconn, "h2", False):
            return b"0\r\n" + b"".join([n + b": " + v + b"\r\n" for n, v in trailers]) + b"\r\n"
        return LAST_CHUNK

    def on_upstream_complete(self, conn: UpstreamConnection) -> None:
        if self.upconn is not conn:
            return
        self.upconn = None
        ep = conn.endpoint
        # A connection is reusable only if the whole request went out too.
        ep.release(conn, self.request_complete and self.head_sent)
        self._end_attempt_counters()
        self.response_complete = True
        if self.response_chunked:
            self.conn.write(LAST_CHUNK)
        self._finish()

    def on_upstream_reset(self, conn: UpstreamConnection, reason: str) -> None:
        if self.upconn is not conn:
            return
        self.upconn = None
        cluster = self.cluster
        ep = conn.endpoint
        ep.release(conn, False)
        if self.response_started:
            self._end_attempt_counters()
            if self.response_close_delimited and reason != "protocol_error":
                # The body legitimately ends at close.
                self.response_complete = True
                self._finish()
                return
            if reason == "connection_termination" and getattr(conn, "h2", False):
                # An HTTP/2 upstream's connection closed mid-response: Envoy's
                # HTTP/2 codec reports a connection termination, not a protocol
                # error (UC, no upstream_cx_protocol_error; checked on Envoy 1.40).
                self.flags.append(errors.UPSTREAM_CONNECTION_TERMINATION)
                self._fail_downstream()
                return
            if reason in _STREAM_RESETS:
                # An HTTP/2 upstream reset its stream mid-response (Envoy: UR).
                self.flags.append(errors.UPSTREAM_RESET)
                if cluster is not None:
                    cluster.stats.upstream_rq_rx_reset += 1
                self._fail_downstream()
                return
            # A response cut short (closed before its length or last chunk,
            # or malformed) is a codec protocol error to Envoy: flag UPE,
            # upstream_cx_protocol_error, and no upstream_rq_rx_reset
            # (checked against Envoy 1.40).
            self.flags.append(errors.UPSTREAM_PROTOCOL_ERROR)
            if cluster is not None and reason != "protocol_error":
                # (a malformed response was counted by the connection itself)
                cluster.stats.upstream_cx_protocol_error += 1
            self._fail_downstream()
            return
        if cluster is not None:
            cluster.stats.upstream_rq_rx_reset += 1
        if cluster is not None:
            cluster.outlier.on_local_failure(ep)
        self._end_attempt_counters()
        reply = errors.UPE_502 if reason == "protocol_error" else errors.UC_503
        if reason == "protocol_error":
            self._give_up(reply)
            return
        if reason in _STREAM_RESETS:
            # An HTTP/2 upstream's RST_STREAM (or a GOAWAY that left this
            # stream unprocessed): REFUSED_STREAM is Envoy's
            # RemoteRefusedStreamReset, retried under refused-stream.
            if reason == "refused_stream":
                self._on_attempt_failed(REFUSED_STREAM, errors.UR_REFUSED_503)
            else:
                self._on_attempt_failed(RESET, errors.UR_503)
            return
        # The request was written: the upstream may have processed it, even
        # on a reused connection that closed without a byte back. Only a
        # retry policy sends it again (as Envoy: 503 UC otherwise). A pooled
        # connection found closed before the write is never used at all
        # (ClusterEndpoint.acquire).
        self._on_attempt_failed(RESET, reply)

    def on_upstream_upgrade(self, conn: UpstreamConnection, rest: bytes) -> None:
        # httptools raised HttpParserUpgrade: the 101 head was already
        # committed in on_upstream_headers; ``rest`` is tunnel data.
        if rest:
            self.conn.write(rest)

    def on_upstream_write_paused(self) -> None:
        self.downstream_paused_by_us = True
        self.conn.pause_reading_for(self)

    def on_upstream_write_resumed(self) -> None:
        if self.downstream_paused_by_us:
            self.downstream_paused_by_us = False
            self.conn.resume_reading_for(self)

    # ------------------------------------------------------------------
    # websocket / upgrade tunnel

    def _start_tunnel(self) -> None:
        upconn = self.upconn
        if upconn is None:
            return
        self.upconn = None
        self._end_attempt_counters()
        self.conn.become_tunnel(upconn, self)

    # ------------------------------------------------------------------
    # downstream events (from DownstreamConnection)

    def on_request_body(self, data: bytes) -> None:
        self.request_bytes += len(data)
        if self.grpc is not None:
            self.grpc.requests.feed(data)
        limit = self.worker.limits.max_request_body
        if limit and self.request_bytes > limit:
            conn = self.conn
            if conn.current is self:
                self.reject(413, b"Payload Too Large")
            else:
                # A pipelined request queued behind the one in flight: it
                # is refused (in order) once that one is answered.
                conn.pending_error = (413, b"Payload Too Large")
                conn._protocol_error()
            return
        shadows = self.shadows
        if shadows is not None:
            for shadow in shadows:
                shadow.on_body(data)
        replay = self.replay
        if replay is not None:
            if self.request_bytes > self.worker.limits.retry_buffer:
                # Too big to replay: this request will not be retried. Chunks
                # not yet sent upstream must still be kept until they are.
                self.replay = None
                route = self.route
                if route is not None and route.retry.num_retries and self.cluster is not None:
                    self.cluster.stats.retry_or_shadow_abandoned += 1
                if self.upconn is None or not self.head_sent:
                    self.unsent = replay
                    self.unsent_bytes = self.request_bytes - len(data)
            else:
                replay.append(data)
        up = self.upconn
        if up is not None and self.head_sent:
            up.write(chunk(data) if self.chunked_in else data)
            return
        if self.replay is None:
            self.unsent.append(data)
            self.unsent_bytes += len(data)
            if self.unsent_bytes > self.worker.limits.body_buffer and not self.downstream_paused_by_us:
                self.downstream_paused_by_us = True
                self.conn.pause_reading_for(self)

    def on_request_complete(self) -> None:
        self.request_complete = True
        if not self.started:
            self.start()
            return
        shadows = self.shadows
        if shadows is not None:
            for shadow in shadows:
                shadow.on_request_complete()
        conn = self.upconn
        if conn is not None and self.head_sent and self.chunked_in:
            conn.write(LAST_CHUNK if self.version != "2" else self._last_request_chunk())
        if self.response_complete and not self.finished:
            self._finish()
            return
        if self.cluster is not None and not self.finished:
            # Forwarding began while the body streamed in: the route timeout
            # (and the attempt's per-try timeout) start now, as in Envoy.
            self._arm_global_timer()
            if conn is not None and self.head_sent and not self.response_started:
                self._arm_per_try_timer()

    def on_downstream_write_paused(self) -> None:
        if self.upconn is not None:
            self.upconn.pause_reading()

    def on_downstream_write_resumed(self) -> None:
        if self.upconn is not None:
            self.upconn.resume_reading()

    def on_downstream_closed(self) -> None:
        """The client went away: cancel everything, never reuse the upstream
        connection (its response was not read to the end)."""
        if self.finished:
            return
        if not self.response_complete:
            self.flags.append(errors.DOWNSTREAM_CONNECTION_TERMINATION)
        self._abort_attempt(reusable=False)
        self._finish(force=True)

    # ------------------------------------------------------------------
    # local replies and the end

    def send_reply(self, reply: LocalReply, flag_already: bool = False) -> None:
        if reply.flag and not flag_already:
            self.flags.append(reply.flag)
        self.last_local_reply = reply
        self.send_local_reply(reply.status, reply.body, extra=reply.extra_headers, content_type=reply.content_type)

    def _server_line(self) -> bytes:
        """Istio's HCMs overwrite ``server`` (OVERWRITE): "envoy" on sidecar
        outbound listeners, "istio-envoy" on inbound and gateway ones
        (pilot/pkg/networking/util GetProxyHeadersFromProxyConfig)."""
        if self.direction == INBOUND or self.snapshot.identity.gateway:
            return _SERVER_ISTIO_ENVOY
        return _SERVER_ENVOY

    def send_local_reply(self, status: int, body: bytes, extra: tuple[tuple[bytes, bytes], ...] = (), flag: str | None = None,
                         content_type: bytes = _TEXT_PLAIN, route_ops: bool = True) -> None:
        if flag:
            self.flags.append(flag)
        if self.finished:
            return
        self._cancel_timers()
        self._abort_attempt(reusable=False)
        self._release_retry_slot()
        if self.response_started:
            self._fail_downstream()
            return
        if status != 200 and is_grpc(self.hdict.get(b"content-type")):
            status, body, extra, content_type = grpc_local_reply(status, body, extra)
        self.status = status
        self.response_started = True
        # Fields other than framing, date and server: the content type (once;
        # a route's header operation may replace it, as on Envoy), the
        # reply's own fields, then the route's response operations.
        fields: list[tuple[bytes, bytes]] = []
        if body or content_type != _TEXT_PLAIN:
            fields.append((b"content-type", content_type))
        fields.extend(extra)
        route = self.route
        if route is not None and route_ops:
            # Envoy applies the route's (and the chosen destination's) response
            # header mutations to the router's local replies too.
            ops = self.response_ops if self.target_choice is not None else route.response_ops
            if ops is not None:
                fields = ops.apply(fields)
            for f in self.encoders:
                fields = f.on_response_headers(self, fields)
        if self.grpc is not None:
            self.grpc.on_response_headers(fields)
        if not self.keep_alive or not self.request_complete or self.conn.draining or self.close_after:
            self.close_after = True
        self.response_bytes = len(body)
        self.conn.write(local_reply(status, body, fields, HTTP_DATE.get(), self._server_line(), self.close_after,
                                    self.method != b"HEAD"))
        self.response_complete = True
        self._finish()

    def _fail_downstream(self) -> None:
        """The response head is out but the body cannot complete: the only
        honest signal on HTTP/1.1 is closing the connection."""
        self.close_after = True
        self._finish(force=True)

    def _finish(self, force: bool = False) -> None:
        if self.finished:
            return
        if not force and not self.request_complete and not self.close_after:
            # The response ended before the request did (e.g. an early 4xx):
            # the connection cannot be reused, the rest of the body is unread.
            self.close_after = True
        self.finished = True
        self.end_time = monotonic()
        cluster = self.cluster
        if cluster is not None and self.response_started:
            # Envoy's upstream_rq_completed: once per request whose status the
            # router charged to the cluster (upstream responses and its own
            # UF/UC/UO/UH/UT replies), not per attempt.
            cluster.stats.upstream_rq_completed += 1
        shadows = self.shadows
        if shadows is not None:
            self.shadows = None
            if not self.request_complete:
                for shadow in shadows:
                    shadow.abandon()
        # (each call guarded by what it would do: this runs once per request)
        if self.per_try_timer is not None or self.global_timer is not None or self.retry_timer is not None:
            self._cancel_timers()
        if self.upconn is not None or self.waiting_pending:
            self._abort_attempt(reusable=False)
        if self.endpoint is not None:
            self._end_attempt_counters()
        if self.retry_active:
            self._release_retry_slot()
        obs = self.worker.observer
        if obs is not None:
            try:
                obs.on_request_done(self)
            except Exception:  # observability must never break the data path
                log.exception("observer failed")
        self.conn.exchange_done(self)


if TYPE_CHECKING:
    from ..authz.guard import SecurityContext
    from ..filters.chain import FilterContext
    from ..filters.mirror import MirroredRequest
    from ..observability.view import ExchangeView

    def _views_of_an_exchange(ex: Exchange) -> tuple[ExchangeView, MirroredRequest, FilterContext, SecurityContext]:
        """For mypy only (never defined at run time): the Exchange is what the
        observers, the mirror and the filters are typed against. They reach
        it through ``worker.observer``, ``worker.mirror`` and the snapshot's
        filter tuples, which this layer cannot type without importing the
        worker, so the check is stated here."""
        return ex, ex, ex, ex
