"""PeerAuthentication parsing and validation (security.istio.io v1beta1/v1;
internal to the loader).

Fields follow istio/api security/v1beta1/peer_authentication.proto; the checks
follow Istio's validation webhook (ValidatePeerAuthentication): portLevelMtls
only with a selector, ports within 1..65535.
"""

from __future__ import annotations

from . import _common as c
from ._reader import Node, check_integer, describe, join, message
from .model import Meta, PeerAuthentication

PEER_AUTHENTICATION = message("PeerAuthentication", "selector mtls portLevelMtls")
MUTUAL_TLS = message("PeerAuthentication.MutualTLS", "mode")
MODES = ("UNSET", "DISABLE", "PERMISSIVE", "STRICT")


def _mode(node: Node | None) -> str:
    if node is None:
        return "UNSET"
    return node.enum("mode", MODES) or "UNSET"


def parse_peer_authentication(meta: Meta, spec: Node) -> PeerAuthentication:
    selector = c.selector_labels(spec, "selector", match_labels=True)
    mode = _mode(spec.child("mtls", MUTUAL_TLS))
    port_level: list[tuple[int, str]] = []
    raw = spec.get("portLevelMtls")
    if raw is not None:
        base = spec.at("portLevelMtls")
        if not isinstance(raw, dict):
            spec.error("portLevelMtls", f"must be a mapping of port numbers, got {describe(raw)}")
        else:
            if selector is None:
                spec.error("portLevelMtls", "requires a selector: port-level mTLS applies to workloads only")
            for key, value in raw.items():
                path = join(base, str(key))
                # YAML gives 8080 (int) or "8080" (quoted) keys.
                number = int(key) if isinstance(key, str) and key.isdigit() else key
                port = check_integer(spec.rep, path, number, lo=1, hi=65535)
                if value is None:
                    value = {}
                if not isinstance(value, dict):
                    spec.rep.error(path, f"must be a mapping, got {describe(value)}")
                    continue
                if port is not None:
                    port_level.append((port, _mode(Node(spec.rep, path, value, MUTUAL_TLS))))
    return PeerAuthentication(meta=meta, selector=selector, mode=mode, port_level=tuple(port_level))
