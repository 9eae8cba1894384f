"""A cluster replaced by a reload keeps serving the requests already queued
on it (they pinned the old snapshot): a connection that completes after the
swap is handed to them, and closed once they are done."""

from __future__ import annotations

import random

from pyproxy.upstream.cluster import Cluster, ClusterEndpoint
from pyproxy.upstream.settings import ClusterSettings


class _Loop:
    def time(self) -> float:
        return 100.0


class _Stream:
    def __init__(self) -> None:
        self.connected = None
        self.failed = None

    def on_upstream_connected(self, conn: object) -> None:
        self.connected = conn

    def on_upstream_connect_failed(self, ep: object, reason: str) -> None:
        self.failed = reason


class _Conn:
    def __init__(self, ep: ClusterEndpoint) -> None:
        self.endpoint = ep
        self.closed = False
        self.reusable = True
        self.requests = 1
        self.stream = None
        self.counted = True
        self.idle_since = 0.0
        self.read_paused = False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.endpoint.on_connection_closed(self)


def _endpoint() -> tuple[Cluster, ClusterEndpoint]:
    cluster = Cluster("outbound|80||svc", ClusterSettings(), None, _Loop(), random.Random(1))  # type: ignore[arg-type]
    ep = ClusterEndpoint(cluster, "127.0.0.1", 1)
    cluster.endpoints = [ep]
    return cluster, ep


def test_connection_completing_after_drain_serves_the_queued_request() -> None:
    cluster, ep = _endpoint()
    first, second = _Stream(), _Stream()
    for s in (first, second):
        ep.pending.append(s)
        cluster.stats.upstream_rq_pending_active += 1
    ep.connecting = 1
    ep.connections = 1
    cluster.stats.upstream_cx_active = 1
    cluster.draining = True  # the reload swapped the snapshot while connecting
    conn = _Conn(ep)
    ep._connect_done(conn)  # type: ignore[arg-type]
    assert first.connected is conn and first.failed is None
    # Released while another request still waits: handed over, not closed.
    ep.release(conn, True)  # type: ignore[arg-type]
    assert second.connected is conn and not conn.closed
    # Nobody waits any more: a draining cluster closes it.
    ep.release(conn, True)  # type: ignore[arg-type]
    assert conn.closed and not ep.idle
    assert cluster.stats.upstream_rq_pending_active == 0


def test_draining_cluster_closes_a_connection_nobody_waits_for() -> None:
    cluster, ep = _endpoint()
    ep.connecting = 1
    ep.connections = 1
    cluster.stats.upstream_cx_active = 1
    cluster.draining = True
    conn = _Conn(ep)
    ep._connect_done(conn)  # type: ignore[arg-type]
    assert conn.closed and not ep.idle
