"""Sidecar parsing and validation (internal to the loader).

Field lists follow istio/api networking/v1/sidecar.proto. pyproxy only uses
the workload selector and the outbound traffic policy mode; listeners
(ingress/egress) and inbound connection pools are accepted with a warning.
"""

from __future__ import annotations

from . import _common as c
from ._destination_rule import CONNECTION_POOL
from ._reader import Node, message
from .model import Meta, Sidecar

SIDECAR_PORT = message("SidecarPort", "", "number protocol name targetPort")
INGRESS_LISTENER = message(
    "IstioIngressListener",
    "",
    "port bind captureMode defaultEndpoint tls connectionPool",
    port=SIDECAR_PORT,
    tls=c.SERVER_TLS,
    connectionPool=CONNECTION_POOL,
)
EGRESS_LISTENER = message("IstioEgressListener", "", "port bind captureMode hosts", port=SIDECAR_PORT)
SIDECAR = message(
    "Sidecar",
    "workloadSelector outboundTrafficPolicy",
    ignored="ingress egress inboundConnectionPool",
    ingress=INGRESS_LISTENER,
    egress=EGRESS_LISTENER,
    inboundConnectionPool=CONNECTION_POOL,
)
OUTBOUND_TRAFFIC_POLICY = message(
    "OutboundTrafficPolicy", "mode", ignored="egressProxy", egressProxy=c.DESTINATION
)
MODES = ("REGISTRY_ONLY", "ALLOW_ANY")


def parse_sidecar(meta: Meta, spec: Node) -> Sidecar:
    fields = ("egress", "ingress", "outboundTrafficPolicy", "inboundConnectionPool")
    if not any(spec.has(k) for k in fields):
        # Istio: "sidecar: empty configuration provided".
        spec.rep.error(spec.path, f"must set at least one of {', '.join(fields)}")
    return Sidecar(
        meta=meta,
        workload_selector=c.selector_labels(spec, "workloadSelector", match_labels=False),
        outbound_traffic_policy_mode=_mode(spec),
    )


def _mode(spec: Node) -> str | None:
    node = spec.child("outboundTrafficPolicy", OUTBOUND_TRAFFIC_POLICY)
    if node is None:
        return None
    mode = node.enum("mode", MODES)
    if mode is None and not node.has("mode"):
        # proto3 enum default: an explicit policy without a mode is REGISTRY_ONLY.
        node.warn("mode", "not set: Istio treats this as REGISTRY_ONLY")
        return "REGISTRY_ONLY"
    return mode
