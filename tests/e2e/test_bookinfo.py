"""Istio's Bookinfo tasks on the local mesh (``pyproxy demo bookinfo``), end to end.

One demo per module: 6 stand-in apps, 6 sidecars and the ingress gateway, as
real processes on their own loopback addresses (a random 127.x.y.0/24 so test
runs do not collide with each other or with a running demo). Every request
goes through the ingress as a browser's would, with cookies for sign-in.
Scenarios are switched the way the README says: a file copied over
``routing.yaml`` in the mesh config directory; the tests then wait until
every proxy reports the new config version.

The tests run in file order and each applies the scenario it needs.
"""

from __future__ import annotations

import asyncio
import collections
import csv
import importlib.util
import json
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pyproxy.demo.launcher import _die_with_parent as die_with_parent
from tests.harness import ROOT, http_get
from tests.reference import reference, skip_unless_present

pytestmark = pytest.mark.slow

SCENARIOS = ROOT / "config" / "bookinfo"
REVIEWS_UNAVAILABLE = "Sorry, product reviews are currently unavailable for this book."
RATINGS_UNAVAILABLE = "Ratings service is currently unavailable"
POD_HOSTS = {"ingress": 10, "productpage-v1": 11, "details-v1": 12, "reviews-v1": 13, "reviews-v2": 14,
             "reviews-v3": 15, "ratings-v1": 16}
STARTUP_TIMEOUT = 120.0
RELOAD_TIMEOUT = 20.0


@dataclass
class Demo:
    process: subprocess.Popen
    prefix: str  # "127.x.y."
    config_dir: Path
    output: list[str] = field(default_factory=list)
    log_dir: Path | None = None
    reader: threading.Thread | None = None

    def ip(self, pod: str) -> str:
        return f"{self.prefix}{POD_HOSTS[pod]}"

    @property
    def url(self) -> str:
        return f"http://{self.ip('ingress')}:8080"

    def text(self) -> str:
        return "\n".join(self.output)

    def config_versions(self) -> dict[str, int]:
        out = {}
        for pod in POD_HOSTS:
            status, body = http_get(f"http://{self.ip(pod)}:15000/server_info", timeout=5)
            assert status == 200, (pod, status, body[:200])
            out[pod] = json.loads(body)["config_version"]
        return out

    def apply(self, scenario: str | None) -> None:
        """Copy a scenario over routing.yaml (None: remove it) and wait until
        every proxy has loaded it."""
        target = self.config_dir / "routing.yaml"
        if scenario is None and not target.exists():
            return
        before = self.config_versions()
        if scenario is None:
            target.unlink(missing_ok=True)
        else:
            tmp = self.config_dir / ".routing.yaml.tmp"  # dotfiles are never read
            shutil.copyfile(SCENARIOS / scenario, tmp)
            os.replace(tmp, target)
        deadline = time.monotonic() + RELOAD_TIMEOUT
        while True:
            now = self.config_versions()
            if all(now[p] > before[p] for p in POD_HOSTS):
                return
            assert time.monotonic() < deadline, (
                f"{scenario}: not every proxy reloaded within {RELOAD_TIMEOUT}s: before {before}, now {now}\n"
                + self.text()[-2000:]
            )
            time.sleep(0.2)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        if self.reader is not None:
            self.reader.join(10)
        if self.process.stdout is not None:
            self.process.stdout.close()
        return self.process.returncode


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes containing ``text`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{entry.name}: {cmdline}")
    return found


def _start_demo(config_dir: Path) -> Demo:
    for _ in range(3):
        prefix = f"127.{random.randint(100, 250)}.{random.randint(1, 250)}."
        proc = subprocess.Popen(
            [sys.executable, "-m", "pyproxy", "demo", "bookinfo", "--config-dir", str(config_dir),
             "--pod-subnet", f"{prefix}0/24", "--ingress", f"{prefix}10:8080"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=str(ROOT),
            env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"},
            # Its own session (the test signals only the launcher), and gone if this test process dies.
            start_new_session=True, preexec_fn=die_with_parent,  # noqa: PLW1509 - prctl only
        )
        demo = Demo(proc, prefix, config_dir)
        ready = threading.Event()

        def pump(demo: Demo = demo, ready: threading.Event = ready) -> None:
            assert demo.process.stdout is not None
            for line in demo.process.stdout:
                line = line.rstrip("\n")
                demo.output.append(line)
                if line.startswith("Logs: "):
                    demo.log_dir = Path(line[len("Logs: "):].strip())
                if "Ctrl-C stops everything." in line:
                    ready.set()
            ready.set()

        demo.reader = threading.Thread(target=pump, daemon=True)
        demo.reader.start()
        ready.wait(STARTUP_TIMEOUT)
        if proc.poll() is None and "Ctrl-C stops everything." in demo.text():
            return demo
        demo.stop()
        if "already in use" not in demo.text():
            pytest.fail(f"the demo did not start:\n{demo.text()}")
    pytest.fail("no free pod subnet after 3 tries")


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    d = _start_demo(tmp_path_factory.mktemp("mesh"))
    try:
        yield d
    finally:
        d.stop()


# --------------------------------------------------------------------------- a browser


def classify(html: str) -> str:
    """What the reviews part of a product page shows: none | black | red | ratings-error | reviews-error."""
    if REVIEWS_UNAVAILABLE in html:
        return "reviews-error"
    if RATINGS_UNAVAILABLE in html:
        return "ratings-error"
    colors = set(re.findall(r'<font color="([a-z]+)">', html))
    stars = html.count('class="glyphicon glyphicon-star"')
    if not colors and stars == 0:
        return "none"
    assert len(colors) == 1 and stars > 0, (colors, stars)
    return colors.pop()


class Browser:
    def __init__(self, base: str) -> None:
        self.base = base
        # unsafe=True: keep cookies for an IP-address host.
        self.session = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.session.close()

    async def page(self, headers: dict[str, str] | None = None) -> tuple[int, str, float]:
        start = time.monotonic()
        async with self.session.get(self.base + "/productpage", headers=headers) as r:
            body = await r.text()
            return r.status, body, time.monotonic() - start

    async def kinds(self, n: int) -> list[str]:
        out = []
        for _ in range(n):
            status, body, _ = await self.page()
            assert status == 200, body[:300]
            out.append(classify(body))
        return out

    async def login(self, user: str) -> None:
        async with self.session.post(self.base + "/login", data={"username": user, "passwd": ""}) as r:
            assert r.status == 200  # redirected back to /productpage
            assert f"{user}" in await r.text()

    async def logout(self) -> None:
        async with self.session.get(self.base + "/logout") as r:
            assert r.status == 200


async def page_kinds(base: str, total: int, concurrency: int) -> collections.Counter[str]:
    """``total`` anonymous page loads from ``concurrency`` browsers at once."""
    counts: collections.Counter[str] = collections.Counter()

    async def one_browser(n: int) -> None:
        async with Browser(base) as b:
            counts.update(await b.kinds(n))

    share = [total // concurrency + (1 if i < total % concurrency else 0) for i in range(concurrency)]
    await asyncio.gather(*(one_browser(n) for n in share))
    return counts


# --------------------------------------------------------------------------- request routing


async def test_without_rules_reviews_spreads_over_v1_v2_v3(demo: Demo) -> None:
    demo.apply(None)
    counts = await page_kinds(demo.url, 30, 1)
    # Istio's default balancing over the three reviews pods; a version missing
    # from 30 loads has probability ~3 * (2/3)^30 = 2e-5.
    assert set(counts) == {"none", "black", "red"}, counts


async def test_all_v1_never_shows_stars(demo: Demo) -> None:
    demo.apply("virtual-service-all-v1.yaml")
    async with Browser(demo.url) as anonymous, Browser(demo.url) as jason:
        assert set(await anonymous.kinds(20)) == {"none"}
        await jason.login("jason")
        assert set(await jason.kinds(10)) == {"none"}


async def test_jason_gets_reviews_v2_everyone_else_v1(demo: Demo) -> None:
    demo.apply("virtual-service-reviews-jason-v2.yaml")
    async with Browser(demo.url) as jason, Browser(demo.url) as anonymous, Browser(demo.url) as alice:
        await jason.login("jason")
        await alice.login("alice")
        assert set(await jason.kinds(10)) == {"black"}
        assert set(await anonymous.kinds(10)) == {"none"}
        assert set(await alice.kinds(5)) == {"none"}
        await jason.logout()
        assert set(await jason.kinds(5)) == {"none"}


# --------------------------------------------------------------------------- traffic shifting


async def test_50_50_between_v1_and_v3_then_all_v3(demo: Demo) -> None:
    demo.apply("virtual-service-reviews-50-v3.yaml")
    total = 300  # 50% +- 10% of 300 is +-3.5 standard deviations: a false failure is ~1 in 2000
    counts = await page_kinds(demo.url, total, 6)
    assert set(counts) <= {"none", "red"}, counts
    assert 0.40 * total <= counts["red"] <= 0.60 * total, counts

    demo.apply("virtual-service-reviews-v3.yaml")
    counts = await page_kinds(demo.url, 20, 2)
    assert counts == {"red": 20}, counts


async def test_90_10_between_v1_and_v2(demo: Demo) -> None:
    demo.apply("virtual-service-reviews-90-10.yaml")
    total = 300  # 10% +- 6%: +-3.5 standard deviations
    counts = await page_kinds(demo.url, total, 6)
    assert set(counts) <= {"none", "black"}, counts
    assert 0.04 * total <= counts["black"] <= 0.16 * total, counts


# --------------------------------------------------------------------------- fault injection


async def test_ratings_delay_for_jason_times_out_productpage_after_about_6s(demo: Demo) -> None:
    async with Browser(demo.url) as jason, Browser(demo.url) as anonymous:
        await jason.login("jason")  # before the fault: the login redirect loads the page too
        demo.apply("fault-ratings-delay-jason.yaml")
        status, body, seconds = await jason.page()
        # reviews v2 waits up to 10s for the 7s-delayed ratings; productpage
        # gives up on reviews after 3s and tries once more: about 6s in all.
        assert status == 200
        assert classify(body) == "reviews-error", body[-1500:]
        assert 5.5 <= seconds <= 9.0, seconds
        status, body, seconds = await anonymous.page()
        assert (status, classify(body)) == (200, "none")
        assert seconds < 3.0, seconds


async def test_ratings_abort_for_jason_shows_ratings_unavailable_at_once(demo: Demo) -> None:
    demo.apply("fault-ratings-abort-jason.yaml")
    async with Browser(demo.url) as jason, Browser(demo.url) as anonymous:
        await jason.login("jason")
        status, body, seconds = await jason.page()
        assert status == 200
        assert classify(body) == "ratings-error", body[-1500:]
        assert "Reviewer1" in body and 'class="glyphicon glyphicon-star"' not in body
        assert seconds < 3.0, seconds
        assert set(await anonymous.kinds(5)) == {"none"}


# --------------------------------------------------------------------------- circuit breaking


async def test_circuit_breaker_rejects_the_third_concurrent_client_with_overflow(demo: Demo) -> None:
    demo.apply("circuit-breaking.yaml")
    results: list[tuple[int, str | None, str]] = []

    async def client(n: int) -> None:
        async with aiohttp.ClientSession() as s:
            for _ in range(n):
                async with s.get(demo.url + "/productpage") as r:
                    body = await r.text()
                    results.append((r.status, r.headers.get("x-envoy-overloaded"), body[:120]))

    await asyncio.gather(*(client(20) for _ in range(3)))
    statuses = collections.Counter(status for status, _, _ in results)
    assert set(statuses) == {200, 503}, statuses
    overflow = [r for r in results if r[0] == 503]
    assert all(flag == "true" for _, flag, _ in overflow), overflow[:3]
    assert all("overflow" in body for _, _, body in overflow), overflow[:3]


# --------------------------------------------------------------------------- telemetry


def reviews_requests_by_version(demo: Demo) -> collections.Counter[str]:
    """istio_requests_total from productpage's sidecar (reporter=source) for
    calls to reviews, summed by destination_version."""
    status, body = http_get(f"http://{demo.ip('productpage-v1')}:15090/stats/prometheus", timeout=5)
    assert status == 200, f"productpage sidecar /stats/prometheus answered {status}: {body[:200]!r}"
    out: collections.Counter[str] = collections.Counter()
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            labels = sample.labels
            if sample.name != "istio_requests_total" or labels.get("reporter") != "source":
                continue
            if "reviews" not in (labels.get("destination_service_name"), labels.get("destination_app")):
                continue
            out[labels.get("destination_version", "")] += int(sample.value)
    return out


async def test_sidecar_metrics_count_reviews_traffic_by_destination_version(demo: Demo) -> None:
    demo.apply("virtual-service-reviews-50-v3.yaml")
    before = reviews_requests_by_version(demo)
    counts = await page_kinds(demo.url, 40, 2)
    after = reviews_requests_by_version(demo)
    delta = {v: after[v] - before[v] for v in after if after[v] != before[v]}
    # Each page load is one reviews call: v1 pages show no stars, v3 red ones.
    expected = {v: n for v, n in (("v1", counts["none"]), ("v3", counts["red"])) if n}
    assert delta == expected, (delta, counts)


async def test_trace_id_sent_to_productpage_reaches_ratings(demo: Demo) -> None:
    demo.apply("virtual-service-reviews-v3.yaml")  # v3 calls ratings
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    request_id = f"e2e-{secrets.token_hex(8)}"
    headers = {"traceparent": f"00-{trace_id}-{span_id}-01", "x-request-id": request_id}
    async with Browser(demo.url) as b:
        status, body, _ = await b.page(headers=headers)
    assert (status, classify(body)) == (200, "red")
    assert demo.log_dir is not None, demo.text()
    ratings_log = demo.log_dir / "ratings-v1.app.log"
    deadline = time.monotonic() + 5
    line = ""
    while time.monotonic() < deadline and not line:
        line = next((ln for ln in ratings_log.read_text().splitlines() if request_id in ln), "")
        await asyncio.sleep(0.1)
    assert line, f"no request with x-request-id {request_id} reached ratings"
    match = re.search(r"traceparent=00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})", line)
    assert match, line
    # Same trace, but a newer parent span: the sidecars on the way took part
    # (the apps only copy the header; without tracing the span id would be ours).
    assert match.group(1) == trace_id, line
    assert match.group(2) != span_id, line
    # The ratings sidecar logged the request (Envoy's format carries x-request-id).
    access_log = demo.log_dir / "ratings-v1.access.log"
    deadline = time.monotonic() + 5  # the access log is flushed every 250 ms
    while time.monotonic() < deadline and request_id not in access_log.read_text():
        await asyncio.sleep(0.1)
    assert request_id in access_log.read_text()


# --------------------------------------------------------------------------- bad input, shutdown


ISTIO_MTLS_DR = reference("istio/bookinfo/destination-rule-all-mtls.yaml")
PP_PRINCIPAL = "spiffe://cluster.local/ns/default/sa/bookinfo-productpage"


async def add_config(demo: Demo, name: str, source: Path | None) -> None:
    """Add (or, with None, remove) a file in the mesh config directory next to
    routing.yaml and wait until every proxy has reloaded."""
    before = demo.config_versions()
    target = demo.config_dir / name
    if source is None:
        target.unlink()
    else:
        tmp = demo.config_dir / f".{name}.tmp"
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    deadline = time.monotonic() + RELOAD_TIMEOUT
    while not all(v > before[p] for p, v in demo.config_versions().items()):
        assert time.monotonic() < deadline, demo.text()[-2000:]
        await asyncio.sleep(0.2)


def mtls_requests_at(demo: Demo, pod: str) -> dict[tuple[str, str], int]:
    """istio_requests_total at a pod's sidecar (reporter=destination) by
    (source_principal, connection_security_policy)."""
    status, body = http_get(f"http://{demo.ip(pod)}:15090/stats/prometheus", timeout=5)
    assert status == 200
    out: dict[tuple[str, str], int] = collections.Counter()
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == "istio_requests_total" and sample.labels.get("reporter") == "destination":
                key = (sample.labels["source_principal"], sample.labels["connection_security_policy"])
                out[key] += int(sample.value)
    return out


async def _plaintext_to(ip: str) -> bytes:
    reader, writer = await asyncio.open_connection(ip, 15006)
    try:
        writer.write(b"GET /health HTTP/1.1\r\nHost: reviews\r\nConnection: close\r\n\r\n")
        return await asyncio.wait_for(reader.read(), 10)
    except ConnectionError:
        return b""
    finally:
        writer.close()


async def test_sidecars_use_mtls_and_istio_mtls_destination_rules_and_strict_work(demo: Demo) -> None:
    """Istio's Mutual TLS tasks on the demo: auto mTLS between the sidecars,
    destination-rule-all-mtls (the project's copy of Istio's sample), then a
    mesh-wide STRICT PeerAuthentication: pages keep working, plaintext to a
    sidecar's inbound port is refused."""
    demo.apply("virtual-service-all-v1.yaml")
    before = mtls_requests_at(demo, "reviews-v1")
    assert await page_kinds(demo.url, 3, 1) == {"none": 3}
    after = mtls_requests_at(demo, "reviews-v1")
    assert after[(PP_PRINCIPAL, "mutual_tls")] - before[(PP_PRINCIPAL, "mutual_tls")] == 3, after
    await add_config(demo, "destination-rule-all-mtls.yaml", SCENARIOS / "destination-rule-all-mtls.yaml")
    await add_config(demo, "peer-authentication-strict.yaml", SCENARIOS / "peer-authentication-strict.yaml")
    try:
        assert await page_kinds(demo.url, 3, 1) == {"none": 3}
        # No sidecar, no certificate: refused (reset) by reviews-v1's STRICT inbound.
        assert await _plaintext_to(demo.ip("reviews-v1")) == b""
    finally:
        await add_config(demo, "peer-authentication-strict.yaml", None)
        await add_config(demo, "destination-rule-all-mtls.yaml", None)
    # PERMISSIVE again: plaintext is served.
    assert (await _plaintext_to(demo.ip("reviews-v1"))).startswith(b"HTTP/1.1 200")


@skip_unless_present(ISTIO_MTLS_DR)
async def test_istio_destination_rule_all_mtls_works_unchanged(demo: Demo) -> None:
    demo.apply("virtual-service-all-v1.yaml")
    await add_config(demo, "destination-rule-all-mtls.yaml", ISTIO_MTLS_DR)
    try:
        assert await page_kinds(demo.url, 3, 1) == {"none": 3}
    finally:
        await add_config(demo, "destination-rule-all-mtls.yaml", None)


async def test_invalid_scenario_file_is_rejected_and_routing_is_kept(demo: Demo) -> None:
    demo.apply("virtual-service-reviews-v3.yaml")
    before = demo.config_versions()
    lines_before = len(demo.output)
    (demo.config_dir / "broken.yaml").write_text(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: broken}\n"
        "spec: {hosts: [reviews], http: [{route: [{destination: {host: reviews}, weight: -1}]}]}\n"
    )
    try:
        deadline = time.monotonic() + RELOAD_TIMEOUT
        while not any("rejected" in ln for ln in demo.output[lines_before:]):
            assert time.monotonic() < deadline, demo.text()[-2000:]
            await asyncio.sleep(0.2)
        report = "\n".join(demo.output[lines_before:])
        assert "broken.yaml added: rejected" in report and "weight" in report, report
        assert demo.config_versions() == before
        assert await page_kinds(demo.url, 5, 1) == {"red": 5}
    finally:
        (demo.config_dir / "broken.yaml").unlink()


def test_locustfile_drives_the_demo_and_sees_the_traffic_split(demo: Demo, tmp_path: Path) -> None:
    # Not imported here: importing locust monkey-patches the whole process (gevent).
    if importlib.util.find_spec("locust") is None:
        pytest.skip("locust comes with the load extra: pip install -e '.[load]'")
    demo.apply("virtual-service-reviews-v3.yaml")
    res = subprocess.run(
        [sys.executable, "-m", "locust", "-f", str(ROOT / "load-tests" / "locustfile_bookinfo.py"),
         "--host", demo.url, "--headless", "-u", "4", "-r", "4", "-t", "6s", "--only-summary",
         "--csv", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=90, cwd=str(tmp_path), check=False,
        env={**os.environ, "BOOKINFO_WAIT": "0.05-0.2"},
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    with open(tmp_path / "run_stats.csv") as f:
        rows = {(r["Type"], r["Name"]): r for r in csv.DictReader(f)}
    assert int(rows[("", "Aggregated")]["Failure Count"]) == 0, rows
    assert int(rows[("GET", "/productpage")]["Request Count"]) > 10
    # Every page showed reviews v3 (red stars), as the scenario routes.
    reviews = {name: int(r["Request Count"]) for (kind, name), r in rows.items() if kind == "REVIEWS"}
    assert set(reviews) == {"red stars (v3)"} and reviews["red stars (v3)"] > 10, reviews


def test_canary_release_of_reviews_v3_is_promoted_under_load(demo: Demo, tmp_path: Path) -> None:
    """docs/canary.md's walk-through, faster: Flagger's Canary for reviews v3 run by
    `pyproxy canary run --scrape` against v3's sidecar while the product page is loaded."""
    from pyproxy.canary.load import generate

    demo.apply("virtual-service-all-v1.yaml")
    canary = (ROOT / "config" / "bookinfo" / "canary" / "reviews.yaml").read_text()
    canary = canary.replace("interval: 10s", "interval: 2s").replace("interval: 30s", "interval: 6s")
    (tmp_path / "reviews.yaml").write_text(canary)
    cmd = [sys.executable, "-m", "pyproxy", "canary", "run", "--config", str(demo.config_dir), "--canary",
           str(tmp_path / "reviews.yaml"), "--scrape", f"{demo.ip('reviews-v3')}:15090", "--min-interval", "1"]

    async def drive() -> tuple[subprocess.CompletedProcess, list]:
        stop = asyncio.Event()
        load = asyncio.create_task(generate(demo.url + "/productpage", 20.0, 120.0, stop=stop))
        try:
            await asyncio.sleep(1.0)
            res = await asyncio.to_thread(subprocess.run, cmd, capture_output=True, text=True, timeout=120,
                                          check=False, cwd=str(ROOT), env={**os.environ, "PYTHONPATH": str(ROOT)})
            await asyncio.sleep(2.0)
        finally:
            stop.set()
        return res, await load

    try:
        res, responses = asyncio.run(drive())
        assert res.returncode == 0, res.stdout + res.stderr[-3000:]
        assert "default.reviews: Succeeded, v3 promoted" in res.stdout
        state = json.loads((demo.config_dir / ".canary-default.reviews.json").read_text())
        advances = [e["weight"] for e in state["history"] if e["message"].startswith("Advance")]
        assert advances == [10, 20, 30, 40, 50] and state["weight"] == 100, state["history"]
        assert all(r.status == 200 for r in responses), [r for r in responses if r.status != 200][:3]
        assert responses[-1].version == "v3"  # red stars once promoted
        assert {r.version for r in responses} <= {"v1", "v3"}
    finally:
        before = demo.config_versions()
        for leftover in (demo.config_dir / "zz-canary-reviews.yaml", *demo.config_dir.glob(".canary-*")):
            leftover.unlink(missing_ok=True)
        deadline = time.monotonic() + RELOAD_TIMEOUT
        while not all(v > before[p] for p, v in demo.config_versions().items()):
            assert time.monotonic() < deadline, "the proxies did not drop the canary's VirtualService"
            time.sleep(0.2)


def test_stopping_the_demo_stops_every_process_it_started(demo: Demo) -> None:
    assert processes_mentioning(demo.prefix), "the demo's processes should be running"
    assert demo.stop() == 0, demo.text()[-2000:]
    assert demo.output[-1] == "stopped", demo.text()[-2000:]
    deadline = time.monotonic() + 5
    while (left := processes_mentioning(demo.prefix)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert left == []
