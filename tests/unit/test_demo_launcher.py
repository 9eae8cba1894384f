"""The Bookinfo launcher's pure parts: registry, addresses, change detection, banner."""

from __future__ import annotations

import argparse
import ipaddress
from pathlib import Path

import pytest

from pyproxy.config.loader import load_paths
from pyproxy.config.model import ServiceEntry
from pyproxy.demo import launcher
from pyproxy.demo.launcher import (
    AUTHZ_SCENARIOS,
    BOOKINFO_CONFIG,
    PODS,
    SCENARIOS,
    LaunchError,
    Mesh,
    banner,
    config_signature,
    describe_change,
    parse_host_port,
    pod_subnet,
    render_registry,
)

ROOT = Path(__file__).resolve().parents[2]


def test_scenarios_live_in_the_checkout() -> None:
    assert BOOKINFO_CONFIG == ROOT / "config" / "bookinfo"
    for name, _ in SCENARIOS:
        assert (BOOKINFO_CONFIG / name).is_file(), name


def test_checked_in_local_registry_is_what_the_launcher_writes() -> None:
    text = (BOOKINFO_CONFIG / "local" / "services.yaml").read_text()
    assert text == render_registry(ipaddress.ip_network("127.0.0.0/24"))


def test_registry_has_one_endpoint_per_pod_on_its_inbound_listener(tmp_path: Path) -> None:
    path = tmp_path / "services.yaml"
    path.write_text(render_registry(ipaddress.ip_network("127.9.8.0/24")))
    cfg = load_paths([str(path)])
    assert cfg.ok and cfg.warnings == (), cfg.errors
    endpoints = {}
    for se in cfg.resources:
        assert isinstance(se, ServiceEntry) and se.resolution == "STATIC"
        assert [(p.number, p.name, p.protocol) for p in se.ports] == [(9080, "http", "HTTP")]
        for ep in se.endpoints:
            labels = dict(ep.labels)
            assert labels["app"] == se.hosts[0]
            endpoints[f"{labels['app']}-{labels['version']}"] = (ep.address, dict(ep.ports))
    assert endpoints == {
        pod.name: (f"127.9.8.{pod.host_number}", {"http": 15006}) for pod in PODS
    }


@pytest.mark.parametrize("value", ["10.0.0.0/24", "127.0.0.0/28", "::1/128", "nonsense"])
def test_pod_subnet_must_be_a_loopback_ipv4_network_of_at_least_32_addresses(value: str) -> None:
    with pytest.raises(LaunchError, match="--pod-subnet"):
        pod_subnet(value)


def test_pod_subnet_accepts_host_bits() -> None:
    assert pod_subnet("127.1.2.3/24") == ipaddress.ip_network("127.1.2.0/24")


def test_parse_host_port() -> None:
    assert parse_host_port("127.0.0.1:9080") == ("127.0.0.1", 9080)
    assert parse_host_port("[::1]:8080") == ("::1", 8080)
    for bad in ("9080", ":9080", "host:", "host:0", "host:70000"):
        with pytest.raises(LaunchError):
            parse_host_port(bad)


def test_ingress_must_not_clash_with_a_pod_address() -> None:
    mesh = Mesh(Path("/nonexistent"), Path("/nonexistent"), ipaddress.ip_network("127.0.0.0/24"),
                ("127.0.0.11", 9080))
    with pytest.raises(LaunchError, match="clashes"):
        mesh.addresses()


def test_config_signature_tracks_what_the_loader_reads(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("x")
    (tmp_path / ".hidden.yaml").write_text("x")
    (tmp_path / "notes.txt").write_text("x")
    first = config_signature(tmp_path)
    assert [name for name, *_ in first] == ["a.yaml"]
    (tmp_path / "notes.txt").write_text("changed")
    (tmp_path / ".hidden.yaml").write_text("changed")
    assert config_signature(tmp_path) == first
    (tmp_path / "b.yml").write_text("y")
    second = config_signature(tmp_path)
    assert second != first
    assert describe_change(first, second) == "b.yml added"
    (tmp_path / "a.yaml").write_text("longer")
    (tmp_path / "b.yml").unlink()
    assert describe_change(second, config_signature(tmp_path)) == "a.yaml changed, b.yml removed"
    assert config_signature(tmp_path / "missing") == ()


def test_banner_prints_url_and_the_command_for_every_scenario(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    mesh = Mesh(tmp_path / "mesh", tmp_path / "logs", ipaddress.ip_network("127.0.0.0/24"), ("127.0.0.1", 9080))
    text = banner(mesh)
    assert "open   http://127.0.0.1:9080/productpage" in text
    for name, _ in SCENARIOS:
        assert f"cp config/bookinfo/{name} {tmp_path}/mesh/routing.yaml" in text
    assert f"rm {tmp_path}/mesh/routing.yaml" in text
    assert "productpage-v1 127.0.0.11" in text and "ingress 127.0.0.10" in text


def test_main_refuses_bad_arguments_before_starting_anything(capsys: pytest.CaptureFixture[str]) -> None:
    args = argparse.Namespace(config_dir=None, ingress="nope", pod_subnet="127.0.0.0/24", log_level="warning")
    assert launcher.main(args) == 2
    assert "--ingress 'nope'" in capsys.readouterr().err
    args = argparse.Namespace(config_dir=None, ingress="127.0.0.1:1", pod_subnet="10.0.0.0/8", log_level="warning")
    assert launcher.main(args) == 2
    assert "--pod-subnet" in capsys.readouterr().err



@pytest.mark.parametrize("scenario", [None, *(name for name, _ in SCENARIOS)])
def test_every_scenario_loads_and_builds_cleanly_for_every_local_proxy(scenario: str | None, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """What `pyproxy validate` says of the demo's mesh dir with each scenario as routing.yaml, and
    that no proxy's snapshot warns (unknown subset or host, a subset selecting no pod)."""
    import asyncio
    import random

    from pyproxy.config.validate import main as validate_main
    from pyproxy.snapshot import BuildContext, ProxyIdentity, build_snapshot

    (tmp_path / "services.yaml").write_text(render_registry(ipaddress.ip_network("127.0.0.0/24")))
    if scenario:
        (tmp_path / "routing.yaml").write_text((BOOKINFO_CONFIG / scenario).read_text())
    paths = [str(tmp_path), str(BOOKINFO_CONFIG / "gateway.yaml")]
    assert validate_main(paths) == 0, capsys.readouterr()
    # What each proxy reads (launcher.py): the sidecars the mesh dir, the ingress gateway.yaml too.
    sidecar_config, ingress_config = load_paths(paths[:1]), load_paths(paths)
    identities = [(ProxyIdentity(workload=p.name, labels=(("app", p.app), ("version", p.version))), sidecar_config)
                  for p in PODS]
    identities.append((ProxyIdentity(workload="istio-ingressgateway", gateway="default/bookinfo-gateway"),
                       ingress_config))
    loop = asyncio.new_event_loop()
    try:
        for identity, loaded in identities:
            snap = build_snapshot(loaded, identity, BuildContext(loop, random.Random(0)))
            assert snap.warnings == [], (identity.workload, snap.warnings)
    finally:
        loop.close()


def test_everything_the_demo_reads_is_package_data() -> None:
    # `pip install .` ships pyproxy/demo/bookinfo (a symlink to config/bookinfo
    # in the checkout) through pyproject.toml's package-data globs.
    import fnmatch
    import tomllib

    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["pyproxy.demo"]
    package_dir = ROOT / "pyproxy" / "demo"
    assert (package_dir / "bookinfo").resolve() == BOOKINFO_CONFIG
    needed = ["gateway.yaml", "local/services.yaml", "compose/services.yaml", "jwt-demo-token.txt",
              *(name for name, _ in (*SCENARIOS, *AUTHZ_SCENARIOS))]
    shipped = [str(p.relative_to(BOOKINFO_CONFIG)) for p in BOOKINFO_CONFIG.rglob("*") if p.is_file()]
    for rel in needed:
        assert rel in shipped, rel
    for rel in shipped:  # every file, in the glob's terms (bookinfo/<rel> under pyproxy/demo)
        assert any(fnmatch.fnmatch(f"bookinfo/{rel}", g) and g.count("/") == f"bookinfo/{rel}".count("/")
                   for g in globs), rel
