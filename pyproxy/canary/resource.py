"""Flagger's ``Canary`` and ``MetricTemplate`` (``flagger.app/v1beta1``) as frozen objects.

Field names and defaults follow Flagger's CRD (pkg/apis/flagger/v1beta1):
``analysis.interval`` defaults to 1m, ``threshold`` to 1, a metric's
``interval`` to 1m, ``maxWeight`` to 100 (or the last of ``stepWeights``),
a webhook's ``timeout`` to 10s. Loading never raises: every problem is a
:class:`~pyproxy.config.model.Diagnostic` located as ``FILE#N: path: message``.
A Flagger field pyproxy does not implement is a warning with its path (the
field is ignored); a field Flagger does not have is an error, as the
Kubernetes API server would reject it.

pyproxy has no Deployments: the canary is the DestinationRule subset named by
the annotation ``pyproxy.io/canary-subset`` (the new version) and the primary
the subset named by ``pyproxy.io/primary-subset``, both of the service host
``spec.service.name`` (default: ``spec.targetRef.name``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from typing import Literal

from ..config._reader import Message, Node, Report, describe, message
from ..config._yaml import read_documents
from ..config.loader import OBJECT, OBJECT_META
from ..config.model import Diagnostic, Pairs

API_VERSION = "flagger.app/v1beta1"
PRIMARY_SUBSET = "pyproxy.io/primary-subset"
CANARY_SUBSET = "pyproxy.io/canary-subset"

# Flagger's defaults (pkg/apis/flagger/v1beta1/canary.go).
DEFAULT_INTERVAL = 60.0
DEFAULT_METRIC_INTERVAL = 60.0
DEFAULT_WEBHOOK_TIMEOUT = 10.0
# Flagger raises any analysis interval below 10s to 10s (GetAnalysisInterval).
FLAGGER_MIN_INTERVAL = 10.0

BUILTIN_METRICS = ("request-success-rate", "request-duration")

HookType = Literal[
    "confirm-rollout", "pre-rollout", "rollout", "confirm-traffic-increase", "confirm-promotion",
    "post-rollout", "rollback",
]
HOOK_TYPES: tuple[str, ...] = (
    "confirm-rollout", "pre-rollout", "rollout", "confirm-traffic-increase", "confirm-promotion",
    "post-rollout", "rollback",
)
Strategy = Literal["canary", "ab", "bluegreen"]

NOT_SUPPORTED = "not implemented by pyproxy canary, ignored"

CANARY_SPEC = message(
    "CanarySpec",
    "targetRef service analysis canaryAnalysis skipAnalysis suspend provider",
    "metricsServer autoscalerRef ingressRef routeRef upstreamRef progressDeadlineSeconds revertOnDeletion",
)
TARGET_REF = message("LocalObjectReference", "apiVersion kind name")
CANARY_SERVICE = message(
    "CanaryService",
    "name port hosts gateways timeout retries headers corsPolicy rewrite",
    "portName targetPort appProtocol portDiscovery gatewayRefs delegation trafficPolicy match meshName "
    "backends apex primary canary",
)
ANALYSIS = message(
    "CanaryAnalysis",
    "interval iterations maxWeight stepWeight stepWeights threshold metrics webhooks match",
    "mirror mirrorWeight stepWeightPromotion primaryReadyThreshold canaryReadyThreshold alerts sessionAffinity",
)
METRIC = message("CanaryMetric", "name interval threshold thresholdRange query templateRef templateVariables")
THRESHOLD_RANGE = message("CanaryThresholdRange", "min max")
TEMPLATE_REF = message("CrossNamespaceObjectReference", "apiVersion kind name namespace")
WEBHOOK = message("CanaryWebhook", "type name url timeout metadata", "muteAlert")
TEMPLATE_SPEC = message("MetricTemplateSpec", "provider query")
PROVIDER = message("MetricTemplateProvider", "type address", "secretRef insecureSkipVerify region")


@dataclass(frozen=True, slots=True)
class ThresholdRange:
    min: float | None = None
    max: float | None = None

    def violation(self, value: float, unit: str = "") -> str | None:
        """Why ``value`` is outside the range (``98.69% < 99%``), or None when it is inside."""
        if self.min is not None and value < self.min:
            return f"{value:.2f}{unit} < {self.min:g}{unit}"
        if self.max is not None and value > self.max:
            return f"{value:.2f}{unit} > {self.max:g}{unit}"
        return None


@dataclass(frozen=True, slots=True)
class MetricCheck:
    name: str
    interval: float  # seconds: the window the metric is computed over
    interval_text: str  # as written (or Flagger's default "1m"): PromQL range
    threshold_range: ThresholdRange
    query: str = ""  # deprecated inline PromQL
    template: tuple[str, str] | None = None  # (namespace, name) of a MetricTemplate
    template_variables: Pairs = ()


@dataclass(frozen=True, slots=True)
class Webhook:
    name: str
    type: str
    url: str
    timeout: float
    metadata: Pairs = ()


@dataclass(frozen=True, slots=True)
class Analysis:
    interval: float
    threshold: int
    max_weight: int
    step_weight: int
    step_weights: tuple[int, ...]
    iterations: int
    match: tuple[dict, ...]  # Istio HTTPMatchRequest, as written (validated with the VirtualService)
    metrics: tuple[MetricCheck, ...]
    webhooks: tuple[Webhook, ...]

    @property
    def strategy(self) -> Strategy:
        # Flagger's order (scheduler.go advanceCanary): match + iterations is
        # A/B testing, iterations alone blue/green, otherwise weights.
        if self.match and self.iterations > 0:
            return "ab"
        if self.iterations > 0:
            return "bluegreen"
        return "canary"

    def hooks(self, kind: str) -> tuple[Webhook, ...]:
        return tuple(w for w in self.webhooks if w.type == kind)


@dataclass(frozen=True, slots=True)
class Canary:
    name: str
    namespace: str
    host: str  # the service: spec.service.name, else spec.targetRef.name
    target: str  # spec.targetRef.name (Flagger's {{ target }})
    port: int
    primary_subset: str
    canary_subset: str
    hosts: tuple[str, ...]
    gateways: tuple[str, ...]
    route_extras: tuple[tuple[str, object], ...]  # timeout/retries/headers/corsPolicy/rewrite, as written
    analysis: Analysis
    skip_analysis: bool
    suspend: bool
    checksum: str  # of the spec as written: Flagger's webhook payload "checksum"
    source: str  # FILE#N

    @property
    def key(self) -> str:
        return f"{self.namespace}.{self.name}"


@dataclass(frozen=True, slots=True)
class MetricTemplate:
    name: str
    namespace: str
    provider: str
    address: str
    query: str


@dataclass(frozen=True, slots=True)
class CanaryFile:
    canaries: tuple[Canary, ...]
    templates: tuple[MetricTemplate, ...]
    errors: tuple[Diagnostic, ...]
    warnings: tuple[Diagnostic, ...]

    def template(self, namespace: str, name: str) -> MetricTemplate | None:
        return next((t for t in self.templates if (t.namespace, t.name) == (namespace, name)), None)


class _FlaggerNode(Node):
    """A Node whose unknown fields are errors (the API server rejects them
    for Flagger's structural CRD schema) and whose unimplemented fields are
    warnings; children are FlaggerNodes too."""

    __slots__ = ()

    def _check_fields(self, msg: Message) -> None:
        for key, value in self.data.items():
            if not isinstance(key, str):
                self.rep.error(self.path, f"field names must be strings, got {describe(key)}")
            elif key in msg.parsed:
                continue
            elif key in msg.ignored:
                if value is not None:
                    self.rep.warn(self.at(key), NOT_SUPPORTED)
            else:
                self.rep.error(self.at(key), f"unknown field {key!r} in {msg.name}")

    def seconds(self, key: str, default: float) -> tuple[float, str]:
        text = self.get(key)
        value = self.duration(key)
        if value is None:
            return default, _go_duration(default)
        if value <= 0:
            self.error(key, "must be greater than 0")
            return default, _go_duration(default)
        return value, str(text)


def _go_duration(seconds: float) -> str:
    return f"{int(seconds // 60)}m" if seconds % 60 == 0 else f"{seconds:g}s"


# -------------------------------------------------------------------------- loading


def load_file(path: str) -> CanaryFile:
    """Read one file of Canary and MetricTemplate documents."""
    try:
        with open(path, encoding="utf-8-sig") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return CanaryFile((), (), (Diagnostic(path, None, "", f"cannot read file: {reason}"),), ())
    return load_text(text, path)


def load_text(text: str, file: str = "<string>") -> CanaryFile:
    documents, problems = read_documents(text, file)
    errors: list[Diagnostic] = list(problems)
    warnings: list[Diagnostic] = []
    canaries: list[Canary] = []
    templates: list[MetricTemplate] = []
    for document in documents:
        if document.data is None:
            continue
        rep = Report(file, document.index)
        try:
            obj = _load_object(rep, document.data)
        except Exception as exc:  # noqa: BLE001 - a loader bug must come out as a diagnostic, not a traceback
            rep.error("", f"internal error while loading this document: {type(exc).__name__}: {exc}")
            obj = None
        if obj is not None and not rep.errors:
            (canaries if isinstance(obj, Canary) else templates).append(obj)  # type: ignore[arg-type]
        errors.extend(rep.errors)
        warnings.extend(rep.warnings)
    seen: set[tuple[str, str, str]] = set()
    for kind, items in (("Canary", canaries), ("MetricTemplate", templates)):
        for item in items:
            key = (kind, item.namespace, item.name)
            if key in seen:
                errors.append(Diagnostic(file, None, "", f"{kind} {item.namespace}/{item.name} is defined twice"))
            seen.add(key)
    return CanaryFile(tuple(canaries), tuple(templates), tuple(errors), tuple(warnings))


def _load_object(rep: Report, data: object) -> Canary | MetricTemplate | None:
    if not isinstance(data, dict):
        rep.error("", f"a Kubernetes object must be a mapping, got {describe(data)}")
        return None
    top = _FlaggerNode(rep, "", data, OBJECT)
    kind = top.string("kind", required=True)
    api_version = top.string("apiVersion", required=True)
    if kind is not None and kind not in ("Canary", "MetricTemplate"):
        rep.error("kind", f"expected Canary or MetricTemplate ({API_VERSION}), got {kind!r}")
        return None
    if api_version is not None and api_version != API_VERSION:
        rep.error("apiVersion", f"expected {API_VERSION}, got {api_version!r}")
    md = Node(rep, "metadata", data["metadata"], OBJECT_META) if isinstance(data.get("metadata"), dict) else None
    if md is None:
        rep.error("metadata.name", "is required")
        return None
    name = md.string("name", required=True, nonempty=True)
    namespace = md.string("namespace") or "default"
    annotations = dict(md.string_map("annotations"))
    spec = top.child("spec", CANARY_SPEC if kind == "Canary" else TEMPLATE_SPEC, required=True)
    if spec is None or name is None or kind is None:
        return None
    if kind == "MetricTemplate":
        return _template(spec, name, namespace)
    return _canary(rep, spec, name, namespace, annotations, data)


def _template(spec: Node, name: str, namespace: str) -> MetricTemplate | None:
    provider = spec.child("provider", PROVIDER, required=True)
    query = spec.string("query", required=True, nonempty=True)
    if provider is None or query is None:
        return None
    kind = provider.string("type", required=True)
    if kind is not None and kind != "prometheus":
        provider.error("type", f"only provider type prometheus is supported by pyproxy canary, got {kind!r}")
        return None
    address = provider.string("address") or ""
    return MetricTemplate(name, namespace, "prometheus", address, query)


def _canary(rep: Report, spec: Node, name: str, namespace: str, annotations: dict[str, str],
            data: dict) -> Canary | None:
    primary = annotations.get(PRIMARY_SUBSET)
    canary = annotations.get(CANARY_SUBSET)
    for key, value in ((PRIMARY_SUBSET, primary), (CANARY_SUBSET, canary)):
        if not value:
            rep.error(f"metadata.annotations.{key}",
                      "is required: the DestinationRule subset of the " +
                      ("current (primary)" if key == PRIMARY_SUBSET else "new (canary)") + " version")
    if primary and canary and primary == canary:
        rep.error(f"metadata.annotations.{CANARY_SUBSET}", "must differ from the primary subset")
    provider = spec.string("provider")
    if provider is not None and provider != "istio":
        spec.error("provider", f"pyproxy speaks Istio's VirtualService only (provider istio), got {provider!r}")
    target_ref = spec.child("targetRef", TARGET_REF, required=True)
    target = target_ref.string("name", required=True, nonempty=True) if target_ref else None
    service = spec.child("service", CANARY_SERVICE, required=True)
    host = target
    port = 0
    hosts: tuple[str, ...] = ()
    gateways: tuple[str, ...] = ()
    extras: list[tuple[str, object]] = []
    if service is not None:
        host = service.string("name", nonempty=True) or target
        port = service.integer("port", lo=1, hi=65535, required=True) or 0
        hosts = service.strings("hosts")
        gateways = service.strings("gateways")
        for key in ("timeout", "retries", "headers", "corsPolicy", "rewrite"):
            if service.has(key):
                extras.append((key, service.get(key)))
    if spec.has("analysis") and spec.has("canaryAnalysis"):
        spec.error("canaryAnalysis", "deprecated alias of analysis; give only one of them")
    if spec.has("canaryAnalysis"):
        spec.warn("canaryAnalysis", "deprecated by Flagger: use analysis")
    analysis_node = spec.child("analysis" if spec.has("analysis") else "canaryAnalysis", ANALYSIS)
    skip = bool(spec.boolean("skipAnalysis"))
    suspend = bool(spec.boolean("suspend"))
    if analysis_node is None and not skip:
        spec.error("analysis", "is required (or skipAnalysis: true)")
    analysis = _analysis(analysis_node) if analysis_node is not None else _empty_analysis()
    if host is None or not primary or not canary or analysis is None or rep.errors:
        return None
    if not hosts:
        hosts = (host,)
    checksum = hashlib.sha256(json.dumps(data.get("spec"), sort_keys=True, default=str).encode()).hexdigest()[:16]
    return _fill_template_namespaces(
        Canary(name, namespace, host, target or host, port, primary, canary, hosts, gateways, tuple(extras),
               analysis, skip, suspend, checksum, f"{rep.file}#{rep.doc}"))


def _empty_analysis() -> Analysis:
    return Analysis(DEFAULT_INTERVAL, 1, 100, 0, (), 0, (), (), ())


def _analysis(node: Node) -> Analysis | None:
    assert isinstance(node, _FlaggerNode)
    interval, _ = node.seconds("interval", DEFAULT_INTERVAL)
    threshold = node.integer("threshold", lo=0) or 0
    iterations = node.integer("iterations", lo=0) or 0
    step_weight = node.integer("stepWeight", lo=0, hi=100) or 0
    max_weight = node.integer("maxWeight", lo=0, hi=100) or 0
    steps: list[int] = []
    for path, item in node.items("stepWeights"):
        if isinstance(item, bool) or not isinstance(item, int) or not 0 < item <= 100:
            node.rep.error(path, f"must be an integer between 1 and 100, got {describe(item)}")
        elif steps and item <= steps[-1]:
            node.rep.error(path, f"must be greater than the step before it ({steps[-1]})")
        else:
            steps.append(item)
    match = []
    for path, item in node.items("match"):
        if isinstance(item, dict):
            match.append(item)
        else:
            node.rep.error(path, f"must be a mapping, got {describe(item)}")
    if step_weight and steps:
        node.error("stepWeights", "give stepWeight or stepWeights, not both")
    if not iterations and not step_weight and not steps:
        node.error("stepWeight", "is required for a canary release (or stepWeights; iterations for A/B "
                                 "testing and blue/green)")
    if match and not iterations:
        node.error("iterations", "is required with match (A/B testing)")
    # Flagger's maxWeight (scheduler.go): the last step weight (at most 100),
    # else maxWeight, else 100.
    if steps:
        max_weight = min(100, steps[-1])
    elif max_weight == 0:
        max_weight = 100
    metrics = tuple(m for m in (_metric(n) for n in node.children("metrics", METRIC)) if m is not None)
    hooks = tuple(h for h in (_webhook(n) for n in node.children("webhooks", WEBHOOK)) if h is not None)
    names = [m.name for m in metrics]
    for i, n in enumerate(names):
        if n in names[:i]:
            node.rep.error(node.at(f"metrics[{i}].name"), f"metric {n!r} is listed twice")
    return Analysis(interval, max(threshold, 1), max_weight, step_weight, tuple(steps), iterations, tuple(match),
                    metrics, hooks)


def _metric(node: Node) -> MetricCheck | None:
    assert isinstance(node, _FlaggerNode)
    name = node.string("name", required=True, nonempty=True)
    interval, interval_text = node.seconds("interval", DEFAULT_METRIC_INTERVAL)
    rng_node = node.child("thresholdRange", THRESHOLD_RANGE)
    threshold = node.number("threshold")
    query = node.string("query") or ""
    ref = node.child("templateRef", TEMPLATE_REF)
    variables = node.string_map("templateVariables")
    if rng_node is not None:
        rng = ThresholdRange(rng_node.number("min"), rng_node.number("max"))
        if rng.min is None and rng.max is None:
            node.error("thresholdRange", "needs min or max")
        if threshold is not None:
            node.warn("threshold", "deprecated by Flagger and ignored when thresholdRange is set")
    elif threshold is not None:
        node.warn("threshold", "deprecated by Flagger: use thresholdRange")
        # Flagger's meaning of the deprecated field: a minimum success rate,
        # a maximum for everything else.
        rng = ThresholdRange(min=threshold) if name == "request-success-rate" else ThresholdRange(max=threshold)
    else:
        node.error("thresholdRange", "is required")
        rng = ThresholdRange()
    template = None
    if ref is not None:
        ref_name = ref.string("name", required=True, nonempty=True)
        kind = ref.string("kind")
        if kind is not None and kind != "MetricTemplate":
            ref.error("kind", f"must be MetricTemplate, got {kind!r}")
        if ref_name:
            template = (ref.string("namespace") or "", ref_name)  # "": the canary's namespace
    if name is None:
        return None
    sources = sum((name in BUILTIN_METRICS and not query and ref is None, bool(query), ref is not None))
    if sources == 0:
        node.error("name", f"{name!r} is not a built-in metric ({', '.join(BUILTIN_METRICS)}); "
                           "give templateRef (or query)")
    elif query and ref is not None:
        node.error("query", "give query or templateRef, not both")
    if query:
        node.warn("query", "deprecated by Flagger: use a MetricTemplate")
    return MetricCheck(name, interval, interval_text, rng, query, template, variables)


def _webhook(node: Node) -> Webhook | None:
    assert isinstance(node, _FlaggerNode)
    name = node.string("name", required=True, nonempty=True)
    kind = node.string("type") or "rollout"  # Flagger: an empty type is a rollout hook
    if kind == "event":
        node.warn("type", "event webhooks are not implemented by pyproxy canary; this hook is ignored")
        return None
    if kind not in HOOK_TYPES:
        node.error("type", f"must be one of {', '.join(HOOK_TYPES)}, got {kind!r}")
    url = node.string("url", required=True, nonempty=True)
    if url is not None and not url.startswith(("http://", "https://")):
        node.error("url", f"must be an http:// or https:// URL, got {url!r}")
    timeout, _ = node.seconds("timeout", DEFAULT_WEBHOOK_TIMEOUT)
    metadata = node.string_map("metadata")
    if name is None or url is None:
        return None
    return Webhook(name, kind, url, timeout, metadata)


def _fill_template_namespaces(canary: Canary) -> Canary:
    """templateRef without a namespace means the canary's namespace (Flagger)."""
    metrics = tuple(
        replace(m, template=(m.template[0] or canary.namespace, m.template[1])) if m.template else m
        for m in canary.analysis.metrics
    )
    return replace(canary, analysis=replace(canary.analysis, metrics=metrics))


def check_references(cf: CanaryFile, canary: Canary, prometheus: bool) -> list[str]:
    """Problems that make ``canary`` impossible to run with the given metric source."""
    problems = []
    for m in canary.analysis.metrics:
        if m.template is not None:
            if cf.template(*m.template) is None:
                problems.append(f"metric {m.name!r}: MetricTemplate {m.template[0]}/{m.template[1]} not found "
                                f"in the --canary file")
            elif not prometheus:
                problems.append(f"metric {m.name!r}: MetricTemplates need a Prometheus (--prometheus URL)")
        elif m.query and not prometheus:
            problems.append(f"metric {m.name!r}: an inline query needs a Prometheus (--prometheus URL)")
    return problems


def interval_seconds(canary: Canary, min_interval: float = FLAGGER_MIN_INTERVAL) -> float:
    """The analysis interval, raised to ``min_interval`` as Flagger raises it to 10s."""
    return max(canary.analysis.interval, min_interval)


__all__ = [
    "API_VERSION", "Analysis", "Canary", "CanaryFile", "MetricCheck", "MetricTemplate", "ThresholdRange",
    "Webhook", "check_references", "interval_seconds", "load_file", "load_text",
]
