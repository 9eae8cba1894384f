"""Where the analysis gets its numbers: the sidecars' own ``/stats/prometheus``
(``--scrape``) or a Prometheus server's HTTP API (``--prometheus``).

Both compute Flagger's built-in Istio metrics for the canary subset, from
``reporter="destination"`` series (what the canary's own sidecar saw):

* ``request-success-rate``: the share of requests that did not answer 5xx, in
  percent (Flagger: ``sum(rate(istio_requests_total{..., response_code!~"5.*"}))
  / sum(rate(istio_requests_total{...})) * 100``).
* ``request-duration``: the 99th percentile of
  ``istio_request_duration_milliseconds`` in milliseconds (Flagger:
  ``histogram_quantile(0.99, sum(rate(..._bucket{...})) by (le))``).

Flagger selects the canary with ``destination_workload=~"{{ target }}"`` (its
canary Deployment). pyproxy has no Deployments, so the canary subset's pods are
selected by their labels: ``destination_app`` (the subset's ``app`` label,
else the targetRef name) and ``destination_version`` (the subset's
``version`` label).

No traffic in the window is :class:`NoData`, never a value: like Flagger's
"no values found", the check fails and says why.
"""

from __future__ import annotations

import json
import math
import re
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client.parser import text_string_to_metric_families

from .resource import Canary, MetricCheck, MetricTemplate

REQUESTS = "istio_requests_total"
DURATION_BUCKET = "istio_request_duration_milliseconds_bucket"
QUANTILE = 0.99
PROMETHEUS_TIMEOUT = 5.0  # Flagger's Prometheus client timeout
SCRAPE_TIMEOUT = 2.0
MAX_SCRAPE_BYTES = 64 * 1024 * 1024


class NoData(Exception):
    """No values for the metric: the canary got no requests in the window (yet)."""


class MetricError(Exception):
    """The metric could not be computed (query failed, target unreachable)."""


@dataclass(frozen=True, slots=True)
class Selector:
    """The canary subset's ``reporter="destination"`` series."""

    namespace: str
    labels: tuple[tuple[str, str], ...]  # Istio metric label -> value, e.g. destination_version=v3

    def matches(self, labels: Mapping[str, str]) -> bool:
        return (labels.get("reporter") == "destination"
                and labels.get("destination_workload_namespace") == self.namespace
                and all(labels.get(k) == v for k, v in self.labels))

    def promql(self) -> str:
        parts = ['reporter="destination"', f'destination_workload_namespace="{_promql_string(self.namespace)}"']
        parts += [f'{k}="{_promql_string(v)}"' for k, v in self.labels]
        return ",".join(parts)


# Subset (pod) label -> the Istio metric label carrying it at the destination.
POD_LABEL_METRIC = {"app": "destination_app", "version": "destination_version"}


def selector_for(canary: Canary, subset_labels: Mapping[str, str]) -> Selector:
    """The series of the canary subset; ValueError when its labels cannot be selected on."""
    unknown = sorted(set(subset_labels) - set(POD_LABEL_METRIC))
    if unknown:
        raise ValueError(
            f"subset {canary.canary_subset!r} selects pods by {', '.join(unknown)}; Istio's metrics carry only "
            f"app and version of the destination, so pyproxy canary needs a subset defined by those labels")
    if "version" not in subset_labels:
        raise ValueError(f"subset {canary.canary_subset!r} has no version label: its metrics cannot be told "
                         f"apart from the primary's")
    labels = {"destination_app": canary.target}
    labels.update({POD_LABEL_METRIC[k]: v for k, v in subset_labels.items()})
    return Selector(canary.namespace, tuple(sorted(labels.items())))


def _promql_string(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


class MetricSource(Protocol):
    def refresh(self, now: float) -> None:
        """Take a new reading (a scrape); called once per analysis interval."""

    def value(self, check: MetricCheck, canary: Canary, now: float) -> float:
        """The metric's value over its window; raises NoData or MetricError."""


# -------------------------------------------------------------------------- templates

_TEMPLATE_VAR = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)(?:\.([A-Za-z_][A-Za-z0-9_]*))?\s*\}\}")
TEMPLATE_VARIABLES = ("name", "namespace", "target", "service", "ingress", "interval")


def template_model(canary: Canary, interval: str) -> dict[str, str]:
    """Flagger's MetricTemplateModel (scheduler_metrics.go toMetricModel)."""
    return {"name": canary.name, "namespace": canary.namespace, "target": canary.target,
            "service": canary.host, "ingress": canary.target, "interval": interval}


def render(query: str, model: Mapping[str, str], variables: Mapping[str, str]) -> str:
    """Flagger's template variables: ``{{ namespace }}``, ``{{ interval }}``,
    ``{{ variables.name }}`` ...; anything else is an error, as Go's
    text/template fails on an unknown function."""

    def one(m: re.Match[str]) -> str:
        head, attr = m.group(1), m.group(2)
        if head == "variables" and attr is not None:
            if attr not in variables:
                raise MetricError(f"template variable {attr!r} is not set in templateVariables")
            return variables[attr]
        if attr is None and head in model:
            return model[head]
        raise MetricError(f"unknown template variable {m.group(0)!r} (Flagger's are "
                          f"{', '.join(TEMPLATE_VARIABLES)}, variables.NAME)")

    rendered = _TEMPLATE_VAR.sub(one, query)
    if "{{" in rendered:
        raise MetricError(f"unsupported template syntax in {query.strip()[:80]!r}")
    return rendered


def builtin_query(check: MetricCheck, selector: Selector) -> str:
    """Flagger's Istio queries (pkg/metrics/observers/istio.go) with pyproxy's canary selector."""
    sel = selector.promql()
    window = check.interval_text
    if check.name == "request-success-rate":
        return (f'sum(rate({REQUESTS}{{{sel},response_code!~"5.*"}}[{window}])) / '
                f"sum(rate({REQUESTS}{{{sel}}}[{window}])) * 100")
    return f"histogram_quantile({QUANTILE}, sum(rate({DURATION_BUCKET}{{{sel}}}[{window}])) by (le))"


# -------------------------------------------------------------------------- Prometheus


Fetch = Callable[[str, float], bytes]


def http_fetch(url: str, timeout: float) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.read(MAX_SCRAPE_BYTES)
    except urllib.error.HTTPError as exc:
        body = exc.read(500).decode(errors="replace")
        raise MetricError(f"{url}: HTTP {exc.code}: {body.strip()[:300]}") from None
    except (OSError, ValueError) as exc:
        raise MetricError(f"{url}: {exc}") from None


class PrometheusSource:
    """PromQL over Prometheus's HTTP API (``GET /api/v1/query``), as Flagger's
    Prometheus provider runs it: the value of the (last) result sample; an
    empty result is "no values found". A NaN result (0/0: series exist but
    had no requests in the window) is no values too, never a pass."""

    def __init__(self, url: str, selector: Selector, templates: Sequence[MetricTemplate] = (),
                 fetch: Fetch = http_fetch) -> None:
        self.url = url.rstrip("/")
        self.selector = selector
        self.templates = {(t.namespace, t.name): t for t in templates}
        self.fetch = fetch

    def refresh(self, now: float) -> None:
        pass  # Prometheus scrapes on its own schedule

    def query_for(self, check: MetricCheck, canary: Canary) -> tuple[str, str]:
        """(base URL, PromQL) for ``check``."""
        if check.template is not None:
            template = self.templates.get(check.template)
            if template is None:
                raise MetricError(f"MetricTemplate {check.template[0]}/{check.template[1]} not found")
            model = template_model(canary, check.interval_text)
            return (template.address.rstrip("/") or self.url,
                    render(template.query, model, dict(check.template_variables)))
        if check.query:
            return self.url, check.query
        return self.url, builtin_query(check, self.selector)

    def value(self, check: MetricCheck, canary: Canary, now: float) -> float:
        base, query = self.query_for(check, canary)
        return self.run_query(base, query)

    def run_query(self, base: str, query: str) -> float:
        query = " ".join(query.split())  # Flagger trims whitespace the same way
        url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": query})
        body = self.fetch(url, PROMETHEUS_TIMEOUT)
        try:
            doc = json.loads(body)
            results = doc["data"]["result"]
        except (ValueError, KeyError, TypeError):
            raise MetricError(f"unexpected answer from Prometheus: {body[:200]!r}") from None
        if doc.get("status") != "success":
            raise MetricError(f"Prometheus: {doc.get('error', body[:200])}")
        value: float | None = None
        try:
            if doc["data"].get("resultType") == "scalar":
                value = float(results[1])
            else:
                for result in results:
                    value = float(result["value"][1])
        except (KeyError, IndexError, TypeError, ValueError):
            raise MetricError(f"unexpected result from Prometheus: {str(results)[:200]}") from None
        if value is None or math.isnan(value):
            raise NoData(f"no values found for query {query[:160]}")
        return value


# -------------------------------------------------------------------------- direct scrapes


SeriesKey = tuple[str, frozenset[tuple[str, str]]]


@dataclass(slots=True)
class _Target:
    address: str
    samples: deque[tuple[float, dict[SeriesKey, float]]] = field(default_factory=deque)
    last_error: str = ""


class ScrapeSource:
    """Scrapes the sidecars' ``/stats/prometheus`` itself (``--scrape``) and
    computes the two built-in metrics from successive scrapes.

    Counts are exact increases between scrapes: for each series, the sum of
    the differences of consecutive readings, where a reading lower than the
    one before is a counter reset (the sidecar restarted) and counts from 0,
    and a series missing from a reading counts as 0 (it had no request yet).
    The window of a metric runs from the last scrape at or before
    ``now - interval`` (else the oldest kept) to the latest scrape."""

    def __init__(self, targets: Iterable[str], selector: Selector, fetch: Fetch = http_fetch,
                 keep: float = 3600.0) -> None:
        self.targets = [_Target(t) for t in targets]
        self.selector = selector
        self.fetch = fetch
        self.keep = keep

    def refresh(self, now: float) -> None:
        for target in self.targets:
            try:
                text = self.fetch(f"http://{target.address}/stats/prometheus", SCRAPE_TIMEOUT).decode()
                reading = self._parse(text)
            except (MetricError, ValueError, UnicodeDecodeError) as exc:
                target.last_error = str(exc)
                continue
            target.last_error = ""
            target.samples.append((now, reading))
            while target.samples and target.samples[0][0] < now - self.keep:
                target.samples.popleft()

    def _parse(self, text: str) -> dict[SeriesKey, float]:
        reading: dict[SeriesKey, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name not in (REQUESTS, DURATION_BUCKET) or not self.selector.matches(sample.labels):
                    continue
                reading[(sample.name, frozenset(sample.labels.items()))] = float(sample.value)
        return reading

    def increases(self, now: float, window: float) -> dict[SeriesKey, float]:
        """Per series, the increase over the window, summed over all targets."""
        total: dict[SeriesKey, float] = {}
        usable = 0
        for target in self.targets:
            samples = list(target.samples)
            if len(samples) < 2:
                continue
            start = 0
            for i, (t, _) in enumerate(samples):
                if t <= now - window:
                    start = i
            if start >= len(samples) - 1:
                continue
            usable += 1
            for (_, before), (_, after) in zip(samples[start:], samples[start + 1:], strict=False):
                for key, value in after.items():
                    prev = before.get(key, 0.0)
                    total[key] = total.get(key, 0.0) + (value - prev if value >= prev else value)
        if not usable:
            errors = "; ".join(f"{t.address}: {t.last_error}" for t in self.targets if t.last_error)
            raise NoData("fewer than two scrapes of any sidecar yet" + (f" ({errors})" if errors else ""))
        return total

    def value(self, check: MetricCheck, canary: Canary, now: float) -> float:
        if check.template is not None or check.query:
            raise MetricError(f"metric {check.name!r} needs PromQL: run with --prometheus URL")
        inc = self.increases(now, check.interval)
        if check.name == "request-success-rate":
            total = ok = 0.0
            for (name, labels), value in inc.items():
                if name != REQUESTS:
                    continue
                total += value
                if not dict(labels).get("response_code", "").startswith("5"):
                    ok += value
            if total <= 0:
                raise NoData(f"no requests to the canary subset in the last {check.interval_text}")
            return ok / total * 100.0
        buckets: dict[float, float] = {}
        for (name, labels), value in inc.items():
            if name == DURATION_BUCKET:
                le = float(dict(labels).get("le", "nan"))
                buckets[le] = buckets.get(le, 0.0) + value
        result = histogram_quantile(QUANTILE, buckets)
        if math.isnan(result):
            raise NoData(f"no requests to the canary subset in the last {check.interval_text}")
        return result


def histogram_quantile(q: float, buckets: Mapping[float, float]) -> float:
    """Prometheus's histogram_quantile over cumulative bucket counts by upper
    bound (promql/quantile.go): linear interpolation inside the bucket the
    rank falls in, 0 as the lower bound of the first bucket, and the upper
    bound of the highest finite bucket when the rank falls in +Inf. NaN when
    there is no +Inf bucket or no observation."""
    if math.isnan(q) or q < 0 or q > 1:
        return math.nan if math.isnan(q) else (-math.inf if q < 0 else math.inf)
    bounds = sorted(b for b in buckets if not math.isnan(b))
    if not bounds or bounds[-1] != math.inf or len(bounds) < 2:
        return math.nan
    counts = [buckets[b] for b in bounds]
    # Prometheus makes the counts monotonic first (float noise across series).
    for i in range(1, len(counts)):
        counts[i] = max(counts[i], counts[i - 1])
    total = counts[-1]
    if total <= 0:
        return math.nan
    rank = q * total
    b = next(i for i, c in enumerate(counts) if c >= rank)
    if b == len(bounds) - 1:
        return bounds[-2]
    if b == 0 and bounds[0] <= 0:
        return bounds[0]
    start = 0.0 if b == 0 else bounds[b - 1]
    below = 0.0 if b == 0 else counts[b - 1]
    in_bucket = counts[b] - below
    if in_bucket <= 0:
        return bounds[b]
    return start + (bounds[b] - start) * ((rank - below) / in_bucket)
