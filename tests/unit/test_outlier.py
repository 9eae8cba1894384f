"""Outlier detection: ejection timing with a fake clock (no sockets, no loop)."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest

from pyproxy.config.model import OutlierDetection
from pyproxy.upstream.cluster import Cluster, ClusterEndpoint
from pyproxy.upstream.lb import RoundRobin
from pyproxy.upstream.outlier import NULL_OUTLIER, OutlierDetector, can_ever_eject
from pyproxy.upstream.settings import ClusterSettings, outlier_settings
from tests.unit.fakes import Mesh, service


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Harness:
    """A cluster of ``n`` endpoints with a detector on a fake clock; ejection
    decisions queued with call_soon run when the test says so."""

    def __init__(self, n: int, **fields: Any) -> None:
        self.clock = Clock()
        self.soon: list[tuple[Callable[..., Any], tuple]] = []
        settings = outlier_settings(OutlierDetection(**fields))
        assert settings is not None
        self.cluster = Cluster("c", ClusterSettings(outlier=settings), None, None, random.Random(1))  # type: ignore[arg-type]
        self.eps = [ClusterEndpoint(self.cluster, "10.0.0.%d" % i, 80) for i in range(n)]
        self.cluster.lb = RoundRobin([], random.Random(1))
        self.cluster.set_endpoints(self.eps)
        self.od = OutlierDetector(self.cluster, settings, self.clock, lambda f, *a: self.soon.append((f, a)), None)
        self.cluster.outlier = self.od

    def run_soon(self) -> None:
        while self.soon:
            f, a = self.soon.pop(0)
            f(*a)

    def fail(self, ep: ClusterEndpoint, times: int, status: int = 503) -> None:
        for _ in range(times):
            self.od.on_response(ep, status)
        self.run_soon()

    def tick_at(self, t: float) -> None:
        self.clock.now = t
        self.od.tick()

    @property
    def balanced(self) -> list[ClusterEndpoint]:
        return list(self.cluster.lb.hosts)

    @property
    def stats(self) -> Any:
        return self.cluster.stats


def test_defaults_follow_istio_and_envoy() -> None:
    s = outlier_settings(OutlierDetection())
    assert s is not None
    assert (s.consecutive_5xx, s.consecutive_gateway, s.consecutive_local_origin) == (5, 0, 5)
    assert (s.interval, s.base_ejection_time, s.max_ejection_percent, s.min_health_percent) == (10.0, 30.0, 10, 0)
    assert outlier_settings(None) is None
    # Istio cannot tell 0 from unset for maxEjectionPercent: 0 gets Envoy's 10%.
    assert outlier_settings(OutlierDetection(max_ejection_percent=0)).max_ejection_percent == 10  # type: ignore[union-attr]


def test_no_outlier_block_means_the_null_detector() -> None:
    m = Mesh(service("svc", [1001]))
    assert m.cluster("svc").outlier is NULL_OUTLIER


def test_ejected_at_the_threshold_immediately_not_at_the_next_interval() -> None:
    h = Harness(2, consecutive_5xx_errors=3, max_ejection_percent=50)
    a, b = h.eps
    h.fail(a, 2)
    assert not a.ejected
    h.od.on_response(a, 500)
    assert not a.ejected, "the request path only records"
    h.run_soon()
    assert a.ejected and h.balanced == [b]
    assert (h.stats.outlier_detection_ejections_active, h.stats.outlier_detection_ejections_total) == (1, 1)
    assert h.stats.outlier_detection_ejections_enforced_consecutive_5xx == 1


def test_a_success_resets_the_consecutive_count() -> None:
    h = Harness(2, consecutive_5xx_errors=3, max_ejection_percent=50)
    a = h.eps[0]
    for status in (500, 502, 200, 503, 504, 404, 500, 500):
        h.od.on_response(a, status)
    h.run_soon()
    assert not a.ejected


def test_gateway_errors_count_only_502_503_504() -> None:
    h = Harness(2, consecutive_gateway_errors=3, consecutive_5xx_errors=0, max_ejection_percent=50)
    a, b = h.eps
    for status in (502, 503, 500, 504, 503):  # the 500 breaks the run
        h.od.on_response(a, status)
    h.run_soon()
    assert not a.ejected
    h.fail(a, 1, 502)
    assert a.ejected
    assert h.stats.outlier_detection_ejections_enforced_consecutive_gateway_failure == 1
    h.fail(b, 10, 500)
    assert not b.ejected, "consecutive5xxErrors: 0 switched 5xx-based ejection off"


def test_deprecated_consecutive_errors_is_ignored_envoy_default_applies() -> None:
    """istiod ignores consecutiveErrors since 1.7: the block still turns
    outlier detection on, with Envoy's default of 5 consecutive 5xx."""
    m = Mesh("---\n".join([service("svc", [1001, 1002]), """apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata: {name: svc}
spec:
  host: svc
  trafficPolicy: {outlierDetection: {consecutiveErrors: 2, maxEjectionPercent: 50}}
"""]))
    cluster = m.cluster("svc")
    a, b = cluster.endpoints
    for _ in range(4):
        cluster.outlier.on_response(b, 503)
    m.loop.run_ready()
    assert not b.ejected, "2 gateway errors no longer eject"
    for _ in range(5):
        cluster.outlier.on_response(a, 500)
    m.loop.run_ready()
    assert a.ejected


def test_local_origin_failures_count_as_5xx_unless_split() -> None:
    h = Harness(2, consecutive_5xx_errors=2, max_ejection_percent=50)
    a = h.eps[0]
    h.od.on_local_failure(a)
    h.od.on_local_failure(a, timeout=True)
    h.run_soon()
    assert a.ejected


def test_split_local_origin_errors_have_their_own_counter() -> None:
    h = Harness(2, consecutive_5xx_errors=2, split_external_local_origin_errors=True,
                consecutive_local_origin_failures=3, max_ejection_percent=50)
    a, b = h.eps
    for _ in range(2):
        h.od.on_local_failure(a)
    h.od.on_local_success(a)  # a connect succeeded: the local-origin run is broken
    for _ in range(2):
        h.od.on_local_failure(a)
    h.run_soon()
    assert not a.ejected and a.consecutive_5xx == 0
    h.od.on_local_failure(a)
    h.run_soon()
    assert a.ejected
    assert h.stats.outlier_detection_ejections_enforced_consecutive_local_origin_failure == 1
    h.fail(b, 2, 500)
    assert b.ejected is False, "max 50% of 2: one ejection only"
    assert h.stats.outlier_detection_ejections_overflow == 1


def test_ejection_time_grows_with_each_ejection_and_returns_on_the_interval_timer() -> None:
    h = Harness(2, consecutive_5xx_errors=1, interval=1.0, base_ejection_time=10.0, max_ejection_percent=50)
    a = h.eps[0]
    h.fail(a, 1)
    assert a.ejected and a.ejected_until == pytest.approx(110.0)
    h.tick_at(109.9)
    assert a.ejected
    h.tick_at(110.0)
    assert not a.ejected and h.stats.outlier_detection_ejections_active == 0
    assert a in h.balanced
    h.fail(a, 1)  # ejected again at once: twice the time
    assert a.ejected_until - h.clock.now == pytest.approx(20.0)
    h.tick_at(129.0)
    assert a.ejected
    h.tick_at(130.0)
    assert not a.ejected
    h.fail(a, 1)
    assert a.ejected_until - h.clock.now == pytest.approx(30.0)
    assert h.stats.outlier_detection_ejections_total == 3


def test_multiplier_decays_one_step_per_interval_once_back() -> None:
    h = Harness(2, consecutive_5xx_errors=1, interval=1.0, base_ejection_time=10.0, max_ejection_percent=50)
    a = h.eps[0]
    for t in (110.0, 130.0):  # ejected twice (10 s, then 20 s)
        h.fail(a, 1)
        h.tick_at(t)
    assert a.ejection_count == 2 and not a.ejected
    h.tick_at(130.5)
    assert a.ejection_count == 2, "not back for a whole interval yet"
    h.tick_at(131.0)
    assert a.ejection_count == 1
    h.tick_at(132.0)
    assert a.ejection_count == 0
    h.tick_at(140.0)
    assert a.ejection_count == 0
    h.fail(a, 1)
    assert a.ejected_until - h.clock.now == pytest.approx(10.0), "fully decayed: back to the base time"


@pytest.mark.parametrize(
    ("base", "expected", "multiplier"),
    [(100.0, [100, 200, 300, 300, 300, 300], 4), (400.0, [400, 400, 400], 2)],
)
def test_ejection_time_is_capped_at_300s_or_the_base_time(base: float, expected: list[float],
                                                           multiplier: int) -> None:
    h = Harness(2, consecutive_5xx_errors=1, interval=1.0, base_ejection_time=base, max_ejection_percent=50)
    a = h.eps[0]
    durations = []
    for _ in expected:
        h.fail(a, 1)
        durations.append(a.ejected_until - h.clock.now)
        h.tick_at(a.ejected_until)  # back, and immediately failing again
    assert durations == pytest.approx(expected)
    # Envoy stops raising the multiplier once base x multiplier >= 300 s + base,
    # so a host that recovers decays back to the base time in that many intervals.
    assert a.ejection_count == multiplier


def test_max_ejection_percent_is_strict() -> None:
    h = Harness(3, consecutive_5xx_errors=1)  # default 10%: 1 of 3 is 33%
    h.fail(h.eps[0], 1)
    assert not h.eps[0].ejected
    assert h.stats.outlier_detection_ejections_overflow == 1
    assert not can_ever_eject(h.od.settings, 3)
    h = Harness(3, consecutive_5xx_errors=1, max_ejection_percent=34)
    for ep in h.eps:
        h.fail(ep, 1)
    assert [ep.ejected for ep in h.eps] == [True, False, False]
    assert h.stats.outlier_detection_ejections_overflow == 2


def test_load_warns_when_max_ejection_percent_can_never_eject() -> None:
    m = Mesh("---\n".join([service("svc", [1001, 1002, 1003]), """apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: svc}
spec:
  host: svc
  trafficPolicy: {outlierDetection: {consecutive5xxErrors: 1}}
"""]))
    assert any("maxEjectionPercent 10%" in w and "never eject" in w for w in m.snapshot.warnings)


def test_every_endpoint_ejected_means_no_healthy_upstream_without_panic() -> None:
    h = Harness(2, consecutive_5xx_errors=1, max_ejection_percent=100)
    for ep in h.eps:
        h.fail(ep, 1)
    assert h.balanced == [] and h.cluster.healthy == []


def test_min_health_percent_is_the_panic_threshold() -> None:
    h = Harness(4, consecutive_5xx_errors=1, max_ejection_percent=100, min_health_percent=50)
    h.fail(h.eps[0], 1)
    h.fail(h.eps[1], 1)
    assert h.balanced == h.eps[2:], "50% healthy: not below the threshold"
    h.fail(h.eps[2], 1)
    assert h.balanced == h.eps, "25% healthy < 50%: panic, balance over every endpoint"
    h.clock.now += 1.0
    h.fail(h.eps[3], 1)
    assert h.balanced == h.eps and h.stats.outlier_detection_ejections_active == 4
    h.tick_at(h.eps[0].ejected_until)  # the first three return, the last stays out
    assert h.balanced == h.eps[:3]


def test_exchange_outcomes_feed_the_detector() -> None:
    m = Mesh("---\n".join([service("svc", [1001, 1002]), """apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: svc}
spec:
  host: svc
  trafficPolicy:
    loadBalancer: {simple: ROUND_ROBIN}
    outlierDetection: {consecutive5xxErrors: 2, maxEjectionPercent: 50, baseEjectionTime: 5s, interval: 1s}
"""]))
    cluster = m.cluster("svc")
    bad = cluster.endpoints[0]
    for _ in range(6):
        ex, _down = m.request("svc")
        up = m.loop.upstream_of(ex)
        if up.conn.endpoint is bad:
            up.respond(503)
        else:
            up.respond(200)
        m.loop.run_ready()
    assert bad.ejected and cluster.healthy == [cluster.endpoints[1]]
    assert cluster.stats.outlier_detection_ejections_active == 1
    m.loop.advance(6.0)  # the interval timer returns it
    assert not bad.ejected and cluster.stats.outlier_detection_ejections_active == 0
