"""PeerAuthentication precedence and the auto-mTLS decision (spec §2.1, §4).

Istio (pilot/pkg/security/authn/policy_applier.go ComposePeerAuthentication,
pilot/pkg/model/authentication.go):

- scopes: mesh (root namespace, no selector) → namespace (no selector) →
  workload (selector, not in the root namespace); the narrowest policy whose
  mode is not UNSET wins; no policy at all = PERMISSIVE;
- selector policies in the root namespace are ignored;
- ``portLevelMtls`` only on workload policies; UNSET at a port inherits the
  workload's mode; the key is the workload (target) port;
- several policies at one level: Istio keeps the oldest (creationTimestamp).
  pyproxy has no timestamps: the first in load order (files sorted by name,
  documents in order) wins, the others are reported as warnings.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ..config.model import ClientTLSSettings, PeerAuthentication, TrafficPolicy

ROOT_NAMESPACE = "istio-system"
TLS_MODE_LABEL = "security.istio.io/tlsMode"


def _labels_match(selector: tuple[tuple[str, str], ...], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector)


@dataclass(frozen=True, slots=True)
class PeerPolicy:
    """The effective inbound mode of one workload: DISABLE, PERMISSIVE or STRICT."""

    mode: str = "PERMISSIVE"
    ports: tuple[tuple[int, str], ...] = ()
    # Where the mode came from, for /config_dump and messages.
    source: str = "default (no PeerAuthentication)"

    def for_port(self, port: int) -> str:
        for p, mode in self.ports:
            if p == port:
                return mode
        return self.mode


class PeerAuthIndex:
    """All PeerAuthentications of one config, indexed once per snapshot."""

    def __init__(self, policies: Iterable[PeerAuthentication], root_namespace: str = ROOT_NAMESPACE,
                 warn: Callable[[str], None] | None = None) -> None:
        self.root = root_namespace
        self.mesh: PeerAuthentication | None = None
        self.namespaces: dict[str, PeerAuthentication] = {}
        self.workloads: dict[str, list[PeerAuthentication]] = {}
        self.warnings: list[str] = []
        self._warn = warn
        for pa in policies:
            ns = pa.meta.namespace
            selector = pa.selector or None  # an empty selector is namespace-wide
            if selector is None:
                if ns == self.root:
                    self.mesh = self._first(self.mesh, pa, "mesh-wide")
                else:
                    self.namespaces[ns] = self._first(self.namespaces.get(ns), pa, f"namespace {ns}")  # type: ignore[assignment]
            elif ns == self.root:
                self._say(f"{pa.meta.source}: PeerAuthentication {ns}/{pa.meta.name} has a selector in the root "
                          f"namespace {ns}: ignored (as Istio does)")
            else:
                self.workloads.setdefault(ns, []).append(pa)

    def _say(self, msg: str) -> None:
        self.warnings.append(msg)
        if self._warn is not None:
            self._warn(msg)

    def _first(self, kept: PeerAuthentication | None, new: PeerAuthentication, scope: str) -> PeerAuthentication:
        if kept is None:
            return new
        self._say(f"{new.meta.source}: PeerAuthentication {new.meta.namespace}/{new.meta.name} is a second "
                  f"{scope} policy; {kept.meta.namespace}/{kept.meta.name} ({kept.meta.source}) comes first "
                  f"and wins (Istio keeps the oldest)")
        return kept

    def namespace_mode(self, namespace: str) -> str:
        """Mesh then namespace level (what the client side uses for a
        destination namespace): DISABLE, PERMISSIVE or STRICT."""
        mode = "PERMISSIVE"
        for pa in (self.mesh, self.namespaces.get(namespace)):
            if pa is not None and pa.mode != "UNSET":
                mode = pa.mode
        return mode

    def workload_policy(self, namespace: str, labels: dict[str, str]) -> PeerAuthentication | None:
        chosen: PeerAuthentication | None = None
        for pa in self.workloads.get(namespace, ()):
            if pa.selector and _labels_match(pa.selector, labels):
                if chosen is None:
                    chosen = pa
                else:
                    self._first(chosen, pa, f"workload ({dict(labels)})")
        return chosen

    def effective(self, namespace: str, labels: dict[str, str]) -> PeerPolicy:
        mode = "PERMISSIVE"
        source = "default (no PeerAuthentication)"
        wl = self.workload_policy(namespace, labels)
        for pa in (self.mesh, self.namespaces.get(namespace), wl):
            if pa is not None and pa.mode != "UNSET":
                mode = pa.mode
                source = f"PeerAuthentication {pa.meta.namespace}/{pa.meta.name}"
        ports: tuple[tuple[int, str], ...] = ()
        if wl is not None:
            ports = tuple((port, mode if m == "UNSET" else m) for port, m in wl.port_level)
        return PeerPolicy(mode, ports, source)


def client_tls_for(top: TrafficPolicy | None, subset: TrafficPolicy | None, port: int) -> ClientTLSSettings | None:
    """The DestinationRule TLS block for one cluster: subset port-level →
    subset → rule port-level → rule (Istio's mtls_checker order; a subset's
    tls replaces the rule's)."""
    for policy in (subset, top):
        if policy is None:
            continue
        for pls in policy.port_level_settings:
            if pls.port == port and pls.tls is not None:
                return pls.tls
        if policy.tls is not None:
            return policy.tls
    return None


def istio_sni(port: int, subset: str, host: str) -> str:
    """``outbound_.PORT_.SUBSET_.HOST`` (BuildDNSSrvSubsetKey); empty subset → ``_``."""
    return f"outbound_.{port}_.{subset or ''}_.{host}"


def endpoint_tls_mode(labels: dict[str, str], service_account: str) -> str:
    """The endpoint's ``security.istio.io/tlsMode``: an explicit label wins,
    else ``istio`` when it has a service account, else ``disabled``
    (getTLSModeFromWorkloadEntry)."""
    explicit = labels.get(TLS_MODE_LABEL)
    if explicit:
        return explicit
    return "istio" if service_account else "disabled"


def auto_mtls(location: str, namespace_mode: str, endpoint_tls_mode: str, endpoint_port_mode: str,
              have_certs: bool) -> bool:
    """Istio's auto mTLS for one endpoint with no DestinationRule TLS:
    only in-mesh services, not when the destination namespace/mesh says
    DISABLE, only endpoints labelled ``tlsMode: istio`` whose own workload
    policy (at that port) is not DISABLE. Without a workload certificate
    there is nothing to present: plaintext."""
    return (have_certs and location == "MESH_INTERNAL" and namespace_mode != "DISABLE"
            and endpoint_tls_mode == "istio" and endpoint_port_mode != "DISABLE")
