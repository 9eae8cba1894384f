"""Circuit breaking: connection-pool limits and their counters (fake loop,
fake transports, no sockets)."""

from __future__ import annotations

from pyproxy.config.loader import load_text
from pyproxy.config.model import DestinationRule
from pyproxy.upstream.cluster import Cluster
from pyproxy.upstream.settings import UNLIMITED, cluster_settings
from tests.unit.fakes import Mesh, service

NO_RETRY_VS = """apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: svc}
spec:
  hosts: [svc]
  http:
  - route: [{destination: {host: svc}}]
    retries: {attempts: 0}
"""


def dr(pool: str) -> str:
    return ("apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: svc}\n"
            f"spec:\n  host: svc\n  trafficPolicy:\n    connectionPool: {pool}\n")


def mesh(pool: str, ports: tuple[int, ...] = (1001,)) -> Mesh:
    return Mesh("---\n".join([service("svc", list(ports)), NO_RETRY_VS, dr(pool)]))


def gauges_idle(cluster: Cluster) -> None:
    s = cluster.stats
    assert (s.upstream_rq_active, s.upstream_rq_pending_active) == (0, 0)
    assert all(ep.active_requests == 0 and not ep.pending for ep in cluster.endpoints)
    assert cluster.retries_active == 0


def test_unset_limits_are_istio_unlimited() -> None:
    s = cluster_settings(None, None, 9080)
    assert (s.max_connections, s.max_pending, s.max_requests, s.max_retries) == (UNLIMITED,) * 4
    assert s.max_requests_per_connection == 0
    assert (s.connect_timeout, s.idle_timeout) == (10.0, 3600.0)


def test_zero_limits_mean_unset_and_tcp_idle_timeout_is_the_fallback() -> None:
    loaded = load_text(dr("{tcp: {maxConnections: 0, idleTimeout: 5s, connectTimeout: 250ms}, "
                          "http: {http1MaxPendingRequests: 0, maxRetries: 0}}"))
    rule = loaded.resources[0]
    assert isinstance(rule, DestinationRule)
    s = cluster_settings(rule.traffic_policy, None, 9080)
    assert (s.max_connections, s.max_pending, s.max_retries) == (UNLIMITED,) * 3
    assert (s.idle_timeout, s.connect_timeout) == (5.0, 0.25)


def test_pending_queue_overflow_fails_at_once_with_uo_and_counters() -> None:
    m = mesh("{tcp: {maxConnections: 1}, http: {http1MaxPendingRequests: 1}}")
    cluster = m.cluster("svc")
    s = cluster.stats
    _ex1, down1 = m.request("svc")  # queued while its connection opens
    assert (s.upstream_rq_pending_active, s.upstream_cx_total) == (1, 1)
    ex2, down2 = m.request("svc")  # the queue (1) is full
    assert down2.status == 503
    assert down2.response_header("x-envoy-overloaded") == "true"
    assert b"overflow" in down2.body and ex2.flags == ["UO"]
    assert s.upstream_rq_pending_overflow == 1
    up = m.loop.connect()
    assert (s.upstream_rq_pending_active, s.upstream_rq_active) == (0, 1)
    # The connection is busy and the limit reached: the next request waits.
    ex3, down3 = m.request("svc")
    assert down3.status is None and s.upstream_rq_pending_active == 1
    assert s.upstream_cx_overflow == 1 and not m.loop.connects
    _ex4, down4 = m.request("svc")
    assert down4.status == 503 and s.upstream_rq_pending_overflow == 2
    up.respond(200)
    assert down1.status == 200
    # Keep-alive: the freed connection goes straight to the waiting request.
    assert ex3.upconn is up.conn
    up.respond(200)
    assert down3.status == 200
    assert (s.upstream_cx_total, s.upstream_cx_active) == (1, 1)
    # Envoy counts a request in upstream_rq_total once a connection takes it;
    # upstream_rq_completed counts every request the router answered for the
    # cluster, its two UO replies included (as Envoy 1.40 does).
    assert (s.upstream_rq_total, s.upstream_rq_pending_total, s.upstream_rq_completed) == (2, 2, 4)
    gauges_idle(cluster)


def test_one_connection_per_endpoint_is_always_allowed() -> None:
    # maxConnections is cluster-wide; Envoy still opens one connection to an
    # endpoint that has none so its queued requests cannot be stranded.
    m = mesh("{tcp: {maxConnections: 1}}", ports=(1001, 1002))
    cluster = m.cluster("svc")
    _ex1, _ = m.request("svc")
    _ex2, _ = m.request("svc")
    assert {ep for ep, _ in m.loop.connects} == set(cluster.endpoints)
    assert cluster.stats.upstream_cx_overflow == 1
    assert cluster.stats.upstream_cx_active == 2


def test_max_requests_per_connection_one_means_no_keepalive() -> None:
    m = mesh("{tcp: {maxConnections: 1}, http: {maxRequestsPerConnection: 1}}")
    s = m.cluster("svc").stats
    _ex1, down1 = m.request("svc")
    up1 = m.loop.connect()
    ex2, down2 = m.request("svc")
    assert ex2.waiting_pending and not m.loop.connects
    up1.respond(200)
    assert down1.status == 200 and up1.transport.closing
    assert s.upstream_cx_max_requests == 1
    m.loop.run_ready()  # the close completes; a replacement opens for the queued request
    up2 = m.loop.connect()
    assert ex2.upconn is up2.conn
    up2.respond(200)
    assert down2.status == 200
    assert s.upstream_cx_total == 2
    gauges_idle(m.cluster("svc"))


TASK_POOL = "{tcp: {maxConnections: 1}, http: {http1MaxPendingRequests: 1, maxRequestsPerConnection: 1}}"


def test_istio_task_queued_request_gets_the_replacement_connect_within_the_release() -> None:
    """Istio's circuit-breaking task, Envoy's pool accounting step by step
    (ConnPoolImplBase: a stream is pending from newStream until the
    Connected event attaches it; a DRAINING client closes when its last
    stream ends and, in that same close event, tryCreateNewConnections
    opens a replacement for the pending streams)."""
    m = mesh(TASK_POOL)
    s = m.cluster("svc").stats
    _ex1, down1 = m.request("svc")
    up1 = m.loop.connect()
    ex2, down2 = m.request("svc")
    # maxConnections reached by a busy connection: queued, no connect.
    assert ex2.waiting_pending and not m.loop.connects
    assert (s.upstream_rq_pending_active, s.upstream_cx_overflow) == (1, 1)
    # The response ends: within that read (no loop pass in between) the
    # spent connection is closed, its slot freed and the replacement connect
    # started, before the response is flushed to the client.
    up1.respond(200, settle=False)
    assert down1.status == 200 and up1.transport.closing
    assert len(m.loop.connects) == 1
    assert (s.upstream_cx_total, s.upstream_cx_active, s.upstream_cx_max_requests) == (2, 1, 1)
    # Pending until its connection is up: a request arriving meanwhile
    # overflows (the only 503 of this sequence).
    assert ex2.waiting_pending and s.upstream_rq_pending_active == 1
    _ex3, down3 = m.request("svc")
    assert down3.status == 503 and s.upstream_rq_pending_overflow == 1
    # Attached in the call that reports the connection up, and written.
    up2 = m.loop.connect(settle=False)
    assert ex2.upconn is up2.conn and up2.sent.startswith(b"GET / HTTP/1.1")
    assert (s.upstream_rq_pending_active, s.upstream_rq_active) == (0, 1)
    # Once attached, the next request is queued, not refused (maxConnections
    # is reached, so it waits for the next replacement).
    ex4, down4 = m.request("svc")
    assert ex4.waiting_pending and down4.status is None
    assert s.upstream_rq_pending_overflow == 1 and not m.loop.connects
    up2.respond(200, settle=False)
    assert down2.status == 200 and len(m.loop.connects) == 1
    up3 = m.loop.connect(settle=False)
    assert ex4.upconn is up3.conn
    up3.respond(200)
    assert down4.status == 200
    assert (s.upstream_cx_total, s.upstream_rq_pending_overflow, s.upstream_rq_pending_total) == (3, 1, 3)
    gauges_idle(m.cluster("svc"))


def test_max_connections_counts_only_connecting_and_open_connections() -> None:
    """A connection the upstream closed frees its maxConnections slot in the
    event that reports the close, which also opens one for the queued
    request; a failed connect frees its slot too."""
    m = mesh("{tcp: {maxConnections: 1}, http: {http1MaxPendingRequests: 1}}")
    s = m.cluster("svc").stats
    ex1, down1 = m.request("svc")
    up1 = m.loop.connect()
    ex2, _down2 = m.request("svc")
    assert ex2.waiting_pending and not m.loop.connects and s.upstream_cx_active == 1
    up1.reset(settle=False)
    assert down1.status == 503 and ex1.flags == ["UC"]
    assert (s.upstream_cx_active, s.upstream_cx_total) == (1, 2) and len(m.loop.connects) == 1
    assert ex2.waiting_pending
    m.loop.refuse()
    assert s.upstream_cx_active == 0 and s.upstream_cx_connect_fail == 1
    gauges_idle(m.cluster("svc"))


def test_http2_max_requests_bounds_concurrent_requests_for_http1_too() -> None:
    m = mesh("{http: {http2MaxRequests: 1}}")
    s = m.cluster("svc").stats
    _ex1, _down1 = m.request("svc")
    up = m.loop.connect()
    ex2, down2 = m.request("svc")
    assert down2.status == 503 and ex2.flags == ["UO"]
    assert down2.response_header("x-envoy-overloaded") == "true"
    # Envoy 1.40 counts a max_requests overflow as upstream_rq_active_overflow.
    assert (s.upstream_rq_active_overflow, s.upstream_rq_pending_overflow) == (1, 0)
    up.respond(200)
    ex3, down3 = m.request("svc")
    m.loop.upstream_of(ex3).respond(200)
    assert down3.status == 200


def test_client_gone_while_queued_releases_the_pending_slot() -> None:
    m = mesh("{tcp: {maxConnections: 1}, http: {http1MaxPendingRequests: 1}}")
    cluster = m.cluster("svc")
    s = cluster.stats
    ex, down = m.request("svc")
    assert s.upstream_rq_pending_active == 1
    ex.on_downstream_closed()
    assert s.upstream_rq_pending_active == 0
    assert s.upstream_rq_cancelled == 1
    assert ex.flags == ["DC"]
    # The connection opened for it arrives later and simply goes idle.
    up = m.loop.connect()
    assert list(cluster.endpoints[0].idle) == [up.conn]
    assert down.out == b""
    gauges_idle(cluster)
    # The slot is really free: a new request gets the idle connection.
    ex2, _down2 = m.request("svc")
    assert ex2.upconn is up.conn


def test_client_gone_mid_request_closes_the_upstream_connection() -> None:
    m = mesh("{tcp: {maxConnections: 1}}")
    cluster = m.cluster("svc")
    ex, _down = m.request("svc")
    up = m.loop.connect()
    ex.on_downstream_closed()
    assert up.transport.closing, "a connection with an unread response is never reused"
    m.loop.run_ready()
    assert cluster.stats.upstream_cx_active == 0
    gauges_idle(cluster)


def test_route_timeout_while_queued_releases_the_pending_slot() -> None:
    m = Mesh("---\n".join([service("svc", [1001]), dr("{tcp: {maxConnections: 1}}"), """apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: svc}
spec:
  hosts: [svc]
  http:
  - route: [{destination: {host: svc}}]
    timeout: 1s
"""]))
    cluster = m.cluster("svc")
    _ex1, down1 = m.request("svc")
    m.loop.connect()  # ex1 holds the only connection and never gets an answer
    _ex2, down2 = m.request("svc")
    assert cluster.stats.upstream_rq_pending_active == 1
    m.loop.advance(1.0)
    assert down1.status == 504 and down2.status == 504
    assert cluster.stats.upstream_rq_timeout == 2
    assert cluster.stats.upstream_rq_cancelled == 1
    m.loop.run_ready()
    gauges_idle(cluster)


def test_connect_failure_fails_every_request_queued_on_that_endpoint() -> None:
    m = mesh("{tcp: {maxConnections: 1}}")
    s = m.cluster("svc").stats
    exchanges = [m.request("svc") for _ in range(3)]
    assert s.upstream_rq_pending_active == 3 and len(m.loop.connects) == 1
    m.loop.refuse()
    for ex, down in exchanges:
        assert down.status == 503 and ex.flags == ["UF"]
        assert b"connection failure" in down.body
    assert (s.upstream_cx_connect_fail, s.upstream_cx_active, s.upstream_rq_pending_active) == (1, 0, 0)
    gauges_idle(m.cluster("svc"))


def test_idle_connection_past_idle_timeout_is_not_reused() -> None:
    m = mesh("{http: {idleTimeout: 2s}}")
    s = m.cluster("svc").stats
    _ex, _down = m.request("svc")
    up = m.loop.connect()
    up.respond(200)
    m.loop.advance(2.5)
    ex2, _ = m.request("svc")
    assert up.transport.closing and s.upstream_cx_idle_timeout == 1
    assert ex2.waiting_pending and m.loop.connects


def test_idle_connection_closes_when_idle_timeout_expires() -> None:
    """Envoy closes an idle connection at its idle timeout, not at the next
    housekeeping sweep: the endpoint's idle timer fires on time."""
    m = mesh("{http: {idleTimeout: 2s}}")
    s = m.cluster("svc").stats
    _ex, _down = m.request("svc")
    up = m.loop.connect()
    up.respond(200)
    m.loop.advance(1.9)
    assert not up.transport.closing and s.upstream_cx_idle_timeout == 0
    # Reused at 1.9 s: its idle time starts again when it is parked again.
    ex2, _ = m.request("svc")
    assert ex2.upconn is up.conn
    up.respond(200)
    m.loop.advance(1.9)
    assert not up.transport.closing
    m.loop.advance(0.2)
    assert up.transport.closing and s.upstream_cx_idle_timeout == 1


def test_connection_older_than_max_connection_duration_is_not_reused() -> None:
    m = mesh("{tcp: {maxConnectionDuration: 10s}}")
    s = m.cluster("svc").stats
    _ex, _ = m.request("svc")
    up = m.loop.connect()
    up.respond(200)
    m.loop.advance(5.0)
    ex2, _ = m.request("svc")
    assert ex2.upconn is up.conn, "young enough: reused"
    m.loop.advance(6.0)
    up.respond(200)  # released at 11 s of age: closed instead of pooled
    assert up.transport.closing and s.upstream_cx_max_duration_reached == 1
    ex3, _ = m.request("svc")
    assert ex3.waiting_pending and m.loop.connects
