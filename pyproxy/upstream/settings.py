"""Effective per-cluster settings: a DestinationRule's traffic policy merged
for one (port, subset) and filled with Istio's defaults.

Merging follows Istio: a ``portLevelSettings`` entry for the cluster's port
replaces its policy's blocks (unset ones fall back to the defaults, they do
not inherit); the subset's trafficPolicy then replaces the DestinationRule's
blocks one whole block at a time (loadBalancer, connectionPool,
outlierDetection), never field by field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config.model import (
    ConnectionPoolSettings,
    ConsistentHashLB,
    HTTPSettings,
    LoadBalancerSettings,
    OutlierDetection,
    TrafficPolicy,
)

# Istio programs Envoy's circuit breakers with 2^32-1 when a limit is unset.
UNLIMITED = 2**32 - 1

DEFAULT_CONNECT_TIMEOUT = 10.0

# The protocol spoken to a cluster's endpoints (``upstream_protocol``).
HTTP1 = "http1"
H2 = "h2"
DOWNSTREAM = "downstream"  # the client's: HTTP/2 for HTTP/2 clients, else HTTP/1.1
# Port protocols Istio speaks HTTP/2 to (protocol.Instance.IsHTTP2).
HTTP2_PORT_PROTOCOLS = frozenset({"HTTP2", "GRPC", "GRPC-WEB"})
DEFAULT_IDLE_TIMEOUT = 3600.0


@dataclass(frozen=True, slots=True)
class OutlierSettings:
    consecutive_5xx: int  # 0 = off
    consecutive_gateway: int  # 0 = off
    consecutive_local_origin: int
    split_local_origin: bool
    interval: float
    base_ejection_time: float
    max_ejection_percent: int
    min_health_percent: int


MAX_EJECTION_TIME = 300.0


def outlier_settings(od: OutlierDetection | None) -> OutlierSettings | None:
    """Istio enables outlier detection only when the block exists; inside it
    Envoy's defaults apply to every field Istio leaves unset. Istio cannot
    tell 0 from unset for the int32 fields, so ``maxEjectionPercent: 0`` gets
    Envoy's 10%, and ``consecutiveLocalOriginFailures: 0`` Envoy's 5."""
    if od is None:
        return None
    return OutlierSettings(
        # UInt32Value: unset -> Envoy's 5; an explicit 0 switches it off.
        consecutive_5xx=5 if od.consecutive_5xx_errors is None else od.consecutive_5xx_errors,
        # Envoy's default threshold is 5 but not enforced unless Istio sets the field.
        consecutive_gateway=od.consecutive_gateway_errors or 0,
        consecutive_local_origin=od.consecutive_local_origin_failures or 5,
        split_local_origin=od.split_external_local_origin_errors,
        interval=od.interval or 10.0,
        base_ejection_time=od.base_ejection_time or 30.0,
        max_ejection_percent=od.max_ejection_percent or 10,
        # Istio maps it to Envoy's healthy_panic_threshold; 0 (default) = no panic mode.
        min_health_percent=od.min_health_percent or 0,
    )


@dataclass(frozen=True, slots=True)
class ClusterSettings:
    lb_policy: str = "LEAST_REQUEST"  # Istio's default when unset
    consistent_hash: ConsistentHashLB | None = None
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    max_connections: int = UNLIMITED
    max_pending: int = UNLIMITED
    max_requests: int = UNLIMITED
    max_requests_per_connection: int = 0  # 0 = unlimited keep-alive
    max_retries: int = UNLIMITED
    max_connection_duration: float | None = None
    outlier: OutlierSettings | None = None
    upstream_protocol: str = HTTP1
    max_concurrent_streams: int = 0  # per HTTP/2 connection; 0 = the peer's and pyproxy's bounds only


def _pick_blocks(
    policy: TrafficPolicy | None, port: int
) -> tuple[LoadBalancerSettings | None, ConnectionPoolSettings | None, OutlierDetection | None, bool]:
    """The (lb, pool, outlier) blocks a policy sets for ``port``; the last
    element tells whether a port-level entry for ``port`` exists. As in Istio
    (GetPortLevelTrafficPolicy), a matching ``portLevelSettings`` entry
    replaces the policy's blocks entirely: blocks it leaves out fall back to
    the defaults, not to the same policy's top-level blocks."""
    if policy is None:
        return None, None, None, False
    for pls in policy.port_level_settings:
        if pls.port == port:
            return pls.load_balancer, pls.connection_pool, pls.outlier_detection, True
    return policy.load_balancer, policy.connection_pool, policy.outlier_detection, False


def merge_policy(
    top: TrafficPolicy | None, subset: TrafficPolicy | None, port: int
) -> tuple[LoadBalancerSettings | None, ConnectionPoolSettings | None, OutlierDetection | None]:
    """Istio's MergeSubsetTrafficPolicy: the DestinationRule's blocks for the
    port, then each block the subset sets replaces the whole block; a subset
    port-level entry for the port replaces all three blocks."""
    lb, pool, od, _ = _pick_blocks(top, port)
    if subset is None:
        return lb, pool, od
    s_lb, s_pool, s_od, subset_port_level = _pick_blocks(subset, port)
    if subset_port_level:
        return s_lb, s_pool, s_od
    return s_lb or lb, s_pool or pool, s_od or od


def upstream_protocol(port_protocol: str, http: HTTPSettings | None, outbound: bool = True,
                      sidecar: bool = True) -> str:
    """The protocol to a cluster's endpoints, as istiod's cluster builder
    decides it (pilot/pkg/networking/core: applyConnectionPool, then
    applyH2Upgrade/shouldH2Upgrade for outbound clusters, then
    setUpstreamProtocol, each overriding the one before):

    - an HTTP2, GRPC or GRPC-Web port: HTTP/2 (setUpstreamProtocol, last);
    - a port of unknown protocol (auto-detected) on a sidecar: the client's
      protocol (setUseDownstreamProtocol, last; a gateway does not);
    - outbound, DestinationRule ``h2UpgradePolicy: UPGRADE``: HTTP/2 (it
      replaces ``useClientProtocol``'s setting, applied before it);
    - ``useClientProtocol: true``: the client's protocol;
    - otherwise HTTP/1.1 (MeshConfig's h2UpgradePolicy defaults to
      DO_NOT_UPGRADE; pyproxy has no MeshConfig).

    ``port_protocol`` is the ServiceEntry port's ``protocol`` upper-cased,
    "" when unset (Istio's protocol.Parse: Unsupported, sniffed)."""
    if port_protocol in HTTP2_PORT_PROTOCOLS:
        return H2
    if not port_protocol and sidecar:
        return DOWNSTREAM
    if http is not None:
        if outbound and http.h2_upgrade_policy == "UPGRADE":
            return H2
        if http.use_client_protocol:
            return DOWNSTREAM
    return HTTP1


def inbound_protocol(port_protocols: list[str]) -> str:
    """The protocol to the local application (the inbound cluster; Istio's
    setUpstreamProtocol runs for inbound clusters too): HTTP/2 (h2c) when a
    service port it serves is HTTP2/GRPC/GRPC-Web, the client's protocol
    when that port's protocol is unset (sniffed). pyproxy often has no
    ServiceEntry for its own workload: none found, HTTP/1.1."""
    if any(p in HTTP2_PORT_PROTOCOLS for p in port_protocols):
        return H2
    if any(not p for p in port_protocols):
        return DOWNSTREAM
    return HTTP1


def cluster_settings(top: TrafficPolicy | None, subset: TrafficPolicy | None, port: int,
                     port_protocol: str = "HTTP", sidecar: bool = True) -> ClusterSettings:
    lb, pool, od = merge_policy(top, subset, port)
    kwargs: dict[str, Any] = {}
    if lb is not None:
        if lb.consistent_hash is not None:
            kwargs["lb_policy"] = "CONSISTENT_HASH"
            kwargs["consistent_hash"] = lb.consistent_hash
        elif lb.simple and lb.simple not in ("UNSPECIFIED",):
            kwargs["lb_policy"] = lb.simple
    if pool is not None:
        if pool.tcp is not None:
            t = pool.tcp
            if t.max_connections is not None:
                kwargs["max_connections"] = t.max_connections or UNLIMITED
            if t.connect_timeout is not None:
                kwargs["connect_timeout"] = t.connect_timeout
            if t.max_connection_duration is not None:
                kwargs["max_connection_duration"] = t.max_connection_duration
        if pool.http is not None:
            h = pool.http
            # Istio maps 0 ("unset" in proto3) to unlimited for every limit.
            if h.http1_max_pending_requests:
                kwargs["max_pending"] = h.http1_max_pending_requests
            if h.http2_max_requests:
                kwargs["max_requests"] = h.http2_max_requests
            if h.max_requests_per_connection:
                kwargs["max_requests_per_connection"] = h.max_requests_per_connection
            if h.max_retries:
                kwargs["max_retries"] = h.max_retries
            if h.idle_timeout is not None:
                kwargs["idle_timeout"] = h.idle_timeout
            if h.max_concurrent_streams:
                kwargs["max_concurrent_streams"] = h.max_concurrent_streams
        if "idle_timeout" not in kwargs and pool.tcp is not None and pool.tcp.idle_timeout is not None:
            # Istio uses tcp.idleTimeout for HTTP connections when http.idleTimeout is unset.
            kwargs["idle_timeout"] = pool.tcp.idle_timeout
    kwargs["outlier"] = outlier_settings(od)
    kwargs["upstream_protocol"] = upstream_protocol(port_protocol, pool.http if pool is not None else None,
                                                    sidecar=sidecar)
    return ClusterSettings(**kwargs)
