"""Passive health checking (Envoy outlier detection, as Istio configures it).

The request path only updates per-endpoint counters (O(1)). When a counter
reaches its threshold the ejection decision is scheduled with ``call_soon``
and taken outside the request; un-ejection and the decay of the ejection
multiplier run on the ``interval`` timer. Clock and scheduling are injected,
so tests drive ``tick()`` with a fake clock.

Semantics (Envoy):
- consecutive 5xx: any 5xx response counts; any other response resets the count.
  Local-origin failures (connect failure, timeout, reset) count as 5xx unless
  ``splitExternalLocalOriginErrors`` is set, in which case they feed their own
  ``consecutiveLocalOriginFailures`` counter.
- consecutive gateway errors: 502, 503, 504 (and local-origin failures when not split).
- ejection time = baseEjectionTime x times ejected, capped at 300 s; each
  interval a non-ejected endpoint has spent healthy decrements its multiplier.
- maxEjectionPercent is strict: an ejection happens only if the ejected share
  after it stays <= the limit.
- minHealthPercent: when the healthy share drops below it, the balancer uses
  every endpoint (Envoy's panic threshold, which is how Istio maps it).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable

from .settings import MAX_EJECTION_TIME, OutlierSettings

if TYPE_CHECKING:
    from .cluster import Cluster, ClusterEndpoint

log = logging.getLogger("pyproxy.outlier")

REASON_5XX = "consecutive_5xx"
REASON_GATEWAY = "consecutive_gateway_failure"
REASON_LOCAL = "consecutive_local_origin_failure"


class NullOutlierDetector:
    """Stand-in when a cluster has no outlierDetection: callers never test a flag."""

    __slots__ = ()

    def on_response(self, ep: ClusterEndpoint, status: int) -> None:
        pass

    def on_local_failure(self, ep: ClusterEndpoint) -> None:
        pass

    def on_local_success(self, ep: ClusterEndpoint) -> None:
        pass

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


NULL_OUTLIER = NullOutlierDetector()


class OutlierDetector:
    __slots__ = ("cluster", "settings", "clock", "call_soon", "call_later", "timer", "stopped", "_queued")

    def __init__(
        self,
        cluster: Cluster,
        settings: OutlierSettings,
        clock: Callable[[], float],
        call_soon: Callable[..., Any],
        call_later: Callable[..., Any] | None,
    ) -> None:
        self.cluster = cluster
        self.settings = settings
        self.clock = clock
        self.call_soon = call_soon
        self.call_later = call_later  # None in tests that call tick() by hand
        self.timer: Any = None
        self.stopped = False
        self._queued: set[int] = set()

    # -- request path: record only ---------------------------------------

    def on_response(self, ep: ClusterEndpoint, status: int) -> None:
        s = self.settings
        if status >= 500:
            ep.consecutive_5xx += 1
            if s.consecutive_5xx and ep.consecutive_5xx >= s.consecutive_5xx:
                self._schedule(ep, REASON_5XX)
            if status in (502, 503, 504):
                ep.consecutive_gateway += 1
                if s.consecutive_gateway and ep.consecutive_gateway >= s.consecutive_gateway:
                    self._schedule(ep, REASON_GATEWAY)
            else:
                ep.consecutive_gateway = 0
        else:
            ep.consecutive_5xx = 0
            ep.consecutive_gateway = 0

    def on_local_failure(self, ep: ClusterEndpoint) -> None:
        """Connect failure, timeout or reset: no response from the endpoint."""
        s = self.settings
        if s.split_local_origin:
            ep.consecutive_local += 1
            if s.consecutive_local_origin and ep.consecutive_local >= s.consecutive_local_origin:
                self._schedule(ep, REASON_LOCAL)
        else:
            # Without the split, Envoy maps a local-origin failure to a 503
            # and feeds it to both the 5xx and gateway-failure counters.
            self.on_response(ep, 503)

    def on_local_success(self, ep: ClusterEndpoint) -> None:
        if self.settings.split_local_origin:
            ep.consecutive_local = 0

    def _schedule(self, ep: ClusterEndpoint, reason: str) -> None:
        if ep.ejected or id(ep) in self._queued:
            return
        self._queued.add(id(ep))
        self.call_soon(self._decide, ep, reason)

    # -- decisions ---------------------------------------------------------

    def _decide(self, ep: ClusterEndpoint, reason: str) -> None:
        self._queued.discard(id(ep))
        if self.stopped or ep.ejected or ep not in self.cluster.endpoints:
            return
        self.try_eject(ep, reason)

    def try_eject(self, ep: ClusterEndpoint, reason: str) -> bool:
        cluster = self.cluster
        stats = cluster.stats
        total = len(cluster.endpoints)
        ejected_now = sum(1 for e in cluster.endpoints if e.ejected)
        if total == 0 or (ejected_now + 1) * 100 > self.settings.max_ejection_percent * total:
            stats.outlier_ejections_overflow += 1
            # Counters restart so a still-failing host is re-evaluated after
            # as many new failures, not on every single one.
            ep.consecutive_5xx = ep.consecutive_gateway = ep.consecutive_local = 0
            return False
        now = self.clock()
        ep.ejection_count += 1
        ep.ejected = True
        ep.last_ejected = now
        duration = min(self.settings.base_ejection_time * ep.ejection_count,
                       max(MAX_EJECTION_TIME, self.settings.base_ejection_time))
        ep.ejected_until = now + duration
        ep.consecutive_5xx = ep.consecutive_gateway = ep.consecutive_local = 0
        stats.outlier_ejections_active += 1
        stats.outlier_ejections_total += 1
        if reason == REASON_5XX:
            stats.outlier_ejections_consecutive_5xx += 1
        elif reason == REASON_GATEWAY:
            stats.outlier_ejections_consecutive_gateway_failure += 1
        else:
            stats.outlier_ejections_consecutive_local_origin_failure += 1
        log.info("outlier: ejected %s from %s for %.1fs (%s)", ep.address, cluster.name, duration, reason)
        self.refresh()
        return True

    def refresh(self) -> None:
        cluster = self.cluster
        healthy = [e for e in cluster.endpoints if not e.ejected]
        min_pct = self.settings.min_health_percent
        if min_pct and cluster.endpoints and len(healthy) * 100 < min_pct * len(cluster.endpoints):
            healthy = list(cluster.endpoints)  # panic: balance over everyone
        cluster.healthy = healthy
        if cluster.lb is not None:
            cluster.lb.on_hosts_changed(healthy)

    def tick(self) -> None:
        """The interval timer: return endpoints whose ejection expired and
        decay the multiplier of endpoints that stayed healthy."""
        now = self.clock()
        changed = False
        interval = self.settings.interval
        for ep in self.cluster.endpoints:
            if ep.ejected:
                if now >= ep.ejected_until:
                    ep.ejected = False
                    ep.healthy_since = now
                    self.cluster.stats.outlier_ejections_active -= 1
                    changed = True
                    log.info("outlier: %s back in %s", ep.address, self.cluster.name)
            elif ep.ejection_count > 0 and now - max(ep.healthy_since, ep.last_ejected) >= interval:
                ep.ejection_count -= 1
                ep.healthy_since = now
        if changed:
            self.refresh()

    # -- timer -------------------------------------------------------------

    def start(self) -> None:
        if self.call_later is not None and self.timer is None and not self.stopped:
            self.timer = self.call_later(self.settings.interval, self._on_timer)

    def _on_timer(self) -> None:
        self.timer = None
        if self.stopped:
            return
        try:
            self.tick()
        finally:
            self.start()

    def stop(self) -> None:
        self.stopped = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


def can_ever_eject(settings: OutlierSettings, endpoint_count: int) -> bool:
    """False when maxEjectionPercent is too small to eject even one endpoint."""
    return endpoint_count > 0 and 100 <= settings.max_ejection_percent * endpoint_count
