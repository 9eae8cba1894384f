"""Mirroring: the shadow request's head, body streaming, bounds and counters.
Upstream connections are fakes; the pool and clusters are the real ones."""

from __future__ import annotations

import math
import random
from typing import Any

from pyproxy.filters.mirror import Mirror, ShadowRequest, shadow_head
from pyproxy.http.exchange import Exchange

from .fakes import StubWorker
from .routing_util import build, send, service_entry

CONFIG = service_entry("reviews", [("10.0.0.1", 9080, {"version": "v1"}), ("10.0.0.2", 9080, {"version": "v2"}),
                                   ("10.0.0.3", 9080, {"version": "v3"})]) + """
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
  - {name: v3, labels: {version: v3}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - match: [{uri: {prefix: /api/}}]
    rewrite: {uri: /v2/}
    headers: {request: {set: {x-added: "1"}}}
    route: [{destination: {host: reviews, subset: v1}}]
    mirror: {host: reviews, subset: v3}
  - match: [{uri: {prefix: /half}}]
    route: [{destination: {host: reviews, subset: v1}}]
    mirrors:
    - {destination: {host: reviews, subset: v2}, percentage: {value: 25}}
    - {destination: {host: reviews, subset: v3}}
  - match: [{uri: {prefix: /zero}}]
    route: [{destination: {host: reviews, subset: v1}}]
    mirror: {host: reviews, subset: v3}
    mirrorPercentage: {value: 0}
  - match: [{uri: {prefix: /nowhere}}]
    route: [{destination: {host: reviews, subset: v1}}]
    mirror: {host: reviews, subset: missing}
  - route: [{destination: {host: reviews, subset: v1}}]
"""


class FakeUpConn:
    """An upstream connection as the pool and a stream use it."""

    def __init__(self, ep: Any) -> None:
        self.endpoint = ep
        self.stream: Any = None
        self.data: list[bytes] = []
        self.closed = False
        self.reusable = True
        self.requests = 0
        self.idle_since = 0.0
        self.read_paused = False

    def attach(self, stream: Any, head_request: bool = False) -> None:
        self.stream = stream
        self.requests += 1

    def write(self, data: bytes) -> None:
        self.data.append(data)

    def detach(self) -> None:
        self.stream = None

    def close(self) -> None:
        self.closed = True

    @property
    def sent(self) -> bytes:
        return b"".join(self.data)


def worker(**kw: Any) -> StubWorker:
    w = StubWorker()
    w.mirror = Mirror(w.loop, w.rng, **kw)  # type: ignore[attr-defined,arg-type]
    return w


def connect(shadow: ShadowRequest) -> FakeUpConn:
    assert shadow.waiting and shadow.endpoint is not None
    ep = shadow.endpoint
    ep.cancel_pending(shadow)  # what the pool does when it hands a connection over
    conn = FakeUpConn(ep)
    shadow.on_upstream_connected(conn)  # type: ignore[arg-type]
    return conn


def test_shadow_head_suffixes_the_host_part() -> None:
    head = b"GET /x HTTP/1.1\r\nhost: reviews:9080\r\nx-a: 1\r\ncontent-length: 0\r\n"
    # Envoy's shadow also says it is internal and its attempt count (1).
    assert shadow_head(head) == (b"GET /x HTTP/1.1\r\nhost: reviews-shadow:9080\r\n"
                                 b"x-envoy-attempt-count: 1\r\nx-envoy-internal: true\r\n"
                                 b"x-a: 1\r\ncontent-length: 0\r\n\r\n")
    assert b"host: reviews-shadow\r\n" in shadow_head(b"GET / HTTP/1.1\r\nhost: reviews\r\n")
    assert b"host: [::1]-shadow:80\r\n" in shadow_head(b"GET / HTTP/1.1\r\nhost: [::1]:80\r\n")
    # Without a well-formed port the whole authority is the host (Envoy's parseAuthority).
    assert b"host: reviews:-shadow\r\n" in shadow_head(b"GET / HTTP/1.1\r\nhost: reviews:\r\n")
    assert b"host: reviews:http-shadow\r\n" in shadow_head(b"GET / HTTP/1.1\r\nhost: reviews:http\r\n")
    assert b"host: [::1]-shadow\r\n" in shadow_head(b"GET / HTTP/1.1\r\nhost: [::1]\r\n")


def test_mirror_copies_the_upstream_request_to_the_mirror_cluster() -> None:
    w = worker()
    ex = send(build(CONFIG), "/api/items?q=1", {"x-client": "c"}, host="reviews:9080", worker=w)
    assert ex.cluster is not None and ex.cluster.subset == "v1"  # the main request is unchanged
    assert ex.shadows is not None and len(ex.shadows) == 1
    shadow = ex.shadows[0]
    assert shadow.cluster.subset == "v3" and shadow.endpoint.host == "10.0.0.3"
    conn = connect(shadow)
    head = conn.sent
    assert head.startswith(b"GET /v2/items?q=1 HTTP/1.1\r\nhost: reviews-shadow:9080\r\n")
    for line in (b"x-client: c", b"x-added: 1", b"x-envoy-original-path: /api/items?q=1"):
        assert line in head
    assert head.endswith(b"\r\n\r\n")
    assert ex.upstream_head.startswith(b"GET /v2/items?q=1 HTTP/1.1\r\nhost: reviews:9080\r\n")
    stats = w.mirror.stats  # type: ignore[attr-defined]
    assert stats.mirror_rq_sent == 1 and w.mirror.in_flight == 1  # type: ignore[attr-defined]
    shadow.on_upstream_headers(conn, 500, [], True)  # type: ignore[arg-type]
    shadow.on_upstream_body(b"ignored")
    shadow.on_upstream_complete(conn)  # type: ignore[arg-type]
    assert stats.as_dict() == {"mirror_rq_sent": 1, "mirror_rq_completed": 1, "mirror_rq_failed": 0,
                               "mirror_rq_dropped": 0}
    assert w.mirror.in_flight == 0 and shadow.cluster.stats.upstream_rq_active == 0  # type: ignore[attr-defined]
    assert list(shadow.cluster.endpoints[0].idle) == [conn]  # reused by the pool
    assert ex.conn.response == b""  # type: ignore[attr-defined]  # nothing reached the client


def post(w: StubWorker, headers: dict[str, str]) -> Exchange:
    return send(build(CONFIG), "/api/upload", headers, method="POST", worker=w, complete=False)


def test_request_body_streams_to_the_shadow() -> None:
    w = worker()
    ex = post(w, {"content-length": "6"})
    shadow = ex.shadows[0]
    ex.on_request_body(b"abc")  # before the shadow's connection is ready: buffered
    conn = connect(shadow)
    ex.on_request_body(b"def")  # streamed as it arrives
    ex.on_request_complete()
    assert conn.sent.endswith(b"content-length: 6\r\n\r\nabcdef")
    assert ex.replay == [b"abc", b"def"]  # the main request kept its own copy


def test_chunked_body_is_reframed_for_the_shadow() -> None:
    w = worker()
    ex = post(w, {"transfer-encoding": "chunked"})
    shadow = ex.shadows[0]
    conn = connect(shadow)
    ex.on_request_body(b"hello")
    ex.on_request_complete()
    assert conn.sent.endswith(b"transfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")


def test_a_slow_shadow_is_dropped_instead_of_holding_the_body_or_pausing_the_client() -> None:
    w = worker(buffer_limit=10)
    ex = post(w, {"content-length": "30"})
    shadow = ex.shadows[0]
    conn = connect(shadow)
    shadow.on_upstream_write_paused()  # its upstream stopped reading
    ex.on_request_body(b"x" * 8)
    assert not shadow.finished
    ex.on_request_body(b"y" * 8)
    assert shadow.finished and conn.closed
    assert w.mirror.stats.mirror_rq_dropped == 1 and w.mirror.in_flight == 0  # type: ignore[attr-defined]
    ex.on_request_body(b"z" * 14)
    assert not ex.downstream_paused_by_us and ex.replay == [b"x" * 8, b"y" * 8, b"z" * 14]


def test_resumed_shadow_flushes_what_it_buffered() -> None:
    w = worker()
    ex = post(w, {"content-length": "4"})
    shadow = ex.shadows[0]
    conn = connect(shadow)
    shadow.on_upstream_write_paused()
    ex.on_request_body(b"ab")
    assert not conn.sent.endswith(b"ab")
    shadow.on_upstream_write_resumed()
    ex.on_request_body(b"cd")
    assert conn.sent.endswith(b"\r\n\r\nabcd")


def test_in_flight_bound_drops_extra_shadows() -> None:
    w = worker(max_in_flight=2)
    snap = build(CONFIG)
    shadows = [send(snap, "/api/x", worker=w).shadows for _ in range(3)]
    assert [s is not None for s in shadows] == [True, True, False]
    assert w.mirror.stats.mirror_rq_dropped == 1 and w.mirror.in_flight == 2  # type: ignore[attr-defined]


def test_mirror_percentage_is_drawn_per_request_and_per_policy() -> None:
    w = worker(max_in_flight=10**6)
    w.rng = random.Random(11)
    w.mirror.rng = w.rng  # type: ignore[attr-defined]
    snap = build(CONFIG)
    n = 4000
    v2 = v3 = 0
    for _ in range(n):
        ex = send(snap, "/half", worker=w)
        subsets = [s.cluster.subset for s in ex.shadows or ()]
        v2 += subsets.count("v2")
        v3 += subsets.count("v3")
    assert v3 == n  # no percentage: 100%
    assert abs(v2 / n - 0.25) <= 4.5 * math.sqrt(0.25 * 0.75 / n)
    assert send(snap, "/zero", worker=w).shadows is None  # 0%: never


def test_failures_are_counted_and_never_reach_the_main_request() -> None:
    w = worker()
    snap = build(CONFIG)
    ex = send(snap, "/nowhere", worker=w)  # unknown mirror subset
    assert ex.shadows is None and ex.cluster is not None and ex.conn.response == b""  # type: ignore[attr-defined]
    assert w.mirror.stats.mirror_rq_failed == 1  # type: ignore[attr-defined]
    ex = send(snap, "/api/x", worker=w)
    shadow = ex.shadows[0]
    shadow.endpoint.cancel_pending(shadow)
    shadow.on_upstream_connect_failed(shadow.endpoint, "connection failure")
    assert w.mirror.stats.mirror_rq_failed == 2 and w.mirror.in_flight == 0  # type: ignore[attr-defined]
    ex = send(snap, "/api/x", worker=w)
    conn = connect(ex.shadows[0])
    ex.shadows[0].on_upstream_reset(conn, "connection_termination")  # type: ignore[arg-type]
    assert w.mirror.stats.mirror_rq_failed == 3  # type: ignore[attr-defined]
    assert ex.conn.response == b"" and not ex.finished  # type: ignore[attr-defined]


def test_shadow_times_out() -> None:
    w = worker(default_timeout=30.0)
    ex = send(build(CONFIG), "/api/x", worker=w)
    shadow = ex.shadows[0]
    conn = connect(shadow)
    timers = [h for _, h in w.loop.scheduled if getattr(h.cb, "__self__", None) is shadow]
    assert len(timers) == 1 and timers[0].when() == 30.0
    timers[0].cb()
    assert shadow.finished and conn.closed
    assert w.mirror.stats.mirror_rq_failed == 1 and w.mirror.in_flight == 0  # type: ignore[attr-defined]


def test_client_gone_before_the_body_ended_abandons_the_shadow() -> None:
    w = worker()
    ex = post(w, {"content-length": "10"})
    shadow = ex.shadows[0]
    conn = connect(shadow)
    ex.on_request_body(b"12345")
    ex.on_downstream_closed()
    assert shadow.finished and conn.closed
    assert w.mirror.stats.mirror_rq_dropped == 1 and w.mirror.in_flight == 0  # type: ignore[attr-defined]


def test_routes_without_mirrors_do_nothing() -> None:
    w = worker()
    ex = send(build(CONFIG), "/other", worker=w)
    assert ex.shadows is None and w.mirror.stats.mirror_rq_sent == 0  # type: ignore[attr-defined]
