"""Unit tests for the service registry (pyproxy.upstream.registry): host-name
canonicalisation and aliases, and ServiceEntry/WorkloadEntry → services."""

from __future__ import annotations

import textwrap

import pytest

from pyproxy.config.loader import load_text
from pyproxy.config.model import ServiceEntry, ServicePort, WorkloadEntry
from pyproxy.upstream.registry import (
    Service,
    ServiceEndpoint,
    address_host,
    build_registry,
    canonical_host,
    host_aliases,
    labels_match,
)


def doc(kind: str, spec: str, *, name: str = "x", namespace: str | None = None) -> str:
    md = f"  name: {name}\n" + (f"  namespace: {namespace}\n" if namespace else "")
    body = textwrap.indent(textwrap.dedent(spec).strip("\n"), "  ")
    return f"apiVersion: networking.istio.io/v1\nkind: {kind}\nmetadata:\n{md}spec:\n{body}\n"


def registry(*docs: str, warnings: list[str] | None = None) -> dict[str, Service]:
    loaded = load_text("---\n".join(docs), "reg.yaml")
    assert loaded.ok, [str(e) for e in loaded.errors]
    ses = [r for r in loaded.resources if isinstance(r, ServiceEntry)]
    wes = [r for r in loaded.resources if isinstance(r, WorkloadEntry)]
    return build_registry(ses, wes, warnings.append if warnings is not None else None)


def endpoints(svc: Service) -> list[tuple[str, tuple, tuple, int, str, str]]:
    return [(e.address, e.ports, e.labels, e.weight, e.workload, e.namespace) for e in svc.endpoints]


# -- canonical_host / host_aliases ------------------------------------------------


@pytest.mark.parametrize(
    ("host", "namespace", "expected"),
    [
        ("reviews", "default", "reviews.default.svc.cluster.local"),
        ("reviews", "prod", "reviews.prod.svc.cluster.local"),
        ("Reviews", "default", "reviews.default.svc.cluster.local"),  # DNS names are case-insensitive
        (" reviews ", "default", "reviews.default.svc.cluster.local"),
        ("reviews.default.svc.cluster.local.", "x", "reviews.default.svc.cluster.local"),  # trailing dot
        ("reviews.default.svc.cluster.local", "other", "reviews.default.svc.cluster.local"),
        # Istio expands only names without a dot: these stay literal.
        ("reviews.default", "default", "reviews.default"),
        ("reviews.default.svc", "default", "reviews.default.svc"),
        ("api.example.com", "default", "api.example.com"),
        ("*.example.com", "default", "*.example.com"),
        ("*", "default", "*"),
        ("10.0.0.1", "default", "10.0.0.1"),
        ("fd00::1", "default", "fd00::1"),
    ],
)
def test_canonical_host(host: str, namespace: str, expected: str) -> None:
    assert canonical_host(host, namespace) == expected


def test_host_aliases_same_namespace_includes_short_name() -> None:
    assert host_aliases("reviews.default.svc.cluster.local", "default") == [
        "reviews.default.svc.cluster.local",
        "reviews.default.svc",
        "reviews.default",
        "reviews",
    ]


def test_host_aliases_other_namespace_has_no_short_name() -> None:
    assert host_aliases("reviews.prod.svc.cluster.local", "default") == [
        "reviews.prod.svc.cluster.local",
        "reviews.prod.svc",
        "reviews.prod",
    ]


@pytest.mark.parametrize("fqdn", ["api.example.com", "a.b.c.svc.cluster.local", "10.0.0.1", "*.example.com"])
def test_host_aliases_of_non_cluster_names_is_only_the_name(fqdn: str) -> None:
    assert host_aliases(fqdn, "default") == [fqdn]


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("10.0.0.5", "10.0.0.5"),
        ("10.0.0.5/32", "10.0.0.5"),
        ("fd00:0::5", "[fd00::5]"),
        ("fd00::5/128", "[fd00::5]"),
        ("10.0.0.0/24", None),
        ("fd00::/64", None),
        ("not-an-ip", None),
    ],
)
def test_address_host(address: str, expected: str | None) -> None:
    assert address_host(address) == expected


def test_labels_match() -> None:
    labels = (("app", "reviews"), ("version", "v1"))
    assert labels_match((("version", "v1"),), labels)
    assert labels_match((), labels)  # an empty selector selects everything
    assert not labels_match((("version", "v2"),), labels)
    assert not labels_match((("zone", "a"),), labels)
    assert not labels_match((("version", "v1"),), ())


# -- build_registry: resolution kinds ----------------------------------------------


def test_static_endpoints_with_labels_weights_and_workload_names() -> None:
    reg = registry(doc("ServiceEntry", """
        hosts: [reviews]
        ports: [{number: 9080, name: http, protocol: HTTP}]
        resolution: STATIC
        endpoints:
        - {address: 10.0.0.1, labels: {app: reviews, version: v1}}
        - {address: 10.0.0.2, labels: {app: reviews}, weight: 3}
        - {address: 10.0.0.3}
    """, name="reviews-se"))
    assert list(reg) == ["reviews.default.svc.cluster.local"]
    svc = reg["reviews.default.svc.cluster.local"]
    assert (svc.hostname, svc.namespace, svc.resolution, svc.location) == (
        "reviews.default.svc.cluster.local", "default", "STATIC", "MESH_EXTERNAL")
    assert svc.source == "reg.yaml#0"
    assert svc.ports == (ServicePort(9080, "http", "HTTP", None),)
    assert endpoints(svc) == [
        ("10.0.0.1", (), (("app", "reviews"), ("version", "v1")), 1, "reviews-v1", "default"),
        ("10.0.0.2", (), (("app", "reviews"),), 3, "reviews", "default"),
        ("10.0.0.3", (), (), 1, "unknown", "default"),
    ]


def test_dns_endpoints_keep_their_names() -> None:
    reg = registry(doc("ServiceEntry", """
        hosts: [api.example.com]
        ports: [{number: 80, name: http}]
        resolution: DNS
        endpoints: [{address: eu.api.example.com}, {address: us.api.example.com}]
    """))
    svc = reg["api.example.com"]
    assert svc.resolution == "DNS"
    assert [e.address for e in svc.endpoints] == ["eu.api.example.com", "us.api.example.com"]


@pytest.mark.parametrize("resolution", ["DNS", "DNS_ROUND_ROBIN"])
def test_dns_without_endpoints_uses_each_host_as_its_endpoint(resolution: str) -> None:
    reg = registry(doc("ServiceEntry", f"""
        hosts: [api.example.com, Other.Example.com.]
        ports: [{{number: 443, name: https, protocol: HTTPS}}]
        resolution: {resolution}
    """))
    assert [e.address for e in reg["api.example.com"].endpoints] == ["api.example.com"]
    # The endpoint is the name as written (minus the trailing dot) for the resolver.
    assert [e.address for e in reg["other.example.com"].endpoints] == ["Other.Example.com"]


def test_resolution_none_has_no_endpoints() -> None:
    reg = registry(doc("ServiceEntry", """
        hosts: [ext.example.com]
        ports: [{number: 80, name: http}]
        resolution: NONE
    """))
    svc = reg["ext.example.com"]
    assert (svc.resolution, svc.endpoints) == ("NONE", ())


def test_resolution_defaults_to_none() -> None:
    reg = registry(doc("ServiceEntry", """
        hosts: [ext.example.com]
        ports: [{number: 80, name: http}]
    """))
    assert reg["ext.example.com"].resolution == "NONE"


def test_wildcard_host_is_a_service_without_dns_endpoint() -> None:
    reg = registry(doc("ServiceEntry", """
        hosts: ["*.example.com"]
        ports: [{number: 80, name: http}]
        resolution: NONE
    """))
    svc = reg["*.example.com"]
    assert svc.is_wildcard and svc.endpoints == ()


def test_short_hosts_expand_in_the_entry_namespace_and_addresses_are_kept() -> None:
    reg = registry(doc("ServiceEntry", """
        hosts: [ratings]
        addresses: [240.0.0.7]
        ports: [{number: 9080, name: http}]
        resolution: STATIC
        location: MESH_INTERNAL
        endpoints: [{address: 10.1.0.1}]
    """, namespace="prod"))
    svc = reg["ratings.prod.svc.cluster.local"]
    assert (svc.namespace, svc.location, svc.addresses) == ("prod", "MESH_INTERNAL", ("240.0.0.7",))
    assert svc.endpoints[0].namespace == "prod"


# -- ports: by name, targetPort, service port --------------------------------------


def test_endpoint_port_by_name_then_target_port_then_service_port() -> None:
    reg = registry(doc("ServiceEntry", """
        hosts: [svc]
        ports:
        - {number: 80, name: http, targetPort: 8080}
        - {number: 81, name: admin}
        - {number: 82, name: metrics, targetPort: 9090}
        resolution: STATIC
        endpoints:
        - {address: 10.0.0.1, ports: {http: 7001, admin: 7002}}
        - {address: 10.0.0.2}
    """))
    svc = reg["svc.default.svc.cluster.local"]
    named, plain = svc.endpoints
    http, admin, metrics = svc.ports
    assert svc.port(80) is http and svc.port(99) is None
    # The endpoint's own mapping for the port's name wins over targetPort.
    assert named.port_for(http) == 7001
    assert named.port_for(admin) == 7002
    assert named.port_for(metrics) == 9090  # not mapped: targetPort
    assert plain.port_for(http) == 8080  # targetPort
    assert plain.port_for(admin) == 81  # neither: the service port


def test_service_endpoint_port_for_unit() -> None:
    ep = ServiceEndpoint("10.0.0.1", (("grpc", 5000),), (), 1, "w", "ns")
    assert ep.port_for(ServicePort(50051, "grpc")) == 5000
    assert ep.port_for(ServicePort(80, "http", target_port=8080)) == 8080
    assert ep.port_for(ServicePort(80, "http")) == 80


# -- WorkloadEntry selection ----------------------------------------------------------


WORKLOADS = [
    doc("WorkloadEntry", "address: 10.2.0.1\nlabels: {app: details, version: v1}\nports: {http: 9081}",
        name="details-vm-1"),
    doc("WorkloadEntry", "address: 10.2.0.2\nlabels: {app: details, version: v2}\nweight: 5",
        name="details-vm-2"),
    doc("WorkloadEntry", "address: 10.2.0.3\nlabels: {app: ratings}", name="ratings-vm"),
    # Same labels, other namespace: never selected by a ServiceEntry in default.
    doc("WorkloadEntry", "address: 10.9.0.1\nlabels: {app: details, version: v1}", name="details-vm-other",
        namespace="other"),
]


def test_workload_selector_selects_matching_workload_entries_in_the_same_namespace() -> None:
    reg = registry(doc("ServiceEntry", """
        hosts: [details]
        ports: [{number: 9080, name: http, targetPort: 9000}]
        resolution: STATIC
        workloadSelector: {labels: {app: details}}
    """, name="details"), *WORKLOADS)
    svc = reg["details.default.svc.cluster.local"]
    assert endpoints(svc) == [
        ("10.2.0.1", (("http", 9081),), (("app", "details"), ("version", "v1")), 1, "details-vm-1", "default"),
        ("10.2.0.2", (), (("app", "details"), ("version", "v2")), 5, "details-vm-2", "default"),
    ]
    port = svc.ports[0]
    assert [e.port_for(port) for e in svc.endpoints] == [9081, 9000]


def test_workload_selector_in_another_namespace_selects_only_there() -> None:
    reg = registry(doc("ServiceEntry", """
        hosts: [details]
        ports: [{number: 9080, name: http}]
        resolution: STATIC
        workloadSelector: {labels: {app: details}}
    """, namespace="other"), *WORKLOADS)
    svc = reg["details.other.svc.cluster.local"]
    assert [(e.address, e.namespace, e.workload) for e in svc.endpoints] == [
        ("10.9.0.1", "other", "details-vm-other")]


def test_workload_selector_matching_nothing_gives_no_endpoints() -> None:
    reg = registry(doc("ServiceEntry", """
        hosts: [reviews]
        ports: [{number: 9080, name: http}]
        resolution: STATIC
        workloadSelector: {labels: {app: reviews}}
    """), *WORKLOADS)
    assert reg["reviews.default.svc.cluster.local"].endpoints == ()


def test_workload_entries_without_a_selecting_service_entry_are_not_services() -> None:
    reg = registry(*WORKLOADS)
    assert reg == {}


# -- merging -------------------------------------------------------------------------------


def test_two_service_entries_for_one_host_are_merged() -> None:
    warnings: list[str] = []
    reg = registry(
        doc("ServiceEntry", """
            hosts: [reviews]
            addresses: [240.0.0.1]
            ports: [{number: 9080, name: http}]
            resolution: STATIC
            endpoints: [{address: 10.0.0.1, labels: {version: v1}}]
        """, name="reviews-a"),
        doc("ServiceEntry", """
            hosts: [reviews.default.svc.cluster.local]
            addresses: [240.0.0.1, 240.0.0.2]
            ports: [{number: 9080, name: http}, {number: 9443, name: https}]
            resolution: STATIC
            endpoints: [{address: 10.0.0.2, labels: {version: v2}}]
        """, name="reviews-b"),
        warnings=warnings,
    )
    assert list(reg) == ["reviews.default.svc.cluster.local"]
    svc = reg["reviews.default.svc.cluster.local"]
    assert [e.address for e in svc.endpoints] == ["10.0.0.1", "10.0.0.2"]
    assert [p.number for p in svc.ports] == [9080, 9443]
    assert svc.addresses == ("240.0.0.1", "240.0.0.2")
    assert svc.source == "reg.yaml#0"  # the first entry names the merged service
    assert warnings == []


def test_merging_entries_with_different_resolution_warns_and_keeps_the_first() -> None:
    warnings: list[str] = []
    reg = registry(
        doc("ServiceEntry", "hosts: [api.example.com]\nports: [{number: 80, name: http}]\nresolution: DNS",
            name="a"),
        doc("ServiceEntry", "hosts: [api.example.com]\nports: [{number: 80, name: http}]\nresolution: NONE",
            name="b"),
        warnings=warnings,
    )
    assert reg["api.example.com"].resolution == "DNS"
    assert len(warnings) == 1
    assert warnings[0].startswith("reg.yaml#1: ServiceEntry default/b declares host api.example.com")
    assert "keeping the first" in warnings[0]


def test_one_entry_with_several_hosts_gives_each_host_the_endpoints() -> None:
    reg = registry(doc("ServiceEntry", """
        hosts: [a.example.com, b.example.com]
        ports: [{number: 80, name: http, protocol: HTTP}]
        resolution: STATIC
        endpoints: [{address: 10.0.0.1}]
    """))
    assert sorted(reg) == ["a.example.com", "b.example.com"]
    assert [e.address for e in reg["b.example.com"].endpoints] == ["10.0.0.1"]


# -- ServiceEntry / WorkloadEntry fields pyproxy accepts with a warning ----------------------


def warnings_of(text: str) -> list[str]:
    loaded = load_text(text, "w.yaml")
    assert loaded.ok, [str(e) for e in loaded.errors]
    return [str(w) for w in loaded.warnings]


@pytest.mark.parametrize("protocol", ["HTTP", "http", "HTTP_PROXY", "GRPC-WEB", "HTTP2", "grpc", None])
def test_http_port_protocols_load_without_warning(protocol: str | None) -> None:
    port = "{number: 80, name: web" + (f", protocol: {protocol}" if protocol else "") + "}"
    assert warnings_of(doc("ServiceEntry", f"hosts: [a.example.com]\nports: [{port}]\nresolution: DNS")) == []


@pytest.mark.parametrize("protocol", ["HTTPS", "TLS", "TCP", "MONGO"])
def test_other_port_protocols_warn(protocol: str) -> None:
    ws = warnings_of(doc("ServiceEntry", f"hosts: [a.example.com]\nports: [{{number: 443, name: p, protocol: {protocol}}}]\n"
                                         "resolution: DNS"))
    assert ws == [(f"w.yaml#0: spec.ports[0].protocol: {protocol}: pyproxy carries HTTP/1.1 and HTTP/2 only; other traffic "
                   "to this port fails (keep it out of capture with pyproxy iptables --exclude-outbound-ports 443)")]


def test_cidr_addresses_warn_but_single_addresses_do_not() -> None:
    ws = warnings_of(doc("ServiceEntry", """
        hosts: [db.internal]
        addresses: [10.0.0.5, 10.0.0.6/32, 10.1.0.0/16, 'fd00::/64']
        ports: [{number: 80, name: http}]
        resolution: STATIC
        endpoints: [{address: 10.0.0.5}]
    """))
    assert ws == [
        "w.yaml#0: spec.addresses[2]: a CIDR block is not used by pyproxy (requests select a service by Host); ignored",
        "w.yaml#0: spec.addresses[3]: a CIDR block is not used by pyproxy (requests select a service by Host); ignored",
    ]


def test_unimplemented_endpoint_fields_warn() -> None:
    # serviceAccount is implemented (auto mTLS and the expected SANs, docs/mtls.md): no warning.
    ws = warnings_of(doc("WorkloadEntry", "address: 10.0.0.1\nnetwork: n1\nlocality: eu/west\nserviceAccount: sa"))
    assert ws == [f"w.yaml#0: {f}: parsed, but not implemented by pyproxy: it has no effect"
                  for f in ("spec.network", "spec.locality")]
