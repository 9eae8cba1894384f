"""docker/Dockerfile and .dockerignore, checked structurally (no Docker on CI)."""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from pyproxy.cli import build_parser, parse_run_options

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
HEALTHCHECK_SCRIPT = ROOT / "docker" / "healthcheck.py"


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def parse_dockerfile() -> tuple[dict[str, str], list[Stage]]:
    """(global ARG defaults, stages) with continuation lines joined and comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in lines:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            parts = rest.split()
            base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], parts[0])
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(base, name))
        elif not stages and keyword == "ARG":
            key, _, value = rest.partition("=")
            args[key.strip()] = value.strip()
        else:
            stages[-1].instructions.append((keyword, rest.strip()))
    return args, stages


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def env_of(stage: Stage) -> dict[str, str]:
    env = {}
    for args in stage.all("ENV"):
        for pair in args.split():
            key, _, value = pair.partition("=")
            env[key] = value
    return env


def test_multi_stage_build_on_a_pinned_slim_python() -> None:
    _, stages = parse_dockerfile()
    assert len(stages) >= 2
    assert stages[0].name == "build"
    for stage in stages:
        assert re.fullmatch(r"docker\.io/library/python:3\.1[1-9]\.\d+-slim-bookworm", stage.base), stage.base
    assert stages[-1].base == stages[0].base


def test_final_stage_runs_pyproxy_as_1337_with_a_healthcheck() -> None:
    _, stages = parse_dockerfile()
    final = stages[-1]
    assert final.all("USER")[-1] == "1337:1337"
    assert exec_form(final.all("ENTRYPOINT")[-1]) == ["pyproxy", "run"]
    (healthcheck,) = final.all("HEALTHCHECK")
    options, _, command = healthcheck.partition("CMD ")
    assert "--interval=" in options and "--timeout=" in options
    argv = exec_form(command)
    assert argv[0] == "python"
    # The script it runs is copied into the image from the repository.
    copies: dict[str, str] = {}  # destination -> source
    for c in final.all("COPY"):
        if not c.startswith("--from"):
            src, dest = c.split()
            copies[dest] = src
    assert copies[argv[1]] == "docker/healthcheck.py"
    exposed = {int(p) for e in final.all("EXPOSE") for p in e.split()}
    assert {15001, 15006, 15090} <= exposed


def test_final_stage_has_iptables_and_no_build_tools_or_pip_cache() -> None:
    _, stages = parse_dockerfile()
    build, final = stages[0], stages[-1]
    final_runs = " ".join(final.all("RUN"))
    assert "apt-get install --yes --no-install-recommends iptables" in final_runs
    assert "rm -rf /var/lib/apt/lists/*" in final_runs
    for tool in ("build-essential", "gcc", "g++", "make ", "pip install", "python3-dev"):
        assert tool not in final_runs, tool
    # pip runs only in the build stage, without a cache; its venv is what ships.
    build_runs = " ".join(build.all("RUN"))
    assert "pip install --no-cache-dir" in build_runs
    assert env_of(build)["PIP_NO_CACHE_DIR"] == "1"
    assert "pip uninstall --yes pip setuptools" in build_runs
    assert "--from=build /opt/pyproxy /opt/pyproxy" in final.all("COPY")
    assert env_of(final)["PATH"].startswith("/opt/pyproxy/bin:")
    # The proxy's group and user exist with Istio's IDs.
    assert "groupadd --system --gid 1337" in final_runs and "useradd --system --uid 1337 --gid 1337" in final_runs


def test_image_environment_configures_pyproxy_run() -> None:
    _, stages = parse_dockerfile()
    env = env_of(stages[-1])
    parser, _ = build_parser()
    opts = parse_run_options(parser.parse_args(["run"]), environ=env)
    assert opts.config == ("/etc/pyproxy",)
    assert (opts.inbound.host, opts.inbound.port) == ("0.0.0.0", 15006)
    assert (opts.outbound.host, opts.outbound.port) == ("127.0.0.1", 15001)
    assert (opts.stats.host, opts.stats.port) == ("0.0.0.0", 15090)
    assert (opts.admin.host, opts.admin.port) == ("127.0.0.1", 15000)


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern: ``*`` and ``?`` stay within one path segment,
    ``**`` spans any number of them."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out))


def dockerignore_excludes(path: str) -> bool:
    """Docker's rule: a pattern matching a path or one of its parent
    directories applies; the last matching pattern wins; ``!`` re-includes."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    excluded = False
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        regex = _pattern_regex(pattern.lstrip("!").strip("/"))
        if any(regex.fullmatch(p) for p in prefixes):
            excluded = not negate
    return excluded


def test_everything_the_dockerfile_copies_exists_and_is_in_the_build_context() -> None:
    _, stages = parse_dockerfile()
    sources = []
    for stage in stages:
        for args in stage.all("COPY"):
            if args.startswith("--from"):
                continue
            *srcs, _dest = args.split()
            sources += srcs
    assert sources, "no COPY found"
    for src in sources:
        path = ROOT / src
        assert path.exists(), src
        files = [path] if path.is_file() else [p for p in path.rglob("*.py")]
        for f in files:
            rel = f.relative_to(ROOT).as_posix()
            assert not dockerignore_excludes(rel), f"{rel} is excluded by .dockerignore"


def test_dockerignore_keeps_the_context_small() -> None:
    for path in (".git/config", ".venv/bin/python", "tests/harness.py", "load-tests/bench.py",
                 "docker/bookinfo/compose.yaml", "pyproxy/__pycache__/cli.cpython-311.pyc"):
        assert dockerignore_excludes(path), path
    for path in ("pyproject.toml", "README.md", "pyproxy/cli.py", "pyproxy/config/loader.py",
                 "docker/healthcheck.py"):
        assert not dockerignore_excludes(path), path


def _healthcheck_module():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("pyproxy_docker_healthcheck", HEALTHCHECK_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_healthcheck_asks_the_stats_listener_on_loopback() -> None:
    ready_url = _healthcheck_module().ready_url
    assert ready_url({}) == "http://127.0.0.1:15090/healthz/ready"
    assert ready_url({"PYPROXY_STATS": "0.0.0.0:9901"}) == "http://127.0.0.1:9901/healthz/ready"
    assert ready_url({"PYPROXY_STATS": "10.1.2.3:15090"}) == "http://10.1.2.3:15090/healthz/ready"
    assert ready_url({"PYPROXY_STATS": "[::]:15090"}) == "http://[::1]:15090/healthz/ready"
    assert ready_url({"PYPROXY_STATS": ":15091"}) == "http://127.0.0.1:15091/healthz/ready"
    assert ready_url({"PYPROXY_STATS": "15092"}) == "http://127.0.0.1:15092/healthz/ready"


def test_python_is_byte_compiled_at_build_time_not_on_every_start() -> None:
    # The runtime user (1337) cannot write __pycache__: modules without a .pyc
    # would be compiled again by every process start.
    _, stages = parse_dockerfile()
    build, final = stages[0], stages[-1]
    build_runs = " ".join(build.all("RUN"))
    assert "python -m compileall" in build_runs and "/opt/pyproxy/lib" in build_runs
    assert "--invalidation-mode unchecked-hash" in build_runs  # valid whatever the copied mtimes
    assert "__pycache__" not in build_runs  # and not deleted afterwards
    final_runs = " ".join(final.all("RUN"))
    # The official image's standard library comes without .pyc files.
    assert "compileall" in final_runs and 'get_paths()["stdlib"]' in final_runs
    assert "--invalidation-mode unchecked-hash" in final_runs
    assert final.instructions.index(("USER", "1337:1337")) > max(
        i for i, (kw, _) in enumerate(final.instructions) if kw == "RUN")


def test_the_demo_config_is_in_the_build_context_for_the_package_data() -> None:
    # pyproxy/demo/bookinfo is a symlink to config/bookinfo (pyproject.toml package-data).
    assert (ROOT / "pyproxy" / "demo" / "bookinfo").resolve() == ROOT / "config" / "bookinfo"
    build = parse_dockerfile()[1][0]
    assert "config/bookinfo ./config/bookinfo" in build.all("COPY")
    assert not dockerignore_excludes("config/bookinfo/gateway.yaml")
    assert not dockerignore_excludes("config/bookinfo/local/services.yaml")
