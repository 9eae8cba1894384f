"""pyproxy.canary: Flagger resources, metric math, the state machine (injected
clock, scripted metric values, recorded webhooks and routes) and the owned
VirtualService."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from pyproxy.canary import controller as ctl
from pyproxy.canary.controller import Controller, LockedError, StateStore
from pyproxy.canary.mesh import Mesh, RouteRejected, Routes
from pyproxy.canary.metrics import (
    MetricError,
    NoData,
    PrometheusSource,
    ScrapeSource,
    Selector,
    builtin_query,
    histogram_quantile,
    render,
    selector_for,
    template_model,
)
from pyproxy.canary.resource import Canary, MetricCheck, Webhook, load_text
from pyproxy.canary.webhooks import payload
from pyproxy.config.loader import load_paths
from pyproxy.config.model import VirtualService

ROOT = Path(__file__).resolve().parents[2]


def canary_yaml(analysis: str, extra_meta: str = "", service: str = "{port: 9080}") -> str:
    return textwrap.dedent("""\
        apiVersion: flagger.app/v1beta1
        kind: Canary
        metadata:
          name: reviews
          annotations: {pyproxy.io/primary-subset: v1, pyproxy.io/canary-subset: v3%s}
        spec:
          targetRef: {kind: Deployment, name: reviews}
          service: %s
          analysis:
        """) % (extra_meta, service) + textwrap.indent(textwrap.dedent(analysis), "    ")


METRICS = """\
metrics:
- {name: request-success-rate, thresholdRange: {min: 99}, interval: 1m}
- {name: request-duration, thresholdRange: {max: 500}, interval: 30s}
"""


def load_one(text: str) -> Canary:
    cf = load_text(text, "canary.yaml")
    assert not cf.errors, [str(e) for e in cf.errors]
    assert len(cf.canaries) == 1
    return cf.canaries[0]


# --------------------------------------------------------------------------- resources


def test_issue_example_loads_with_flagger_defaults() -> None:
    c = load_one(canary_yaml("interval: 30s\nthreshold: 5\nmaxWeight: 50\nstepWeight: 10\n" + METRICS))
    a = c.analysis
    assert (c.name, c.namespace, c.host, c.primary_subset, c.canary_subset) == ("reviews", "default", "reviews",
                                                                               "v1", "v3")
    assert (a.interval, a.threshold, a.max_weight, a.step_weight, a.strategy) == (30.0, 5, 50, 10, "canary")
    assert [(m.name, m.interval, m.interval_text) for m in a.metrics] == [
        ("request-success-rate", 60.0, "1m"), ("request-duration", 30.0, "30s")]
    assert a.metrics[0].threshold_range.violation(98.5, "%") == "98.50% < 99%"
    assert a.metrics[1].threshold_range.violation(501) == "501.00 > 500"
    assert a.metrics[1].threshold_range.violation(500) is None


def test_defaults_threshold_one_max_weight_100_metric_interval_1m() -> None:
    c = load_one(canary_yaml("stepWeight: 20\nmetrics: [{name: request-success-rate, thresholdRange: {min: 99}}]\n"))
    assert (c.analysis.interval, c.analysis.threshold, c.analysis.max_weight) == (60.0, 1, 100)
    assert c.analysis.metrics[0].interval_text == "1m"


def test_strategies_follow_flaggers_order() -> None:
    ab = load_one(canary_yaml("iterations: 3\nmatch: [{headers: {end-user: {exact: jason}}}]\n"))
    bg = load_one(canary_yaml("iterations: 3\n"))
    steps = load_one(canary_yaml("stepWeights: [1, 5, 25]\n"))
    assert (ab.analysis.strategy, bg.analysis.strategy, steps.analysis.strategy) == ("ab", "bluegreen", "canary")
    assert steps.analysis.max_weight == 25  # the last step weight, as Flagger's maxWeight()


def test_unknown_fields_are_errors_and_unsupported_ones_warnings_with_paths() -> None:
    cf = load_text(canary_yaml("stepWeight: 10\nmirror: true\nstepWieght: 5\n"
                               "webhooks: [{name: a, url: 'http://x/', muteAlert: true, colour: red}]\n",
                               service="{port: 9080, portDiscovery: true}"), "c.yaml")
    errors = [str(e) for e in cf.errors]
    warnings = [str(w) for w in cf.warnings]
    assert "c.yaml#0: spec.analysis.stepWieght: unknown field 'stepWieght' in CanaryAnalysis" in errors
    assert "c.yaml#0: spec.analysis.webhooks[0].colour: unknown field 'colour' in CanaryWebhook" in errors
    assert "c.yaml#0: spec.analysis.mirror: not implemented by pyproxy canary, ignored" in warnings
    assert "c.yaml#0: spec.service.portDiscovery: not implemented by pyproxy canary, ignored" in warnings
    assert "c.yaml#0: spec.analysis.webhooks[0].muteAlert: not implemented by pyproxy canary, ignored" in warnings
    assert cf.canaries == ()


@pytest.mark.parametrize(("analysis", "path", "message"), [
    ("stepWeight: 10\nthreshold: -1\n", "spec.analysis.threshold", "must be >= 0"),
    ("stepWeight: 110\n", "spec.analysis.stepWeight", "must be between 0 and 100"),
    ("stepWeights: [10, 5]\n", "spec.analysis.stepWeights[1]", "greater than the step before"),
    ("interval: 10\nstepWeight: 5\n", "spec.analysis.interval", "expected a duration string"),
    ("threshold: 2\n", "spec.analysis.stepWeight", "is required"),
    ("match: [{headers: {a: {exact: b}}}]\n", "spec.analysis.iterations", "is required with match"),
    ("stepWeight: 5\nmetrics: [{name: my-metric, thresholdRange: {max: 1}}]\n", "spec.analysis.metrics[0].name",
     "not a built-in metric"),
    ("stepWeight: 5\nmetrics: [{name: request-success-rate}]\n", "spec.analysis.metrics[0].thresholdRange",
     "is required"),
    ("stepWeight: 5\nwebhooks: [{name: a, type: during, url: 'http://x/'}]\n", "spec.analysis.webhooks[0].type",
     "must be one of"),
])
def test_bad_values_are_located_errors(analysis: str, path: str, message: str) -> None:
    cf = load_text(canary_yaml(analysis), "c.yaml")
    assert any(e.path == path and message in e.message for e in cf.errors), [str(e) for e in cf.errors]
    assert cf.canaries == ()


def test_missing_subset_annotations_are_errors() -> None:
    text = canary_yaml("stepWeight: 10\n").replace(", pyproxy.io/canary-subset: v3", "")
    cf = load_text(text, "c.yaml")
    assert [e.path for e in cf.errors] == ["metadata.annotations.pyproxy.io/canary-subset"]


def test_metric_template_and_deprecated_threshold() -> None:
    text = canary_yaml("stepWeight: 10\nmetrics:\n- {name: request-success-rate, threshold: 99}\n"
                       "- {name: errors, templateRef: {name: errs}, thresholdRange: {max: 5}, "
                       "templateVariables: {code: '5'}}\n") + textwrap.dedent("""\
        ---
        apiVersion: flagger.app/v1beta1
        kind: MetricTemplate
        metadata: {name: errs}
        spec:
          provider: {type: prometheus, address: 'http://prom:9090'}
          query: sum(rate(x{ns="{{ namespace }}",t="{{ target }}",c="{{ variables.code }}"}[{{ interval }}]))
        """)
    cf = load_text(text, "c.yaml")
    assert not cf.errors, cf.errors
    m = cf.canaries[0].analysis.metrics
    assert m[0].threshold_range.min == 99 and m[0].threshold_range.max is None  # success rate: a minimum
    assert m[1].template == ("default", "errs")
    t = cf.template("default", "errs")
    assert t is not None
    assert render(t.query, template_model(cf.canaries[0], "1m"), dict(m[1].template_variables)) == (
        'sum(rate(x{ns="default",t="reviews",c="5"}[1m]))')
    with pytest.raises(MetricError, match="unknown template variable"):
        render("{{ pod }}", template_model(cf.canaries[0], "1m"), {})
    assert any(w.path == "spec.analysis.metrics[0].threshold" for w in cf.warnings)


def test_other_provider_templates_are_errors() -> None:
    cf = load_text("apiVersion: flagger.app/v1beta1\nkind: MetricTemplate\nmetadata: {name: x}\n"
                   "spec: {provider: {type: datadog}, query: q}\n", "t.yaml")
    assert [(e.path, "datadog" in e.message) for e in cf.errors] == [("spec.provider.type", True)]


# --------------------------------------------------------------------------- metric math


def test_histogram_quantile_matches_prometheus() -> None:
    # 100 observations: 50 in (0,10], 40 in (10,100], 10 in (100,+Inf).
    buckets = {10.0: 50.0, 100.0: 90.0, math.inf: 100.0}
    assert histogram_quantile(0.5, buckets) == pytest.approx(10.0)
    assert histogram_quantile(0.75, buckets) == pytest.approx(10 + 90 * (25 / 40))
    assert histogram_quantile(0.99, buckets) == 100.0  # in +Inf: the highest finite bound
    assert histogram_quantile(0.25, buckets) == pytest.approx(5.0)  # 0 is the first bucket's lower bound
    assert math.isnan(histogram_quantile(0.99, {10.0: 0.0, math.inf: 0.0}))
    assert math.isnan(histogram_quantile(0.99, {10.0: 5.0}))  # no +Inf bucket


SEL = Selector("default", (("destination_app", "reviews"), ("destination_version", "v3")))


def exposition(ok: int, errors: int, fast: int, slow: int, version: str = "v3") -> str:
    def labels(code: str, reporter: str = "destination") -> str:
        return (f'reporter="{reporter}",destination_workload_namespace="default",destination_app="reviews",'
                f'destination_version="{version}",response_code="{code}"')

    lines = ["# TYPE istio_requests_total counter"]
    if ok:
        lines.append(f"istio_requests_total{{{labels('200')}}} {ok}")
        lines.append(f"istio_requests_total{{{labels('200', 'source')}}} {ok * 10}")  # not the destination's
    if errors:
        lines.append(f"istio_requests_total{{{labels('503')}}} {errors}")
    lines.append("# TYPE istio_request_duration_milliseconds histogram")
    total = ok + errors
    for le, count in (("10", fast), ("1000", fast + slow), ("+Inf", total)):
        lines.append(f'istio_request_duration_milliseconds_bucket{{{labels("200")},le="{le}"}} {count}')
    lines.append(f'istio_request_duration_milliseconds_sum{{{labels("200")}}} 1')
    lines.append(f'istio_request_duration_milliseconds_count{{{labels("200")}}} {total}')
    return "\n".join(lines) + "\n"


class Scripted:
    """A fetch that answers each URL from a list of texts, one per call."""

    def __init__(self, pages: dict[str, list[str]]) -> None:
        self.pages = {k: list(v) for k, v in pages.items()}
        self.urls: list[str] = []

    def __call__(self, url: str, timeout: float) -> bytes:
        self.urls.append(url)
        for prefix, texts in self.pages.items():
            if url.startswith(prefix):
                if not texts:
                    raise MetricError(f"{url}: connection refused")
                return texts.pop(0).encode()
        raise MetricError(f"{url}: unexpected")


def check(name: str, interval: float = 10.0) -> MetricCheck:
    from pyproxy.canary.resource import ThresholdRange

    return MetricCheck(name, interval, f"{interval:g}s", ThresholdRange(min=0))


def a_canary() -> Canary:
    return load_one(canary_yaml("stepWeight: 10\n" + METRICS))


def test_scrape_success_rate_and_p99_from_successive_scrapes_with_a_counter_reset() -> None:
    # Two sidecars of the canary subset; the second restarts (its counters fall) between scrapes 2 and 3.
    fetch = Scripted({
        "http://a:1/": [exposition(100, 0, 100, 0), exposition(190, 10, 180, 20), exposition(280, 20, 260, 40)],
        "http://b:2/": [exposition(50, 0, 50, 0), exposition(90, 0, 90, 0), exposition(30, 10, 30, 10)],
    })
    src = ScrapeSource(["a:1", "b:2"], SEL, fetch=fetch)
    c = a_canary()
    with pytest.raises(NoData):
        src.value(check("request-success-rate"), c, 0.0)
    for t in (0.0, 10.0, 20.0):
        src.refresh(t)
    # Window of 10s at t=20: a +90 ok +10 err; b restarted: counts from 0, +30 ok +10 err.
    rate = src.value(check("request-success-rate", 10), c, 20.0)
    assert rate == pytest.approx(100 * 120 / 140)
    # Window of 20s: a +180 ok +20 err; b +40 ok, then +30 ok +10 err.
    assert src.value(check("request-success-rate", 20), c, 20.0) == pytest.approx(100 * 250 / 280)
    # p99 over the 10s window: a's buckets +80 fast +20 slow, b's 30 fast 10 slow = 110 fast of 140.
    p99 = src.value(check("request-duration", 10), c, 20.0)
    assert p99 == pytest.approx(10 + 990 * ((0.99 * 140 - 110) / 30))


def test_scrape_without_requests_for_the_canary_is_no_data_not_a_pass() -> None:
    idle = exposition(5, 0, 5, 0)
    fetch = Scripted({"http://a:1/": [idle, idle, exposition(0, 0, 0, 0, version="v1")]})
    src = ScrapeSource(["a:1"], SEL, fetch=fetch)
    src.refresh(0.0)
    src.refresh(10.0)
    with pytest.raises(NoData, match="no requests to the canary subset"):
        src.value(check("request-success-rate"), a_canary(), 10.0)
    with pytest.raises(NoData):
        src.value(check("request-duration"), a_canary(), 10.0)


def test_prometheus_runs_flaggers_istio_queries() -> None:
    answers = [json.dumps({"status": "success", "data": {"resultType": "vector",
                                                          "result": [{"metric": {}, "value": [1, "99.5"]}]}}),
               json.dumps({"status": "success", "data": {"resultType": "vector", "result": []}}),
               json.dumps({"status": "success", "data": {"resultType": "vector",
                                                          "result": [{"metric": {}, "value": [1, "NaN"]}]}})]
    fetch = Scripted({"http://prom:9090/api/v1/query": answers})
    src = PrometheusSource("http://prom:9090/", SEL, fetch=fetch)
    c = a_canary()
    assert src.value(c.analysis.metrics[0], c, 0) == 99.5
    with pytest.raises(NoData):
        src.value(c.analysis.metrics[0], c, 0)
    with pytest.raises(NoData):
        src.value(c.analysis.metrics[1], c, 0)
    from urllib.parse import parse_qs, urlsplit

    sent = parse_qs(urlsplit(fetch.urls[0]).query)["query"][0]
    assert sent == ('sum(rate(istio_requests_total{reporter="destination",destination_workload_namespace="default",'
                    'destination_app="reviews",destination_version="v3",response_code!~"5.*"}[1m])) / '
                    'sum(rate(istio_requests_total{reporter="destination",destination_workload_namespace="default",'
                    'destination_app="reviews",destination_version="v3"}[1m])) * 100')
    assert builtin_query(c.analysis.metrics[1], SEL).startswith(
        "histogram_quantile(0.99, sum(rate(istio_request_duration_milliseconds_bucket{")


def test_selector_needs_version_and_only_app_version_labels() -> None:
    c = a_canary()
    assert selector_for(c, {"version": "v3"}) == SEL
    with pytest.raises(ValueError, match="no version label"):
        selector_for(c, {"app": "reviews"})
    with pytest.raises(ValueError, match="track"):
        selector_for(c, {"version": "v3", "track": "canary"})


def test_webhook_payload_is_flaggers() -> None:
    c = a_canary()
    hook = Webhook("load", "rollout", "http://x/", 5.0, (("cmd", "hey"),))
    assert payload(c, hook, "Progressing") == {"name": "reviews", "namespace": "default", "phase": "Progressing",
                                               "checksum": c.checksum, "type": "rollout",
                                               "metadata": {"cmd": "hey"}}


# --------------------------------------------------------------------------- the state machine


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


class Router:
    def __init__(self) -> None:
        self.routes: list[Routes] = []
        self.reject = False

    def set_routes(self, routes: Routes) -> None:
        if self.reject:
            raise RouteRejected("invalid")
        self.routes.append(routes)


class Metrics:
    """Scripted metric values: one entry per analysis, a value per metric name
    (None: no data)."""

    def __init__(self, script: list[dict[str, float | None]]) -> None:
        self.script = script
        self.refreshed = 0
        self.current: dict[str, float | None] | None = None

    def refresh(self, now: float) -> None:
        self.refreshed += 1

    def value(self, check: MetricCheck, canary: Canary, now: float) -> float:
        if self.current is None:
            self.current = self.script.pop(0) if self.script else {}
        value = self.current.get(check.name, 100.0 if check.name == "request-success-rate" else 10.0)
        if check.name == canary.analysis.metrics[-1].name:
            self.current = None
        if value is None:
            raise NoData("no requests")
        return value


class Hooks:
    def __init__(self, answers: dict[str, list[str | None]] | None = None) -> None:
        self.answers = answers or {}
        self.calls: list[tuple[str, str, str]] = []

    def __call__(self, canary: Canary, hook: Webhook, phase: str) -> str | None:
        self.calls.append((hook.type, hook.name, phase))
        script = self.answers.get(hook.name)
        return script.pop(0) if script else None


GOOD: dict[str, float | None] = {"request-success-rate": 100.0, "request-duration": 20.0}
BAD: dict[str, float | None] = {"request-success-rate": 80.0, "request-duration": 20.0}


def make(analysis: str, script: list[dict[str, float | None]] | None = None, hooks: Hooks | None = None,
         store: StateStore | None = None) -> tuple[Controller, Router, Metrics, Hooks, Clock]:
    c = load_one(canary_yaml(analysis))
    router, metrics, hooks, clock = Router(), Metrics(script or []), hooks or Hooks(), Clock()
    return Controller(c, router, metrics, hooks, store, clock=clock), router, metrics, hooks, clock


def run_ticks(con: Controller, clock: Clock, n: int) -> list[tuple[str, int, int]]:
    seen = []
    for _ in range(n):
        clock.t += 30
        con.tick()
        seen.append((con.state.phase, con.state.weight, con.state.failed_checks))
    return seen


def test_canary_steps_to_max_weight_then_promotes() -> None:
    con, router, metrics, _hooks, clock = make("interval: 30s\nthreshold: 2\nmaxWeight: 30\nstepWeight: 10\n"
                                              + METRICS, [GOOD] * 10)
    seen = run_ticks(con, clock, 9)
    assert seen == [
        ("Initialized", 0, 0),   # all traffic to the primary
        ("Progressing", 0, 0),   # new revision: the analysis starts next interval
        ("Progressing", 10, 0),  # pre-rollout (no metric check without canary traffic), first step
        ("Progressing", 20, 0),
        ("Progressing", 30, 0),
        ("Promoting", 30, 0),    # max weight reached and checked once more
        ("Finalising", 100, 0),  # all traffic to the canary subset
        ("Succeeded", 100, 0),
        ("Succeeded", 100, 0),   # terminal: nothing more
    ]
    assert [(r.primary, r.canary) for r in router.routes] == [(100, 0), (90, 10), (80, 20), (70, 30), (0, 100)]
    assert con.state.steps == 5
    assert metrics.refreshed == 8  # every non-terminal interval reads the metrics
    passed = [e["message"] for e in con.state.history if e["message"].startswith("Checks passed")]
    assert passed[0] == "Checks passed: request-success-rate 100.00%, request-duration 20ms"
    assert len(passed) == 3  # at weight 10, at 20, and at the max weight 30 (then promoted)
    assert [m for m in (e["message"] for e in con.state.history) if m.startswith("Advance")] == [
        "Advance default.reviews canary weight 10", "Advance default.reviews canary weight 20",
        "Advance default.reviews canary weight 30"]


def test_failed_checks_accumulate_and_roll_back_at_threshold() -> None:
    # Flagger never resets FailedChecks during an analysis: fail, pass, fail, fail = 3 = threshold.
    con, router, _, hooks, clock = make("threshold: 3\nstepWeight: 10\n" + METRICS
                                        + "webhooks: [{name: bye, type: post-rollout, url: 'http://h/'}]\n",
                                        [BAD, GOOD, BAD, BAD, GOOD])
    seen = run_ticks(con, clock, 8)
    assert seen == [
        ("Initialized", 0, 0), ("Progressing", 0, 0), ("Progressing", 10, 0),
        ("Progressing", 10, 1),  # success rate 80% < 99%: halted, weight kept
        ("Progressing", 20, 1),  # a pass advances, the count stays
        ("Progressing", 20, 2),
        ("Progressing", 20, 3),
        ("Failed", 0, 3),        # threshold reached: rolled back at the next interval
    ]
    assert router.routes[-1] == Routes(100, 0)
    assert ("post-rollout", "bye", "Failed") in hooks.calls
    assert con.state.checks[0]["message"] == "success rate 80.00% < 99%"
    assert "Rolling back default.reviews failed checks threshold reached 3" in [
        e["message"] for e in con.state.history]


def test_no_data_is_waiting_for_data_and_a_failed_check_never_a_pass() -> None:
    con, _router, _, _, clock = make("threshold: 5\nstepWeight: 50\n" + METRICS,
                                    [{"request-success-rate": None, "request-duration": None}, GOOD, GOOD])
    seen = run_ticks(con, clock, 6)
    assert seen[3] == ("Progressing", 50, 1)  # no data: no advance, one failed check (as Flagger)
    halted = [e for e in con.state.history if any(k["result"] != "pass" for k in e.get("checks", ()))]
    assert len(halted) == 1 and [k["result"] for k in halted[0]["checks"]] == ["no_data", "no_data"]
    assert "waiting for data: no values found for metric request-success-rate" in halted[0]["message"]
    assert seen[4:] == [("Progressing", 100, 1), ("Promoting", 100, 1)]


def test_step_weights() -> None:
    con, router, _, _, clock = make("stepWeights: [1, 5, 25]\n" + METRICS, [GOOD] * 6)
    run_ticks(con, clock, 7)
    assert [r.canary for r in router.routes] == [0, 1, 5, 25, 100]


def test_ab_testing_routes_matching_requests_for_n_iterations() -> None:
    con, router, _, _, clock = make("iterations: 2\nmatch: [{headers: {end-user: {exact: jason}}}]\n" + METRICS,
                                    [GOOD] * 4)
    seen = run_ticks(con, clock, 7)
    assert [s[0] for s in seen] == ["Initialized", "Progressing", "Progressing", "Progressing", "Promoting",
                                    "Finalising", "Succeeded"]
    assert router.routes == [Routes(100, 0), Routes(100, 0, True), Routes(100, 0, True), Routes(0, 100)]
    assert con.state.iterations == 2


def test_blue_green_iterates_then_switches_all_traffic_then_promotes() -> None:
    con, router, _, _, clock = make("iterations: 2\n" + METRICS, [GOOD] * 5)
    seen = run_ticks(con, clock, 8)
    assert seen == [("Initialized", 0, 0), ("Progressing", 0, 0), ("Progressing", 0, 0), ("Progressing", 0, 0),
                    ("Progressing", 100, 0), ("Promoting", 100, 0), ("Finalising", 100, 0), ("Succeeded", 100, 0)]
    assert [(r.primary, r.canary) for r in router.routes] == [(100, 0), (0, 100), (0, 100)]


def test_failed_pre_rollout_and_rollout_webhooks_count_as_failed_checks() -> None:
    hooks = Hooks({"smoke": ["HTTP 500", None], "load": ["timed out", None]})
    con, _router, _, _, clock = make(
        "threshold: 5\nstepWeight: 50\nmaxWeight: 50\n" + METRICS + "webhooks:\n"
        "- {name: smoke, type: pre-rollout, url: 'http://h/'}\n- {name: load, url: 'http://h/'}\n",
        [GOOD] * 5, hooks)
    seen = run_ticks(con, clock, 6)
    assert seen[:5] == [("Initialized", 0, 0), ("Progressing", 0, 0), ("Progressing", 0, 1),
                        ("Progressing", 50, 1), ("Progressing", 50, 2)]
    assert seen[5] == ("Promoting", 50, 2)
    assert ("rollout", "load", "Progressing") in hooks.calls  # an empty type is a rollout hook


def test_confirm_rollout_waits_and_confirm_promotion_holds_promotion() -> None:
    hooks = Hooks({"go": ["HTTP 403", None], "ship": ["HTTP 403", None]})
    con, _router, _, _, clock = make(
        "stepWeight: 100\n" + METRICS + "webhooks:\n"
        "- {name: go, type: confirm-rollout, url: 'http://h/'}\n"
        "- {name: ship, type: confirm-promotion, url: 'http://h/'}\n", [GOOD] * 5, hooks)
    seen = run_ticks(con, clock, 7)
    assert [s[0] for s in seen] == ["Initialized", "Waiting", "Progressing", "Progressing", "WaitingPromotion",
                                    "Promoting", "Finalising"]


def test_a_rollback_webhook_answering_2xx_rolls_back() -> None:
    hooks = Hooks({"abort": ["HTTP 404", None]})
    con, router, _, _, clock = make("stepWeight: 10\n" + METRICS
                                    + "webhooks: [{name: abort, type: rollback, url: 'http://h/'}]\n",
                                    [GOOD] * 4, hooks)
    seen = run_ticks(con, clock, 4)
    assert seen[-1] == ("Failed", 0, 0)
    assert router.routes[-1] == Routes(100, 0)


def test_a_rejected_virtual_service_changes_nothing() -> None:
    con, router, _, _, clock = make("stepWeight: 10\n" + METRICS, [GOOD] * 4)
    run_ticks(con, clock, 3)
    router.reject = True
    run_ticks(con, clock, 1)
    assert (con.state.phase, con.state.weight) == ("Progressing", 10)
    assert "routing not changed" in con.state.message


def test_state_survives_a_restart_and_a_second_controller_is_refused(tmp_path: Path) -> None:
    store = StateStore(str(tmp_path), "default", "reviews")
    store.acquire()
    other = StateStore(str(tmp_path), "default", "reviews")
    with pytest.raises(LockedError, match=f"pid {os.getpid()}"):
        other.acquire()
    con, _, _, _, clock = make("threshold: 3\nstepWeight: 10\n" + METRICS, [GOOD, BAD], store=store)
    run_ticks(con, clock, 5)
    assert (con.state.phase, con.state.weight, con.state.failed_checks) == ("Progressing", 20, 1)
    store.release()
    store2 = StateStore(str(tmp_path), "default", "reviews")
    store2.acquire()  # free again
    con2, router2, _, _, clock2 = make("threshold: 3\nstepWeight: 10\n" + METRICS, [GOOD] * 9, store=store2)
    assert con2.resumed and (con2.state.phase, con2.state.weight, con2.state.failed_checks) == ("Progressing", 20, 1)
    con2.resume()
    assert router2.routes == [Routes(80, 20)]  # the routes put back as they were
    run_ticks(con2, clock2, 1)
    assert con2.state.weight == 30
    store2.release()


def test_controller_in_another_process_is_refused(tmp_path: Path) -> None:
    store = StateStore(str(tmp_path), "default", "reviews")
    store.acquire()
    try:
        code = ("from pyproxy.canary.controller import StateStore, LockedError\n"
                f"s = StateStore({str(tmp_path)!r}, 'default', 'reviews')\n"
                "try:\n    s.acquire()\nexcept LockedError as e:\n    print('refused', e)\n")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             cwd=ROOT, timeout=60).stdout
        assert out.startswith("refused another controller") and str(os.getpid()) in out
    finally:
        store.release()


def test_status_value_is_flaggers() -> None:
    assert [ctl.status_value(p) for p in ("Progressing", "Succeeded", "Failed", "Initialized")] == [0, 1, 2, 1]


# --------------------------------------------------------------------------- the owned VirtualService


MESH = """\
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
  - name: jason
    match: [{headers: {end-user: {exact: jason}}}]
    route: [{destination: {host: reviews, subset: v1}}]
  - timeout: 3s
    route: [{destination: {host: reviews, subset: v1}}]
"""


@pytest.fixture
def mesh_dir(tmp_path: Path) -> Iterator[Path]:
    (tmp_path / "routing.yaml").write_text(MESH)
    yield tmp_path


def test_generated_virtual_service_keeps_other_rules_and_overrides_the_original(mesh_dir: Path) -> None:
    c = load_one(canary_yaml("iterations: 2\nmatch: [{headers: {x-canary: {exact: 'yes'}}}]\n"))
    mesh = Mesh(str(mesh_dir), c)
    assert mesh.subset_labels("v3") == {"version": "v3"}
    mesh.set_routes(Routes(100, 0, match=True))
    doc = yaml.safe_load((mesh_dir / "zz-canary-reviews.yaml").read_text())
    http = doc["spec"]["http"]
    assert doc["metadata"]["name"] == "reviews"
    assert [r.get("name") for r in http] == ["jason", "pyproxy-canary-match", None]
    assert http[1]["match"] == [{"headers": {"x-canary": {"exact": "yes"}}}]
    assert http[2]["timeout"] == "3s"  # the default rule keeps its other fields
    assert [(d["destination"]["subset"], d["weight"]) for d in http[2]["route"]] == [("v1", 100), ("v3", 0)]
    loaded = load_paths([str(mesh_dir)])
    assert not loaded.errors
    vss = [r for r in loaded.resources if isinstance(r, VirtualService)]
    assert len(vss) == 1 and vss[0].meta.source.file.endswith("zz-canary-reviews.yaml")  # the original is replaced
    assert not [p for p in os.listdir(mesh_dir) if p.endswith(".tmp")]


def test_invalid_generated_virtual_service_is_never_written(mesh_dir: Path) -> None:
    c = load_one(canary_yaml("iterations: 2\nmatch: [{headers: {x-canary: {regex: '(unclosed'}}}]\n"))
    mesh = Mesh(str(mesh_dir), c)
    mesh.set_routes(Routes(100, 0))
    before = (mesh_dir / "zz-canary-reviews.yaml").read_text()
    with pytest.raises(RouteRejected, match="zz-canary-reviews.yaml#0: spec.http"):
        mesh.set_routes(Routes(100, 0, match=True))
    assert (mesh_dir / "zz-canary-reviews.yaml").read_text() == before
    assert sorted(os.listdir(mesh_dir)) == ["routing.yaml", "zz-canary-reviews.yaml"]


def test_without_an_existing_virtual_service_one_is_created(tmp_path: Path) -> None:
    (tmp_path / "dr.yaml").write_text(MESH.split("---")[0])
    c = load_one(canary_yaml("stepWeight: 10\n"))
    Mesh(str(tmp_path), c).set_routes(Routes(70, 30))
    doc = yaml.safe_load((tmp_path / "zz-canary-reviews.yaml").read_text())
    assert doc["spec"]["hosts"] == ["reviews"]
    assert [(d["destination"]["subset"], d["weight"]) for d in doc["spec"]["http"][0]["route"]] == [
        ("v1", 70), ("v3", 30)]


def test_cli_status_prints_phase_weight_checks_and_history(tmp_path: Path) -> None:
    store = StateStore(str(tmp_path), "default", "reviews")
    con, _, _, _, clock = make("threshold: 3\nstepWeight: 10\n" + METRICS, [GOOD, BAD], store=store)
    run_ticks(con, clock, 5)
    res = subprocess.run([sys.executable, "-m", "pyproxy", "canary", "status", "--config", str(tmp_path),
                          "reviews"], capture_output=True, text=True, cwd=ROOT, timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert out.startswith("default.reviews: Progressing\n  weight 20%   failed checks 1"), out
    assert "request-success-rate     fail         80.00  success rate 80.00% < 99%" in out
    assert "Advance default.reviews canary weight 20" in out
    res = subprocess.run([sys.executable, "-m", "pyproxy", "canary", "status", "--config", str(tmp_path), "nope"],
                         capture_output=True, text=True, cwd=ROOT, timeout=60, check=False)
    assert res.returncode == 1 and "no canary 'nope'" in res.stderr


def test_cli_status_into_a_closed_pipe_stops_quietly(tmp_path: Path) -> None:
    # `pyproxy canary status --json | head -1`: the reader leaves after one
    # line; the command ends as a tool killed by SIGPIPE would (141), with no
    # BrokenPipeError traceback on stderr.
    store = StateStore(str(tmp_path), "default", "reviews")
    con, _, _, _, clock = make("threshold: 3\nstepWeight: 10\n" + METRICS, [GOOD, BAD], store=store)
    run_ticks(con, clock, 5)
    # A state larger than a pipe's buffer (64 KiB), so the writer meets the
    # closed pipe whatever the timing.
    (state_file,) = tmp_path.glob(".canary-*.json")
    doc = json.loads(state_file.read_text())
    doc["history"] = doc["history"] * (200_000 // len(json.dumps(doc["history"])) + 1)
    state_file.write_text(json.dumps(doc))
    proc = subprocess.Popen([sys.executable, "-m", "pyproxy", "canary", "status", "--config", str(tmp_path),
                             "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline() == b"{\n"
    proc.stdout.close()  # before the rest (several KiB: more than one line) was read
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait(timeout=60) == 141, err
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_cli_run_rejects_a_bad_canary_file_with_located_errors(tmp_path: Path) -> None:
    bad = tmp_path / "c.yaml"
    bad.write_text(canary_yaml("stepWeight: 10\nthreshhold: 2\n"))
    res = subprocess.run([sys.executable, "-m", "pyproxy", "canary", "run", "--config", str(tmp_path), "--canary",
                          str(bad), "--scrape", "127.0.0.1:1"], capture_output=True, text=True, cwd=ROOT,
                         timeout=60, check=False)
    assert res.returncode == 2
    assert f"error: {bad}#0: spec.analysis.threshhold: unknown field 'threshhold' in CanaryAnalysis" in res.stderr
    assert not list(tmp_path.glob(".canary-*"))  # nothing started, nothing written


def test_the_canary_command_keeps_pyproxy_startup_light_and_flaggers_interval_floor() -> None:
    # build_parser (every pyproxy command, `run` included) imports pyproxy.canary.cli.
    code = ("import sys, pyproxy.cli; p, _ = pyproxy.cli.build_parser(); "
            "a = p.parse_args(['canary', 'run', '--config', 'd', '--canary', 'f', '--scrape', 'h:1']); "
            "print(a.min_interval, sorted(m for m in sys.modules if m.startswith(('pyproxy.canary', 'prometheus'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT,
                         timeout=60).stdout.split(" ", 1)
    from pyproxy.canary.resource import FLAGGER_MIN_INTERVAL

    assert float(out[0]) == FLAGGER_MIN_INTERVAL
    assert out[1].strip() == "['pyproxy.canary', 'pyproxy.canary.cli']"


def test_confirm_traffic_increase_holds_the_next_step_without_failing() -> None:
    hooks = Hooks({"more": ["HTTP 403", "HTTP 403", None, None]})
    con, router, _, _, clock = make("stepWeight: 50\nmaxWeight: 50\n" + METRICS
                                    + "webhooks: [{name: more, type: confirm-traffic-increase, url: 'http://h/'}]\n",
                                    [GOOD] * 6, hooks)
    seen = run_ticks(con, clock, 6)
    # Closed twice: the weight waits at 0, nothing counts as failed; then 50, then promotion.
    assert seen == [("Initialized", 0, 0), ("Progressing", 0, 0), ("Progressing", 0, 0), ("Progressing", 0, 0),
                    ("Progressing", 50, 0), ("Promoting", 50, 0)]
    held = [e for e in con.state.history if "confirm-traffic-increase webhook more not approved: HTTP 403"
            in e["message"]]
    assert len(held) == 2
    assert router.routes == [Routes(100, 0), Routes(50, 50)]


def test_skip_analysis_promotes_at_once_and_suspend_does_nothing() -> None:
    c = load_one(canary_yaml("stepWeight: 10\n" + METRICS).replace("  service:", "  skipAnalysis: true\n  service:"))
    router, clock = Router(), Clock()
    con = Controller(c, router, Metrics([]), Hooks(), None, clock=clock)
    assert [s[:2] for s in run_ticks(con, clock, 3)] == [("Initialized", 0), ("Succeeded", 100), ("Succeeded", 100)]
    assert router.routes == [Routes(100, 0), Routes(0, 100)]
    c = load_one(canary_yaml("stepWeight: 10\n" + METRICS).replace("  service:", "  suspend: true\n  service:"))
    router = Router()
    con = Controller(c, router, Metrics([]), Hooks(), None, clock=clock)
    assert run_ticks(con, clock, 2) == [("Initializing", 0, 0), ("Initializing", 0, 0)]
    assert router.routes == [] and con.state.message == "skipping canary run as object is suspended"


@pytest.mark.parametrize(("files", "flags", "message"), [
    ({"routing.yaml": MESH}, ["--scrape", "sidecar-without-port"], "--scrape: expected HOST:PORT"),
    ({"routing.yaml": MESH.replace("name: v3", "name: v2")}, ["--scrape", "127.0.0.1:1"],
     "no DestinationRule for host 'reviews' defines subset 'v3'"),
    ({"routing.yaml": MESH}, ["--scrape", "127.0.0.1:1", "--metrics", "9095"], "--metrics: expected HOST:PORT"),
])
def test_cli_run_refuses_a_mesh_or_flags_it_cannot_work_with(tmp_path: Path, files: dict[str, str],
                                                             flags: list[str], message: str) -> None:
    mesh = tmp_path / "mesh"
    mesh.mkdir()
    for name, text in files.items():
        (mesh / name).write_text(text)
    (tmp_path / "c.yaml").write_text(canary_yaml("stepWeight: 10\n" + METRICS))
    res = subprocess.run([sys.executable, "-m", "pyproxy", "canary", "run", "--config", str(mesh), "--canary",
                          str(tmp_path / "c.yaml"), *flags], capture_output=True, text=True, cwd=ROOT, timeout=60,
                         check=False)
    assert res.returncode == 2 and message in res.stderr, res.stderr
    assert sorted(p.name for p in mesh.iterdir() if not p.name.endswith(".lock")) == ["routing.yaml"]


def test_request_duration_is_whole_milliseconds_as_in_flagger() -> None:
    # Flagger: time.Duration(int64(value)) * time.Millisecond, then "> max": 500.9 ms passes a 500 ms maximum.
    con, _, _, _, clock = make("stepWeight: 10\nmaxWeight: 50\n" + METRICS,
                               [{"request-success-rate": 100.0, "request-duration": 500.9},
                                {"request-success-rate": 100.0, "request-duration": 501.2}])
    run_ticks(con, clock, 5)
    assert (con.state.phase, con.state.weight, con.state.failed_checks) == ("Progressing", 20, 1)
    assert con.state.checks[1]["message"] == "request duration 501.00ms > 500ms"


def test_run_ticks_until_a_final_phase_and_a_finished_canary_only_reports_again(tmp_path: Path) -> None:
    store = StateStore(str(tmp_path), "default", "reviews")
    con, router, _, _, clock = make("stepWeight: 50\nmaxWeight: 50\n" + METRICS, [GOOD] * 3, store=store)
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock.t += seconds

    assert con.run(sleep, 10.0, lambda: False) == "Succeeded"
    assert slept and all(s == 10.0 for s in slept)  # one tick per interval
    assert router.routes[-1] == Routes(0, 100)
    again, router2, _, _, _ = make("stepWeight: 50\nmaxWeight: 50\n" + METRICS, [], store=store)
    assert again.run(sleep, 10.0, lambda: False) == "Succeeded"
    assert router2.routes == [Routes(0, 100)]  # the routes put back, no new analysis
    assert again.state.history[-1]["message"].startswith("resumed in phase Succeeded")
