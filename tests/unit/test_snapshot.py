"""Unit tests for the snapshot builder (pyproxy.snapshot): the host index,
cluster construction and carry-over across reloads, Sidecar selection.

No sockets and no event loop: the builder only stores the loop in clusters
and uses its clock/timer methods for outlier detection, so a stand-in with
those three methods is enough.
"""

from __future__ import annotations

import random
import textwrap

import pytest

from pyproxy.config.loader import load_text
from pyproxy.http.exchange import OUTBOUND, Exchange
from pyproxy.options import Limits
from pyproxy.routing.table import VirtualHost
from pyproxy.snapshot import BuildContext, ProxyIdentity, Snapshot, build_snapshot, retire
from pyproxy.upstream.cluster import Cluster, PassthroughCluster
from tests.unit.fakes import StubLoop

# -- helpers ------------------------------------------------------------------


def doc(kind: str, spec: str, *, name: str = "x", namespace: str | None = None) -> str:
    md = f"  name: {name}\n" + (f"  namespace: {namespace}\n" if namespace else "")
    body = textwrap.indent(textwrap.dedent(spec).strip("\n"), "  ")
    return f"apiVersion: networking.istio.io/v1\nkind: {kind}\nmetadata:\n{md}spec:\n{body}\n"


def se(host: str, *, name: str | None = None, namespace: str | None = None, ports: str = "[{number: 9080, name: http}]",
       resolution: str = "STATIC", endpoints: str = "", extra: str = "") -> str:
    spec = f"hosts: [{host}]\nports: {ports}\nresolution: {resolution}\n"
    if endpoints:
        spec += f"endpoints:\n{textwrap.indent(textwrap.dedent(endpoints).strip(), '')}\n"
    spec += extra
    return doc("ServiceEntry", spec, name=name or host.replace("*", "w").replace(".", "-"), namespace=namespace)


REVIEWS = se("reviews", endpoints="""
- {address: 10.0.0.1, labels: {app: reviews, version: v1}}
- {address: 10.0.0.2, labels: {app: reviews, version: v2}}
- {address: 10.0.0.3, labels: {app: reviews, version: v3}, ports: {http: 9999}}
""")

REVIEWS_DR = doc("DestinationRule", """
host: reviews
subsets:
- {name: v1, labels: {version: v1}}
- {name: v2, labels: {version: v2}}
- {name: v3, labels: {version: v3}}
""", name="reviews")


def loaded(*docs: str):
    cfg = load_text("---\n".join(docs), "mesh.yaml")
    assert cfg.ok, [str(e) for e in cfg.errors]
    return cfg


def build(*docs: str, identity: ProxyIdentity | None = None, previous: Snapshot | None = None,
          created: list[Cluster] | None = None, loop: StubLoop | None = None) -> Snapshot:
    ctx = BuildContext(loop or StubLoop(now=100.0), random.Random(0), None, None,  # type: ignore[arg-type]
                       created.append if created is not None else None)
    return build_snapshot(loaded(*docs), identity or ProxyIdentity(), ctx, previous,
                          version=1 if previous is None else previous.version + 1)


class _Worker:
    def __init__(self, snap: Snapshot) -> None:
        self.snapshot = snap
        self.loop = StubLoop(now=100.0)


class _Conn:
    """The attributes Exchange reads from its downstream connection."""

    def __init__(self, snap: Snapshot, original_dst: tuple[str, int] | None = None) -> None:
        self.worker = _Worker(snap)
        self.direction = OUTBOUND
        self.listen_port = 15001
        self.original_dst = original_dst
        self.limits = Limits()


def request(snap: Snapshot, authority: bytes, target: bytes = b"/") -> Exchange:
    return Exchange(_Conn(snap), b"GET", target, [(b"host", authority)], "1.1", True, False)


def lookup(snap: Snapshot, authority: bytes) -> VirtualHost | None:
    """The virtual host for a request's Host header, parsed as the exchange does."""
    return snap.hosts.lookup(request(snap, authority).host)


def cluster_of(vh: VirtualHost, port: int | None = None) -> Cluster | None:
    target = vh.routes[0].targets[0]
    return target.cluster_for(port) if port is not None else target.cluster


# -- host index: names ------------------------------------------------------------------


@pytest.mark.parametrize(
    "authority",
    [b"reviews", b"reviews:9080", b"reviews.default", b"reviews.default:9080", b"reviews.default.svc",
     b"reviews.default.svc.cluster.local", b"reviews.default.svc.cluster.local:9080", b"REVIEWS:9080",
     b"Reviews.Default.Svc.Cluster.Local"],
)
def test_service_is_found_by_every_name_form(authority: bytes) -> None:
    snap = build(REVIEWS)
    vh = lookup(snap, authority)
    assert vh is not None and vh.name == "reviews.default.svc.cluster.local"
    assert vh.service is snap.registry["reviews.default.svc.cluster.local"]
    assert not vh.has_vs


@pytest.mark.parametrize("authority", [b"ratings", b"reviews.prod", b"reviews.default.svc.cluster", b"10.0.0.1",
                                       b"reviews.other.svc.cluster.local", b"example.com"])
def test_unknown_names_are_not_found(authority: bytes) -> None:
    assert lookup(build(REVIEWS), authority) is None


def test_short_name_only_from_the_same_namespace() -> None:
    snap = build(se("ratings", namespace="prod", endpoints="- {address: 10.0.0.9}"))
    assert lookup(snap, b"ratings") is None
    for name in (b"ratings.prod", b"ratings.prod.svc", b"ratings.prod.svc.cluster.local"):
        assert lookup(snap, name) is not None, name
    prod = build(se("ratings", namespace="prod", endpoints="- {address: 10.0.0.9}"),
                 identity=ProxyIdentity(namespace="prod"))
    assert lookup(prod, b"ratings") is not None


def test_same_short_name_in_two_namespaces_resolves_to_the_proxy_namespace() -> None:
    docs = (se("web", namespace="a", endpoints="- {address: 10.0.0.1}"),
            se("web", namespace="b", endpoints="- {address: 10.0.0.2}"))
    for ns in ("a", "b"):
        vh = lookup(build(*docs, identity=ProxyIdentity(namespace=ns)), b"web")
        assert vh is not None and vh.name == f"web.{ns}.svc.cluster.local"


def test_wildcard_virtual_service_hosts_longest_suffix_first() -> None:
    snap = build(
        se("backend", endpoints="- {address: 10.0.0.5}"),
        doc("VirtualService", "hosts: ['*.example.com']\nhttp:\n- route: [{destination: {host: backend}}]",
            name="short"),
        doc("VirtualService", "hosts: ['*.api.example.com']\nhttp:\n- route: [{destination: {host: backend}}]",
            name="long"),
        doc("VirtualService", "hosts: [exact.api.example.com]\nhttp:\n- route: [{destination: {host: backend}}]",
            name="exact"),
    )
    assert [s for s, _ in snap.hosts.wildcards] == [b".api.example.com", b".example.com"]
    assert lookup(snap, b"v1.api.example.com").name == "*.api.example.com"
    assert lookup(snap, b"a.b.api.example.com:8080").name == "*.api.example.com"
    assert lookup(snap, b"www.example.com").name == "*.example.com"
    assert lookup(snap, b"exact.api.example.com").name == "exact.api.example.com"  # exact beats wildcards
    # ``*.example.com`` matches subdomains only, not the domain itself.
    assert lookup(snap, b"example.com") is None
    assert lookup(snap, b"api.example.com").name == "*.example.com"


def test_virtual_service_only_host_routes_to_a_registry_service() -> None:
    snap = build(REVIEWS, doc("VirtualService", """
        hosts: [legacy.internal]
        http:
        - route: [{destination: {host: reviews}}]
    """))
    vh = lookup(snap, b"legacy.internal:80")
    assert vh is not None and vh.service is None and vh.has_vs
    assert cluster_of(vh) is snap.clusters["outbound|9080||reviews.default.svc.cluster.local"]
    # No port, or one the (portless) service does not declare: port 80.
    assert addressed_port(snap, b"legacy.internal") == 80 and addressed_port(snap, b"legacy.internal:8080") == 8080


def test_virtual_service_short_host_gets_cluster_aliases() -> None:
    snap = build(REVIEWS, doc("VirtualService", """
        hosts: [ghost]
        http:
        - route: [{destination: {host: reviews}}]
    """))
    for name in (b"ghost", b"ghost.default", b"ghost.default.svc.cluster.local"):
        vh = lookup(snap, name)
        assert vh is not None and vh.name == "ghost.default.svc.cluster.local"


def test_virtual_service_host_written_literally_beats_a_generated_alias() -> None:
    # ``reviews.default`` has a dot, so it is not expanded: it is its own
    # host, and the name written in config wins over the alias the reviews
    # service would otherwise own.
    snap = build(REVIEWS, REVIEWS_DR, doc("VirtualService", """
        hosts: [reviews.default]
        http:
        - route: [{destination: {host: reviews, subset: v3}}]
    """, name="literal"))
    vh = lookup(snap, b"reviews.default")
    assert vh is not None and vh.name == "reviews.default" and vh.has_vs
    assert cluster_of(vh).name == "outbound|9080|v3|reviews.default.svc.cluster.local"
    for name in (b"reviews", b"reviews.default.svc", b"reviews.default.svc.cluster.local"):
        assert lookup(snap, name).name == "reviews.default.svc.cluster.local"


def test_service_fqdn_is_never_taken_by_another_hosts_alias() -> None:
    # An entry whose host is literally ``a.b`` and a service a.b.svc.cluster.local
    # (whose generated alias is also ``a.b``): the literal name wins.
    snap = build(se("a.b", name="literal", endpoints="- {address: 10.0.0.1}"),
                 se("a", name="short", namespace="b", endpoints="- {address: 10.0.0.2}"))
    assert lookup(snap, b"a.b").name == "a.b"
    assert lookup(snap, b"a.b.svc").name == "a.b.svc.cluster.local"


def test_service_addresses_are_host_names_but_cidrs_are_not() -> None:
    snap = build(se("db", endpoints="- {address: 10.0.0.1}",
                    extra="addresses: [240.0.0.1, 'fd00::1', 10.10.0.0/16]\n"))
    for name in (b"240.0.0.1", b"240.0.0.1:9080", b"[fd00::1]:9080", b"[FD00::1]"):
        vh = lookup(snap, name)
        assert vh is not None and vh.name == "db.default.svc.cluster.local", name
    assert lookup(snap, b"10.10.0.1") is None


def test_virtual_service_bound_only_to_gateways_does_not_apply() -> None:
    snap = build(REVIEWS, REVIEWS_DR,
                 doc("VirtualService", """
                     hosts: [reviews]
                     gateways: [istio-system/ingress]
                     http:
                     - route: [{destination: {host: reviews, subset: v1}}]
                 """, name="edge"),
                 doc("VirtualService", """
                     hosts: [edge-only.example.com]
                     gateways: [ingress]
                     http:
                     - route: [{destination: {host: reviews}}]
                 """, name="edge-only"))
    vh = lookup(snap, b"reviews")
    assert not vh.has_vs
    assert cluster_of(vh).name == "outbound|9080||reviews.default.svc.cluster.local"  # default route: all endpoints
    assert lookup(snap, b"edge-only.example.com") is None


def test_virtual_service_with_mesh_among_gateways_applies() -> None:
    snap = build(REVIEWS, REVIEWS_DR, doc("VirtualService", """
        hosts: [reviews]
        gateways: [ingress, mesh]
        http:
        - route: [{destination: {host: reviews, subset: v2}}]
    """))
    vh = lookup(snap, b"reviews")
    assert vh.has_vs and cluster_of(vh).subset == "v2"


def test_two_virtual_services_for_one_host_are_concatenated_in_load_order() -> None:
    snap = build(
        REVIEWS, REVIEWS_DR,
        doc("VirtualService", """
            hosts: [reviews]
            http:
            - match: [{headers: {end-user: {exact: jason}}}]
              route: [{destination: {host: reviews, subset: v2}}]
        """, name="first"),
        doc("VirtualService", """
            hosts: [reviews.default.svc.cluster.local]
            http:
            - route: [{destination: {host: reviews, subset: v3}}]
        """, name="second"),
    )
    vh = lookup(snap, b"reviews")
    assert [r.virtual_host for r in vh.routes] == ["first", "second"]
    assert [r.targets[0].subset for r in vh.routes] == ["v2", "v3"]
    assert [w for w in snap.warnings if "are concatenated" in w] == [
        ("host reviews.default.svc.cluster.local: rules of VirtualServices default/first (mesh.yaml#2), "
         "default/second (mesh.yaml#3) are concatenated in that order")
    ]


def test_wildcard_virtual_service_applies_to_registry_services_it_covers() -> None:
    snap = build(
        se("api.example.com", endpoints="- {address: 10.0.0.1, labels: {v: a}}\n- {address: 10.0.0.2, labels: {v: b}}",
           ports="[{number: 80, name: http}]"),
        doc("DestinationRule", "host: api.example.com\nsubsets: [{name: b, labels: {v: b}}]"),
        doc("VirtualService", "hosts: ['*.com']\nhttp:\n- route: [{destination: {host: api.example.com}}]",
            name="broad"),
        doc("VirtualService", "hosts: ['*.example.com']\nhttp:\n- route: [{destination: {host: api.example.com, "
                              "subset: b}}]", name="narrow"),
    )
    vh = lookup(snap, b"api.example.com")
    assert vh.service is not None and vh.has_vs
    assert [r.virtual_host for r in vh.routes] == ["narrow"]


def test_wildcard_service_entry_is_matched_by_suffix_and_passes_through() -> None:
    snap = build(se("'*.example.com'", name="wild", resolution="NONE", ports="[{number: 80, name: http}]"),
                 se("api.example.com", endpoints="- {address: 10.0.0.1}", ports="[{number: 80, name: http}]"))
    vh = lookup(snap, b"foo.example.com")
    assert vh is not None and vh.name == "*.example.com" and vh.service.is_wildcard
    cluster = cluster_of(vh)
    assert isinstance(cluster, PassthroughCluster) and cluster.name == "outbound|80||*.example.com"
    assert lookup(snap, b"api.example.com").name == "api.example.com"  # an exact service still wins


# -- effective port ------------------------------------------------------------------------


MULTI = se("multi", ports="[{number: 8080, name: http}, {number: 9090, name: http-admin}]",
           endpoints="- {address: 10.0.0.1}")


def addressed_port(snap: Snapshot, authority: bytes, original_dst: tuple[str, int] | None = None) -> int:
    """The service port an outbound request ends up with (what Exchange.start uses)."""
    ex = Exchange(_Conn(snap, original_dst), b"GET", b"/", [(b"host", authority)], "1.1", True, False)
    vh = snap.hosts.lookup(ex.host)
    assert vh is not None
    return ex.service_port(vh)


def test_effective_port() -> None:
    snap = build(MULTI)
    vh = lookup(snap, b"multi")
    assert vh.ports == frozenset({8080, 9090}) and vh.default_port == 8080
    assert addressed_port(snap, b"multi:9090") == 9090
    assert addressed_port(snap, b"multi:8080") == 8080
    assert addressed_port(snap, b"multi") == 8080  # no port: the first declared port
    assert addressed_port(snap, b"multi:12345") == 8080  # not a service port: the first declared port


def test_port_selection_from_authority_and_original_destination() -> None:
    snap = build(MULTI)
    assert addressed_port(snap, b"multi:9090") == 9090
    assert addressed_port(snap, b"multi") == 8080
    assert addressed_port(snap, b"multi:15001") == 8080  # the sidecar's own listener port names no service port
    # Transparently redirected: the port the app connected to decides, like Istio's per-port listeners.
    assert addressed_port(snap, b"multi", ("10.0.0.1", 9090)) == 9090
    assert addressed_port(snap, b"multi:8080", ("10.0.0.1", 9090)) == 9090
    # The original port is not a service port: fall back to the Host header's.
    assert addressed_port(snap, b"multi:9090", ("10.0.0.1", 7777)) == 9090


def test_multi_port_service_routes_by_port() -> None:
    snap = build(MULTI)
    vh = lookup(snap, b"multi")
    assert cluster_of(vh).name == "outbound|8080||multi.default.svc.cluster.local"
    assert cluster_of(vh, 9090).name == "outbound|9090||multi.default.svc.cluster.local"
    assert cluster_of(vh, 8080).name == "outbound|8080||multi.default.svc.cluster.local"
    assert cluster_of(vh, 1).name == "outbound|8080||multi.default.svc.cluster.local"


# -- clusters --------------------------------------------------------------------------------


def endpoint_view(cluster: Cluster) -> list[tuple[str, int, str]]:
    return [(e.host, e.port, e.label_dict.get("version", "")) for e in cluster.endpoints]


def test_istio_cluster_names_and_subset_endpoint_selection() -> None:
    created: list[Cluster] = []
    snap = build(REVIEWS, REVIEWS_DR, created=created)
    fqdn = "reviews.default.svc.cluster.local"
    assert list(snap.clusters) == [f"outbound|9080|{s}|{fqdn}" for s in ("", "v1", "v2", "v3")]
    assert endpoint_view(snap.clusters[f"outbound|9080||{fqdn}"]) == [
        ("10.0.0.1", 9080, "v1"), ("10.0.0.2", 9080, "v2"), ("10.0.0.3", 9999, "v3")]
    assert endpoint_view(snap.clusters[f"outbound|9080|v1|{fqdn}"]) == [("10.0.0.1", 9080, "v1")]
    assert endpoint_view(snap.clusters[f"outbound|9080|v3|{fqdn}"]) == [("10.0.0.3", 9999, "v3")]
    c = snap.clusters[f"outbound|9080|v2|{fqdn}"]
    assert (c.kind, c.service_port, c.subset, c.service) == ("outbound", 9080, "v2", snap.registry[fqdn])
    assert [e.workload for e in c.endpoints] == ["reviews-v2"]
    assert c.healthy == c.endpoints
    # Every cluster of the snapshot was announced once (metrics binding).
    assert {id(c) for c in created} == {id(c) for c in snap.all_clusters()}
    assert len(created) == len(snap.all_clusters()) == 6
    assert snap.inbound_cluster.name == "inbound|9080||" and snap.passthrough.name == "PassthroughCluster"


def test_service_clusters_one_per_port_and_subset() -> None:
    snap = build(MULTI, doc("DestinationRule", "host: multi\nsubsets: [{name: a, labels: {x: y}}]"))
    assert list(snap.clusters) == [
        "outbound|8080||multi.default.svc.cluster.local", "outbound|8080|a|multi.default.svc.cluster.local",
        "outbound|9090||multi.default.svc.cluster.local", "outbound|9090|a|multi.default.svc.cluster.local",
    ]
    # Subset ``a`` selects no endpoint: a warning, the cluster exists and is empty (503 UH).
    assert snap.clusters["outbound|8080|a|multi.default.svc.cluster.local"].endpoints == []
    assert "cluster outbound|8080|a|multi.default.svc.cluster.local: subset a selects no endpoint " \
           "(requests get 503 UH)" in snap.warnings


def test_unknown_subset_leaves_the_target_without_cluster_and_warns() -> None:
    snap = build(REVIEWS, REVIEWS_DR, doc("VirtualService", """
        hosts: [reviews]
        http:
        - route: [{destination: {host: reviews, subset: v9}}]
    """, name="r"))
    target = lookup(snap, b"reviews").routes[0].targets[0]
    assert target.subset == "v9" and target.cluster is None
    assert any("subset 'v9' of reviews.default.svc.cluster.local is not defined by any DestinationRule (503 NC)" in w
               for w in snap.warnings)


def test_subset_without_any_destination_rule_warns() -> None:
    snap = build(REVIEWS, doc("VirtualService", """
        hosts: [reviews]
        http:
        - route: [{destination: {host: reviews, subset: v1}}]
    """, name="r"))
    assert lookup(snap, b"reviews").routes[0].targets[0].cluster is None
    assert any("subset 'v1'" in w and "(503 NC)" in w for w in snap.warnings)


def test_destination_host_not_in_registry_warns() -> None:
    snap = build(doc("VirtualService", """
        hosts: [front]
        http:
        - route: [{destination: {host: nowhere}}]
    """))
    assert lookup(snap, b"front").routes[0].targets[0].cluster is None
    assert any("destination host nowhere.default.svc.cluster.local is not in the service registry (503 NC)" in w
               for w in snap.warnings)


def test_destination_rule_in_another_namespace_expands_its_own_short_host() -> None:
    snap = build(se("ratings", namespace="prod", endpoints="- {address: 10.0.0.1, labels: {version: v1}}"),
                 doc("DestinationRule", "host: ratings\nsubsets: [{name: v1, labels: {version: v1}}]",
                     namespace="prod"))
    assert "outbound|9080|v1|ratings.prod.svc.cluster.local" in snap.clusters


def test_resolution_none_without_endpoints_is_a_passthrough_cluster() -> None:
    snap = build(se("ext.example.com", resolution="NONE", ports="[{number: 80, name: http}]"))
    cluster = snap.clusters["outbound|80||ext.example.com"]
    assert isinstance(cluster, PassthroughCluster) and cluster.endpoints == []


def test_dns_names_are_collected_for_the_resolver_but_ips_are_not() -> None:
    snap = build(
        se("api.example.com", resolution="DNS", ports="[{number: 80, name: http}]"),
        se("db", resolution="DNS", endpoints="- {address: db-1.internal}\n- {address: 10.0.0.7}"),
        REVIEWS,
    )
    assert snap.dns_names == frozenset({"api.example.com", "db-1.internal"})
    assert [e.host for e in snap.clusters["outbound|80||api.example.com"].endpoints] == ["api.example.com"]


def test_outlier_detection_uses_the_loop_clock_and_timers() -> None:
    loop = StubLoop(now=100.0)
    snap = build(REVIEWS, doc("DestinationRule", """
        host: reviews
        trafficPolicy: {outlierDetection: {consecutive5xxErrors: 2, interval: 3s}}
    """), loop=loop)
    cluster = snap.clusters["outbound|9080||reviews.default.svc.cluster.local"]
    assert cluster.outlier.clock() == 100.0
    cluster.outlier.start()
    assert loop.scheduled and loop.scheduled[-1][0] == 3.0


# -- reload: carry-over and retire -----------------------------------------------------------


def test_unchanged_clusters_are_carried_over_as_the_same_objects() -> None:
    first = build(REVIEWS, REVIEWS_DR)
    created: list[Cluster] = []
    second = build(REVIEWS, REVIEWS_DR, previous=first, created=created)
    assert second.version == 2
    for name, cluster in first.clusters.items():
        assert second.clusters[name] is cluster
    assert second.inbound_cluster is first.inbound_cluster
    assert second.passthrough is first.passthrough
    assert created == []  # nothing new to announce
    assert retire(first, second) == []
    assert not any(c.draining for c in second.all_clusters())


def test_changed_clusters_are_replaced_and_the_old_ones_drain() -> None:
    first = build(REVIEWS, REVIEWS_DR)
    changed_dr = REVIEWS_DR.replace("{name: v2, labels: {version: v2}}", "{name: v2, labels: {version: v3}}")
    created: list[Cluster] = []
    second = build(REVIEWS, changed_dr, previous=first, created=created)
    fqdn = "reviews.default.svc.cluster.local"
    v2 = f"outbound|9080|v2|{fqdn}"
    assert second.clusters[v2] is not first.clusters[v2]
    assert endpoint_view(second.clusters[v2]) == [("10.0.0.3", 9999, "v3")]
    assert [c.name for c in created] == [v2]
    for name in (f"outbound|9080||{fqdn}", f"outbound|9080|v1|{fqdn}", f"outbound|9080|v3|{fqdn}"):
        assert second.clusters[name] is first.clusters[name]
    retired = retire(first, second)
    assert retired == [first.clusters[v2]]
    assert first.clusters[v2].draining and not second.clusters[v2].draining


def test_traffic_policy_change_replaces_the_cluster() -> None:
    first = build(REVIEWS)
    second = build(REVIEWS, doc("DestinationRule", """
        host: reviews
        trafficPolicy: {connectionPool: {tcp: {maxConnections: 7}}}
    """), previous=first)
    name = "outbound|9080||reviews.default.svc.cluster.local"
    assert second.clusters[name] is not first.clusters[name]
    assert second.clusters[name].settings.max_connections == 7


def test_removed_service_clusters_are_retired() -> None:
    first = build(REVIEWS, MULTI)
    second = build(MULTI, previous=first)
    retired = {c.name for c in retire(first, second)}
    assert retired == {"outbound|9080||reviews.default.svc.cluster.local"}


def test_carried_over_cluster_sees_the_new_service_object() -> None:
    first = build(REVIEWS)
    second = build(REVIEWS, doc("VirtualService", "hosts: [reviews]\nhttp:\n- route: [{destination: {host: reviews}}]"),
                   previous=first)
    cluster = second.clusters["outbound|9080||reviews.default.svc.cluster.local"]
    assert cluster is first.clusters["outbound|9080||reviews.default.svc.cluster.local"]
    assert cluster.service is second.registry["reviews.default.svc.cluster.local"]


def test_carried_over_dns_clusters_keep_their_names_resolved() -> None:
    dns = se("api.example.com", resolution="DNS", ports="[{number: 80, name: http}]")
    first = build(dns)
    second = build(dns, previous=first)
    assert second.clusters["outbound|80||api.example.com"] is first.clusters["outbound|80||api.example.com"]
    assert second.dns_names == frozenset({"api.example.com"})


def test_app_change_replaces_the_inbound_cluster() -> None:
    first = build(REVIEWS)
    second = build(REVIEWS, previous=first, identity=ProxyIdentity(app_port=9999))
    assert second.inbound_cluster is not first.inbound_cluster
    assert [(e.host, e.port) for e in second.inbound_cluster.endpoints] == [("127.0.0.1", 9999)]
    assert first.inbound_cluster in retire(first, second)


# -- Sidecar: outbound traffic policy ------------------------------------------------------------


def sidecar(mode: str | None, *, name: str = "sc", namespace: str | None = None, selector: str = "") -> str:
    spec = ""
    if selector:
        spec += f"workloadSelector: {{labels: {selector}}}\n"
    spec += f"outboundTrafficPolicy: {{mode: {mode}}}\n" if mode else "egress: [{hosts: ['./*']}]\n"
    return doc("Sidecar", spec, name=name, namespace=namespace)


RO, ANY = "REGISTRY_ONLY", "ALLOW_ANY"
ME = ProxyIdentity(namespace="shop", labels=(("app", "cart"), ("version", "v1")))


@pytest.mark.parametrize(
    ("docs", "registry_only"),
    [
        ([], False),
        ([sidecar(RO, namespace="shop")], True),
        ([sidecar(RO, namespace="other")], False),
        ([sidecar(ANY, namespace="shop")], False),
        # A selector that matches this proxy beats the namespace default, whatever the order.
        ([sidecar(RO, namespace="shop"), sidecar(ANY, name="mine", namespace="shop", selector="{app: cart}")], False),
        ([sidecar(ANY, name="mine", namespace="shop", selector="{app: cart}"), sidecar(RO, namespace="shop")], False),
        ([sidecar(ANY, namespace="shop"), sidecar(RO, name="mine", namespace="shop", selector="{version: v1}")], True),
        # A selector that does not match is ignored.
        ([sidecar(ANY, namespace="shop"), sidecar(RO, name="other", namespace="shop", selector="{app: web}")], False),
        ([sidecar(RO, name="other", namespace="shop", selector="{app: cart, version: v2}")], False),
        # The root namespace's Sidecar is the mesh-wide default ...
        ([sidecar(RO, namespace="istio-system")], True),
        # ... unless the proxy's namespace has its own.
        ([sidecar(RO, namespace="istio-system"), sidecar(ANY, namespace="shop")], False),
        # A selected Sidecar without outboundTrafficPolicy leaves the mesh default (ALLOW_ANY).
        ([sidecar(RO, namespace="istio-system"), sidecar(None, namespace="shop")], False),
        # Root-namespace Sidecars with a selector are not mesh defaults.
        ([sidecar(RO, namespace="istio-system", selector="{app: cart}")], False),
    ],
)
def test_registry_only_sidecar_selection(docs: list[str], registry_only: bool) -> None:
    snap = build(REVIEWS, *docs, identity=ME)
    assert snap.registry_only is registry_only


def test_several_sidecars_at_one_level_warn_and_the_first_wins() -> None:
    snap = build(sidecar(RO, name="a", namespace="shop"), sidecar(ANY, name="b", namespace="shop"), identity=ME)
    assert snap.registry_only
    assert [w for w in snap.warnings if "several Sidecars" in w] == [
        "mesh.yaml#0: several Sidecars apply to this proxy; using shop/a, ignoring shop/b (mesh.yaml#1)"]


def test_registry_only_admits_hosts_of_wildcard_service_entries() -> None:
    snap = build(se("'*.googleapis.com'", name="g", resolution="NONE", ports="[{number: 80, name: http}]"),
                 sidecar(RO, namespace="default"))
    assert snap.registry_only
    assert lookup(snap, b"storage.googleapis.com") is not None
    assert lookup(snap, b"example.com") is None  # → 502 NR under REGISTRY_ONLY
