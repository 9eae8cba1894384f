"""Passive health checking: Envoy's outlier detection, as Istio configures it.

The request path only updates per-endpoint counters (O(1)). When a counter
reaches its threshold the ejection decision is scheduled with ``call_soon``
and taken outside the request (Envoy posts it to the main thread, so an
ejection is immediate, not delayed to the next interval). Un-ejection and
the decay of the ejection multiplier run on the ``interval`` timer. Clock and
scheduling are injected, so tests drive ``tick()`` with a fake clock.

Semantics (Envoy ``outlier_detection``; Istio's field names in brackets):

- consecutive 5xx [consecutive5xxErrors, default 5, 0 = off]: every 5xx
  response counts, any other response resets the count;
- consecutive gateway failures [consecutiveGatewayErrors, default off]: 502,
  503 and 504 count, any other response resets the count;
- local-origin failures (connect failure or timeout, reset, per-try or route
  timeout): without splitExternalLocalOriginErrors Envoy maps them to 503/504
  and feeds both counters above; with it they feed only
  consecutiveLocalOriginFailures (default 5), reset by a successful connect;
- ejection at the threshold; an ejection is refused (and counted as
  ``ejections_overflow``) when ejected hosts would then exceed
  maxEjectionPercent of the cluster (strict: 10% of 3 hosts ejects nobody);
  the counter that triggered it restarts either way;
- ejection time = baseEjectionTime x multiplier, at most
  max(300 s, baseEjectionTime); the multiplier grows by one per ejection
  (while multiplier x base < 300 s + base) and shrinks by one per interval
  once the host has been back for a whole interval; un-ejection happens on
  the interval timer, so an ejection lasts until the first tick after it
  expires;
- minHealthPercent is Envoy's healthy_panic_threshold: when the share of
  healthy endpoints drops below it the balancer uses all of them. Istio's
  default 0 means no panic mode: with every endpoint ejected requests get
  503 UH.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

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

    def on_local_failure(self, ep: ClusterEndpoint, timeout: bool = False) -> None:
        pass

    def on_local_success(self, ep: ClusterEndpoint) -> None:
        pass

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


NULL_OUTLIER = NullOutlierDetector()


class OutlierDetector:
    __slots__ = ("cluster", "settings", "clock", "call_soon", "call_later", "timer", "stopped", "_queued",
                 "max_multiplier")

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
        # Envoy raises the multiplier only while base x multiplier < max + base.
        base = settings.base_ejection_time
        self.max_multiplier = max(1, int(-(-(MAX_EJECTION_TIME + base) // base))) if base > 0 else 1

    # -- request path: record only ---------------------------------------

    def on_response(self, ep: ClusterEndpoint, status: int) -> None:
        s = self.settings
        if 500 <= status <= 599:
            ep.consecutive_5xx += 1
            if s.consecutive_5xx and ep.consecutive_5xx >= s.consecutive_5xx:
                self._schedule(ep, REASON_5XX)
            if status == 502 or status == 503 or status == 504:
                ep.consecutive_gateway += 1
                if s.consecutive_gateway and ep.consecutive_gateway >= s.consecutive_gateway:
                    self._schedule(ep, REASON_GATEWAY)
            else:
                ep.consecutive_gateway = 0
        else:
            ep.consecutive_5xx = 0
            ep.consecutive_gateway = 0

    def on_local_failure(self, ep: ClusterEndpoint, timeout: bool = False) -> None:
        """Connect failure, timeout or reset: no response from the endpoint."""
        s = self.settings
        if s.split_local_origin:
            ep.consecutive_local += 1
            if s.consecutive_local_origin and ep.consecutive_local >= s.consecutive_local_origin:
                self._schedule(ep, REASON_LOCAL)
        else:
            # Without the split Envoy maps a timeout to 504 and any other
            # local-origin failure to 503: both count as 5xx and gateway errors.
            self.on_response(ep, 504 if timeout else 503)

    def on_local_success(self, ep: ClusterEndpoint) -> None:
        """A connection to the endpoint was obtained (Envoy: LocalOriginConnectSuccess)."""
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
        # The triggering counter restarts whether or not the ejection happens,
        # so a host that keeps failing is re-evaluated after as many new
        # failures, not on every single one (Envoy does the same).
        if reason == REASON_5XX:
            ep.consecutive_5xx = 0
        elif reason == REASON_GATEWAY:
            ep.consecutive_gateway = 0
        else:
            ep.consecutive_local = 0
        # Envoy counts the detection before deciding (ejections_detected_*,
        # even when max ejection percent then refuses it); ejections_total
        # and ejections_enforced_* only for an ejection that happens (Istio
        # sets enforcing to 100%, so every allowed ejection is enforced).
        if reason == REASON_5XX:
            stats.outlier_detection_ejections_detected_consecutive_5xx += 1
        elif reason == REASON_GATEWAY:
            stats.outlier_detection_ejections_detected_consecutive_gateway_failure += 1
        else:
            stats.outlier_detection_ejections_detected_consecutive_local_origin_failure += 1
        total = len(cluster.endpoints)
        ejected_now = stats.outlier_detection_ejections_active
        if total == 0 or (ejected_now + 1) * 100 > self.settings.max_ejection_percent * total:
            stats.outlier_detection_ejections_overflow += 1
            return False
        now = self.clock()
        if ep.ejection_count < self.max_multiplier:
            ep.ejection_count += 1
        ep.ejected = True
        ep.last_ejected = now
        ep.ejected_until = now + self.ejection_duration(ep.ejection_count)
        stats.outlier_detection_ejections_active += 1
        stats.outlier_detection_ejections_total += 1
        stats.outlier_detection_ejections_enforced_total += 1
        if reason == REASON_5XX:
            stats.outlier_detection_ejections_enforced_consecutive_5xx += 1
        elif reason == REASON_GATEWAY:
            stats.outlier_detection_ejections_enforced_consecutive_gateway_failure += 1
        else:
            stats.outlier_detection_ejections_enforced_consecutive_local_origin_failure += 1
        log.info("outlier: ejected %s from %s for %.3fs (%s, multiplier %d)", ep.address, cluster.name,
                 ep.ejected_until - now, reason, ep.ejection_count)
        self.refresh()
        return True

    def ejection_duration(self, multiplier: int) -> float:
        base = self.settings.base_ejection_time
        return min(base * multiplier, max(MAX_EJECTION_TIME, base))

    def refresh(self) -> None:
        """Recompute the set the balancer picks from (never on the request path)."""
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
        decay the multiplier of endpoints back for at least one interval."""
        now = self.clock()
        changed = False
        interval = self.settings.interval
        stats = self.cluster.stats
        for ep in self.cluster.endpoints:
            if ep.ejected:
                if now >= ep.ejected_until:
                    ep.ejected = False
                    ep.healthy_since = now
                    # Fresh counters: a host close to a threshold must not be
                    # ejected again by a handful of new errors.
                    ep.consecutive_5xx = ep.consecutive_gateway = ep.consecutive_local = 0
                    stats.outlier_detection_ejections_active -= 1
                    changed = True
                    log.info("outlier: %s back in %s", ep.address, self.cluster.name)
            elif ep.ejection_count > 0 and now - ep.healthy_since >= interval:
                ep.ejection_count -= 1
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
