"""Gateway resources and ``--gateway`` binding: parser, options, snapshot helpers."""

from __future__ import annotations

import asyncio
import random
import textwrap

import pytest

from pyproxy.config.loader import load_text
from pyproxy.config.model import Gateway, GatewayServer
from pyproxy.options import parse_gateway
from pyproxy.snapshot import BuildContext, ProxyIdentity, binds_to, build_snapshot, intersect_hosts


def gateway(spec: str, name: str = "gw") -> str:
    body = textwrap.indent(textwrap.dedent(spec).strip("\n"), "  ")
    return f"apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata:\n  name: {name}\nspec:\n{body}\n"


def messages(diags: tuple) -> list[str]:
    return [str(d) for d in diags]


def test_gateway_parses_http_servers() -> None:
    cfg = load_text(gateway("""
        selector: {istio: ingressgateway}
        servers:
        - port: {number: 8080, name: http, protocol: HTTP}
          hosts: ["*", "ns1/shop.example.com", "./*.example.org"]
          name: main
    """), "t.yaml")
    assert cfg.ok, messages(cfg.errors)
    assert cfg.warnings == ()
    (gw,) = cfg.resources
    assert isinstance(gw, Gateway)
    assert gw.selector == (("istio", "ingressgateway"),)
    assert gw.servers == (
        GatewayServer(8080, "http", "HTTP", ("*", "ns1/shop.example.com", "./*.example.org"), "main"),
    )


def test_gateway_protocol_is_case_insensitive_and_non_http_servers_are_ignored_with_a_warning() -> None:
    cfg = load_text(gateway("""
        servers:
        - port: {number: 80, name: web, protocol: http}
          hosts: ["*"]
        - port: {number: 443, name: https, protocol: HTTPS}
          hosts: ["*"]
          tls: {mode: SIMPLE}
    """), "t.yaml")
    assert cfg.ok, messages(cfg.errors)
    (gw,) = cfg.resources
    assert [s.port_number for s in gw.servers] == [80]
    warnings = messages(cfg.warnings)
    assert any(w.startswith("t.yaml#0: spec.servers[1].port.protocol: HTTPS servers are not served by pyproxy")
               for w in warnings), warnings
    assert "t.yaml#0: spec.servers[1].tls: not implemented by pyproxy, ignored" in warnings


@pytest.mark.parametrize(
    ("spec", "where", "fragment"),
    [
        ("servers: []", "spec.servers", "at least one server"),
        ("servers:\n- hosts: ['*']", "spec.servers[0].port", "is required"),
        ("servers:\n- port: {number: 80, protocol: HTTP}", "spec.servers[0].hosts", "at least one host"),
        ("servers:\n- port: {number: 0, protocol: HTTP}\n  hosts: ['*']", "spec.servers[0].port.number", ""),
        ("servers:\n- port: {number: 80, protocol: QUIC}\n  hosts: ['*']", "spec.servers[0].port.protocol",
         "must be one of"),
        ("servers:\n- port: {number: 80, protocol: HTTP}\n  hosts: ['a/b/c']", "spec.servers[0].hosts[0]",
         "at most one '/'"),
        ("servers:\n- port: {number: 80, protocol: HTTP}\n  hosts: ['Bad_NS/x.com']", "spec.servers[0].hosts[0]",
         "namespace must be"),
        ("servers:\n- port: {number: 80, protocol: HTTP}\n  hosts: ['ns/']", "spec.servers[0].hosts[0]",
         "empty host name"),
        ("servers:\n- port: {number: 80, protocol: HTTP}\n  hosts: ['foo.*.com']", "spec.servers[0].hosts[0]",
         "expected a DNS name"),
        (("servers:\n- port: {number: 80, name: p, protocol: HTTP}\n  hosts: ['*']\n"
          "- port: {number: 81, name: p, protocol: HTTP}\n  hosts: ['*']"), "spec.servers[1].port.name",
         "already used"),
    ],
)
def test_gateway_errors_are_located(spec: str, where: str, fragment: str) -> None:
    cfg = load_text(gateway(spec), "t.yaml")
    assert not cfg.ok
    assert any(m.startswith(f"t.yaml#0: {where}: ") and fragment in m for m in messages(cfg.errors)), \
        messages(cfg.errors)
    assert cfg.resources == ()


def test_parse_gateway_option() -> None:
    assert parse_gateway("", "default") == ""
    assert parse_gateway("bookinfo-gateway", "default") == "default/bookinfo-gateway"
    assert parse_gateway("istio-system/gw", "default") == "istio-system/gw"
    for bad in ("mesh", "/gw", "ns/", "a/b/c"):
        with pytest.raises(ValueError):
            parse_gateway(bad, "default")


def test_binds_to_follows_istio_reference_rules() -> None:
    # Sidecars: no list, or "mesh" in it.
    assert binds_to((), "default", "")
    assert binds_to(("mesh", "gw"), "default", "")
    assert not binds_to(("gw",), "default", "")
    # Gateways: unqualified names are in the VirtualService's namespace.
    assert binds_to(("gw",), "default", "default/gw")
    assert not binds_to(("gw",), "shop", "default/gw")
    assert binds_to(("default/gw",), "shop", "default/gw")
    assert not binds_to((), "default", "default/gw")
    assert not binds_to(("mesh",), "default", "default/gw")


@pytest.mark.parametrize(
    ("vs_host", "gw_host", "expected"),
    [
        ("*", "*", "*"),
        ("*", "shop.example.com", "shop.example.com"),
        ("shop.example.com", "*", "shop.example.com"),
        ("shop.example.com", "*.example.com", "shop.example.com"),
        ("*.example.com", "shop.example.com", "shop.example.com"),
        ("*.a.example.com", "*.example.com", "*.a.example.com"),
        ("shop.example.com", "shop.example.org", None),
        ("*.example.com", "*.example.org", None),
    ],
)
def test_intersect_hosts(vs_host: str, gw_host: str, expected: str | None) -> None:
    assert intersect_hosts(vs_host, gw_host) == expected


def test_gateway_snapshot_routes_only_bound_hosts_and_answers_others_with_404() -> None:
    text = gateway("servers:\n- port: {number: 80, protocol: HTTP}\n  hosts: ['shop.example.com']") + textwrap.dedent("""\
        ---
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {name: web}
        spec:
          hosts: [web]
          ports: [{number: 9080, name: http, protocol: HTTP}]
          resolution: STATIC
          endpoints: [{address: 127.0.0.9}]
        ---
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: web}
        spec:
          hosts: ["*.example.com", "web"]
          gateways: [gw, mesh]
          http:
          - route: [{destination: {host: web}}]
        """)
    cfg = load_text(text, "t.yaml")
    assert cfg.ok, messages(cfg.errors)
    loop = asyncio.new_event_loop()
    try:
        ctx = BuildContext(loop, random.Random(1))
        gw_snap = build_snapshot(cfg, ProxyIdentity(gateway="default/gw"), ctx)
        sidecar_snap = build_snapshot(cfg, ProxyIdentity(), ctx)
    finally:
        loop.close()
    # *.example.com narrowed by the server host to shop.example.com; "web" is not served.
    vh = gw_snap.hosts.lookup(b"shop.example.com")
    assert vh is not None and vh.routes
    for other in (b"web", b"other.example.com"):
        fallback = gw_snap.hosts.lookup(other)
        assert fallback is not None and fallback.routes == ()  # -> 404 NR, never passthrough
    # The sidecar sees the same VirtualService through "mesh", with its own hosts.
    assert sidecar_snap.hosts.lookup(b"web").routes  # type: ignore[union-attr]
    assert sidecar_snap.hosts.lookup(b"other.example.com").routes  # type: ignore[union-attr]
