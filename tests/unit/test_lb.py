"""Load balancers and the DestinationRule settings that choose them."""

from __future__ import annotations

import math
import random
from collections import Counter
from typing import Any

import pytest

from pyproxy.config.model import (
    ConnectionPoolSettings,
    ConsistentHashLB,
    HTTPCookie,
    LoadBalancerSettings,
    OutlierDetection,
    PortTrafficPolicy,
    TCPSettings,
    TrafficPolicy,
)
from pyproxy.upstream.cluster import Cluster, ClusterEndpoint
from pyproxy.upstream.lb import LeastRequest, Random, RingHash, RoundRobin, make_balancer
from pyproxy.upstream.settings import ClusterSettings, cluster_settings, merge_policy

from .fakes import StubLoop
from .routing_util import build, request, send, service_entry


def endpoints(n: int, weights: list[int] | None = None) -> list[ClusterEndpoint]:
    cluster = Cluster("c", ClusterSettings(), None, StubLoop(), random.Random(0))  # type: ignore[arg-type]
    return [ClusterEndpoint(cluster, f"10.0.0.{i + 1}", 8080, weight=(weights[i] if weights else 1))
            for i in range(n)]


def within(share: float, p: float, n: int, sigmas: float = 4.5) -> bool:
    return abs(share - p) <= sigmas * math.sqrt(p * (1 - p) / n)


# -- LEAST_REQUEST ---------------------------------------------------------------


def test_least_request_prefers_the_idle_endpoint() -> None:
    eps = endpoints(2)
    eps[0].active_requests = 5  # busy
    lb = LeastRequest(eps, random.Random(1))
    n = 10_000
    picks = Counter(lb.pick(None).host for _ in range(n))  # type: ignore[union-attr]
    # Power of two choices: the busy one wins only when both draws hit it (1/4).
    assert within(picks["10.0.0.2"] / n, 0.75, n)


def test_least_request_never_picks_the_busiest_of_three_when_it_has_a_choice() -> None:
    eps = endpoints(3)
    eps[0].active_requests, eps[1].active_requests, eps[2].active_requests = 9, 1, 0
    lb = LeastRequest(eps, random.Random(2))
    n = 9000
    picks = Counter(lb.pick(None).host for _ in range(n))  # type: ignore[union-attr]
    # P(busiest) = P(both draws hit it) = 1/9; P(idlest) = 1 - (2/3)^2 = 5/9.
    assert within(picks["10.0.0.1"] / n, 1 / 9, n)
    assert within(picks["10.0.0.3"] / n, 5 / 9, n)


def test_least_request_with_equal_load_spreads_evenly() -> None:
    lb = LeastRequest(endpoints(4), random.Random(3))
    n = 10_000
    picks = Counter(lb.pick(None).host for _ in range(n))  # type: ignore[union-attr]
    assert all(within(c / n, 0.25, n) for c in picks.values()) and len(picks) == 4


def test_least_request_with_weights_uses_weight_over_active() -> None:
    eps = endpoints(2, weights=[3, 1])
    lb = LeastRequest(eps, random.Random(4))
    n = 10_000
    picks = Counter(lb.pick(None).host for _ in range(n))  # type: ignore[union-attr]
    assert within(picks["10.0.0.1"] / n, 0.75, n)
    eps[0].active_requests = 5  # effective weights 3/6 vs 1/1
    picks = Counter(lb.pick(None).host for _ in range(n))  # type: ignore[union-attr]
    assert within(picks["10.0.0.2"] / n, 2 / 3, n)


def test_retry_prefers_an_untried_endpoint() -> None:
    eps = endpoints(3)
    lb = LeastRequest(eps, random.Random(5))
    for _ in range(200):
        assert lb.pick(None, exclude=[eps[0], eps[1]]) is eps[2]
    assert lb.pick(None, exclude=list(eps)) in eps  # all tried: still an answer


# -- ROUND_ROBIN and RANDOM ---------------------------------------------------------


def test_round_robin_cycles_in_order() -> None:
    eps = endpoints(3)
    lb = RoundRobin(eps, random.Random(6))
    seq = [lb.pick(None).host for _ in range(9)]  # type: ignore[union-attr]
    start = seq[0]
    hosts = [e.host for e in eps]
    i = hosts.index(start)
    assert seq == [hosts[(i + k) % 3] for k in range(9)]


def test_round_robin_honours_endpoint_weights() -> None:
    lb = RoundRobin(endpoints(2, weights=[3, 1]), random.Random(7))
    picks = Counter(lb.pick(None).host for _ in range(400))  # type: ignore[union-attr]
    assert picks == {"10.0.0.1": 300, "10.0.0.2": 100}


def test_random_spreads_by_weight() -> None:
    lb = Random(endpoints(2, weights=[1, 4]), random.Random(8))
    n = 10_000
    picks = Counter(lb.pick(None).host for _ in range(n))  # type: ignore[union-attr]
    assert within(picks["10.0.0.2"] / n, 0.8, n)


# -- consistent hash ----------------------------------------------------------------


def header_ring(eps: list[ClusterEndpoint], seed: int = 0, size: int = 1024) -> RingHash:
    return RingHash(eps, random.Random(seed), lambda ex: ex, size)


def test_same_key_same_endpoint_every_time() -> None:
    lb = header_ring(endpoints(5))
    for key in (b"alice", b"bob", b"carol", b"dave"):
        first = lb.pick(key)
        assert all(lb.pick(key) is first for _ in range(50))
    spread = {lb.pick(f"user-{i}".encode()).host for i in range(200)}  # type: ignore[union-attr]
    assert len(spread) == 5  # keys spread over every endpoint


def test_mapping_survives_a_rebuild_with_the_same_endpoints() -> None:
    a = header_ring(endpoints(4), seed=1)
    b = header_ring(endpoints(4), seed=999)  # different RNG, new objects
    keys = [f"k{i}".encode() for i in range(500)]
    assert [a.pick(k).address for k in keys] == [b.pick(k).address for k in keys]  # type: ignore[union-attr]


def test_removing_an_endpoint_keeps_most_other_keys_in_place() -> None:
    # As in Envoy, each endpoint's share of ring points depends on the number
    # of endpoints, so a removal also adds points for the others and moves
    # some of their keys; most stay.
    eps = endpoints(5)
    full = header_ring(eps)
    fewer = header_ring(eps[:4])
    keys = [f"k{i}".encode() for i in range(2000)]
    kept = [k for k in keys if full.pick(k) is not eps[4]]
    stayed = sum(fewer.pick(k) is full.pick(k) for k in kept)
    assert stayed / len(kept) > 0.7
    assert all(fewer.pick(k) is not eps[4] for k in keys)


def test_no_key_means_a_random_endpoint() -> None:
    lb = RingHash(endpoints(3), random.Random(3), lambda ex: None)
    assert len({lb.pick(object()).host for _ in range(300)}) == 3  # type: ignore[union-attr]


def test_retry_walks_the_ring_to_the_next_endpoint() -> None:
    eps = endpoints(3)
    lb = header_ring(eps)
    first = lb.pick(b"key")
    second = lb.pick(b"key", exclude=[first])
    assert second is not first
    assert all(lb.pick(b"key", exclude=[first]) is second for _ in range(20))


def test_huge_minimum_ring_size_is_capped() -> None:
    lb = header_ring(endpoints(2), size=10**12)
    assert len(lb.ring) <= 65536


@pytest.mark.parametrize("ch, make_request, key", [
    (ConsistentHashLB(http_header_name="x-user"), lambda: request("/", {"x-user": "u1"}), b"u1"),
    (ConsistentHashLB(http_query_parameter_name="user"), lambda: request("/?user=u2&user=u3"), b"u2"),
    (ConsistentHashLB(http_cookie=HTTPCookie("sid")), lambda: request("/", {"cookie": 'a=1; sid="u4"'}), b"u4"),
    (ConsistentHashLB(use_source_ip=True), lambda: request("/"), b"127.0.0.1"),
])
def test_hash_keys(ch: ConsistentHashLB, make_request: Any, key: bytes) -> None:
    lb = make_balancer(ClusterSettings(lb_policy="CONSISTENT_HASH", consistent_hash=ch), [], random.Random(0))
    assert isinstance(lb, RingHash)
    assert lb.key_fn(make_request()) == key


def test_cookie_is_generated_only_when_the_policy_has_a_ttl() -> None:
    no_ttl = make_balancer(ClusterSettings(lb_policy="CONSISTENT_HASH",
                                           consistent_hash=ConsistentHashLB(http_cookie=HTTPCookie("sid"))),
                           [], random.Random(0))
    ex = request("/")
    assert no_ttl.key_fn(ex) is None and ex.hash_cookie is None  # type: ignore[attr-defined]
    ttl = make_balancer(ClusterSettings(lb_policy="CONSISTENT_HASH",
                                        consistent_hash=ConsistentHashLB(http_cookie=HTTPCookie("sid", ttl=0.0))),
                        [], random.Random(0))
    ex = request("/")
    key = ttl.key_fn(ex)  # type: ignore[attr-defined]
    assert ex.hash_cookie is not None and ex.hash_cookie[0] == "sid"
    assert key == ex.hash_cookie[1].encode() and len(key) == 16
    assert ttl.key_fn(ex) == key  # the same value for a retry of this request  # type: ignore[attr-defined]


# -- settings: defaults, merge, port-level --------------------------------------------------

RR = LoadBalancerSettings(simple="ROUND_ROBIN")
RAND = LoadBalancerSettings(simple="RANDOM")
POOL = ConnectionPoolSettings(tcp=TCPSettings(max_connections=7))
OD = OutlierDetection(consecutive_5xx_errors=3)


def test_unset_load_balancer_is_least_request() -> None:
    assert cluster_settings(None, None, 80).lb_policy == "LEAST_REQUEST"
    assert isinstance(make_balancer(cluster_settings(None, None, 80), [], random.Random(0)), LeastRequest)
    settings = cluster_settings(TrafficPolicy(load_balancer=LoadBalancerSettings(simple="UNSPECIFIED")), None, 80)
    assert settings.lb_policy == "LEAST_REQUEST"


def test_subset_policy_replaces_whole_blocks() -> None:
    top = TrafficPolicy(load_balancer=RR, connection_pool=POOL)
    assert merge_policy(top, TrafficPolicy(load_balancer=RAND), 80) == (RAND, POOL, None)
    assert merge_policy(top, TrafficPolicy(), 80) == (RR, POOL, None)


def test_port_level_settings_replace_their_policy_without_inheriting() -> None:
    top = TrafficPolicy(load_balancer=RR, connection_pool=POOL,
                        port_level_settings=(PortTrafficPolicy(port=9080, outlier_detection=OD),))
    # Port 9080: only the port-level block; lb and pool fall back to defaults.
    assert merge_policy(top, None, 9080) == (None, None, OD)
    assert merge_policy(top, None, 9081) == (RR, POOL, None)
    s = cluster_settings(top, None, 9080)
    assert s.lb_policy == "LEAST_REQUEST" and s.outlier is not None and s.outlier.consecutive_5xx == 3


def test_subset_port_level_settings_replace_all_three_blocks() -> None:
    top = TrafficPolicy(load_balancer=RR, connection_pool=POOL)
    subset = TrafficPolicy(load_balancer=RAND,
                           port_level_settings=(PortTrafficPolicy(port=9080, load_balancer=RR),))
    assert merge_policy(top, subset, 9080) == (RR, None, None)
    assert merge_policy(top, subset, 9081) == (RAND, POOL, None)


CH_CONFIG = service_entry("reviews", [(f"10.0.0.{i}", 9080, {"version": "v1"}) for i in range(1, 5)]) + """
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  trafficPolicy:
    loadBalancer:
      consistentHash: {httpHeaderName: x-user, ringHash: {minimumRingSize: 2048}}
  subsets:
  - name: v1
    labels: {version: v1}
    trafficPolicy:
      loadBalancer: {consistentHash: {httpCookie: {name: sid, path: /, ttl: 60s}, maglev: {tableSize: 65537}}}
"""


def test_consistent_hash_is_stable_across_an_unrelated_reload() -> None:
    users = [f"user-{i}" for i in range(100)]

    def endpoints_for(snap: Any) -> list[str]:
        return [send(snap, "/", {"x-user": u}).endpoint.address for u in users]

    first = build(CH_CONFIG)
    mapping = endpoints_for(first)
    assert len(set(mapping)) == 4
    assert endpoints_for(first) == mapping  # same key, same endpoint, request after request
    unrelated = CH_CONFIG + "\n---\n" + service_entry("other", [("10.9.9.9", 80, {})])
    reloaded = build(unrelated, previous=first)
    cluster = "outbound|9080||reviews.default.svc.cluster.local"
    assert reloaded.clusters[cluster] is first.clusters[cluster]  # carried over, ring and all
    assert endpoints_for(reloaded) == mapping
    fresh = build(unrelated, rng=random.Random(12345))  # rebuilt from scratch: same ring
    assert fresh.clusters[cluster] is not first.clusters[cluster]
    assert endpoints_for(fresh) == mapping


def test_subset_consistent_hash_cookie_and_maglev_accepted() -> None:
    snap = build(CH_CONFIG)
    cluster = snap.clusters["outbound|9080|v1|reviews.default.svc.cluster.local"]
    assert isinstance(cluster.lb, RingHash)
    assert cluster.settings.consistent_hash is not None
    assert cluster.settings.consistent_hash.http_cookie == HTTPCookie("sid", "/", 60.0)
    top = snap.clusters["outbound|9080||reviews.default.svc.cluster.local"]
    assert isinstance(top.lb, RingHash) and top.lb.min_ring_size == 2048


COOKIE_CONFIG = service_entry("reviews", [("10.0.0.1", 9080, {}), ("10.0.0.2", 9080, {})]) + """
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  trafficPolicy:
    loadBalancer:
      consistentHash:
        httpCookie:
          name: sticky
          path: /app
          ttl: 90s
          attributes: [{name: SameSite, value: Lax}, {name: Secure}]
"""


def test_generated_cookie_uses_envoys_set_cookie_format() -> None:
    snap = build(COOKIE_CONFIG)
    ex = send(snap, "/")
    assert ex.hash_cookie is not None
    value = ex.hash_cookie[1]
    assert ex._hash_cookie_header() == (
        f'set-cookie: sticky="{value}"; Max-Age=90; Path=/app; SameSite=Lax; Secure; HttpOnly\r\n'.encode())
    assert send(snap, "/").hash_cookie == ("sticky", value)  # same connection addresses, same value
    # Sent back (quoted, as browsers do), the cookie is the key: same endpoint, nothing generated.
    for _ in range(5):
        again = send(snap, "/", {"cookie": f'other=1; sticky="{value}"'}, peer=("127.0.0.2", 50000))
        assert again.hash_cookie is None and again.endpoint is ex.endpoint


def test_session_cookie_has_no_max_age() -> None:
    ex = send(build(COOKIE_CONFIG.replace("ttl: 90s", "ttl: 0s")), "/")
    assert b"Max-Age" not in ex._hash_cookie_header()
