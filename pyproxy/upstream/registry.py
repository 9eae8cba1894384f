"""The service registry: Istio ServiceEntry / WorkloadEntry resources turned
into services with endpoints, plus host-name canonicalisation shared by every
resource kind.

Names: Istio expands a short host (``reviews``) written in a VirtualService or
DestinationRule to ``reviews.<namespace>.svc.cluster.local``. pyproxy applies
the same expansion to ServiceEntry hosts too, so a registry can be written
with short names (a documented difference: Istio takes ServiceEntry hosts
literally). Everything is keyed by the canonical FQDN.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass

from ..config.model import Pairs, ServiceEntry, ServicePort, WorkloadEntry

CLUSTER_DOMAIN = "svc.cluster.local"


def canonical_host(host: str, namespace: str) -> str:
    """Expand a short name the way Istio does; leave FQDNs, IPs and wildcards."""
    host = host.strip().lower().rstrip(".")
    if host == "*" or "." in host or ":" in host:
        return host
    return f"{host}.{namespace}.{CLUSTER_DOMAIN}"


def host_aliases(fqdn: str, proxy_namespace: str) -> list[str]:
    """Names an application may use for a service (Istio's virtual-host domains).

    ``reviews.default.svc.cluster.local`` is also reachable as
    ``reviews.default.svc``, ``reviews.default`` and, from the same namespace,
    ``reviews``.
    """
    names = [fqdn]
    suffix = "." + CLUSTER_DOMAIN
    if fqdn.endswith(suffix):
        short = fqdn[: -len(suffix)]  # name.ns
        parts = short.split(".")
        if len(parts) == 2:
            name, ns = parts
            names += [f"{name}.{ns}.svc", f"{name}.{ns}"]
            if ns == proxy_namespace:
                names.append(name)
    return names


def is_ip(address: str) -> bool:
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return False
    return True


def address_host(address: str) -> str | None:
    """The Host-header form of a ServiceEntry ``addresses`` entry that names
    one IP (``10.0.0.5``, ``10.0.0.5/32``, ``[fd00::5]``); None for a CIDR
    block, which Istio does not turn into an HTTP domain either."""
    try:
        net = ipaddress.ip_network(address.strip(), strict=False)
    except ValueError:
        return None
    if net.num_addresses != 1:
        return None
    ip = net.network_address
    return f"[{ip.compressed}]" if ip.version == 6 else ip.compressed


def labels_match(selector: Pairs, labels: Pairs) -> bool:
    """True when every selector label is present with the same value."""
    if not selector:
        return True
    have = dict(labels)
    return all(have.get(k) == v for k, v in selector)


@dataclass(frozen=True, slots=True)
class ServiceEndpoint:
    """One workload instance behind a service, as configured (not resolved)."""

    address: str  # IP, DNS name, or unix:///path
    ports: tuple[tuple[str, int], ...]
    labels: Pairs
    weight: int
    workload: str  # workload name for telemetry ("unknown" if not known)
    namespace: str
    service_account: str = ""  # WorkloadEntry serviceAccount (auto mTLS, expected SANs)

    def port_for(self, port: ServicePort) -> int:
        for name, number in self.ports:
            if name == port.name:
                return number
        return port.target_port or port.number


@dataclass(frozen=True, slots=True)
class Service:
    hostname: str  # canonical FQDN (or wildcard)
    namespace: str
    ports: tuple[ServicePort, ...]
    resolution: str
    location: str
    endpoints: tuple[ServiceEndpoint, ...]
    source: str  # "file#doc" of the ServiceEntry
    addresses: tuple[str, ...] = ()  # ServiceEntry ``addresses`` (VIPs / CIDRs), as written
    subject_alt_names: tuple[str, ...] = ()  # ServiceEntry ``subjectAltNames``

    @property
    def is_wildcard(self) -> bool:
        return self.hostname.startswith("*")

    def port(self, number: int) -> ServicePort | None:
        for p in self.ports:
            if p.number == number:
                return p
        return None


def _workload_name(we: WorkloadEntry, fallback_labels: Pairs) -> str:
    if we.meta is not None:
        return we.meta.name
    labels = dict(fallback_labels)
    app = labels.get("app")
    if app:
        version = labels.get("version")
        return f"{app}-{version}" if version else app
    return "unknown"


def build_registry(
    service_entries: list[ServiceEntry],
    workload_entries: list[WorkloadEntry],
    warn: Callable[[str], None] | None = None,
) -> dict[str, Service]:
    """Services keyed by canonical host. When two ServiceEntries claim the same
    host, their ports, endpoints and addresses are merged (Istio merges
    ServiceEntries for one host into a single service); the first one's
    resolution and location are kept, with a warning through ``warn`` when
    the later one disagrees."""
    services: dict[str, Service] = {}
    for se in service_entries:
        ns = se.meta.namespace
        endpoints: list[ServiceEndpoint] = []
        for ep in se.endpoints:
            endpoints.append(
                ServiceEndpoint(
                    address=ep.address,
                    ports=ep.ports,
                    labels=ep.labels,
                    weight=ep.weight or 1,
                    workload=_workload_name(ep, ep.labels),
                    namespace=ns,
                    service_account=ep.service_account,
                )
            )
        if se.workload_selector is not None:
            for we in workload_entries:
                if we.meta is not None and we.meta.namespace == ns and labels_match(
                    se.workload_selector, we.labels
                ):
                    endpoints.append(
                        ServiceEndpoint(
                            address=we.address,
                            ports=we.ports,
                            labels=we.labels,
                            weight=we.weight or 1,
                            workload=_workload_name(we, we.labels),
                            namespace=we.meta.namespace,
                            service_account=we.service_account,
                        )
                    )
        for raw_host in se.hosts:
            host = canonical_host(raw_host, ns)
            eps = list(endpoints)
            if not eps and se.resolution in ("DNS", "DNS_ROUND_ROBIN") and "*" not in host:
                # DNS resolution without endpoints: the host name itself is the endpoint.
                eps.append(ServiceEndpoint(raw_host.strip().rstrip("."), (), (), 1, "unknown", ns))
            existing = services.get(host)
            if existing is not None:
                if warn is not None and (existing.resolution, existing.location) != (se.resolution, se.location):
                    warn(
                        f"{se.meta.source}: ServiceEntry {ns}/{se.meta.name} declares host {host} with "
                        f"resolution {se.resolution}/{se.location}, but {existing.source} declared it with "
                        f"{existing.resolution}/{existing.location}; merged, keeping the first"
                    )
                ports = existing.ports + tuple(p for p in se.ports if existing.port(p.number) is None)
                addresses = existing.addresses + tuple(a for a in se.addresses if a not in existing.addresses)
                sans = existing.subject_alt_names + tuple(
                    s for s in se.subject_alt_names if s not in existing.subject_alt_names)
                services[host] = Service(
                    host, existing.namespace, ports, existing.resolution, existing.location,
                    existing.endpoints + tuple(eps), existing.source, addresses, sans,
                )
            else:
                services[host] = Service(
                    host, ns, se.ports, se.resolution, se.location, tuple(eps), str(se.meta.source),
                    se.addresses, se.subject_alt_names,
                )
    return services
