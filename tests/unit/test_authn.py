"""PeerAuthentication and DestinationRule tls: parsing, validation, Istio's
precedence, the auto-mTLS decision table and the endpoint TLS a snapshot
build gives each endpoint."""

from __future__ import annotations

import asyncio
import random

import pytest

from pyproxy.config.loader import load_text
from pyproxy.config.model import ClientTLSSettings, DestinationRule, PeerAuthentication, ServiceEntry
from pyproxy.security.authn import PeerAuthIndex, auto_mtls, client_tls_for, endpoint_tls_mode, istio_sni
from pyproxy.security.ca import init_ca, issue_to_dir
from pyproxy.security.certs import CertStore
from pyproxy.security.upstream import UpstreamTLS
from pyproxy.snapshot import BuildContext, ProxyIdentity, build_snapshot


def load(text: str):
    return load_text(text, "t.yaml")


def strs(diags: tuple) -> list[str]:
    return [str(d) for d in diags]


def pa(name: str, ns: str, body: str, api: str = "security.istio.io/v1") -> str:
    return f"apiVersion: {api}\nkind: PeerAuthentication\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{body}\n"


# -- PeerAuthentication parsing --------------------------------------------------------------


def test_peer_authentication_parses_both_api_versions() -> None:
    text = pa("a", "istio-system", "  mtls: {mode: STRICT}") + "---\n" + pa(
        "b", "default", "  selector: {matchLabels: {app: reviews}}\n  mtls: {mode: PERMISSIVE}\n"
                        "  portLevelMtls:\n    8080: {mode: DISABLE}\n    '9090': {}", api="security.istio.io/v1beta1")
    cfg = load(text)
    assert cfg.errors == ()
    a, b = cfg.resources
    assert isinstance(a, PeerAuthentication) and isinstance(b, PeerAuthentication)
    assert (a.mode, a.selector, a.port_level) == ("STRICT", None, ())
    assert (b.mode, b.selector, b.port_level) == ("PERMISSIVE", (("app", "reviews"),),
                                                  ((8080, "DISABLE"), (9090, "UNSET")))


@pytest.mark.parametrize("body,where,fragment", [
    ("  mtls: {mode: STRICTER}", "spec.mtls.mode", "STRICTER"),
    ("  portLevelMtls: {8080: {mode: DISABLE}}", "spec.portLevelMtls", "requires a selector"),
    ("  selector: {matchLabels: {a: b}}\n  portLevelMtls: {70000: {mode: DISABLE}}", "spec.portLevelMtls.70000",
     "65535"),
    ("  mtls: {mode: STRICT, extra: 1}", "spec.mtls.extra", ""),
])
def test_peer_authentication_errors_name_the_field(body: str, where: str, fragment: str) -> None:
    cfg = load(pa("a", "default", body))
    diags = strs(cfg.errors) + strs(cfg.warnings)
    assert any(d.startswith(f"t.yaml#0: {where}: ") and fragment in d for d in diags), diags


def test_peer_authentication_wrong_group_is_not_loaded() -> None:
    cfg = load(pa("a", "default", "  mtls: {mode: STRICT}", api="networking.istio.io/v1"))
    assert cfg.resources == ()
    assert "use security.istio.io/v1 or v1beta1" in strs(cfg.warnings)[0]


# -- precedence ------------------------------------------------------------------------------


def policies(text: str) -> list[PeerAuthentication]:
    cfg = load(text)
    assert cfg.errors == (), strs(cfg.errors)
    return [r for r in cfg.resources if isinstance(r, PeerAuthentication)]


def test_no_policy_is_permissive() -> None:
    idx = PeerAuthIndex([])
    assert idx.effective("default", {}).mode == "PERMISSIVE"
    assert idx.namespace_mode("default") == "PERMISSIVE"


def test_narrowest_non_unset_wins() -> None:
    text = "---\n".join([
        pa("mesh", "istio-system", "  mtls: {mode: STRICT}"),
        pa("ns", "legacy", "  mtls: {mode: PERMISSIVE}"),
        pa("unset", "other", "  mtls: {mode: UNSET}"),
        pa("wl", "legacy", "  selector: {matchLabels: {app: db}}\n  mtls: {mode: DISABLE}\n"
                           "  portLevelMtls: {5432: {mode: STRICT}, 8080: {mode: UNSET}}"),
        pa("root-selector", "istio-system", "  selector: {matchLabels: {app: web}}\n  mtls: {mode: DISABLE}"),
    ])
    warnings: list[str] = []
    idx = PeerAuthIndex(policies(text), warn=warnings.append)
    assert idx.effective("default", {"app": "web"}).mode == "STRICT"  # mesh; root selector ignored
    assert any("selector in the root namespace" in w for w in warnings)
    assert idx.effective("other", {}).mode == "STRICT"  # UNSET inherits the mesh
    assert idx.effective("legacy", {"app": "web"}).mode == "PERMISSIVE"  # namespace
    db = idx.effective("legacy", {"app": "db", "v": "1"})
    assert db.mode == "DISABLE"
    assert db.for_port(5432) == "STRICT"
    assert db.for_port(8080) == "DISABLE"  # port UNSET inherits the workload mode
    assert db.for_port(9999) == "DISABLE"
    assert idx.namespace_mode("legacy") == "PERMISSIVE"  # the client side ignores workload policies
    assert idx.namespace_mode("default") == "STRICT"


def test_two_policies_at_one_level_first_wins_with_warning() -> None:
    text = pa("first", "default", "  mtls: {mode: STRICT}") + "---\n" + pa("second", "default",
                                                                          "  mtls: {mode: DISABLE}")
    warnings: list[str] = []
    idx = PeerAuthIndex(policies(text), warn=warnings.append)
    assert idx.effective("default", {}).mode == "STRICT"
    assert len(warnings) == 1 and "default/second" in warnings[0] and "default/first" in warnings[0]


# -- DestinationRule tls -----------------------------------------------------------------------


def dr(spec: str) -> str:
    return ("apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: d, namespace: default}\n"
            f"spec:\n  host: r\n{spec}\n")


def test_dr_tls_every_field() -> None:
    cfg = load(dr("  trafficPolicy:\n    tls: {mode: MUTUAL, clientCertificate: /c.pem, privateKey: /k.pem, "
                  "caCertificates: /ca.pem, subjectAltNames: [a.example, 'spiffe://td/ns/a/sa/b'], sni: s.example, "
                  "insecureSkipVerify: false}"))
    assert cfg.errors == (), strs(cfg.errors)
    (rule,) = cfg.resources
    assert isinstance(rule, DestinationRule) and rule.traffic_policy is not None
    assert rule.traffic_policy.tls == ClientTLSSettings(
        "MUTUAL", "/c.pem", "/k.pem", "/ca.pem", "", ("a.example", "spiffe://td/ns/a/sa/b"), "s.example", False)


@pytest.mark.parametrize("tls,where,fragment", [
    ("{mode: MUTUAL, privateKey: /k}", "tls.clientCertificate", "required for MUTUAL"),
    ("{mode: MUTUAL, clientCertificate: /c}", "tls.privateKey", "required for MUTUAL"),
    ("{mode: ISTIO_MUTUAL, insecureSkipVerify: true}", "tls.insecureSkipVerify", "ISTIO_MUTUAL"),
    ("{mode: DISABLE, insecureSkipVerify: true}", "tls.insecureSkipVerify", "DISABLE"),
    ("{mode: SIMPLE, credentialName: s}", "tls.credentialName", "Kubernetes secrets"),
    ("{mode: SIMPEL}", "tls.mode", "SIMPEL"),
    ("{mode: SIMPLE, sniHost: x}", "tls.sniHost", ""),
])
def test_dr_tls_validation(tls: str, where: str, fragment: str) -> None:
    cfg = load(dr(f"  trafficPolicy:\n    tls: {tls}"))
    diags = strs(cfg.errors) + strs(cfg.warnings)
    assert any(d.startswith(f"t.yaml#0: spec.trafficPolicy.{where}: ") and fragment in d for d in diags), diags


def test_dr_tls_precedence_subset_port_level_first() -> None:
    cfg = load(dr("""  trafficPolicy:
    tls: {mode: ISTIO_MUTUAL}
    portLevelSettings:
    - port: {number: 80}
      tls: {mode: SIMPLE}
  subsets:
  - name: v1
    labels: {version: v1}
    trafficPolicy:
      tls: {mode: DISABLE}
      portLevelSettings:
      - port: {number: 81}
        tls: {mode: MUTUAL, clientCertificate: /c, privateKey: /k}
  - name: v2
    labels: {version: v2}
    trafficPolicy: {loadBalancer: {simple: RANDOM}}"""))
    assert cfg.errors == (), strs(cfg.errors)
    (rule,) = cfg.resources
    assert isinstance(rule, DestinationRule)
    top = rule.traffic_policy
    v1, v2 = (s.traffic_policy for s in rule.subsets)

    def mode(subset, port):  # type: ignore[no-untyped-def]
        tls = client_tls_for(top, subset, port)
        return tls.mode if tls else None

    assert mode(None, 80) == "SIMPLE"
    assert mode(None, 9080) == "ISTIO_MUTUAL"
    assert mode(v1, 81) == "MUTUAL"
    assert mode(v1, 80) == "DISABLE"  # the subset's tls replaces the rule's, port-level included
    assert mode(v2, 80) == "SIMPLE"  # no tls in the subset: the rule's port-level applies
    assert mode(v2, 9080) == "ISTIO_MUTUAL"
    assert client_tls_for(None, None, 80) is None


# -- auto mTLS -----------------------------------------------------------------------------------


def test_istio_sni() -> None:
    assert istio_sni(9080, "v1", "reviews.default.svc.cluster.local") == \
        "outbound_.9080_.v1_.reviews.default.svc.cluster.local"
    assert istio_sni(9080, "", "reviews.default.svc.cluster.local") == \
        "outbound_.9080_._.reviews.default.svc.cluster.local"


def test_endpoint_tls_mode_defaults_from_service_account() -> None:
    assert endpoint_tls_mode({}, "bookinfo-reviews") == "istio"
    assert endpoint_tls_mode({}, "") == "disabled"
    assert endpoint_tls_mode({"security.istio.io/tlsMode": "disabled"}, "sa") == "disabled"
    assert endpoint_tls_mode({"security.istio.io/tlsMode": "istio"}, "") == "istio"


@pytest.mark.parametrize("location,ns_mode,ep_mode,port_mode,certs,expected", [
    ("MESH_INTERNAL", "PERMISSIVE", "istio", "PERMISSIVE", True, True),
    ("MESH_INTERNAL", "STRICT", "istio", "STRICT", True, True),
    ("MESH_EXTERNAL", "PERMISSIVE", "istio", "PERMISSIVE", True, False),
    ("MESH_INTERNAL", "DISABLE", "istio", "PERMISSIVE", True, False),
    ("MESH_INTERNAL", "PERMISSIVE", "disabled", "PERMISSIVE", True, False),
    ("MESH_INTERNAL", "PERMISSIVE", "istio", "DISABLE", True, False),
    ("MESH_INTERNAL", "PERMISSIVE", "istio", "PERMISSIVE", False, False),
])
def test_auto_mtls_decision_table(location: str, ns_mode: str, ep_mode: str, port_mode: str, certs: bool,
                                  expected: bool) -> None:
    assert auto_mtls(location, ns_mode, ep_mode, port_mode, certs) is expected


MESH = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews.default.svc.cluster.local]
  location: MESH_INTERNAL
  ports: [{number: 9080, name: http, protocol: HTTP}]
  resolution: STATIC
  subjectAltNames: ["spiffe://cluster.local/ns/default/sa/extra"]
  endpoints:
  - {address: 10.0.0.1, labels: {version: v1}, serviceAccount: bookinfo-reviews}
  - {address: 10.0.0.2, labels: {version: v2}}
  - {address: 10.0.0.3, labels: {version: v3, security.istio.io/tlsMode: disabled}, serviceAccount: r3}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ext, namespace: default}
spec:
  hosts: [api.example.com]
  ports: [{number: 80, name: http, protocol: HTTP, targetPort: 443}]
  resolution: DNS
"""


def _build(text: str, certs: CertStore | None):  # type: ignore[no-untyped-def]
    cfg = load(text)
    assert cfg.errors == (), strs(cfg.errors)
    loop = asyncio.new_event_loop()
    try:
        ctx = BuildContext(loop, random.Random(1), certs=certs)
        return build_snapshot(cfg, ProxyIdentity(), ctx)
    finally:
        loop.close()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> CertStore:
    d = tmp_path_factory.mktemp("mesh")
    init_ca(d / "ca")
    issue_to_dir(d / "ca", d / "creds", "default", "productpage")
    s = CertStore(str(d / "creds"))
    s.load()
    return s


def _tls(snap, cluster: str) -> list[UpstreamTLS | None]:  # type: ignore[no-untyped-def]
    return [ep.tls for ep in snap.clusters[cluster].endpoints]


SANS = ("spiffe://cluster.local/ns/default/sa/extra", "spiffe://cluster.local/ns/default/sa/bookinfo-reviews",
        "spiffe://cluster.local/ns/default/sa/r3")
SNI = "outbound_.9080_._.reviews.default.svc.cluster.local"


def test_auto_mtls_per_endpoint(store: CertStore) -> None:
    snap = _build(MESH, store)
    assert _tls(snap, "outbound|9080||reviews.default.svc.cluster.local") == [
        UpstreamTLS("ISTIO_MUTUAL", SNI, SANS, auto=True), None, None]
    assert _tls(snap, "outbound|80||api.example.com") == [None]  # MESH_EXTERNAL: never auto
    # Without a workload certificate: plaintext everywhere.
    snap = _build(MESH, None)
    assert _tls(snap, "outbound|9080||reviews.default.svc.cluster.local") == [None, None, None]


def test_peer_authentication_disable_turns_auto_mtls_off(store: CertStore) -> None:
    snap = _build(MESH + "---\n" + pa("no-mtls", "default", "  mtls: {mode: DISABLE}"), store)
    assert _tls(snap, "outbound|9080||reviews.default.svc.cluster.local") == [None, None, None]
    workload_off = pa("v1", "default", "  selector: {matchLabels: {version: v1}}\n  mtls: {mode: STRICT}\n"
                                       "  portLevelMtls: {9080: {mode: DISABLE}}")
    snap = _build(MESH + "---\n" + workload_off, store)
    assert _tls(snap, "outbound|9080||reviews.default.svc.cluster.local") == [None, None, None]


def test_destination_rule_tls_wins_over_auto(store: CertStore) -> None:
    rules = """---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: default}
spec:
  host: reviews.default.svc.cluster.local
  trafficPolicy: {tls: {mode: ISTIO_MUTUAL, subjectAltNames: ["spiffe://cluster.local/ns/default/sa/only"]}}
  subsets:
  - name: v2
    labels: {version: v2}
    trafficPolicy: {tls: {mode: DISABLE}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: ext, namespace: default}
spec:
  host: api.example.com
  trafficPolicy:
    portLevelSettings:
    - port: {number: 80}
      tls: {mode: SIMPLE}
"""
    snap = _build(MESH + rules, store)
    only = ("spiffe://cluster.local/ns/default/sa/only",)
    assert _tls(snap, "outbound|9080||reviews.default.svc.cluster.local") == [
        UpstreamTLS("ISTIO_MUTUAL", SNI, only)] * 3  # the DR applies to every endpoint, labelled or not
    assert _tls(snap, "outbound|9080|v2|reviews.default.svc.cluster.local") == [None]
    ext = snap.clusters["outbound|80||api.example.com"].endpoints
    assert [(ep.host, ep.port, ep.tls) for ep in ext] == [("api.example.com", 443,
                                                           UpstreamTLS("SIMPLE", "api.example.com"))]


def test_service_entry_subject_alt_names_are_parsed() -> None:
    # ServiceEntry subjectAltNames are parsed (no longer "not implemented").
    cfg = load(MESH)
    se = cfg.resources[0]
    assert isinstance(se, ServiceEntry) and se.subject_alt_names == ("spiffe://cluster.local/ns/default/sa/extra",)
