"""``pyproxy validate`` as ``istioctl analyze``: what the running proxies
would warn about, each finding once; and the snapshot's own de-duplication."""

from __future__ import annotations

import random
import textwrap
from pathlib import Path

import pytest

from pyproxy.config import validate
from pyproxy.config.loader import load_text
from pyproxy.snapshot import BuildContext, ProxyIdentity, build_snapshot
from tests.unit.fakes import StubLoop


def doc(kind: str, spec: str, *, name: str) -> str:
    body = textwrap.indent(textwrap.dedent(spec).strip("\n"), "  ")
    return f"apiVersion: networking.istio.io/v1\nkind: {kind}\nmetadata:\n  name: {name}\nspec:\n{body}\n"


def service(host: str) -> str:
    return doc("ServiceEntry", f"""
        hosts: [{host}]
        ports: [{{number: 9080, name: http}}]
        resolution: STATIC
        endpoints: [{{address: 10.0.0.1, labels: {{version: v1}}}}]
    """, name=host)


SERVICES = "---\n".join(service(h) for h in ("reviews", "ratings", "details"))
REVIEWS_DR = doc("DestinationRule", "host: reviews\nsubsets: [{name: v1, labels: {version: v1}}]", name="reviews")


def analyze(*docs: str) -> list[str]:
    cfg = load_text("---\n".join(docs), "m.yaml")
    assert cfg.ok, [str(e) for e in cfg.errors]
    return validate.analyze(cfg)


def test_a_valid_config_has_no_findings() -> None:
    vs = doc("VirtualService", "hosts: [reviews]\nhttp:\n- route: [{destination: {host: reviews, subset: v1}}]",
             name="reviews")
    assert analyze(SERVICES, REVIEWS_DR, vs) == []


def test_undefined_subset_and_unreachable_rule_are_reported_once() -> None:
    vs = doc("VirtualService", """
        hosts: [reviews]
        http:
        - match: [{uri: {prefix: /}}]
          route: [{destination: {host: reviews, subset: v9}}]
        - match: [{headers: {end-user: {exact: jason}}}]
          route: [{destination: {host: reviews, subset: v1}}]
    """, name="reviews")
    assert analyze(SERVICES, REVIEWS_DR, vs) == [
        ("m.yaml#4 spec.http[0]: subset 'v9' of reviews.default.svc.cluster.local is not defined by any "
        "DestinationRule (503 NC)"),
        "m.yaml#4 spec.http[1]: unreachable, m.yaml#4 spec.http[0] catches every request",
    ]


def test_rules_that_apply_to_nothing_are_reported() -> None:
    ghost_dr = doc("DestinationRule", "host: ghost", name="ghost")
    unbound = doc("VirtualService", "hosts: ['*']\ngateways: [nope]\nhttp:\n- route: [{destination: {host: reviews}}]",
                  name="unbound")
    nohost = doc("VirtualService", "hosts: [nothere]\nhttp:\n- route: [{destination: {host: reviews}}]",
                 name="nohost")
    findings = analyze(SERVICES, ghost_dr, unbound, nohost)
    assert findings == [
        ("m.yaml#3: DestinationRule default/ghost: host ghost.default.svc.cluster.local is not in the service "
        "registry: the rule has no effect"),
        ("m.yaml#4: VirtualService default/unbound: gateway default/nope is not defined in the config (a proxy "
        "run with --gateway default/nope serves the VirtualService's own hosts)"),
        ("m.yaml#5: VirtualService default/nohost: none of its hosts (nothere.default.svc.cluster.local) is a "
        "service in the registry: sidecars apply it only to requests addressed to those names"),
    ]


def test_gateway_rules_are_analyzed_as_the_gateway_proxy_would() -> None:
    gw = doc("Gateway", "selector: {istio: ingressgateway}\nservers:\n- port: {number: 80, name: http, protocol: HTTP}\n"
                        "  hosts: ['*']", name="gw")
    vs = doc("VirtualService", "hosts: ['*']\ngateways: [gw]\nhttp:\n- route: [{destination: {host: ratings, subset: v2}}]",
             name="ingress")
    assert analyze(SERVICES, gw, vs) == [
        ("m.yaml#4 spec.http[0]: subset 'v2' of ratings.default.svc.cluster.local is not defined by any "
        "DestinationRule (503 NC)")
    ]


def test_the_gateway_proxy_logs_a_finding_once_not_once_per_host() -> None:
    # The demo's ingress logged the same warning once per service it routes.
    gw = doc("Gateway", "selector: {istio: ingressgateway}\nservers:\n- port: {number: 80, name: http, protocol: HTTP}\n"
                        "  hosts: ['*']", name="gw")
    vs = doc("VirtualService", "hosts: ['*']\ngateways: [gw]\nhttp:\n- route: [{destination: {host: ratings, subset: v2}}]",
             name="ingress")
    cfg = load_text(f"{SERVICES}---\n{gw}---\n{vs}", "m.yaml")
    ctx = BuildContext(StubLoop(now=100.0), random.Random(0))  # type: ignore[arg-type]
    snap = build_snapshot(cfg, ProxyIdentity(gateway="default/gw"), ctx)
    assert [w for w in snap.warnings if "subset 'v2'" in w] == [
        ("m.yaml#4 spec.http[0]: subset 'v2' of ratings.default.svc.cluster.local is not defined by any "
        "DestinationRule (503 NC)")
    ]


def test_validate_cli_prints_findings_as_warnings_and_exits_0(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a.yaml").write_text(SERVICES + "---\n" + doc("DestinationRule", "host: ghost", name="ghost"))
    assert validate.main([str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert out == "1 files, 4 resources: OK\n"
    assert err == (f"warning: {tmp_path}/a.yaml#3: DestinationRule default/ghost: host "
                   "ghost.default.svc.cluster.local is not in the service registry: the rule has no effect\n")


def test_a_sidecar_says_it_ignores_a_gateways_virtual_service_and_the_gateway_does_not() -> None:
    gw = doc("Gateway", "selector: {istio: ingressgateway}\nservers:\n- port: {number: 80, name: http, protocol: HTTP}\n"
                        "  hosts: ['*']", name="gw")
    vs = doc("VirtualService", "hosts: ['*']\ngateways: [gw]\nhttp:\n- route: [{destination: {host: ratings}}]",
             name="ingress")
    cfg = load_text(f"{SERVICES}---\n{gw}---\n{vs}", "m.yaml")
    assert cfg.warnings == ()
    note = ("m.yaml#4: VirtualService default/ingress: bound only to gateways gw: sidecars ignore it, only a proxy "
            "run with --gateway applies it (add 'mesh' to apply it to sidecars)")
    for identity, expected in ((ProxyIdentity(), [note]), (ProxyIdentity(gateway="default/gw"), [])):
        ctx = BuildContext(StubLoop(), random.Random(0))  # type: ignore[arg-type]
        assert build_snapshot(cfg, identity, ctx).warnings == expected, identity
    assert validate.analyze(cfg) == []  # validate analyzes the gateway as well: no finding
