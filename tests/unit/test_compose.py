"""docker/bookinfo/compose.yaml, checked structurally (no Docker on CI).

The file is parsed with PyYAML (merge keys resolved, as Compose does) and
validated against the Compose specification's JSON schema; then the mesh it
describes is checked the way a reviewer would: every Bookinfo app shares a
pyproxy sidecar's network namespace, apps reach their sidecar, the registry
names the pods, every mounted config loads (with every scenario file) and
builds without warnings for the proxy that reads it, ports do not clash,
images are pinned, the transparent profile is Istio's init-container model,
and Prometheus, Jaeger, Grafana and locust are wired to what exists.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any

import jsonschema
import pytest
import yaml

from pyproxy import __version__
from pyproxy.cli import build_parser, env_name, parse_run_options
from pyproxy.config.loader import load_paths
from pyproxy.config.model import Gateway, ServiceEntry
from pyproxy.config.validate import main as validate_main
from pyproxy.demo.launcher import SCENARIOS
from pyproxy.options import RunOptions
from pyproxy.snapshot import BuildContext, ProxyIdentity, build_snapshot
from tests.reference import reference, skip_unless_present

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_DIR = ROOT / "docker" / "bookinfo"
COMPOSE = COMPOSE_DIR / "compose.yaml"
SCHEMA = reference("compose-spec.json")
BOOKINFO_IMAGE = re.compile(r"docker\.io/istio/examples-bookinfo-(?P<app>[a-z]+)-(?P<version>v\d+):(?P<tag>.+)")
PYPROXY_IMAGE = f"pyproxy-sidecar:{__version__}"
PODS = {("productpage", "v1"), ("details", "v1"), ("reviews", "v1"), ("reviews", "v2"), ("reviews", "v3"),
        ("ratings", "v1")}
# What each real Bookinfo image calls, and the variable that sets the port it calls
# (productpage.py and the reviews service read <NAME>_SERVICE_PORT, default 9080).
CALLS = {"productpage": ("details", "reviews", "ratings"), "reviews": ("ratings",), "details": (), "ratings": ()}
APP_PORT = 9080


@cache
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


def profiles(svc: dict[str, Any]) -> tuple[str, ...]:
    return tuple(svc.get("profiles", ()))


def is_pyproxy(svc: dict[str, Any]) -> bool:
    return svc.get("image") == PYPROXY_IMAGE


def is_init(svc: dict[str, Any]) -> bool:
    return is_pyproxy(svc) and svc.get("entrypoint", [None])[:2] == ["pyproxy", "iptables"]


def is_canary(svc: dict[str, Any]) -> bool:
    return is_pyproxy(svc) and svc.get("entrypoint", [None])[:3] == ["pyproxy", "canary", "run"]


def is_ca(svc: dict[str, Any]) -> bool:
    """The one-shot mesh CA step (pyproxy ca init/issue)."""
    return is_pyproxy(svc) and "pyproxy ca init" in str(svc.get("command", ""))


def proxies() -> dict[str, dict[str, Any]]:
    """Every service running `pyproxy run` (sidecars and ingresses)."""
    return {n: s for n, s in services().items()
            if is_pyproxy(s) and not is_init(s) and not is_canary(s) and not is_ca(s)}


def apps() -> dict[str, dict[str, Any]]:
    return {n: s for n, s in services().items() if BOOKINFO_IMAGE.fullmatch(s.get("image", ""))}


def run_options(svc: dict[str, Any]) -> RunOptions:
    """The options `pyproxy run` resolves from this service's environment (image ENV first)."""
    parser, _ = build_parser()
    env = {**dockerfile_env(), **{k: str(v) for k, v in (svc.get("environment") or {}).items()}}
    return parse_run_options(parser.parse_args(["run"]), environ=env)


@cache
def dockerfile_env() -> dict[str, str]:
    """The final stage's ENV (KEY=VALUE pairs, continuation lines joined)."""
    text = (ROOT / "docker" / "Dockerfile").read_text().replace("\\\n", " ")
    final = text.split("\nFROM ")[-1]
    env: dict[str, str] = {}
    for line in final.splitlines():
        if line.startswith("ENV "):
            for pair in line[4:].split():
                key, _, value = pair.partition("=")
                env[key] = value
    return env


def mounts(svc: dict[str, Any]) -> dict[str, Path]:
    """Container path -> host path of the service's bind mounts."""
    out = {}
    for spec in svc.get("volumes", ()):
        source, target, *_ = spec.split(":")
        if not source.startswith((".", "/")):
            continue  # a named volume (the mesh CA's certs), not a host path
        out[target] = (COMPOSE_DIR / source).resolve()
    return out


def named_mounts(svc: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """Container path -> (named volume, read-only)."""
    out = {}
    for spec in svc.get("volumes", ()):
        source, target, *mode = spec.split(":")
        if not source.startswith((".", "/")):
            out[target] = (source, mode == ["ro"])
    return out


def host_path(svc: dict[str, Any], container_path: str) -> Path:
    """Where ``container_path`` comes from on the host, through the service's mounts."""
    p = PurePosixPath(container_path)
    for target, source in mounts(svc).items():
        t = PurePosixPath(target)
        if p == t or t in p.parents:
            return source.joinpath(*p.relative_to(t).parts)
    raise AssertionError(f"{container_path} is not mounted")


def owner_of(app_name: str) -> str:
    mode = apps()[app_name]["network_mode"]
    assert mode.startswith("service:"), mode
    return mode[len("service:"):]


def aliases(svc: dict[str, Any]) -> dict[str, list[str]]:
    nets = svc.get("networks") or {}
    if isinstance(nets, list):
        return {n: [] for n in nets}
    return {n: list((cfg or {}).get("aliases", ())) for n, cfg in nets.items()}


# --------------------------------------------------------------------------- the file itself


@skip_unless_present(SCHEMA)
def test_compose_file_is_valid_against_the_compose_specification() -> None:
    schema = json.loads(SCHEMA.read_text())
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(compose()), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors[:10])


def test_every_image_is_pinned() -> None:
    tags = {}
    for name, svc in services().items():
        image = svc.get("image")
        assert image, f"{name}: no image"
        _, sep, tag = image.rpartition(":")
        assert sep and "/" not in tag and tag and tag != "latest", f"{name}: {image} is not pinned"
        assert re.fullmatch(r"v?\d+\.\d+\.\d+", tag), f"{name}: {image}: use a full version tag"
        if BOOKINFO_IMAGE.fullmatch(image):
            tags[name] = tag
    assert set(tags.values()) == {"1.20.3"}, tags
    # Our own image carries the package version and is built from the repository.
    for name, svc in proxies().items():
        assert svc["build"] == {"context": "../..", "dockerfile": "docker/Dockerfile"}, name


def test_every_pyproxy_variable_is_a_run_flag() -> None:
    _, run = build_parser()
    known = {env_name(o) for a in run._actions for o in a.option_strings if o.startswith("--")}
    for name, svc in proxies().items():
        for key in svc.get("environment", {}):
            if key.startswith("PYPROXY_"):
                assert key in known, f"{name}: {key} is not a `pyproxy run` flag"
        run_options(svc)  # every value parses


# --------------------------------------------------------------------------- pods


def test_every_bookinfo_app_shares_a_pyproxy_sidecars_network_namespace() -> None:
    seen: dict[tuple[str, ...], set[tuple[str, str]]] = {}
    owners = []
    for name, app in apps().items():
        m = BOOKINFO_IMAGE.fullmatch(app["image"])
        assert m
        owner_name = owner_of(name)
        owner = services()[owner_name]
        assert owner_name in proxies(), f"{name} joins {owner_name}, which is not a pyproxy sidecar"
        assert profiles(owner) == profiles(app), name
        labels = dict(run_options(owner).labels)
        assert labels == {"app": m["app"], "version": m["version"]}, (name, labels)
        # A container in another's namespace cannot have its own network settings.
        for key in ("ports", "networks", "extra_hosts", "hostname", "dns"):
            assert key not in app, f"{name}: {key} belongs on {owner_name}"
        owners.append(owner_name)
        seen.setdefault(profiles(app), set()).add((m["app"], m["version"]))
    assert len(owners) == len(set(owners)), "one app per sidecar"
    assert seen == {(): PODS, ("transparent",): PODS}


def test_apps_start_after_their_sidecar_is_ready_and_restart_with_it() -> None:
    # An app joined to its sidecar's network namespace keeps the old namespace
    # when the sidecar container restarts: Compose restarts the app with it.
    for name, app in apps().items():
        owner = owner_of(name)
        deps = app["depends_on"]
        assert deps[owner] == {"condition": "service_healthy", "restart": True}, name
        if profiles(app):
            init = next(d for d in deps if is_init(services()[d]))
            assert deps[init] == {"condition": "service_completed_successfully"}, name
            assert services()[init]["depends_on"] == {owner: {"condition": "service_healthy"}}, init
            assert set(deps) == {owner, init}, name
        else:
            assert set(deps) == {owner}, name


def test_default_wiring_points_the_apps_at_their_sidecar_without_privileges() -> None:
    for name, app in apps().items():
        if profiles(app):
            continue
        owner = services()[owner_of(name)]
        opts = run_options(owner)
        # The names the app calls resolve to its own pod...
        hosts = dict(entry.split(":", 1) for entry in owner["extra_hosts"])
        for service in ("details", "reviews", "ratings"):
            assert hosts[service] == "127.0.0.1", (name, service)
        assert opts.outbound.host in ("127.0.0.1", "0.0.0.0"), name
        # ...and the ports it calls are the sidecar's outbound listener.
        app_name = BOOKINFO_IMAGE.fullmatch(app["image"])["app"]  # type: ignore[index]
        env = app.get("environment") or {}
        for callee in CALLS[app_name]:
            assert env.get(f"{callee.upper()}_SERVICE_PORT") == str(opts.outbound.port), (name, callee)
        for key in env:
            assert re.fullmatch(r"(DETAILS|REVIEWS|RATINGS)_SERVICE_PORT", key), f"{name}: unexpected {key}"
        # The sidecar's inbound listener forwards to the app in the same namespace.
        assert (opts.app.host, opts.app.port) == ("127.0.0.1", APP_PORT), name
    for name, svc in services().items():
        if not profiles(svc):
            assert not svc.get("cap_add") and not svc.get("privileged"), name
            assert svc.get("user") in (None, "1337:1337"), name


def test_transparent_profile_is_an_init_container_per_pod_and_unchanged_apps() -> None:
    parser, _ = build_parser()
    ipt = parser.parse_args(["iptables"])  # the rules' defaults: what the init container applies
    tp = {n: s for n, s in services().items() if "transparent" in profiles(s)}
    assert all(profiles(s) == ("transparent",) for s in tp.values())
    assert all(n.startswith("tp-") for n in tp), "transparent services are named tp-*"
    tp_apps = [n for n in tp if n in apps()]
    assert len(tp_apps) == len(PODS)
    for name in tp_apps:
        app = services()[name]
        assert "environment" not in app, f"{name}: apps are unchanged in the transparent profile"
        owner_name = owner_of(name)
        owner = services()[owner_name]
        assert "extra_hosts" not in owner, owner_name
        opts = run_options(owner)
        assert opts.outbound.port == ipt.outbound_port and opts.outbound.host == "0.0.0.0", owner_name
        assert opts.inbound.port == ipt.inbound_port, owner_name
        init_name = next(d for d in app["depends_on"] if is_init(services()[d]))
        init = services()[init_name]
        assert init["network_mode"] == f"service:{owner_name}", init_name
        assert init["user"] == "0:0" and "NET_ADMIN" in init["cap_add"], init_name
        assert init["entrypoint"] == ["pyproxy", "iptables", "--apply"], init_name
        assert init["restart"] == "no" and init["healthcheck"] == {"disable": True}, init_name
        # The names the apps call (their defaults, port 9080) resolve on the pods' network.
        callee_aliases = {a for al in aliases(owner).values() for a in al}
        app_name = BOOKINFO_IMAGE.fullmatch(app["image"])["app"]  # type: ignore[index]
        assert app_name in callee_aliases, owner_name
    # The proxy's own traffic is exempt by UID: the image's user is the rules' --proxy-uid.
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert f"USER {ipt.proxy_uid}:{ipt.proxy_gid}" in dockerfile


# --------------------------------------------------------------------------- config


def config_paths(svc: dict[str, Any]) -> list[Path]:
    return [host_path(svc, p) for p in run_options(svc).config]


def test_every_referenced_file_and_directory_exists() -> None:
    for name, svc in services().items():
        for target, source in mounts(svc).items():
            assert source.exists(), f"{name}: {source} (mounted at {target}) does not exist"
        if "build" in svc:
            context = (COMPOSE_DIR / svc["build"]["context"]).resolve()
            assert (context / svc["build"]["dockerfile"]).is_file(), name
        if name in proxies():
            for path in config_paths(svc):
                assert path.exists(), f"{name}: PYPROXY_CONFIG entry {path} does not exist"
    locust_files = {svc["command"][svc["command"].index("-f") + 1]
                    for n, svc in services().items() if n.startswith("locust")}
    for svc_name in ("locust-master", "locust-worker"):
        for f in locust_files:
            assert host_path(services()[svc_name], f).is_file(), (svc_name, f)
    grafana = services()["grafana"]
    assert host_path(grafana, grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]).is_file()


def scenario_files() -> list[Path]:
    return [ROOT / "config" / "bookinfo" / name for name, _ in SCENARIOS]


@pytest.mark.parametrize("name", sorted(proxies()))
def test_every_mounted_config_passes_validate_with_every_scenario(name: str,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    svc = proxies()[name]
    paths = [str(p) for p in config_paths(svc)]
    assert validate_main(paths) == 0, capsys.readouterr()
    opts = run_options(svc)
    identity = ProxyIdentity(workload=opts.workload_name, namespace=opts.namespace, labels=opts.labels,
                             gateway=opts.gateway)
    loop = asyncio.new_event_loop()
    try:
        for scenario in [None, *scenario_files()]:
            # The scenario lands in the mounted mesh directory as routing.yaml.
            files = paths + ([str(scenario)] if scenario else [])
            assert validate_main(files) == 0, (scenario, capsys.readouterr())
            loaded = load_paths(files)
            snap = build_snapshot(loaded, identity, BuildContext(loop, random.Random(0)))
            # No unknown subset or host, no subset that selects no pod.
            assert snap.warnings == [], (scenario, snap.warnings)
            if opts.gateway:
                assert any(isinstance(r, Gateway) for r in loaded.resources)
    finally:
        loop.close()


def test_the_mesh_directory_is_shared_by_every_proxy_and_read_only() -> None:
    for name, svc in proxies().items():
        specs = [v for v in svc["volumes"] if v.split(":")[1] == "/etc/pyproxy/mesh"]
        assert specs == ["./mesh:/etc/pyproxy/mesh:ro"], name
        assert "/etc/pyproxy/mesh" in run_options(svc).config, name


def test_registry_endpoints_are_the_pods_sidecars() -> None:
    by_alias: dict[str, str] = {}
    for name, svc in proxies().items():
        for net_aliases in aliases(svc).values():
            for a in net_aliases:
                if a.endswith("-pod"):
                    by_alias[a] = name
    # Each registry directory, and the sidecars (not the gateways) that mount it.
    readers: dict[Path, set[str]] = {}
    for name, svc in proxies().items():
        if not run_options(svc).gateway:
            readers.setdefault(host_path(svc, "/etc/pyproxy/registry"), set()).add(name)
    assert len(readers) == 2
    for source, sidecars in readers.items():
        loaded = load_paths([str(source)])
        assert loaded.ok, loaded.errors
        found = set()
        for se in loaded.resources:
            assert isinstance(se, ServiceEntry) and se.resolution == "DNS", source
            for ep in se.endpoints:
                owner_name = by_alias[ep.address]
                owner = services()[owner_name]
                opts = run_options(owner)
                assert dict(ep.labels) == dict(opts.labels), (source, ep.address)
                port = dict(ep.ports)["http"]
                if profiles(owner):
                    assert port == APP_PORT, ep.address  # captured by iptables in that pod
                else:
                    assert port == opts.inbound.port, ep.address
                found.add(owner_name)
        assert found == sidecars, (source, found ^ sidecars)


# --------------------------------------------------------------------------- ports


def test_ports_do_not_clash() -> None:
    published = []
    for name, svc in services().items():
        for spec in svc.get("ports", ()):
            host, _, _ = str(spec).rpartition(":")
            published.append(host)
    assert len(published) == len(set(published)), published
    # Inside each pod: the sidecar's listeners and the app's port 9080.
    for name in apps():
        owner = services()[owner_of(name)]
        opts = run_options(owner)
        ports = [opts.outbound.port, opts.inbound.port, opts.admin.port, opts.stats.port, APP_PORT]
        assert len(ports) == len(set(ports)), (name, ports)


def test_ingress_is_published_on_8080_and_serves_the_bookinfo_gateway() -> None:
    ingress = services()["ingress"]
    opts = run_options(ingress)
    assert ingress["ports"] == ["8080:8080"] and opts.outbound.port == 8080 and opts.outbound.host == "0.0.0.0"
    assert opts.gateway == "default/bookinfo-gateway"
    # It waits for productpage's app (its health check), not only for its sidecar.
    for gw, app_name in ((ingress, "productpage-v1"), (services()["tp-ingress"], "tp-productpage-v1")):
        assert gw["depends_on"][app_name] == {"condition": "service_healthy"}, app_name
        check = services()[app_name]["healthcheck"]["test"]
        assert check[0] == "CMD" and "http://127.0.0.1:9080/health" in " ".join(check), check
    tp_ingress = services()["tp-ingress"]
    assert tp_ingress["ports"] == ["8081:8080"] and run_options(tp_ingress).outbound.port == 8080


# --------------------------------------------------------------------------- observability and load


def test_only_the_ingresses_are_published_beyond_loopback_and_prometheus_has_no_lifecycle_api() -> None:
    public = {}
    for name, svc in services().items():
        for spec in svc.get("ports", ()):
            parts = str(spec).split(":")
            if len(parts) < 3 or parts[0] != "127.0.0.1":
                public[name] = spec
    assert public == {"ingress": "8080:8080", "tp-ingress": "8081:8080"}
    assert not any("lifecycle" in arg for arg in services()["prometheus"]["command"])


def test_prometheus_scrapes_every_proxy() -> None:
    prom = services()["prometheus"]
    cfg = yaml.safe_load(host_path(prom, "/etc/prometheus/prometheus.yml").read_text())
    targets = set()
    for job in cfg["scrape_configs"]:
        if job["job_name"] == "pyproxy-canary":
            continue  # the controller, not a proxy: test_canary_controller_uses_the_prometheus_and_the_mesh
        assert job["metrics_path"] == "/stats/prometheus"
        for sc in job["static_configs"]:
            targets.update(sc["targets"])
    expected = set()
    for name, svc in proxies().items():
        opts = run_options(svc)
        assert opts.stats.host == "0.0.0.0", name
        pod_alias = [a for al in aliases(svc).values() for a in al if a.endswith("-pod")]
        expected.add(f"{pod_alias[0] if pod_alias else name}:{opts.stats.port}")
    assert targets == expected
    proxy_networks = {n for svc in proxies().values() for n in aliases(svc)}
    assert proxy_networks <= set(prom["networks"])


def test_every_proxy_sends_traces_to_jaeger_over_otlp() -> None:
    jaeger = services()["jaeger"]
    # Jaeger v2 (v1's all-in-one is end of life): OTLP is on by default, no v1 variables.
    image, _, tag = jaeger["image"].rpartition(":")
    assert image == "docker.io/jaegertracing/jaeger" and int(tag.split(".")[0]) >= 2, jaeger["image"]
    assert not any(k.startswith(("COLLECTOR_", "SPAN_STORAGE")) for k in jaeger.get("environment", {}))
    for name, svc in proxies().items():
        env = svc["environment"]
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4318", name  # OTLP/HTTP
        assert env["OTEL_EXPORTER_OTLP_PROTOCOL"] == "http/protobuf", name
        assert set(aliases(svc)) <= set(jaeger["networks"]), name


def test_grafana_is_provisioned_with_the_istio_metrics_dashboard() -> None:
    grafana = services()["grafana"]
    ds_file = host_path(grafana, "/etc/grafana/provisioning/datasources/prometheus.yaml")
    (ds,) = yaml.safe_load(ds_file.read_text())["datasources"]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    assert services()["prometheus"]["ports"] == ["127.0.0.1:9090:9090"]
    providers = yaml.safe_load(host_path(grafana, "/etc/grafana/provisioning/dashboards/pyproxy.yaml").read_text())
    (provider,) = providers["providers"]
    dash_dir = host_path(grafana, provider["options"]["path"])
    (dash_file,) = dash_dir.glob("*.json")
    dash = json.loads(dash_file.read_text())
    exprs = []
    canary_exprs = []
    for panel in dash["panels"]:
        assert panel["datasource"]["uid"] == ds["uid"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == ds["uid"]
            if target["expr"].startswith("pyproxy_canary_"):
                canary_exprs.append(target["expr"])  # the canary controller's own metrics (profile canary)
                continue
            assert re.search(r"\bistio_[a-z_]+", target["expr"]), target["expr"]
            exprs.append(target["expr"])
    assert sorted(canary_exprs) == ["pyproxy_canary_failed_checks", "pyproxy_canary_status", "pyproxy_canary_weight"]
    text = "\n".join(exprs)
    assert "rate(istio_requests_total" in text  # request rate
    assert 'response_code!~"5.."' in text  # success rate
    # Server-side panels group by the serving proxy's own app/version labels (always
    # known); a Host header the registry does not know leaves destination_service_name
    # "unknown" there.
    for q in ("0.50", "0.90", "0.99"):
        assert f"histogram_quantile({q}, sum by (le, destination_app, destination_version)" in text
    for e in exprs:
        if 'reporter="destination"' in e:
            assert "destination_service_name" not in e, e
    assert "sum by (response_flags" in text
    by_version = [e for e in exprs if "destination_version" in e]
    assert len(by_version) >= 5


def test_locust_master_and_worker_drive_the_ingress() -> None:
    master, worker = services()["locust-master"], services()["locust-worker"]
    assert master["image"] == worker["image"]
    cmd = master["command"]
    assert "--master" in cmd and cmd[cmd.index("--host") + 1] == "http://ingress:8080"
    assert host_path(master, cmd[cmd.index("-f") + 1]) == ROOT / "load-tests" / "locustfile_bookinfo.py"
    wcmd = worker["command"]
    assert "--worker" in wcmd and wcmd[wcmd.index("--master-host") + 1] == "locust-master"
    assert master["ports"] == ["127.0.0.1:8089:8089"]


def test_canary_controller_uses_the_prometheus_and_the_mesh(capsys: pytest.CaptureFixture[str]) -> None:
    from pyproxy.canary.resource import load_file

    (name, svc), = ((n, s) for n, s in services().items() if is_canary(s))
    parser, _ = build_parser()
    args = parser.parse_args(["canary", "run", *svc["command"]])
    # It reads the compose Prometheus, over the network Prometheus is on.
    prom = services()["prometheus"]
    assert args.prometheus == "http://prometheus:9090" and "mesh" in prom["networks"] and svc["networks"] == ["mesh"]
    # It writes into the very directory every proxy watches (read-only for them, read-write for it).
    assert mounts(svc)[args.config] == mounts(next(iter(proxies().values())))["/etc/pyproxy/mesh"]
    assert f"./mesh:{args.config}" in svc["volumes"]
    # Its Canary file is mounted and loads without errors; the subsets are Bookinfo's reviews v1 and v3.
    cf = load_file(str(host_path(svc, args.canary)))
    assert not cf.errors and not cf.warnings, cf
    canary = cf.canaries[0]
    assert (canary.host, canary.primary_subset, canary.canary_subset) == ("reviews", "v1", "v3")
    # Prometheus scrapes its metrics port.
    cfg = yaml.safe_load(host_path(prom, "/etc/prometheus/prometheus.yml").read_text())
    job = next(j for j in cfg["scrape_configs"] if j["job_name"] == "pyproxy-canary")
    assert job["static_configs"][0]["targets"] == [f"{name}:{args.metrics.rpartition(':')[2]}"]
    assert svc["profiles"] == ["canary"] and svc["healthcheck"] == {"disable": True}


def test_every_proxy_gets_its_own_workload_certificate_from_the_mesh_ca_step() -> None:
    """mTLS on Compose: a one-shot service makes the mesh CA (its key in a
    volume no proxy mounts) and issues each workload's certificate into the
    certs volume; every proxy mounts it read-only, points PYPROXY_CERTS at
    its own service account's directory and starts after the step; the
    registry's endpoints name the same service accounts."""
    (ca_name,) = [n for n, svc in services().items() if is_ca(svc)]
    ca = services()[ca_name]
    script = ca["command"][0]
    issued = dict(re.findall(r"--service-account (\S+) --out \$\$out/(\S+)", script))
    loop = re.search(r"for sa in ([^;]+); do", script)
    assert loop is not None
    for sa in loop.group(1).split():
        issued[sa] = sa
    assert "ca=/var/lib/pyproxy/ca out=/etc/pyproxy/certs" in script and "pyproxy ca init $$ca" in script
    assert named_mounts(ca) == {"/var/lib/pyproxy/ca": ("mesh-ca", False), "/etc/pyproxy/certs": ("certs", False)}
    # Unprivileged: the image makes both mount points the proxy user's (new
    # named volumes take the image directory's owner).
    assert ca.get("user") is None
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert "chown 1337:1337 /etc/pyproxy/certs /var/lib/pyproxy/ca" in dockerfile
    sa_of_dir = {d: sa for sa, d in issued.items()}
    for name, svc in proxies().items():
        opts = run_options(svc)
        directory = PurePosixPath(opts.certs)
        assert directory.parent == PurePosixPath("/etc/pyproxy/certs"), name
        assert named_mounts(svc).get("/etc/pyproxy/certs") == ("certs", True), name
        assert "mesh-ca" not in {v for v, _ in named_mounts(svc).values()}, name
        sa = sa_of_dir[directory.name]
        if svc["environment"].get("PYPROXY_GATEWAY"):
            assert sa == "istio-ingressgateway-service-account" and opts.namespace == "istio-system"
        else:
            app = dict(opts.labels)["app"]
            assert sa == f"bookinfo-{app}", name
            assert svc["depends_on"]["mesh-ca"] == {"condition": "service_completed_successfully"}, name
    for registry in ("compose", "compose-transparent"):
        cfg = load_paths([str(ROOT / "config" / "bookinfo" / registry / "services.yaml")])
        for se in cfg.resources:
            for ep in se.endpoints:  # type: ignore[union-attr]
                assert ep.service_account == f"bookinfo-{dict(ep.labels)['app']}", (registry, ep)
