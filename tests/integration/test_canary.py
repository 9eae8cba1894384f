"""``pyproxy canary run`` end to end on a small local mesh of real processes.

The mesh: reviews v1 and reviews v3 (the Bookinfo stand-in app, each behind
its own pyproxy sidecar) and a client sidecar whose outbound listener the
built-in load generator sends ``GET http://reviews:9080/reviews/0`` through.
All share one config directory (ServiceEntry, DestinationRule, and a
VirtualService sending everything to v1), which the controller then takes
over. A good v3 is promoted (10 → 50, then all traffic), a bad one (30 % of
its answers are 500) is rolled back after ``threshold`` failed checks, once
with the controller scraping the sidecars itself and once with a real
Prometheus server scraping them.

What is checked besides the outcome: the share of responses served by v3
between two steps matches the step's weight (generous tolerance; the first
second after a step is left out: the sidecars reload within it); after the
promotion only v3 answers, after the rollback only v1; no request failed
except the bad release's own injected 500s; the controller's metrics port
shows the weight while it runs.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pyproxy.canary.load import Response, generate
from tests.harness import ROOT, Proxy, free_port, http_get, service_entry, start_proxy

pytestmark = pytest.mark.slow

INTERVAL = 2  # seconds between analyses: short, so a run takes ~20 s
RATE = 50.0  # requests per second from the load generator
RELOAD_GRACE = 1.2  # seconds after a step before its traffic is counted (watch 0.2 s + debounce + reload)

ROUTING = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v3, labels: {version: v3}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - route: [{destination: {host: reviews, subset: v1}}]
"""

CANARY = """\
apiVersion: flagger.app/v1beta1
kind: Canary
metadata:
  name: reviews
  annotations: {pyproxy.io/primary-subset: v1, pyproxy.io/canary-subset: v3}
spec:
  targetRef: {kind: Deployment, name: reviews}
  service: {port: 9080}
  analysis:
    interval: %ds
    threshold: 3
    maxWeight: 50
    stepWeight: 10
    metrics:
    - {name: request-success-rate, thresholdRange: {min: 99}, interval: 4s}
    - {name: request-duration, thresholdRange: {max: 1000}, interval: 4s}
""" % INTERVAL


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@dataclass
class App:
    port: int
    process: subprocess.Popen | None = None

    def start(self, version: str, *extra: str) -> None:
        env = _env()
        # reviews v3 asks ratings for stars: a closed port answers at once (the page shows "unavailable").
        env.update(RATINGS_HOSTNAME="127.0.0.1", RATINGS_SERVICE_PORT=str(free_port()))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pyproxy.demo.apps", "reviews", "--listen", f"127.0.0.1:{self.port}",
             "--version", version, "--quiet", *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=str(ROOT))
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError):
                if http_get(f"http://127.0.0.1:{self.port}/health", timeout=1)[0] == 200:
                    return
            assert self.process.poll() is None, "the reviews app exited"
            assert time.monotonic() < deadline, "the reviews app did not come up"
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


@dataclass
class LocalMesh:
    config_dir: Path
    client: Proxy
    v1: Proxy
    v3: Proxy
    v1_app: App
    v3_app: App

    def reset(self) -> None:
        """Back to "everything to v1", no controller state."""
        for p in self.config_dir.glob("zz-canary-*.yaml"):
            p.unlink()
        for p in self.config_dir.glob(".canary-*"):
            p.unlink()


@pytest.fixture(scope="module")
def mesh() -> Iterator[LocalMesh]:
    config_dir = Path(tempfile.mkdtemp(prefix="pyproxy-canary-"))
    inbound = {v: free_port() for v in ("v1", "v3")}
    (config_dir / "services.yaml").write_text(service_entry("reviews", [
        (inbound["v1"], {"app": "reviews", "version": "v1"}),
        (inbound["v3"], {"app": "reviews", "version": "v3"})]))
    (config_dir / "routing.yaml").write_text(ROUTING)
    started: list[Proxy] = []
    apps = {v: App(free_port()) for v in ("v1", "v3")}
    try:
        apps["v1"].start("v1")
        for v in ("v1", "v3"):
            started.append(start_proxy(
                config_dir=config_dir, app_port=apps[v].port,
                args=["--inbound", f"127.0.0.1:{inbound[v]}", "--labels", f"app=reviews,version={v}",
                      "--workload", f"reviews-{v}", "--watch-interval", "0.2"]))
        started.append(start_proxy(config_dir=config_dir, args=[
            "--labels", "app=productpage,version=v1", "--workload", "productpage-v1", "--watch-interval", "0.2"]))
        yield LocalMesh(config_dir, started[2], started[0], started[1], apps["v1"], apps["v3"])
    finally:
        for proxy in started:
            proxy.stop()
        for app in apps.values():
            app.stop()
        shutil.rmtree(config_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def prometheus(mesh: LocalMesh, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = shutil.which("prometheus")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("prometheus is not installed; .ci/run installs Debian's prometheus package")
        pytest.skip("the prometheus binary is not installed (Debian: apt-get install prometheus; .ci/run does)")
    work = tmp_path_factory.mktemp("prometheus")
    (work / "prometheus.yml").write_text(textwrap.dedent(f"""\
        global: {{scrape_interval: 1s, evaluation_interval: 1s}}
        scrape_configs:
        - job_name: sidecars
          metrics_path: /stats/prometheus
          static_configs:
          - targets: ['127.0.0.1:{mesh.v1.stats}', '127.0.0.1:{mesh.v3.stats}']
        """))
    for _ in range(3):
        port = free_port()
        log = open(work / "prometheus.log", "wb")  # noqa: SIM115 - the child keeps it
        proc = subprocess.Popen([binary, f"--config.file={work / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={work / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
                                 "--log.level=warn"], stdout=log, stderr=subprocess.STDOUT, cwd=str(work))
        log.close()
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if http_get(url + "/-/ready", timeout=1)[0] == 200:
                    break
            time.sleep(0.2)
        if proc.poll() is None and http_get(url + "/-/ready", timeout=1)[0] == 200:
            try:
                yield url
            finally:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
            return
        proc.kill()
        proc.wait(5)
    pytest.fail("prometheus did not start:\n" + (work / "prometheus.log").read_text()[-2000:])


@dataclass
class Run:
    code: int
    output: str
    state: dict
    responses: list[Response]
    exported: dict[str, list[float]]  # every value seen while it ran, per series
    served: dict[tuple[str, str], int]  # (version, response code) -> requests the reviews sidecars served


def served(mesh: LocalMesh) -> collections.Counter[tuple[str, str]]:
    """istio_requests_total as the reviews sidecars report it (reporter=destination)."""
    out: collections.Counter[tuple[str, str]] = collections.Counter()
    for proxy in (mesh.v1, mesh.v3):
        status, body = http_get(proxy.stats_url + "/stats/prometheus")
        assert status == 200
        for family in text_string_to_metric_families(body.decode()):
            for sample in family.samples:
                if sample.name == "istio_requests_total" and sample.labels.get("reporter") == "destination":
                    out[(sample.labels["destination_version"], sample.labels["response_code"])] += int(sample.value)
    return out


def run_canary(mesh: LocalMesh, source: list[str], tmp_path: Path, canary: str = CANARY) -> Run:
    canary_file = tmp_path / "canary.yaml"
    canary_file.write_text(canary)
    metrics_port = free_port()
    responses: list[Response] = []
    exported: dict[str, list[float]] = {}
    before = served(mesh)

    async def drive() -> tuple[int, str]:
        stop = asyncio.Event()
        load = asyncio.create_task(generate("http://reviews:9080/reviews/0", RATE, 120.0,
                                            proxy=mesh.client.outbound_url, concurrency=16,
                                            on_response=responses.append, stop=stop))
        await asyncio.sleep(1.0)  # traffic flows before the controller starts
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "pyproxy", "canary", "run", "--config", str(mesh.config_dir),
            "--canary", str(canary_file), *source, "--min-interval", "1", "--metrics", f"127.0.0.1:{metrics_port}",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=_env(), cwd=str(ROOT))
        try:
            deadline = time.monotonic() + 90
            while proc.returncode is None and time.monotonic() < deadline:
                with contextlib.suppress(OSError, ValueError):
                    text = await asyncio.to_thread(_get_text, f"http://127.0.0.1:{metrics_port}/metrics")
                    for family in text_string_to_metric_families(text):
                        for sample in family.samples:
                            if sample.name.startswith("pyproxy_canary_"):
                                key = sample.name + json.dumps(sample.labels, sort_keys=True)
                                exported.setdefault(key, []).append(sample.value)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(proc.wait(), 0.5)
            if proc.returncode is None:
                proc.kill()
            assert proc.stdout is not None
            out = (await proc.stdout.read()).decode(errors="replace")
            await proc.wait()
            await asyncio.sleep(2.0)  # traffic after the last step
            return proc.returncode or 0, out
        finally:
            stop.set()
            await load

    code, output = asyncio.run(drive())
    state = json.loads((mesh.config_dir / ".canary-default.reviews.json").read_text())
    after = served(mesh)
    delta = {k: after[k] - before[k] for k in after if after[k] != before[k]}
    return Run(code, output, state, responses, exported, delta)


def _get_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=2) as resp:
        return resp.read().decode()


def weight_steps(state: dict) -> list[tuple[float, int]]:
    """(time, canary weight) of every route change, from the controller's history."""
    steps = []
    for event in state["history"]:
        msg = event["message"]
        if msg.startswith(("Initialization done", "Advance", "Routing all traffic", "Canary failed")):
            steps.append((event["t"], event["weight"]))
    return steps


def check_shares(run: Run) -> list[tuple[int, int, float]]:
    """Per step: (weight, responses counted, share served by v3), within tolerance."""
    steps = weight_steps(run.state)
    seen = []
    ok = [r for r in run.responses if r.status == 200]
    for (start, weight), (end, _) in zip(steps, [*steps[1:], (float("inf"), 0)], strict=True):
        window = [r for r in ok if start + RELOAD_GRACE <= r.t < end]
        if weight in (0, 100):
            assert {r.version for r in window} <= {"v1" if weight == 0 else "v3"}, (weight, len(window))
        if len(window) >= 20:
            share = sum(r.version == "v3" for r in window) / len(window)
            seen.append((weight, len(window), round(share, 3)))
            assert abs(share - weight / 100) <= 0.25, (weight, len(window), share, steps)
    return seen


def test_good_release_is_promoted_with_the_embedded_scraper(mesh: LocalMesh, tmp_path: Path) -> None:
    mesh.reset()
    mesh.v3_app.start("v3")
    try:
        run = run_canary(mesh, ["--scrape", f"127.0.0.1:{mesh.v3.stats},127.0.0.1:{mesh.v1.stats}"], tmp_path)
    finally:
        mesh.v3_app.stop()
    assert run.code == 0, run.output[-3000:]
    assert run.state["phase"] == "Succeeded" and run.state["failed_checks"] == 0, run.output[-3000:]
    assert [w for _, w in weight_steps(run.state)] == [0, 10, 20, 30, 40, 50, 100]
    assert all(r.status == 200 for r in run.responses), {(r.status, r.note) for r in run.responses if r.status != 200}
    shares = check_shares(run)
    assert len(shares) >= 4, shares  # most steps had enough traffic to be compared
    # What the sidecars served is what the client got, version by version.
    got = collections.Counter((r.version, str(r.status)) for r in run.responses)
    assert run.served == dict(got), (run.served, got)
    assert run.responses[-1].version == "v3"
    assert max(run.exported['pyproxy_canary_checks_total{"name": "reviews", "namespace": "default", '
                            '"result": "pass"}']) >= 3, run.exported
    weights = set(run.exported['pyproxy_canary_weight{"name": "reviews", "namespace": "default"}'])
    assert weights & {10, 20, 30, 40, 50}, weights


def test_bad_release_is_rolled_back_with_the_embedded_scraper(mesh: LocalMesh, tmp_path: Path) -> None:
    mesh.reset()
    mesh.v3_app.start("v3", "--fail-percent", "30")
    try:
        run = run_canary(mesh, ["--scrape", f"127.0.0.1:{mesh.v3.stats}"], tmp_path)
    finally:
        mesh.v3_app.stop()
    assert run.code == 1, run.output[-3000:]
    assert run.state["phase"] == "Failed" and run.state["failed_checks"] == 3, run.output[-3000:]
    assert run.state["weight"] == 0
    # Rolled back early: 30 % errors cannot pass a 99 % success-rate check for long.
    weights = [w for _, w in weight_steps(run.state)]
    assert weights[:2] == [0, 10] and weights[-1] == 0 and max(weights) <= 30, weights
    failed = [e for e in run.state["history"] if any(k["result"] != "pass" for k in e.get("checks", ()))]
    assert len(failed) == 3 and all("success rate" in e["message"] for e in failed), failed
    # Only the bad release's own answers failed: no request was lost to a step.
    bad = [r for r in run.responses if r.status != 200]
    assert bad and all(r.status == 500 and "injected failure" in r.note for r in bad), bad[:5]
    # Every 500 was served by v3's sidecar; the 200s by the version the body names.
    got = collections.Counter((r.version or "v3", str(r.status)) for r in run.responses)
    assert run.served == dict(got), (run.served, got)
    check_shares(run)
    assert run.responses[-1].version == "v1"
    assert max(run.exported['pyproxy_canary_checks_total{"name": "reviews", "namespace": "default", '
                            '"result": "fail"}']) >= 1, run.exported


class Hooks:
    """A webhook receiver: records every POST (path, JSON body) and answers 200."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []
        self.answers: dict[str, tuple[int, bytes, float]] = {}  # path -> (status, body, delay)
        hooks = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                hooks.calls.append((self.path, json.loads(body)))
                status, text, delay = hooks.answers.get(self.path, (200, b"", 0.0))
                time.sleep(delay)
                with contextlib.suppress(OSError):  # a client that timed out has gone
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(text)))
                    self.end_headers()
                    self.wfile.write(text)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# Flagger's MetricTemplate (provider prometheus, its template variables): the
# canary's request rate must be above a floor, i.e. it really gets traffic.
TEMPLATE = """\
    - name: canary-request-rate
      templateRef: {name: request-rate}
      templateVariables: {version: v3}
      thresholdRange: {min: 0.5}
      interval: 4s
    webhooks:
    - {name: load-check, type: rollout, url: '%(hooks)s/rollout', metadata: {cmd: check}}
    - {name: notify, type: post-rollout, url: '%(hooks)s/post'}
---
apiVersion: flagger.app/v1beta1
kind: MetricTemplate
metadata: {name: request-rate}
spec:
  provider: {type: prometheus}
  query: |
    sum(rate(istio_requests_total{reporter="destination",destination_workload_namespace="{{ namespace }}",
      destination_app="{{ target }}",destination_version="{{ variables.version }}"}[{{ interval }}]))
"""


def test_good_and_bad_release_with_a_real_prometheus(mesh: LocalMesh, prometheus: str, tmp_path: Path) -> None:
    hooks = Hooks()
    canary = CANARY + TEMPLATE % {"hooks": hooks.url}
    mesh.reset()
    mesh.v3_app.start("v3")
    try:
        good = run_canary(mesh, ["--prometheus", prometheus], tmp_path, canary)
    finally:
        mesh.v3_app.stop()
    assert good.code == 0 and good.state["phase"] == "Succeeded", good.output[-3000:]
    assert [w for _, w in weight_steps(good.state)] == [0, 10, 20, 30, 40, 50, 100]
    assert all(r.status == 200 for r in good.responses)
    check_shares(good)
    passed = [k for e in good.state["history"] for k in e.get("checks", [])]
    assert {k["name"] for k in passed} == {"request-success-rate", "request-duration", "canary-request-rate"}
    assert all(k["result"] == "pass" for k in passed), passed
    # The rollout hook ran before every analysis, with Flagger's payload; post-rollout once, at the end.
    rollout = [body for path, body in hooks.calls if path == "/rollout"]
    assert len(rollout) >= 5 and rollout[0] == {"name": "reviews", "namespace": "default", "phase": "Progressing",
                                                "checksum": rollout[0]["checksum"], "type": "rollout",
                                                "metadata": {"cmd": "check"}}, rollout[:1]
    assert [body["phase"] for path, body in hooks.calls if path == "/post"] == ["Succeeded"]
    hooks.calls.clear()

    mesh.reset()
    mesh.v3_app.start("v3", "--fail-percent", "30")
    try:
        bad = run_canary(mesh, ["--prometheus", prometheus], tmp_path, canary)
    finally:
        mesh.v3_app.stop()
        hooks.close()
    assert bad.code == 1 and bad.state["phase"] == "Failed", bad.output[-3000:]
    assert [w for _, w in weight_steps(bad.state)][-1] == 0
    assert any("success rate" in e["message"] for e in bad.state["history"]), bad.state["history"]
    assert all(r.status == 200 or (r.status == 500 and "injected failure" in r.note) for r in bad.responses)
    assert bad.responses[-1].version == "v1"
    assert [body["phase"] for path, body in hooks.calls if path == "/post"] == ["Failed"]


def test_a_stopped_controller_resumes_and_a_second_one_is_refused(mesh: LocalMesh, tmp_path: Path) -> None:
    mesh.reset()
    canary_file = tmp_path / "canary.yaml"
    canary_file.write_text(CANARY)
    state_file = mesh.config_dir / ".canary-default.reviews.json"
    cmd = [sys.executable, "-m", "pyproxy", "canary", "run", "--config", str(mesh.config_dir), "--canary",
           str(canary_file), "--scrape", f"127.0.0.1:{mesh.v3.stats}", "--min-interval", "1"]

    def controller() -> subprocess.Popen:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(),
                                cwd=str(ROOT))

    def weight() -> int:
        with contextlib.suppress(OSError, ValueError):
            return int(json.loads(state_file.read_text())["weight"])
        return -1

    responses: list[Response] = []

    async def drive() -> tuple[str, str, str, int]:
        stop = asyncio.Event()
        load = asyncio.create_task(generate("http://reviews:9080/reviews/0", RATE, 120.0,
                                            proxy=mesh.client.outbound_url, concurrency=16,
                                            on_response=responses.append, stop=stop))
        try:
            await asyncio.sleep(1.0)
            first = controller()
            deadline = time.monotonic() + 60
            while weight() < 20:
                assert first.poll() is None and time.monotonic() < deadline, first.communicate()[0]
                await asyncio.sleep(0.2)
            # The same canary, same directory: refused while the first one holds the lock.
            second = await asyncio.to_thread(subprocess.run, cmd, capture_output=True, text=True, env=_env(),
                                             cwd=str(ROOT), timeout=60, check=False)
            assert second.returncode == 1, second.stdout + second.stderr
            refused = second.stderr
            first.terminate()
            out1 = (await asyncio.to_thread(first.communicate, None, 30))[0]
            assert first.returncode == 0, out1
            stopped_at = weight()
            third = controller()
            out3 = (await asyncio.to_thread(third.communicate, None, 90))[0]
            await asyncio.sleep(2.0)
            return refused, out1, out3, stopped_at
        finally:
            stop.set()
            await load

    mesh.v3_app.start("v3")
    try:
        refused, out1, out3, stopped_at = asyncio.run(drive())
    finally:
        mesh.v3_app.stop()
    assert "another controller (pid " in refused and ".canary-default.reviews.lock" in refused, refused
    assert "stopped in phase Progressing" in out1, out1
    assert "default.reviews: Succeeded, v3 promoted" in out3, out3
    state = json.loads(state_file.read_text())
    messages = [e["message"] for e in state["history"]]
    assert f"resumed in phase Progressing (weight {stopped_at}, failed checks 0, iterations 0)" in messages
    # One analysis across both processes: the weight went on from where it stopped, never back.
    advances = [int(m.rsplit(" ", 1)[1]) for m in messages if m.startswith("Advance")]
    assert advances == [10, 20, 30, 40, 50], messages
    assert all(r.status == 200 for r in responses), {(r.status, r.note) for r in responses if r.status != 200}


def test_webhook_calls_over_http(tmp_path: Path) -> None:
    from pyproxy.canary.resource import Webhook, load_text
    from pyproxy.canary.webhooks import call_webhook

    canary = load_text(CANARY).canaries[0]
    hooks = Hooks()
    hooks.answers = {"/accepted": (202, b"", 0.0), "/no": (403, b"gate closed", 0.0), "/slow": (200, b"", 3.0),
                     "/moved": (302, b"", 0.0)}
    try:
        def call(path: str, timeout: float = 2.0) -> str | None:
            return call_webhook(canary, Webhook("h", "confirm-rollout", hooks.url + path, timeout, (("k", "v"),)),
                                "Progressing")

        assert call("/ok") is None and call("/accepted") is None
        assert call("/no") == f"{hooks.url}/no: HTTP 403: gate closed"
        assert call("/moved") == f"{hooks.url}/moved: HTTP 302"  # a gate must answer itself
        slow = call("/slow", timeout=0.5)
        assert slow is not None and "timed out" in slow
        assert hooks.calls[0] == ("/ok", {"name": "reviews", "namespace": "default", "phase": "Progressing",
                                          "checksum": canary.checksum, "type": "confirm-rollout",
                                          "metadata": {"k": "v"}})
    finally:
        hooks.close()
    port = free_port()  # nothing listens: refused
    refused = call_webhook(canary, Webhook("h", "rollout", f"http://127.0.0.1:{port}/", 1.0, ()), "Progressing")
    assert refused is not None and "refused" in refused.lower()
