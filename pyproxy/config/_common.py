"""Parsers for Istio messages shared by several kinds (internal to the loader)."""

from __future__ import annotations

import functools
import re

import re2

from ._reader import Node, Report, describe, is_dns1123_label, message
from .model import Destination, HeaderOperations, Headers, StringMatch

PERCENT = message("Percent", "value")
STRING_MATCH = message("StringMatch", "exact prefix regex")
PORT_SELECTOR = message("PortSelector", "number")
DESTINATION = message("Destination", "host subset port", port=PORT_SELECTOR)
REGEX_REWRITE = message("RegexRewrite", "match rewrite")
# Gateway servers and Sidecar ingress listeners; pyproxy serves no TLS there.
# credentialNames and tlsCertificates (several certificates per server) are
# the newest additions to the message.
TLS_CERTIFICATE = message("ServerTLSSettings.TLSCertificate", "", "serverCertificate privateKey caCertificates")
SERVER_TLS = message(
    "ServerTLSSettings",
    "",
    "httpsRedirect mode serverCertificate privateKey caCertificates caCrl credentialName credentialNames "
    "tlsCertificates subjectAltNames verifyCertificateSpki verifyCertificateHash minProtocolVersion "
    "maxProtocolVersion cipherSuites",
    tlsCertificates=TLS_CERTIFICATE,
)
HEADERS = message("Headers", "request response")
HEADER_OPERATIONS = message("Headers.HeaderOperations", "set add remove")
# Two WorkloadSelector messages exist: networking's (``labels``: Sidecar,
# ServiceEntry) and istio.type's (``matchLabels``: DestinationRule).
SELECTOR_LABELS = message("WorkloadSelector", "labels")
SELECTOR_MATCH_LABELS = message("WorkloadSelector", "matchLabels")

# Istio's header-name rule (pkg/config/validation): letters, digits, '-' and '_'.
HEADER_NAME = re.compile(r"[-_A-Za-z0-9]+")
# Envoy rejects control characters (other than tab) in header values.
_BAD_HEADER_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# Istio caps regexes at 1024 characters (an approximation of Envoy's RE2 program size limit).
MAX_REGEX_LENGTH = 1024

_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # RE2 would otherwise log every bad pattern to stderr


@functools.lru_cache(maxsize=4096)
def regex_problem(pattern: str) -> str | None:
    """Why RE2 (the engine Istio/Envoy use) rejects ``pattern``, or None."""
    if not pattern:
        return "regex must not be empty"
    if len(pattern) > MAX_REGEX_LENGTH:
        return f"regex is too long ({len(pattern)} characters, Istio allows {MAX_REGEX_LENGTH})"
    try:
        re2.compile(pattern, _RE2_OPTIONS)
    except Exception as exc:  # noqa: BLE001 - re2's error type is private (re2._re2.Error)
        detail = exc.args[0] if exc.args else exc
        if isinstance(detail, bytes):
            detail = detail.decode("utf-8", "replace")
        return f"invalid RE2 regex: {detail}"
    return None


def percent(parent: Node, key: str, *, fault: bool = False) -> float | None:
    """An Istio ``Percent`` (``{value: 12.5}``). Fault percentages also refuse
    tiny non-zero values, which Envoy cannot represent (Istio's rule)."""
    node = parent.child(key, PERCENT)
    if node is None:
        return None
    value = node.number("value")
    if value is None:
        return 0.0 if not node.has("value") else None
    if not 0.0 <= value <= 100.0:
        node.error("value", "must be between 0 and 100")
        return None
    if fault and 0.0 < value < 0.0001:
        node.error("value", "must be 0 or at least 0.0001")
        return None
    return value


def string_match(
    rep: Report, path: str, value: object, *, empty_prefix_ok: bool = False, presence_ok: bool = True
) -> StringMatch | None:
    """An Istio ``StringMatch``: at most one of exact/prefix/regex; ``{}`` means
    "present" (the header or parameter must exist, any value)."""
    if not isinstance(value, dict):
        rep.error(path, f"must be a mapping with one of exact, prefix or regex, got {describe(value)}")
        return None
    node = Node(rep, path, value, STRING_MATCH)
    kinds = [k for k in ("exact", "prefix", "regex") if node.has(k)]
    if len(kinds) > 1:
        rep.error(path, f"only one of exact, prefix or regex may be set, got {', '.join(kinds)}")
        return None
    if not kinds:
        if not presence_ok:
            rep.error(path, "one of exact, prefix or regex is required")
            return None
        return StringMatch("present")
    kind = kinds[0]
    text = node.string(kind)
    if text is None:
        return None
    if kind == "prefix" and not text and not empty_prefix_ok:
        node.error(kind, "must not be empty")
        return None
    if kind == "regex":
        problem = regex_problem(text)
        if problem:
            node.error(kind, problem)
            return None
    return StringMatch(kind, text)  # type: ignore[arg-type]


def destination(node: Node) -> Destination:
    """An Istio ``Destination``; problems are reported, a placeholder is returned."""
    host = node.string("host", required=True, nonempty=True) or ""
    if host == "*":
        node.error("host", "must not be '*' (a destination must name one service)")
    subset = node.string("subset") or ""
    if subset and not is_dns1123_label(subset):
        node.error("subset", f"{subset!r} is not a valid subset name (must be a DNS-1123 label)")
    port = port_selector(node, "port")
    return Destination(host=host, subset=subset, port=port)


def port_selector(parent: Node, key: str) -> int | None:
    value = parent.get(key)
    if isinstance(value, int) and not isinstance(value, bool):
        parent.error(key, f"must be a mapping like {{number: {value}}}, got {describe(value)}")
        return None
    node = parent.child(key, PORT_SELECTOR)
    if node is None:
        return None
    return node.integer("number", lo=1, hi=65535, required=True)


def header_ops(parent: Node, key: str, *, request: bool) -> HeaderOperations | None:
    """One side of Istio's ``Headers``. Header names are lowercased, as Envoy does."""
    node = parent.child(key, HEADER_OPERATIONS)
    if node is None:
        return None
    ops = {}
    for op in ("set", "add"):
        pairs = []
        for name, value in node.string_map(op):
            path = node.at(f"{op}.{name}")
            if _header_name_ok(node.rep, path, name, request=request, modify=True):
                pairs.append((name.lower(), value))
            if _BAD_HEADER_VALUE.search(value):
                node.rep.error(path, "header value must not contain control characters")
        ops[op] = tuple(pairs)
    removed = []
    for path, item in node.items("remove"):
        if not isinstance(item, str):
            node.rep.error(path, f"must be a string, got {describe(item)}")
        elif _header_name_ok(node.rep, path, item, request=request, modify=False):
            removed.append(item.lower())
    return HeaderOperations(set=ops["set"], add=ops["add"], remove=tuple(removed))


def _header_name_ok(rep: Report, path: str, name: str, *, request: bool, modify: bool) -> bool:
    # Istio lets request set/add rewrite the authority (":authority" or "host"),
    # and refuses every other pseudo-header and Host manipulation.
    lowered = name.lower()
    if not name:
        rep.error(path, "header name must not be empty")
        return False
    if request and modify and lowered in (":authority", "host"):
        return True
    if lowered.startswith(":"):
        rep.error(path, f"header {name!r} cannot be modified (pseudo-headers starting with ':')")
        return False
    if lowered == "host":
        rep.error(path, "the Host header cannot be modified here (use rewrite.authority)")
        return False
    if not HEADER_NAME.fullmatch(name):
        rep.error(path, f"{name!r} is not a valid header name")
        return False
    return True


def headers(parent: Node, key: str) -> Headers | None:
    node = parent.child(key, HEADERS)
    if node is None:
        return None
    request = header_ops(node, "request", request=True)
    response = header_ops(node, "response", request=False)
    if request is None and response is None:
        return None
    return Headers(request=request, response=response)


def export_to(parent: Node) -> tuple[str, ...]:
    """``exportTo``: parsed and checked like Istio, but it has no effect in pyproxy."""
    values = parent.strings("exportTo")
    if not values:
        return ()
    if len(set(values)) != len(values):
        parent.error("exportTo", "duplicate entries")
    if "*" in values and len(values) > 1:
        parent.error("exportTo", "'*' (all namespaces) cannot be combined with other entries")
    parent.warn(
        "exportTo",
        "parsed, but namespace visibility is not implemented by pyproxy: it has no effect",
    )
    return values


def selector_labels(parent: Node, key: str, *, match_labels: bool) -> tuple[tuple[str, str], ...] | None:
    """A workload selector; Istio refuses wildcards and warns when it has no labels."""
    msg = SELECTOR_MATCH_LABELS if match_labels else SELECTOR_LABELS
    field = "matchLabels" if match_labels else "labels"
    node = parent.child(key, msg)
    if node is None:
        return None
    labels = node.string_map(field)
    for name, value in labels:
        if not name:
            node.error(field, "empty label names are not allowed in a selector")
        if "*" in name or "*" in value:
            node.error(f"{field}.{name}", "wildcards are not supported in a selector")
    if not labels:
        node.warn(field, "selector without labels: it selects every workload in the namespace")
    return labels
