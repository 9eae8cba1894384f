"""Transparent interception end to end, in network namespaces.

The lab (created and deleted by the fixture; every name carries this
process's id, so parallel runs do not collide):

    netns <p>-cli  198.18.0.1  fd00:198:18::1   an unmodified client
    netns <p>-pod  198.18.0.2  fd00:198:18::2   app on :9080 + pyproxy as UID 1337,
                                                 rules from `pyproxy iptables --apply --ipv6`
    netns <p>-oth  198.18.0.3  fd00:198:18::3   "other" service: v1 :8080, v2 :8081,
                                                 alt :8090, pass :8082
    netns <p>-hub  bridge joining the three through veth pairs

Every request is made by a plain urllib client with no proxy settings,
running as UID 1000; what proves interception is what the servers see (the
proxy adds x-request-id, x-envoy-attempt-count and x-forwarded-for) and where
the request ends up (a VirtualService sends port 8080 to v2 on :8081).

Needs root, `ip`, `iptables`/`ip6tables` and `setpriv`; otherwise skipped
with the reason.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.harness import ROOT

pytestmark = pytest.mark.netns

PROXY_UID = 1337
APP_UID = 1000
PREFIX = f"pyx{os.getpid() % 100000}"
V4 = {"cli": "198.18.0.1", "pod": "198.18.0.2", "oth": "198.18.0.3"}
V6 = {"cli": "fd00:198:18::1", "pod": "fd00:198:18::2", "oth": "fd00:198:18::3"}

ECHO_SERVER = r'''
import json, socket, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        peer = self.client_address[0]
        if peer.startswith("::ffff:"):
            peer = peer[7:]
        body = json.dumps({"name": self.server.name, "path": self.path, "peer": peer,
                           "headers": {k.lower(): v for k, v in self.headers.items()}}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

class DualStack(ThreadingHTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True

    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()

for spec in sys.argv[1:]:
    name, port = spec.split("=")
    server = DualStack(("::", int(port)), Handler)
    server.name = name
    threading.Thread(target=server.serve_forever, daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
'''

CLIENT = r'''
import json, sys, urllib.request
req = urllib.request.Request(sys.argv[1])
if len(sys.argv) > 2:
    req.add_header("Host", sys.argv[2])
with urllib.request.urlopen(req, timeout=10) as resp:
    print(json.dumps({"status": resp.status, "body": json.loads(resp.read())}))
'''

WAIT_READY = r'''
import sys, time, urllib.request
deadline = time.monotonic() + float(sys.argv[2])
while True:
    try:
        with urllib.request.urlopen(sys.argv[1], timeout=1) as resp:
            if resp.status == 200:
                sys.exit(0)
    except OSError:
        pass
    if time.monotonic() > deadline:
        sys.exit(1)
    time.sleep(0.05)
'''

MESH = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: other}
spec:
  hosts: [other]
  ports: [{number: 8080, name: http}, {number: 8090, name: http-alt}]
  resolution: STATIC
  endpoints:
  - {address: 198.18.0.3, labels: {version: v1}}
  - {address: 198.18.0.3, ports: {http: 8081}, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: other}
spec:
  host: other
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: other}
spec:
  hosts: [other]
  http:
  - match: [{port: 8080}]
    route: [{destination: {host: other, subset: v2}}]
  - route: [{destination: {host: other, subset: v1}}]
"""


def run(*argv: str, timeout: float = 15.0, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({res.returncode}): {res.stderr.strip() or res.stdout.strip()}")
    return res


def as_user(uid: int) -> list[str]:
    # CAP_DAC_READ_SEARCH (ambient, so the exec'd Python keeps it): the user
    # may read and traverse any file, as root's checkout and virtualenv often
    # sit under a private (0700) directory (a CI workspace, `mktemp -d`).
    # It grants nothing else: the process still runs as ``uid``, which is what
    # the iptables owner match (Istio's UID 1337 exclusion) looks at, so the
    # host's permissions need no change for this test.
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
            "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"]


def skip_reason() -> str | None:
    if sys.platform != "linux":
        return "transparent interception needs Linux"
    if os.geteuid() != 0:
        return "needs root (creates network namespaces and iptables rules)"
    for tool in ("ip", "iptables", "ip6tables", "setpriv"):
        if shutil.which(tool) is None:
            return f"{tool} not found (.ci/run installs iproute2 and iptables)"
    probe = subprocess.run(
        [*as_user(PROXY_UID), sys.executable, "-c", "import pyproxy.cli, uvloop, httptools, aiohttp, yaml"],
        capture_output=True, text=True, timeout=30, cwd="/", check=False,
        env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT)})
    if probe.returncode != 0:
        return (f"UID {PROXY_UID} cannot run {sys.executable} with pyproxy from {ROOT} "
                f"(setpriv with an ambient CAP_DAC_READ_SEARCH): {probe.stderr.strip()[-300:]}")
    return None


@dataclass
class Lab:
    tmp: Path
    namespaces: list[str] = field(default_factory=list)
    processes: list[subprocess.Popen] = field(default_factory=list)
    proxy_log: Path | None = None
    etc_dir: Path | None = None
    created_etc_netns: bool = False

    def ns(self, role: str) -> str:
        return f"{PREFIX}-{role}"

    def exec_in(self, role: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns(role)]

    def start(self, role: str, argv: list[str], log_name: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        with open(self.tmp / log_name, "wb") as log:  # the child keeps its own descriptor
            proc = subprocess.Popen([*self.exec_in(role), *argv], stdout=log, stderr=subprocess.STDOUT,
                                    env=env, cwd="/", start_new_session=True)
        self.processes.append(proc)
        return proc

    def fetch(self, role: str, url: str, host: str | None = None) -> dict:
        """One GET by an unmodified client (no proxy settings) as UID 1000 in ``role``'s namespace."""
        argv = [*self.exec_in(role), *as_user(APP_UID), sys.executable, "-c", CLIENT, url]
        if host is not None:
            argv.append(host)
        res = subprocess.run(argv, capture_output=True, text=True, timeout=20, cwd="/", check=False,
                             env={"PATH": os.environ.get("PATH", "")})
        if res.returncode != 0:
            raise AssertionError(f"client {url} (Host {host}) failed: {res.stderr.strip()[-800:]}\n"
                                 f"proxy log:\n{self.log()[-3000:]}")
        return json.loads(res.stdout)

    def log(self) -> str:
        return self.proxy_log.read_text(errors="replace") if self.proxy_log else ""

    def teardown(self) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # its own session: only what this test started
                except ProcessLookupError:
                    pass
        for proc in self.processes:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        for name in reversed(self.namespaces):
            # Anything still inside a namespace this test created was started by this test.
            pids = run("ip", "netns", "pids", name, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            run("ip", "netns", "del", name, check=False)
        if self.etc_dir is not None:
            shutil.rmtree(self.etc_dir, ignore_errors=True)
            if self.created_etc_netns:
                try:
                    self.etc_dir.parent.rmdir()  # only if still empty (another run may use it)
                except OSError:
                    pass
        shutil.rmtree(self.tmp, ignore_errors=True)


def build_lab(lab: Lab) -> None:
    for role in ("hub", "cli", "pod", "oth"):
        run("ip", "netns", "add", lab.ns(role))
        lab.namespaces.append(lab.ns(role))
        run("ip", "-n", lab.ns(role), "link", "set", "lo", "up")
    hub = lab.ns("hub")
    run("ip", "-n", hub, "link", "add", "br0", "type", "bridge")
    run("ip", "-n", hub, "link", "set", "br0", "up")
    for role in ("cli", "pod", "oth"):
        # Created inside the hub with its peer placed straight into the
        # namespace: nothing ever appears in the host's namespace.
        run("ip", "-n", hub, "link", "add", f"v-{role}", "type", "veth", "peer", "name", "eth0",
            "netns", lab.ns(role))
        run("ip", "-n", hub, "link", "set", f"v-{role}", "master", "br0", "up")
        run("ip", "-n", lab.ns(role), "addr", "add", f"{V4[role]}/24", "dev", "eth0")
        run("ip", "-n", lab.ns(role), "-6", "addr", "add", f"{V6[role]}/64", "dev", "eth0", "nodad")
        run("ip", "-n", lab.ns(role), "link", "set", "eth0", "up")
    # The pod resolves "other" like a cluster DNS would (ip netns exec
    # bind-mounts /etc/netns/<name>/hosts over /etc/hosts).
    lab.etc_dir = Path("/etc/netns") / lab.ns("pod")
    lab.created_etc_netns = not lab.etc_dir.parent.exists()
    lab.etc_dir.mkdir(parents=True, exist_ok=False)
    (lab.etc_dir / "hosts").write_text(f"127.0.0.1 localhost\n::1 localhost\n{V4['oth']} other\n")


def wait_for(predicate, what: str, lab: Lab, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        for proc in lab.processes:
            if proc.poll() is not None:
                raise RuntimeError(f"{' '.join(map(str, proc.args))[:200]} exited while waiting for {what}:\n"
                                   f"{lab.log()[-3000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}:\n{lab.log()[-3000:]}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    reason = skip_reason()
    if reason is not None:
        print(f"test_transparent skipped: {reason}")
        pytest.skip(reason)
    tmp = Path(tempfile.mkdtemp(prefix="pyproxy-netns-"))
    tmp.chmod(0o755)  # the proxy runs as UID 1337 and reads its config here
    lab = Lab(tmp)
    try:
        try:
            build_lab(lab)
        except (RuntimeError, OSError) as exc:
            print(f"test_transparent skipped: cannot build network namespaces: {exc}")
            pytest.skip(f"cannot build network namespaces here: {exc}")
        (tmp / "echo_server.py").write_text(ECHO_SERVER)
        config = tmp / "config"
        config.mkdir(mode=0o755)
        (config / "mesh.yaml").write_text(textwrap.dedent(MESH))
        for path in (tmp / "echo_server.py", config / "mesh.yaml"):
            path.chmod(0o644)
        py = sys.executable
        servers = [
            lab.start("pod", [*as_user(APP_UID), py, str(tmp / "echo_server.py"), "app=9080"], "app.log"),
            lab.start("oth", [py, str(tmp / "echo_server.py"), "v1=8080", "v2=8081", "pass=8082", "alt=8090"],
                      "oth.log"),
        ]
        run(*lab.exec_in("pod"), py, "-m", "pyproxy", "iptables", "--apply", "--ipv6")
        lab.proxy_log = tmp / "proxy.log"
        lab.start("pod", [*as_user(PROXY_UID), py, "-m", "pyproxy", "run", "--config", str(config),
                          "--inbound", "[::]:15006", "--outbound", "[::]:15001", "--app", "127.0.0.1:9080",
                          "--log-level", "info"],
                  "proxy.log", env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT)})
        for name in ("app.log", "oth.log"):
            wait_for(lambda n=name: "ready" in (tmp / n).read_text(), name, lab)
        # /healthz/ready answers 200 once config is loaded and every listener is bound.
        ready = subprocess.run([*lab.exec_in("pod"), py, "-c", WAIT_READY, "http://127.0.0.1:15090/healthz/ready",
                                "20"], capture_output=True, timeout=30, cwd="/", check=False)
        if ready.returncode != 0:
            raise RuntimeError(f"the proxy did not become ready:\n{lab.log()[-3000:]}")
        assert servers[0].poll() is None and servers[1].poll() is None
        yield lab
    finally:
        lab.teardown()


def is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


# -- inbound -------------------------------------------------------------------------------


def test_inbound_call_from_another_pod_is_intercepted(lab: Lab) -> None:
    got = lab.fetch("cli", f"http://{V4['pod']}:9080/hello")
    body = got["body"]
    assert (got["status"], body["name"], body["path"]) == (200, "app", "/hello")
    # The app was reached by the proxy over loopback, not by the client ...
    assert body["peer"] == "127.0.0.1"
    # ... which added what a sidecar adds; no x-forwarded-for: istiod gives
    # sidecar listeners use_remote_address false, so the peer is not appended.
    assert "x-forwarded-for" not in body["headers"]
    assert is_uuid(body["headers"]["x-request-id"])
    assert body["headers"]["x-forwarded-proto"] == "http"


def test_inbound_ipv6(lab: Lab) -> None:
    body = lab.fetch("cli", f"http://[{V6['pod']}]:9080/v6")["body"]
    assert (body["name"], body["peer"]) == ("app", "127.0.0.1")
    assert "x-forwarded-for" not in body["headers"]  # sidecar: use_remote_address false
    assert is_uuid(body["headers"]["x-request-id"])


# -- outbound -------------------------------------------------------------------------------


def test_outbound_call_by_service_name_is_routed_by_the_virtual_service(lab: Lab) -> None:
    # The app connects to other:8080 = 198.18.0.3:8080 (v1); the VirtualService
    # sends port 8080 to subset v2, which listens on :8081.
    body = lab.fetch("pod", "http://other:8080/reviews")["body"]
    assert (body["name"], body["path"]) == ("v2", "/reviews")
    assert body["headers"]["host"] == "other:8080"
    assert body["headers"]["x-envoy-attempt-count"] == "1"
    assert is_uuid(body["headers"]["x-request-id"])
    assert "x-forwarded-for" not in body["headers"]  # sidecar: use_remote_address false


def test_outbound_port_comes_from_the_original_destination_when_host_has_none(lab: Lab) -> None:
    # Host "other" without a port, connection to :8090: the original
    # destination's port selects service port 8090 (second rule: subset v1),
    # not the service's first port 8080 (first rule: v2).
    body = lab.fetch("pod", f"http://{V4['oth']}:8090/alt", host="other")["body"]
    assert (body["name"], body["path"]) == ("alt", "/alt")
    assert is_uuid(body["headers"]["x-request-id"])


def test_outbound_unknown_destination_passes_through_to_the_original_address(lab: Lab) -> None:
    body = lab.fetch("pod", f"http://{V4['oth']}:8082/pass")["body"]
    assert (body["name"], body["path"]) == ("pass", "/pass")
    assert body["headers"]["host"] == f"{V4['oth']}:8082"
    assert body["headers"]["x-envoy-attempt-count"] == "1"  # it went through the proxy
    assert is_uuid(body["headers"]["x-request-id"])
    # A Host that names nothing resolvable: only SO_ORIGINAL_DST knows where to go.
    body = lab.fetch("pod", f"http://{V4['oth']}:8082/odst", host="nowhere.invalid")["body"]
    assert (body["name"], body["path"], body["headers"]["host"]) == ("pass", "/odst", "nowhere.invalid")
    assert is_uuid(body["headers"]["x-request-id"])


def test_outbound_ipv6_routed_and_passthrough(lab: Lab) -> None:
    routed = lab.fetch("pod", f"http://[{V6['oth']}]:8080/r6", host="other:8080")["body"]
    assert (routed["name"], routed["path"]) == ("v2", "/r6")
    passed = lab.fetch("pod", f"http://[{V6['oth']}]:8082/p6")["body"]
    assert (passed["name"], passed["path"]) == ("pass", "/p6")
    assert passed["peer"] == V6["pod"]  # the proxy reached it over IPv6
    assert "x-forwarded-for" not in passed["headers"]  # sidecar: use_remote_address false
    assert is_uuid(passed["headers"]["x-request-id"])


def test_pod_local_traffic_is_not_captured(lab: Lab) -> None:
    # The app calling itself over loopback bypasses the proxy (Istio's rule).
    body = lab.fetch("pod", "http://127.0.0.1:9080/local")["body"]
    assert body["name"] == "app" and "x-request-id" not in body["headers"]
