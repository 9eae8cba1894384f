"""The service registry end to end: ServiceEntry/WorkloadEntry endpoints,
ports, DNS resolution, wildcard hosts, and ``pyproxy validate``.

Real proxy processes (tests/harness.py) and scripted upstreams on 127.0.0.1.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import aiohttp

from tests.harness import ROOT, Upstream, running_proxy
from tests.reference import reference, skip_unless_present

REFERENCE = reference("istio")


async def get(session: aiohttp.ClientSession, url: str, host: str | None = None) -> tuple[int, str, str]:
    """(status, upstream name or "", response flags header) for one request."""
    headers = {"Host": host} if host is not None else {}
    async with session.get(url, headers=headers) as r:
        body = await r.read()
        name = ""
        if r.status == 200 and r.content_type == "application/json":
            name = (await r.json())["upstream"]
        return r.status, name, body.decode(errors="replace")


async def test_endpoint_ports_by_name_target_port_and_service_port_and_two_port_service() -> None:
    async with Upstream("A") as a, Upstream("B") as b, Upstream("C") as c:
        cfg = f"""
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {{name: named}}
        spec:
          hosts: [named]
          ports: [{{number: 80, name: http, targetPort: {b.port}}}]
          resolution: STATIC
          endpoints: [{{address: 127.0.0.1, ports: {{http: {a.port}}}}}]
        ---
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {{name: target}}
        spec:
          hosts: [target]
          ports: [{{number: 80, name: http, targetPort: {b.port}}}]
          resolution: STATIC
          endpoints: [{{address: 127.0.0.1}}]
        ---
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {{name: plain}}
        spec:
          hosts: [plain]
          ports: [{{number: {c.port}, name: http}}]
          resolution: STATIC
          endpoints: [{{address: 127.0.0.1}}]
        ---
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {{name: multi}}
        spec:
          hosts: [multi]
          addresses: [240.0.0.1]
          ports: [{{number: 8080, name: http}}, {{number: 9090, name: http-admin}}]
          resolution: STATIC
          endpoints: [{{address: 127.0.0.1, ports: {{http: {a.port}, http-admin: {b.port}}}}}]
        """
        with running_proxy(cfg) as px:
            out = px.outbound_url
            async with aiohttp.ClientSession() as s:
                # The endpoint's port for the port's name beats targetPort,
                # which beats the service port number.
                assert (await get(s, out + "/", "named"))[:2] == (200, "A")
                assert (await get(s, out + "/", "target:80"))[:2] == (200, "B")
                assert (await get(s, out + "/", "plain"))[:2] == (200, "C")
                assert (await get(s, out + "/", f"plain:{c.port}"))[:2] == (200, "C")
                # Two ports: the authority's port selects the service port.
                assert (await get(s, out + "/", "multi:8080"))[:2] == (200, "A")
                assert (await get(s, out + "/", "multi:9090"))[:2] == (200, "B")
                assert (await get(s, out + "/", "multi.default.svc.cluster.local:9090"))[:2] == (200, "B")
                assert (await get(s, out + "/", "multi"))[:2] == (200, "A")  # no port: the first one
                assert (await get(s, out + "/", f"multi:{px.outbound}"))[:2] == (200, "A")  # the sidecar's port
                # Absolute-form (HTTP_PROXY) requests carry the port in the URI.
                async with s.get("http://multi:9090/abs", proxy=out) as r:
                    assert (await r.json())["upstream"] == "B"
                # The ServiceEntry address names the service too (Istio's VIP domain).
                assert (await get(s, out + "/", "240.0.0.1:9090"))[:2] == (200, "B")
    assert [x.path for x in b.seen][-2:] == ["/abs", "/"]
    assert b.seen[-1].headers["host"] == "240.0.0.1:9090"  # the authority is passed on unchanged


async def test_workload_entries_dns_wildcards_and_registry_only() -> None:
    async with Upstream("v1") as v1, Upstream("v2") as v2, Upstream("stray") as stray, \
            Upstream("dns") as dns, Upstream("wild") as wild:
        cfg = {
            "registry.yaml": f"""
            apiVersion: networking.istio.io/v1
            kind: ServiceEntry
            metadata: {{name: details}}
            spec:
              hosts: [details]
              ports: [{{number: 9080, name: http}}]
              resolution: STATIC
              workloadSelector: {{labels: {{app: details}}}}
            ---
            apiVersion: networking.istio.io/v1
            kind: WorkloadEntry
            metadata: {{name: details-vm-1}}
            spec: {{address: 127.0.0.1, ports: {{http: {v1.port}}}, labels: {{app: details, version: v1}}}}
            ---
            apiVersion: networking.istio.io/v1
            kind: WorkloadEntry
            metadata: {{name: details-vm-2}}
            spec: {{address: 127.0.0.1, ports: {{http: {v2.port}}}, labels: {{app: details, version: v2}}}}
            ---
            apiVersion: networking.istio.io/v1
            kind: WorkloadEntry
            metadata: {{name: ratings-vm}}
            spec: {{address: 127.0.0.1, ports: {{http: {stray.port}}}, labels: {{app: ratings}}}}
            ---
            apiVersion: networking.istio.io/v1
            kind: WorkloadEntry
            metadata: {{name: details-elsewhere, namespace: other}}
            spec: {{address: 127.0.0.1, ports: {{http: {stray.port}}}, labels: {{app: details}}}}
            ---
            apiVersion: networking.istio.io/v1
            kind: ServiceEntry
            metadata: {{name: api}}
            spec:
              hosts: [api.internal]
              ports: [{{number: 80, name: http}}]
              resolution: DNS
              endpoints: [{{address: localhost, ports: {{http: {dns.port}}}}}]
            ---
            apiVersion: networking.istio.io/v1
            kind: ServiceEntry
            metadata: {{name: wild}}
            spec:
              hosts: ["*.example.test"]
              ports: [{{number: 80, name: http}}]
              resolution: STATIC
              endpoints: [{{address: 127.0.0.1, ports: {{http: {wild.port}}}}}]
            """,
            "routing.yaml": """
            apiVersion: networking.istio.io/v1
            kind: DestinationRule
            metadata: {name: details}
            spec:
              host: details
              subsets: [{name: v2, labels: {version: v2}}]
            ---
            apiVersion: networking.istio.io/v1
            kind: VirtualService
            metadata: {name: details-canary}
            spec:
              hosts: [details-canary]
              http:
              - route: [{destination: {host: details, subset: v2}}]
            ---
            apiVersion: networking.istio.io/v1
            kind: Sidecar
            metadata: {name: default}
            spec:
              outboundTrafficPolicy: {mode: REGISTRY_ONLY}
            """,
        }
        with running_proxy(cfg, args=["--log-level", "debug"]) as px:
            out = px.outbound_url
            async with aiohttp.ClientSession() as s:
                seen = {(await get(s, out + "/", "details"))[1] for _ in range(12)}
                assert seen == {"v1", "v2"}  # no VirtualService: every selected WorkloadEntry
                for _ in range(4):
                    assert (await get(s, out + "/", "details-canary"))[:2] == (200, "v2")
                # resolution DNS: the endpoint name was resolved before the
                # config went live, off the request path.
                assert (await get(s, out + "/", "api.internal"))[:2] == (200, "dns")
                # A wildcard ServiceEntry admits its hosts under REGISTRY_ONLY ...
                assert (await get(s, out + "/", "anything.example.test"))[:2] == (200, "wild")
                # ... and a host in no ServiceEntry gets 502 NR.
                async with s.get(out + "/", headers={"Host": "example.test"}) as r:
                    assert r.status == 502
            log = px.log()
    assert stray.seen == []  # other labels, or another namespace: never selected
    assert len(v2.seen) >= 4 and dns.seen and wild.seen[0].headers["host"] == "anything.example.test"
    assert re.search(r"dns: localhost -> \['127\.0\.0\.1'", log), log[-2000:]


# -- pyproxy validate --------------------------------------------------------------------


def validate(*paths: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pyproxy", "validate", *map(str, paths)], cwd=str(ROOT),
                          capture_output=True, text=True, timeout=60, check=False)


BAD = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ok}
spec:
  hosts: [reviews]
  http:
  - route: [{destination: {host: reviews}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: broken}
spec:
  hosts: [reviews]
  http:
  - timeout: 5 parsecs
    route:
    - destination: {subset: v1}
      weight: -1
---
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {name: se}
spec:
  hosts: [api.example.com]
  ports: [{number: abc, name: http}]
  resolution: SOMETIMES
  exportTo: ["."]
"""

BAD2 = """\
apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata: {name: dr}
spec:
  host: reviews
  trafficPolicy:
    outlierDetection: {interval: 1 fortnight}
"""

GOOD = """\
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: default}
spec:
  outboundTrafficPolicy: {mode: REGISTRY_ONLY}
"""


def test_validate_reports_every_error_of_every_file(tmp_path: Path) -> None:
    for name, text in (("bad.yaml", BAD), ("bad2.yaml", BAD2), ("good.yaml", GOOD)):
        (tmp_path / name).write_text(text)
    res = validate(tmp_path / "bad.yaml", tmp_path / "bad2.yaml", tmp_path / "good.yaml")
    assert res.returncode == 1
    assert res.stdout == "6 errors\n"
    lines = res.stderr.splitlines()
    warnings = [x for x in lines if x.startswith("warning: ")]
    errors = [x.replace(str(tmp_path) + "/", "") for x in lines if not x.startswith("warning: ")]
    assert errors == [
        "bad.yaml#1: spec.http[0].route[0].destination.host: is required",
        "bad.yaml#1: spec.http[0].route[0].weight: must be >= 0",
        "bad.yaml#1: spec.http[0].timeout: invalid duration '5 parsecs'; use a duration like '5s', '100ms' or '1m30s'",
        "bad.yaml#2: spec.resolution: must be one of NONE, STATIC, DNS, DNS_ROUND_ROBIN, got 'SOMETIMES'",
        "bad.yaml#2: spec.ports[0].number: must be an integer, got string 'abc'",
        ("bad2.yaml#0: spec.trafficPolicy.outlierDetection.interval: invalid duration '1 fortnight'; "
         "use a duration like '5s', '100ms' or '1m30s'"),
    ]
    for line in errors:
        assert re.fullmatch(r"[\w.]+#\d+: spec(\.\w+(\[\d+\])?)+: .+", line), line
    assert [w.replace(str(tmp_path) + "/", "") for w in warnings] == [
        ("warning: bad.yaml#2: spec.exportTo: parsed, but namespace visibility is not implemented by pyproxy: "
         "it has no effect")]


def test_validate_ok_and_missing_file(tmp_path: Path) -> None:
    (tmp_path / "good.yaml").write_text(GOOD)
    res = validate(tmp_path)
    assert (res.returncode, res.stdout, res.stderr) == (0, "1 files, 1 resources: OK\n", "")
    res = validate(tmp_path / "missing.yaml")
    assert res.returncode == 1
    assert res.stderr.strip() == f"{tmp_path / 'missing.yaml'}: no such file or directory"


@skip_unless_present(REFERENCE)
def test_validate_accepts_every_istio_reference_sample() -> None:
    files = sorted(p for p in REFERENCE.rglob("*") if p.is_file() and p.suffix in (".yaml", ".yml"))
    assert len(files) >= 20, files
    res = validate(*files)
    assert res.returncode == 0, res.stderr
    assert res.stdout == f"{len(files)} files, {res.stdout.split()[2]} resources: OK\n"
    assert not [x for x in res.stderr.splitlines() if not x.startswith("warning: ")], res.stderr
    # Directories are read the same way (every *.yaml / *.yml in name order).
    res = validate(*sorted({p.parent for p in files}))
    assert res.returncode == 0, res.stderr
    assert res.stdout.endswith("resources: OK\n")
