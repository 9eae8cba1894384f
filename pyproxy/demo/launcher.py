"""``pyproxy demo bookinfo``: Istio's Bookinfo mesh as local processes.

Every workload ("pod") gets its own loopback address (Linux routes all of
127.0.0.0/8 to ``lo``), so each pod's sidecar can use Istio's standard ports
on it::

    pod address      app :9080                     sidecar (pyproxy run)
    127.0.0.10       -                             ingress: --ingress (default 127.0.0.1:9080), admin :15000
    127.0.0.11       productpage v1                outbound :15001, inbound :15006, admin :15000, stats :15090
    127.0.0.12       details v1                    "
    127.0.0.13-15    reviews v1, v2, v3            "
    127.0.0.16       ratings v1                    "

The stand-in apps (``pyproxy.demo.apps``) reach their sidecar through
``HTTP_PROXY=http://<pod>:15001``; the registry (ServiceEntries whose
endpoints are the pods' inbound listeners, labelled app/version) is written
into the mesh config directory, which every sidecar reads. The ingress is a
pyproxy run with ``--gateway default/bookinfo-gateway --namespace istio-system`` and
``config/bookinfo/gateway.yaml`` (a Gateway and the VirtualService bound to it).

Changes to the config directory are applied live: every proxy watches its
``--config`` paths (pyproxy's hot reload). The launcher watches the directory
too, only to tell the user what the proxies did with a change (their
``/config_dump`` reload status): reloaded, or rejected with the first error.

Process hygiene: every child runs in its own process group (its session),
is told by the kernel to exit when the launcher dies (``PR_SET_PDEATHSIG``),
and is stopped with SIGTERM, then SIGKILL to its whole group, when the
launcher stops, when a child dies, or when startup fails.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import pyproxy
from pyproxy.config.files import is_config_name

DEFAULT_SUBNET = "127.0.0.0/24"
DEFAULT_INGRESS = "127.0.0.1:9080"
APP_PORT = 9080
OUTBOUND_PORT = 15001
INBOUND_PORT = 15006
ADMIN_PORT = 15000
STATS_PORT = 15090
INGRESS_HOST_NUMBER = 10
GATEWAY_NAME = "bookinfo-gateway"
MTLS_DR_FILE = "destination-rule-all-mtls.yaml"
STRICT_FILE = "peer-authentication-strict.yaml"
REGISTRY_FILE = "services.yaml"
ROUTING_FILE = "routing.yaml"
# Rate limits live in their own file, independent of the routing scenario.
RATELIMIT_FILE = "ratelimit.yaml"
# Where the scenario files live (a source checkout; `make.py demo` installs in editable mode).
# Package data (pyproject.toml): in a checkout pyproxy/demo/bookinfo is a
# symlink to config/bookinfo, which this resolves to; installed, the copy.
BOOKINFO_CONFIG = (Path(__file__).parent / "bookinfo").resolve()

STARTUP_TIMEOUT = 60.0  # seconds for all proxies and apps to become ready (2 busy cores are slow)
STOP_TIMEOUT = 8.0  # per process group, after SIGTERM, before SIGKILL
POLL_INTERVAL = 0.5
# How long to wait for every proxy to report a reload after a change (their
# watchers poll every 0.5 s and debounce 0.2 s; a busy machine is slower).
RELOAD_REPORT_TIMEOUT = 10.0

# (file, what it does) in the order of Istio's tasks; printed for the user.
SCENARIOS = (
    ("virtual-service-all-v1.yaml", "request routing: all traffic to v1"),
    ("virtual-service-reviews-jason-v2.yaml", "request routing: user jason to reviews v2, others v1"),
    ("fault-ratings-delay-jason.yaml", "fault injection: 7s delay to ratings for jason"),
    ("fault-ratings-abort-jason.yaml", "fault injection: HTTP 500 from ratings for jason"),
    ("virtual-service-reviews-50-v3.yaml", "traffic shifting: reviews 50% v1, 50% v3"),
    ("virtual-service-reviews-v3.yaml", "traffic shifting: reviews 100% v3"),
    ("virtual-service-reviews-90-10.yaml", "traffic shifting: reviews 90% v1, 10% v2"),
    ("circuit-breaking.yaml", "circuit breaking: productpage maxConnections 1, 1 pending request"),
)
# Authorization scenarios go to their own file next to the routing one.
AUTHZ_FILE = "authz.yaml"
AUTHZ_SCENARIOS = (
    ("authz-allow-nothing.yaml", "authorization: allow nothing in default (403 RBAC: access denied)"),
    ("authz-productpage-viewer.yaml", "authorization: + GET on productpage (details, reviews unavailable)"),
    ("authz-details-reviews-viewer.yaml", "authorization: + details/reviews from productpage's mTLS identity"),
    ("authz-ratings-viewer.yaml", "authorization: + ratings from reviews' mTLS identity"),
    ("jwt-ingress.yaml", "JWT at the ingress: token required (jwt-demo-token.txt)"),
)
# (file, what it does): Istio's rate-limit task, copied over ratelimit.yaml.
RATELIMIT_SCENARIOS = (
    ("ratelimit-global.yaml", "global rate limit on the ingress: /productpage 1 per minute (Redis)"),
    ("ratelimit-local.yaml", "local rate limit: 4 requests per minute per productpage instance"),
)


@dataclass(frozen=True, slots=True)
class Pod:
    app: str
    version: str
    host_number: int  # the pod's address within the pod subnet

    @property
    def name(self) -> str:
        return f"{self.app}-{self.version}"


PODS = (
    Pod("productpage", "v1", 11),
    Pod("details", "v1", 12),
    Pod("reviews", "v1", 13),
    Pod("reviews", "v2", 14),
    Pod("reviews", "v3", 15),
    Pod("ratings", "v1", 16),
)
SERVICES = ("productpage", "details", "reviews", "ratings")


class LaunchError(Exception):
    """Startup cannot continue; the message is for the user."""


# --------------------------------------------------------------------------- addresses and config


def pod_subnet(value: str) -> ipaddress.IPv4Network:
    try:
        net = ipaddress.ip_network(value, strict=False)
    except ValueError as exc:
        raise LaunchError(f"--pod-subnet {value!r}: {exc}") from None
    if not isinstance(net, ipaddress.IPv4Network) or not net.is_loopback or net.num_addresses < 32:
        raise LaunchError(f"--pod-subnet {value!r}: must be an IPv4 loopback network of at least /27 "
                          f"(for example {DEFAULT_SUBNET})")
    return net


def pod_address(subnet: ipaddress.IPv4Network, host_number: int) -> str:
    return str(subnet.network_address + host_number)


def service_account(app: str) -> str:
    """Bookinfo's service accounts (bookinfo.yaml): bookinfo-<app>."""
    return f"bookinfo-{app}"


# The ingress gateway's identity, as in Istio: istio-system/istio-ingressgateway-service-account.
GATEWAY_SERVICE_ACCOUNT = "istio-ingressgateway-service-account"


def issue_certificates(directory: Path) -> dict[str, Path]:
    """A mesh CA (pyproxy ca init) and one workload certificate per pod and
    for the ingress, in istio-agent's file-mounted layout: {pod name: dir}."""
    from ..security.ca import init_ca, issue_to_dir

    init_ca(directory / "ca")
    out = {}
    pods = [(p.name, "default", service_account(p.app)) for p in PODS]
    for name, namespace, sa in [("ingress", "istio-system", GATEWAY_SERVICE_ACCOUNT), *pods]:
        out[name] = directory / name
        issue_to_dir(directory / "ca", out[name], namespace, sa)
    return out


def render_registry(subnet: ipaddress.IPv4Network) -> str:
    """The ServiceEntries for the local pods: one per service, its endpoints
    the pods' sidecar inbound listeners, labelled app and version."""
    out = [
        "# The Bookinfo service registry for `pyproxy demo bookinfo` (local processes).",
        "# Each endpoint is a pod's sidecar inbound listener (port 15006 on the pod's",
        "# loopback address); the sidecar forwards to the app on :9080 of the same address.",
        "# The launcher writes this file into the mesh config directory (with other",
        "# addresses when --pod-subnet is given).",
    ]
    for service in SERVICES:
        out += [
            "---",
            "apiVersion: networking.istio.io/v1",
            "kind: ServiceEntry",
            "metadata:",
            f"  name: {service}",
            "spec:",
            f"  hosts: [{service}]",
            "  location: MESH_INTERNAL",
            f"  ports: [{{number: {APP_PORT}, name: http, protocol: HTTP}}]",
            "  resolution: STATIC",
            "  endpoints:",
        ]
        for pod in PODS:
            if pod.app == service:
                out += [
                    f"  - address: {pod_address(subnet, pod.host_number)}",
                    f"    ports: {{http: {INBOUND_PORT}}}",
                    f"    labels: {{app: {pod.app}, version: {pod.version}}}",
                    # Istio's Bookinfo service accounts: auto mTLS to this endpoint,
                    # and the server identity the client sidecar expects.
                    f"    serviceAccount: {service_account(pod.app)}",
                ]
    return "\n".join(out) + "\n"


def parse_host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise LaunchError(f"--ingress {value!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


def config_signature(directory: Path) -> tuple:
    """What the loader would read from ``directory``, cheaply: names, sizes, mtimes."""
    sig = []
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError:
        return ()
    for entry in entries:
        if not is_config_name(entry.name):  # the loader's selection (config/files.py)
            continue
        try:
            st = entry.stat()
        except OSError:
            continue
        sig.append((entry.name, st.st_size, st.st_mtime_ns, st.st_ino))
    return tuple(sig)


def describe_change(before: tuple, after: tuple) -> str:
    """``routing.yaml changed, x.yaml removed`` from two config signatures."""
    old = {name: rest for name, *rest in before}
    new = {name: rest for name, *rest in after}
    parts = [f"{n} added" for n in new if n not in old]
    parts += [f"{n} changed" for n in new if n in old and new[n] != old[n]]
    parts += [f"{n} removed" for n in old if n not in new]
    return ", ".join(parts)


def check_free(addresses: Iterable[tuple[str, int]]) -> None:
    """Fail early, with one clear message, when an address cannot be bound."""
    for host, port in addresses:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError as exc:
                where = f"{host}:{port}"
                if exc.errno == errno.EADDRINUSE:
                    raise LaunchError(
                        f"{where} is already in use (is another `pyproxy demo bookinfo` running? "
                        f"Stop it, or pick other addresses with --pod-subnet / --ingress)"
                    ) from None
                if exc.errno == errno.EADDRNOTAVAIL:
                    raise LaunchError(
                        f"cannot bind {where}: {exc.strerror}. The demo gives every pod its own loopback "
                        f"address; Linux routes all of 127.0.0.0/8 to lo, other systems need aliases "
                        f"(macOS: sudo ifconfig lo0 alias {host} up)"
                    ) from None
                raise LaunchError(f"cannot bind {where}: {exc.strerror}") from None


def bad_release_args(pod: Pod, env: dict[str, str]) -> list[str]:
    """``BOOKINFO_<POD>_FAIL_PERCENT`` / ``BOOKINFO_<POD>_DELAY_MS`` (for example
    ``BOOKINFO_REVIEWS_V3_FAIL_PERCENT=30``) make that pod a bad release
    (``pyproxy.demo.apps --fail-percent / --delay``), for canary demos."""
    prefix = "BOOKINFO_" + pod.name.upper().replace("-", "_") + "_"
    out = []
    for name, flag in (("FAIL_PERCENT", "--fail-percent"), ("DELAY_MS", "--delay")):
        value = env.get(prefix + name, "").strip()
        if value:
            out += [flag, value]
    return out


# --------------------------------------------------------------------------- processes


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the launcher dies, however it dies."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


@dataclass
class Child:
    name: str
    argv: list[str]
    log_path: Path
    ready_url: str
    env: dict[str, str]
    process: subprocess.Popen | None = None
    stopping: bool = False

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                # The launcher has no threads, so a preexec_fn is safe here.
                start_new_session=True, preexec_fn=_die_with_parent,  # noqa: PLW1509
            )

    @property
    def exited(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join("    " + line for line in text.splitlines()[-lines:])

    def signal_group(self, sig: int) -> None:
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, sig)  # the child's session: it and anything it started
        except (ProcessLookupError, PermissionError):
            pass


def http_status(url: str, method: str = "GET", timeout: float = 2.0) -> tuple[int, bytes]:
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    # The demo's own calls never go through a proxy set in the user's environment.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@dataclass
class Mesh:
    config_dir: Path
    log_dir: Path
    subnet: ipaddress.IPv4Network
    ingress: tuple[str, int]
    log_level: str = "warning"
    out: IO[str] = field(default_factory=lambda: sys.stdout)
    # Workload certificate directories by pod name ("ingress" too); empty = no mTLS.
    certs: dict[str, Path] = field(default_factory=dict)
    sidecars: list[Child] = field(default_factory=list)
    apps: list[Child] = field(default_factory=list)
    stop_requested: int = 0
    # The Redis the ingress counts global rate limits in (None: redis-server
    # is not installed; ratelimit-global.yaml then answers 500 RLSE).
    redis: subprocess.Popen | None = None
    redis_port: int = 0

    @property
    def ingress_admin(self) -> str:
        return pod_address(self.subnet, INGRESS_HOST_NUMBER)

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def addresses(self) -> list[tuple[str, int]]:
        out = [self.ingress]
        ingress_pod = self.ingress_admin
        out += [(ingress_pod, p) for p in (INBOUND_PORT, ADMIN_PORT, STATS_PORT)]
        for pod in PODS:
            ip = pod_address(self.subnet, pod.host_number)
            out += [(ip, p) for p in (APP_PORT, OUTBOUND_PORT, INBOUND_PORT, ADMIN_PORT, STATS_PORT)]
        if len(set(out)) != len(out):
            raise LaunchError(f"--ingress {self.ingress[0]}:{self.ingress[1]} clashes with a pod address")
        return out

    def base_env(self) -> dict[str, str]:
        env = dict(os.environ)
        # Children import pyproxy from the same place as the launcher.
        root = str(Path(pyproxy.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env["PYTHONUNBUFFERED"] = "1"
        for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy",
                     "NO_PROXY", "no_proxy", "REQUEST_METHOD"):
            env.pop(name, None)
        # Pyproxy flags from the user's environment would change every proxy.
        for name in [n for n in env if n.startswith("PYPROXY_")]:
            del env[name]
        return env

    def build(self) -> None:
        env = self.base_env()
        py = sys.executable
        common = ["--log-level", self.log_level, "--drain-timeout", "1",
                  # Sample every trace, as Istio's demo profile does.
                  "--trace-sampling", "100"]
        gw_pod = self.ingress_admin
        host, port = self.ingress
        ratelimit: list[str] = []
        if self.redis_port:
            ratelimit = ["--ratelimit-config", str(BOOKINFO_CONFIG / "ratelimit"),
                         "--ratelimit-redis", f"redis://{gw_pod}:{self.redis_port}"]
        self.sidecars.append(Child(
            "ingress",
            [py, "-m", "pyproxy", "run", "--config", str(self.config_dir),
             "--config", str(BOOKINFO_CONFIG / "gateway.yaml"),
             # Istio's ingress runs in istio-system; its Gateway is in default.
             "--namespace", "istio-system", "--gateway", f"default/{GATEWAY_NAME}",
             "--workload", "istio-ingressgateway", "--labels", "istio=ingressgateway,app=istio-ingressgateway",
             "--outbound", f"{host}:{port}", "--inbound", f"{gw_pod}:{INBOUND_PORT}",
             "--app", f"{gw_pod}:{APP_PORT}", "--admin", f"{gw_pod}:{ADMIN_PORT}",
             "--stats", f"{gw_pod}:{STATS_PORT}", "--access-log", str(self.log_dir / "ingress.access.log"),
             *self.certs_args("ingress"), *ratelimit, *common],
            self.log_dir / "ingress.log", f"http://{gw_pod}:{STATS_PORT}/healthz/ready", env,
        ))
        for pod in PODS:
            ip = pod_address(self.subnet, pod.host_number)
            self.sidecars.append(Child(
                f"{pod.name} sidecar",
                [py, "-m", "pyproxy", "run", "--config", str(self.config_dir),
                 "--workload", pod.name, "--labels", f"app={pod.app},version={pod.version}",
                 "--outbound", f"{ip}:{OUTBOUND_PORT}", "--inbound", f"{ip}:{INBOUND_PORT}",
                 "--app", f"{ip}:{APP_PORT}", "--admin", f"{ip}:{ADMIN_PORT}", "--stats", f"{ip}:{STATS_PORT}",
                 "--access-log", str(self.log_dir / f"{pod.name}.access.log"), *self.certs_args(pod.name),
                 *common],
                self.log_dir / f"{pod.name}.sidecar.log", f"http://{ip}:{STATS_PORT}/healthz/ready", env,
            ))
            app_env = dict(env)
            # aiohttp (trust_env) sends every call as an absolute-form request to the sidecar.
            app_env["HTTP_PROXY"] = app_env["http_proxy"] = f"http://{ip}:{OUTBOUND_PORT}"
            self.apps.append(Child(
                pod.name,
                [py, "-m", "pyproxy.demo.apps", pod.app, "--listen", f"{ip}:{APP_PORT}", "--version", pod.version,
                 *bad_release_args(pod, env)],
                self.log_dir / f"{pod.name}.app.log", f"http://{ip}:{APP_PORT}/health", app_env,
            ))

    def certs_args(self, name: str) -> list[str]:
        return ["--certs", str(self.certs[name])] if name in self.certs else ["--certs", "off"]

    def children(self) -> list[Child]:
        return [*self.sidecars, *self.apps]

    def start_redis(self) -> None:
        """A throw-away redis-server (no persistence) on the ingress pod's
        address, for the global rate limit, when one is installed."""
        server = shutil.which("redis-server")
        if server is None:
            return
        host = self.ingress_admin
        with socket.socket() as probe:
            probe.bind((host, 0))
            port = probe.getsockname()[1]
        log = open(self.log_dir / "redis.log", "ab")  # noqa: SIM115 - the child keeps it
        self.redis = subprocess.Popen(
            [server, "--bind", host, "--port", str(port), "--save", "", "--appendonly", "no",
             "--dir", str(self.log_dir)], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=_die_with_parent)  # noqa: PLW1509
        log.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((host, port), 0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        self.redis_port = port
                        return
            except OSError:
                pass
            if self.redis.poll() is not None:
                break
            time.sleep(0.05)
        self.say(f"warning: redis-server did not start (log {self.log_dir / 'redis.log'}): "
                 "global rate limits are off")
        self.stop_redis()

    def stop_redis(self) -> None:
        if self.redis is not None and self.redis.poll() is None:
            self.redis.terminate()
            try:
                self.redis.wait(5)
            except subprocess.TimeoutExpired:
                self.redis.kill()
                self.redis.wait(5)
        self.redis = None

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        """Sidecars first (as Istio holds apps until the proxy is ready), then apps."""
        for group in (self.sidecars, self.apps):
            for child in group:
                child.start()
            self._wait_ready(group)

    def _wait_ready(self, group: list[Child]) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        pending = list(group)
        while pending:
            self._check_stop()
            for child in list(pending):
                code = child.exited
                if code is not None:
                    raise LaunchError(f"{child.name} exited with status {code} while starting "
                                      f"(log {child.log_path}):\n{child.log_tail()}")
                try:
                    status, _ = http_status(child.ready_url, timeout=1.0)
                except OSError:
                    continue
                if status == 200:
                    pending.remove(child)
            if pending and time.monotonic() > deadline:
                names = ", ".join(c.name for c in pending)
                raise LaunchError(f"not ready after {STARTUP_TIMEOUT:.0f}s: {names} (logs in {self.log_dir})")
            time.sleep(0.1)

    def _check_stop(self) -> None:
        if self.stop_requested:
            raise KeyboardInterrupt

    def stop(self) -> None:
        """Ingress first, then the apps, then their sidecars: SIGTERM, wait, SIGKILL."""
        order = [self.sidecars[:1], self.apps, self.sidecars[1:]]
        for group in order:
            started = [c for c in group if c.process is not None]
            for child in started:
                child.stopping = True
                child.signal_group(signal.SIGTERM)
            deadline = time.monotonic() + STOP_TIMEOUT
            for child in started:
                assert child.process is not None
                try:
                    child.process.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
            for child in started:
                # Whatever is left in the group (the child, or anything it spawned) goes now.
                child.signal_group(signal.SIGKILL)
                if child.process is not None and child.process.poll() is None:
                    child.process.wait(5)

    def admin_url(self, child: Child, path: str) -> str:
        return child.ready_url.replace(f":{STATS_PORT}/healthz/ready", f":{ADMIN_PORT}{path}")

    def reload_states(self) -> dict[str, dict]:
        """Each proxy's last reload (``/config_dump`` ``last_reload``); {} for one that does not answer."""
        states = {}
        for child in self.sidecars:
            try:
                status, body = http_status(self.admin_url(child, "/config_dump"), timeout=5.0)
                states[child.name] = json.loads(body)["last_reload"] if status == 200 else {}
            except (OSError, ValueError, KeyError):
                states[child.name] = {}
        return states

    def report_reload(self, change: str, before: dict[str, dict]) -> dict[str, dict]:
        """Wait until every proxy has reloaded since ``before``; say how it went.
        Returns the states seen, the baseline for the next change."""

        def count(state: dict) -> int:
            return int(state.get("successes", 0)) + int(state.get("failures", 0))

        deadline = time.monotonic() + RELOAD_REPORT_TIMEOUT
        while True:
            now = self.reload_states()
            waiting = [n for n, st in now.items() if count(st) <= count(before.get(n, {}))]
            if not waiting or time.monotonic() > deadline or self.stop_requested:
                break
            time.sleep(0.2)
        rejected = {n: st for n, st in now.items() if n not in waiting and not st.get("ok", True)}
        reloaded = len(now) - len(waiting) - len(rejected)
        if rejected:
            self.say(f"[mesh] {change}: rejected by {len(rejected)} proxies, which keep their previous config:")
            errors = next(iter(rejected.values())).get("errors") or ["?"]
            for e in errors[:5]:
                self.say(f"  {e}")
        else:
            self.say(f"[mesh] {change}: {reloaded} proxies reloaded")
        if waiting:
            self.say(f"[mesh] no reload seen yet from {', '.join(waiting)}")
        return now

    def run_until_stopped(self) -> int:
        """Watch the children and the config directory until a signal arrives."""
        signature = config_signature(self.config_dir)
        states = self.reload_states()
        while not self.stop_requested:
            time.sleep(POLL_INTERVAL)
            for child in self.children():
                code = child.exited
                if code is not None and not child.stopping:
                    self.say(f"\n{child.name} exited unexpectedly with status {code} (log {child.log_path}):\n"
                             f"{child.log_tail()}\nstopping the demo")
                    return 1
            current = config_signature(self.config_dir)
            if current != signature:
                change = describe_change(signature, current)
                signature = current
                states = self.report_reload(change, states)
        return 0


# --------------------------------------------------------------------------- user-facing text


def _shown(path: Path) -> str:
    """A path as the user would type it: relative to the current directory when inside it."""
    try:
        rel = path.resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        return str(path)
    return str(rel) or "."


def banner(mesh: Mesh) -> str:
    host, port = mesh.ingress
    url_host = f"[{host}]" if ":" in host else host
    url = f"http://{url_host}:{port}/productpage"
    cfg = _shown(mesh.config_dir)
    scen = _shown(BOOKINFO_CONFIG)
    pp = pod_address(mesh.subnet, PODS[0].host_number)
    lines = [
        "",
        "Bookinfo is running: productpage, details, reviews v1/v2/v3 and ratings, each with its own",
        "pyproxy sidecar on its own loopback address, behind a pyproxy ingress gateway.",
        "",
        f"  open   {url}",
        f"  curl   curl -s {url} | grep -c glyphicon-star    # 0 (v1), or stars from v2 (black) / v3 (red)",
        "",
        "No routing rules yet: each page load reaches reviews v1, v2 or v3 (Istio's default balancing).",
        "Sign in as 'jason' (top right) for the user-based scenarios.",
        "",
        f"Mesh config: {cfg}  (every proxy reloads when a file in it changes)",
        "Switch scenario (each file is complete: copying one replaces the previous one):",
    ]
    for name, what in SCENARIOS:
        lines.append(f"  cp {scen}/{name} {cfg}/{ROUTING_FILE}    # {what}")
    lines += [
        f"  rm {cfg}/{ROUTING_FILE}    # back to no rules",
        "Authorization (its own file; each is complete for its step):",
    ]
    for name, what in AUTHZ_SCENARIOS:
        lines.append(f"  cp {scen}/{name} {cfg}/{AUTHZ_FILE}    # {what}")
    lines += [
        f"  rm {cfg}/{AUTHZ_FILE}    # no policies",
        "Rate limits (Istio's rate-limit task; independent of the routing file):",
    ]
    for name, what in RATELIMIT_SCENARIOS:
        lines.append(f"  cp {scen}/{name} {cfg}/{RATELIMIT_FILE}    # {what}")
    lines.append(f"  rm {cfg}/{RATELIMIT_FILE}    # no rate limit")
    if mesh.redis_port:
        lines.append(f"  (global limits count in the demo's redis-server on {mesh.ingress_admin}:{mesh.redis_port})")
    else:
        lines.append("  (global limits need Redis: install redis-server (apt-get install redis-server) and "
                     "restart the demo; without it ratelimit-global.yaml answers 500, flag RLSE)")
    lines += [
        "",
    ]
    if mesh.certs:
        lines += [
            "Mutual TLS is on: every sidecar has a bookinfo-<app> certificate from the demo's own CA",
            f"({_shown(mesh.certs['ingress'].parent / 'ca')}); sidecars talk mTLS (auto mTLS), plaintext is still",
            "accepted (PERMISSIVE). Istio's Mutual TLS tasks:",
            f"  cp {scen}/{MTLS_DR_FILE} {cfg}/    # DestinationRules with tls ISTIO_MUTUAL",
            f"  cp {scen}/{STRICT_FILE} {cfg}/    # STRICT: plaintext is refused",
            f"  curl -s http://{pp}:{STATS_PORT}/stats/prometheus | grep connection_security_policy",
            "",
        ]
    else:
        lines += ["Mutual TLS is off (--mtls off).", ""]
    lines += [
        f"Proxies: admin http://<pod>:{ADMIN_PORT}/server_info, stats http://<pod>:{STATS_PORT}/stats/prometheus",
        "  " + ", ".join(f"{p.name} {pod_address(mesh.subnet, p.host_number)}" for p in PODS)
        + f", ingress {mesh.ingress_admin}",
        f"  e.g. curl -s http://{pp}:{STATS_PORT}/stats/prometheus | grep istio_requests_total",
        f"Logs: {mesh.log_dir}",
        "",
        "Ctrl-C stops everything.",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- entry point


def main(args: argparse.Namespace) -> int:
    out = sys.stdout
    if not (BOOKINFO_CONFIG / "gateway.yaml").is_file():
        print(f"pyproxy demo: {BOOKINFO_CONFIG} not found: this installation lacks the demo's config "
              f"(reinstall with pip from the repository, or run python3 make.py demo in a checkout)",
              file=sys.stderr)
        return 2
    try:
        subnet = pod_subnet(getattr(args, "pod_subnet", None) or DEFAULT_SUBNET)
        ingress = parse_host_port(args.ingress or DEFAULT_INGRESS)
    except LaunchError as exc:
        print(f"pyproxy demo: {exc}", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="pyproxy-bookinfo-"))
    own_config = args.config_dir is None
    config_dir = workdir / "mesh" if own_config else Path(args.config_dir)
    log_dir = workdir / "logs"
    log_dir.mkdir()
    mesh = Mesh(config_dir, log_dir, subnet, ingress, log_level=args.log_level, out=out)
    if getattr(args, "mtls", "on") == "on":
        mesh.certs = issue_certificates(workdir / "certs")

    def on_signal(signum: int, frame: object) -> None:
        mesh.stop_requested += 1

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    code = 1
    try:
        config_dir.mkdir(parents=True, exist_ok=True)
        (config_dir / REGISTRY_FILE).write_text(render_registry(subnet))
        others = [n for n, *_ in config_signature(config_dir) if n != REGISTRY_FILE]
        if others:
            mesh.say(f"[mesh] {config_dir} also holds {', '.join(others)}: the proxies start with those rules")
        _validate(config_dir)
        check_free(mesh.addresses())
        mesh.start_redis()
        mesh.build()
        mesh.say(f"starting 7 proxies and 6 apps (logs in {log_dir}) ...")
        mesh.start()
        status, _ = http_status(f"http://{ingress[0]}:{ingress[1]}/productpage", timeout=10.0)
        if status != 200:
            mesh.say(f"warning: the first /productpage through the ingress answered {status}")
        mesh.say(banner(mesh))
        code = mesh.run_until_stopped()
    except LaunchError as exc:
        print(f"pyproxy demo: {exc}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        code = 0
    finally:
        if any(c.process is not None for c in mesh.children()):
            mesh.say("stopping ...")
        mesh.stop()
        mesh.stop_redis()
        for s, handler in previous.items():
            signal.signal(s, handler)
    started = any(c.process is not None for c in mesh.children())
    if code != 0 and started:
        print(f"pyproxy demo: logs kept in {log_dir}", file=sys.stderr)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    if code == 0:
        mesh.say("stopped")
    return code


def _validate(config_dir: Path) -> None:
    from ..config.loader import load_paths

    loaded = load_paths([str(config_dir), str(BOOKINFO_CONFIG / "gateway.yaml")])
    if loaded.errors:
        listed = "\n".join(f"  {e}" for e in loaded.errors)
        raise LaunchError(f"the mesh config in {config_dir} is invalid:\n{listed}")
