"""ServiceEntry and WorkloadEntry parsing and validation (internal to the loader).

Field lists follow istio/api networking/v1/service_entry.proto and
workload_entry.proto; the checks follow Istio's validation webhook.
"""

from __future__ import annotations

import ipaddress
import posixpath
import re

from . import _common as c
from ._reader import UINT32_MAX, Node, check_integer, is_dns1123_label, message
from .model import Meta, ServiceEntry, ServicePort, WorkloadEntry

SERVICE_ENTRY = message(
    "ServiceEntry",
    "hosts addresses ports location resolution endpoints workloadSelector exportTo subjectAltNames",
)
SERVICE_PORT = message("ServicePort", "number protocol name targetPort")
WORKLOAD_ENTRY = message("WorkloadEntry", "address ports labels network locality weight serviceAccount")

RESOLUTIONS = ("NONE", "STATIC", "DNS", "DNS_ROUND_ROBIN")
LOCATIONS = ("MESH_EXTERNAL", "MESH_INTERNAL")
# Istio's protocol names (matched case-insensitively, like Istio does).
PROTOCOLS = frozenset(
    [
        "HTTP",
        "HTTPS",
        "HTTP2",
        "HTTP_PROXY",
        "GRPC",
        "GRPC-WEB",
        "TCP",
        "TLS",
        "UDP",
        "MONGO",
        "REDIS",
        "MYSQL",
    ]
)
_HTTP_OR_TLS = frozenset(["HTTP", "HTTPS", "HTTP2", "HTTP_PROXY", "GRPC", "GRPC-WEB", "TLS"])
# What pyproxy can carry on a port: HTTP/1.1 and HTTP/2 (h2c to HTTP2, GRPC
# and GRPC-Web ports; docs/http2.md).
_HTTP1 = frozenset(["", "HTTP", "HTTP_PROXY", "HTTP2", "GRPC", "GRPC-WEB"])
_LABEL = r"[A-Za-z0-9_]([-A-Za-z0-9_]{0,61}[A-Za-z0-9_])?"
_DNS_NAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*\.?")
UNIX_PREFIX = "unix://"


def parse_service_entry(meta: Meta, spec: Node) -> ServiceEntry:
    resolution = spec.enum("resolution", RESOLUTIONS) or "NONE"
    hosts = _hosts(spec)
    ports = _ports(spec)
    port_names = {p.name for p in ports}
    endpoints = tuple(
        _workload_entry(node, resolution=resolution, port_names=port_names, endpoint=True)
        for node in spec.children("endpoints", WORKLOAD_ENTRY)
    )
    selector = c.selector_labels(spec, "workloadSelector", match_labels=False)
    _check_resolution(spec, resolution, hosts, ports, endpoints)
    if selector is not None and spec.get("endpoints") is not None:
        spec.rep.error(spec.path, "only one of workloadSelector or endpoints may be set")
    return ServiceEntry(
        meta=meta,
        hosts=hosts,
        addresses=_addresses(spec, resolution),
        ports=ports,
        location=spec.enum("location", LOCATIONS) or "MESH_EXTERNAL",
        resolution=resolution,
        endpoints=endpoints,
        workload_selector=selector,
        export_to=c.export_to(spec),
        subject_alt_names=spec.strings("subjectAltNames"),
    )


def parse_workload_entry(meta: Meta, spec: Node) -> WorkloadEntry:
    entry = _workload_entry(spec, resolution=None, port_names=None, endpoint=False)
    return WorkloadEntry(
        address=entry.address,
        ports=entry.ports,
        labels=entry.labels,
        network=entry.network,
        locality=entry.locality,
        weight=entry.weight,
        service_account=entry.service_account,
        meta=meta,
    )


def _hosts(spec: Node) -> tuple[str, ...]:
    hosts = spec.strings("hosts")
    if not hosts and not spec.get("hosts"):
        spec.error("hosts", "at least one host is required")
    for i, host in enumerate(hosts):
        if not host or host == "*":
            spec.rep.error(f"{spec.at('hosts')}[{i}]", f"invalid host {host!r}")
    return hosts


def _ports(spec: Node) -> tuple[ServicePort, ...]:
    result = []
    names: set[str] = set()
    numbers: set[int] = set()
    for node in spec.children("ports", SERVICE_PORT):
        number = node.integer("number", lo=1, hi=65535, required=True)
        name = node.string("name", required=True)
        if name is not None and not is_dns1123_label(name):
            node.error("name", f"{name!r} is not a valid port name (must be a DNS-1123 label)")
        if name is not None and name in names:
            node.error("name", f"duplicate port name {name!r}")
        if number is not None and number in numbers:
            node.error("number", f"duplicate port number {number}")
        names.add(name or "")
        numbers.add(number or 0)
        protocol = node.string("protocol") or ""
        if protocol and protocol.upper() not in PROTOCOLS:
            node.error("protocol", f"unsupported protocol {protocol!r}")
        elif protocol.upper() not in _HTTP1:
            node.warn(
                "protocol",
                f"{protocol}: pyproxy carries HTTP/1.1 and HTTP/2 only; other traffic to this port fails "
                f"(keep it out of capture with pyproxy iptables --exclude-outbound-ports {number or 'PORT'})",
            )
        target = node.integer("targetPort", lo=0, hi=65535) or None
        result.append(
            ServicePort(number=number or 0, name=name or "", protocol=protocol.upper(), target_port=target)
        )
    return tuple(result)


def _addresses(spec: Node, resolution: str) -> tuple[str, ...]:
    addresses = spec.strings("addresses")
    for i, address in enumerate(addresses):
        path = f"{spec.at('addresses')}[{i}]"
        try:
            ipaddress.ip_network(address, strict=False)
        except ValueError:
            spec.rep.error(path, f"{address!r} is not an IP address or CIDR block")
            continue
        if "/" in address and resolution not in ("NONE", "STATIC"):
            spec.rep.error(path, "CIDR addresses are only allowed with NONE or STATIC resolution")
        elif ipaddress.ip_network(address, strict=False).num_addresses > 1:
            spec.rep.warn(path, "a CIDR block is not used by pyproxy (requests select a service by Host); ignored")
    return addresses


def _check_resolution(
    spec: Node,
    resolution: str,
    hosts: tuple[str, ...],
    ports: tuple[ServicePort, ...],
    endpoints: tuple[WorkloadEntry, ...],
) -> None:
    has_endpoints = bool(spec.get("endpoints"))
    if resolution == "NONE" and has_endpoints:
        spec.error("endpoints", "must not be set when resolution is NONE")
    if resolution in ("DNS", "DNS_ROUND_ROBIN") and not has_endpoints:
        for i, host in enumerate(hosts):
            if "*" in host:
                spec.rep.error(
                    f"{spec.at('hosts')}[{i}]",
                    f"must be a DNS name when resolution is {resolution} and there are no endpoints",
                )
    if resolution == "DNS_ROUND_ROBIN" and len(endpoints) > 1:
        spec.error("endpoints", "DNS_ROUND_ROBIN allows at most one endpoint")
    # With several hosts only HTTP (Host header) or TLS (SNI) can tell them apart.
    if resolution != "NONE" and len(hosts) > 1 and any(p.protocol not in _HTTP_OR_TLS for p in ports):
        spec.error("ports", "several hosts require HTTP or TLS ports (plain TCP cannot tell them apart)")


def _workload_entry(
    node: Node, *, resolution: str | None, port_names: set[str] | None, endpoint: bool
) -> WorkloadEntry:
    address = node.string("address") or ""
    network = node.string("network") or ""
    _check_address(node, address, network, resolution, endpoint)
    ports = []
    for path, name, value in node.entries("ports"):
        number = check_integer(node.rep, path, value, lo=1, hi=65535)
        if port_names is not None and name not in port_names:
            node.rep.error(path, f"port name {name!r} is not defined in the ServiceEntry ports")
        elif number is not None:
            ports.append((name, number))
    if address.startswith(UNIX_PREFIX) and ports:
        node.error("ports", "must not be set for a unix:// address")
    # serviceAccount is used: auto mTLS (tlsMode) and the SANs ISTIO_MUTUAL expects.
    for key in ("network", "locality"):
        if node.has(key):
            node.warn(key, "parsed, but not implemented by pyproxy: it has no effect")
    weight = node.integer("weight", lo=0, hi=UINT32_MAX)
    return WorkloadEntry(
        address=address,
        ports=tuple(ports),
        labels=node.string_map("labels"),
        network=network,
        locality=node.string("locality") or "",
        weight=weight or None,
        service_account=node.string("serviceAccount") or "",
    )


def _check_address(node: Node, address: str, network: str, resolution: str | None, endpoint: bool) -> None:
    if not address:
        raw = node.get("address")
        if raw is not None and raw != "":
            return  # not a string: already reported
        if network:
            # Istio allows this for endpoints reached through a network gateway.
            node.warn("address", f"address is unset (network {network!r})")
        else:
            node.error("address", "is required")
        return
    if address.startswith(UNIX_PREFIX):
        path = address[len(UNIX_PREFIX) :]
        if resolution in ("DNS", "DNS_ROUND_ROBIN"):
            node.error("address", "unix:// addresses cannot be used with DNS resolution")
        elif not (path.startswith("@") or (posixpath.isabs(path) and not path.endswith("/"))):
            node.error("address", f"{path!r} is not an absolute socket path")
        return
    if _is_ip(address):
        return
    if resolution == "STATIC":
        node.error(
            "address", f"{address!r} is not an IP address (STATIC resolution needs IPs or unix:// paths)"
        )
    elif not _DNS_NAME.fullmatch(address):
        what = "an IP address or a DNS name" if endpoint else "an IP address, a DNS name or a unix:// path"
        node.error("address", f"{address!r} is not {what}")


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
