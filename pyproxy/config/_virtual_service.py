"""VirtualService parsing and validation (internal to the loader).

Field lists follow istio/api networking/v1/virtual_service.proto; the checks
follow Istio's validation webhook (pkg/config/validation), so a file Istio
would reject is reported here with the offending field's path.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from http import HTTPStatus

import re2

from . import _common as c
from ._reader import INT32_MAX, Node, Report, is_dns1123_label, message
from .model import (
    CorsPolicy,
    Destination,
    FaultAbort,
    FaultDelay,
    Headers,
    HTTPDirectResponse,
    HTTPFaultInjection,
    HTTPMatchRequest,
    HTTPMirrorPolicy,
    HTTPRedirect,
    HTTPRetry,
    HTTPRewrite,
    HTTPRoute,
    HTTPRouteDestination,
    Meta,
    RegexRewrite,
    StringMatch,
    VirtualService,
)

# TLS and TCP routes are not served by pyproxy; their fields are still checked.
L4_ROUTE_DESTINATION = message("RouteDestination", "", "destination weight", destination=c.DESTINATION)
L4_MATCH = message(
    "L4MatchAttributes", "", "destinationSubnets port sourceSubnet sourceLabels gateways sourceNamespace"
)
TLS_MATCH = message(
    "TLSMatchAttributes", "", "sniHosts destinationSubnets port sourceLabels gateways sourceNamespace"
)
TCP_ROUTE = message("TCPRoute", "", "match route", match=L4_MATCH, route=L4_ROUTE_DESTINATION)
TLS_ROUTE = message("TLSRoute", "", "match route", match=TLS_MATCH, route=L4_ROUTE_DESTINATION)
VIRTUAL_SERVICE = message(
    "VirtualService", "hosts gateways http exportTo", ignored="tls tcp", tls=TLS_ROUTE, tcp=TCP_ROUTE
)
# mirror_percent (snake case) is in Istio's schema: the old name of mirrorPercent.
HTTP_ROUTE = message(
    "HTTPRoute",
    "name match route redirect directResponse delegate rewrite timeout retries fault mirror mirrors "
    "mirrorPercent mirrorPercentage corsPolicy headers",
    ignored="mirror_percent",
)
HTTP_MATCH = message(
    "HTTPMatchRequest",
    "name uri scheme method authority headers withoutHeaders queryParams port sourceLabels gateways "
    "ignoreUriCase sourceNamespace",
    ignored="statPrefix",
)
ROUTE_DESTINATION = message("HTTPRouteDestination", "destination weight headers")
# prefixRewrite: Istio's since 1.31 (istio/api#3708, istio/istio#60385), Envoy's
# RedirectAction.prefix_rewrite.
REDIRECT = message("HTTPRedirect", "uri authority port derivePort scheme redirectCode prefixRewrite")
DIRECT_RESPONSE = message("HTTPDirectResponse", "status body")
HTTP_BODY = message("HTTPBody", "string bytes")
DELEGATE = message("Delegate", "name namespace")
REWRITE = message("HTTPRewrite", "uri authority uriRegexRewrite")
REGEX_REWRITE = c.REGEX_REWRITE
# backoff and retryIgnorePreviousHosts exist since Istio 1.26.
RETRY = message(
    "HTTPRetry", "attempts perTryTimeout retryOn retryRemoteLocalities retryIgnorePreviousHosts backoff"
)
FAULT = message("HTTPFaultInjection", "delay abort")
DELAY = message("HTTPFaultInjection.Delay", "fixedDelay percentage percent", ignored="exponentialDelay")
# Abort's integer "percent" was removed from Istio; old files still use it.
ABORT = message("HTTPFaultInjection.Abort", "httpStatus grpcStatus http2Error percentage percent")
MIRROR_POLICY = message("HTTPMirrorPolicy", "destination percentage")
CORS = message(
    "CorsPolicy",
    "allowOrigin allowOrigins allowMethods allowHeaders exposeHeaders maxAge allowCredentials "
    "unmatchedPreflights",
)

MAX_BODY = 1024 * 1024  # Istio refuses direct response bodies over 1 MiB ...
WARN_BODY = 100 * 1024  # ... and warns above 100 KiB.

# Retry conditions Envoy understands (x-envoy-retry-on and x-envoy-retry-grpc-on);
# Istio also accepts any HTTP status code.
RETRY_ON = frozenset(
    [
        "5xx",
        "gateway-error",
        "reset",
        "reset-before-request",
        "connect-failure",
        "retriable-4xx",
        "refused-stream",
        "retriable-status-codes",
        "retriable-headers",
        "envoy-ratelimited",
        "http3-post-connect-failure",
        "cancelled",
        "deadline-exceeded",
        "internal",
        "resource-exhausted",
        "unavailable",
    ]
)
GRPC_STATUS = frozenset(
    [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ]
)
CORS_METHODS = frozenset(["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "CONNECT", "OPTIONS", "TRACE"])
_HTTP_STATUSES = frozenset(int(s) for s in HTTPStatus)


@dataclass(slots=True)
class _Context:
    rep: Report
    source: str  # "file#N", for HTTPRoute.origin
    applies_to_mesh: bool
    applies_to_gateway: bool


def parse_virtual_service(meta: Meta, spec: Node) -> VirtualService:
    rep = spec.rep
    hosts = spec.strings("hosts")
    gateways = spec.strings("gateways")
    # Bound only to gateways: sidecars ignore it and say so (snapshot.py); a
    # gateway proxy, for which it is meant, does not.
    applies_to_mesh = not gateways or "mesh" in gateways
    _check_hosts(spec, hosts, applies_to_mesh)
    if not any(spec.get(k) for k in ("http", "tcp", "tls")):
        spec.rep.error(spec.path, "one of http, tcp or tls must be provided")
    ctx = _Context(rep, str(meta.source), applies_to_mesh, any(g != "mesh" for g in gateways))
    routes = [(node.path, _http_route(ctx, node)) for node in spec.children("http", HTTP_ROUTE)]
    kept = [(path, route) for path, route in routes if route is not None]
    _warn_unreachable(rep, kept)
    return VirtualService(
        meta=meta,
        hosts=hosts,
        gateways=gateways,
        http=tuple(route for _, route in kept),
        export_to=c.export_to(spec),
    )


def _check_hosts(spec: Node, hosts: tuple[str, ...], applies_to_mesh: bool) -> None:
    if not hosts and spec.get("hosts") is None:
        spec.warn(
            "hosts",
            "no hosts: this is a delegate VirtualService, and delegation is not implemented by "
            "pyproxy, so it has no effect",
        )
    seen: set[str] = set()
    for i, host in enumerate(hosts):
        path = f"{spec.at('hosts')}[{i}]"
        if not host:
            spec.rep.error(path, "must not be empty")
        elif host == "*" and applies_to_mesh:
            spec.rep.error(path, "wildcard host '*' is not allowed for VirtualServices bound to the mesh")
        elif host in seen:
            spec.rep.error(path, f"duplicate host {host!r}")
        seen.add(host)


def _warn_unreachable(rep: Report, routes: list[tuple[str, HTTPRoute]]) -> None:
    # Like Istio's analysis: a rule without match conditions matches every
    # request, so no rule after it can ever be selected.
    catch_all = next((i for i, (_, route) in enumerate(routes) if not route.match), None)
    if catch_all is None:
        return
    first = routes[catch_all][0]
    for path, _ in routes[catch_all + 1 :]:
        rep.warn(path, f"rule is unreachable: {first} has no match conditions and catches every request")


def _http_route(ctx: _Context, node: Node) -> HTTPRoute | None:
    rep = ctx.rep
    matches = tuple(_match(ctx, m) for m in node.children("match", HTTP_MATCH))
    errors_before = len(rep.errors)
    route = tuple(_route_destination(d) for d in node.children("route", ROUTE_DESTINATION))
    if len(rep.errors) == errors_before:  # a bad weight already explains a zero total
        _check_weights(node, route)
    redirect = _redirect(node)
    if redirect is not None and redirect.prefix_rewrite is not None and any(
            m.uri is not None and m.uri.kind != "prefix" for m in matches):
        # Istio's validation: the matched prefix is what gets replaced.
        node.error("redirect.prefixRewrite", "prefixRewrite needs every uri match of the rule to be a prefix match")
    direct = _direct_response(node)
    rewrite = _rewrite(node)
    fault = _fault(node)
    headers = c.headers(node, "headers")
    _check_authority(node, rewrite, headers)
    _check_conflicts(node)
    result = HTTPRoute(
        name=node.string("name") or "",
        match=matches,
        route=route,
        redirect=redirect,
        direct_response=direct,
        rewrite=rewrite,
        timeout=node.duration("timeout"),
        retries=_retries(node),
        fault=fault,
        mirrors=_mirrors(node),
        cors_policy=_cors(node),
        headers=headers,
        origin=f"{ctx.source} {node.path}",
    )
    if node.has("delegate"):
        _delegate(node)
        return None  # pyproxy cannot route it: leave it out rather than half-apply it
    return result


def _delegate(parent: Node) -> None:
    node = parent.child("delegate", DELEGATE)
    if node is not None:
        node.string("name", required=True, nonempty=True)
        node.string("namespace")
    parent.warn("delegate", "delegation is not implemented by pyproxy; this rule is ignored")


def _check_conflicts(node: Node) -> None:
    """Istio's rules on which actions a rule may combine."""
    has = {k: node.has(k) for k in ("route", "redirect", "directResponse", "delegate", "fault", "rewrite")}
    has["route"] = bool(node.get("route"))
    error = node.rep.error
    if has["delegate"]:
        for other in ("route", "redirect"):
            if has[other]:
                error(node.path, f"delegate and {other} cannot both be set")
    elif has["redirect"]:
        for other in ("route", "fault", "rewrite", "directResponse"):
            if has[other]:
                error(node.path, f"redirect and {other} cannot both be set")
    elif has["directResponse"]:
        for other in ("route", "fault", "rewrite"):
            if has[other]:
                error(node.path, f"directResponse and {other} cannot both be set")
    elif not has["route"]:
        error(node.path, "one of route, redirect, directResponse or delegate is required")
    if node.has("mirror") and node.get("mirrors"):
        error(node.path, "mirror and mirrors cannot both be set")


# -- match ------------------------------------------------------------------


def _match(ctx: _Context, node: Node) -> HTTPMatchRequest:
    port = node.integer("port", lo=0, hi=65535) or None  # 0 means "any port", as in Istio
    namespace = node.string("sourceNamespace") or ""
    if namespace and not is_dns1123_label(namespace):
        node.error("sourceNamespace", f"{namespace!r} is not a valid namespace name")
    return HTTPMatchRequest(
        name=node.string("name") or "",
        uri=_single_match(node, "uri", empty_prefix_ok=True),
        scheme=_single_match(node, "scheme"),
        method=_single_match(node, "method"),
        authority=_single_match(node, "authority"),
        headers=_header_matches(ctx, node, "headers"),
        without_headers=_header_matches(ctx, node, "withoutHeaders"),
        claims=_claim_matches(ctx, node, "headers"),
        without_claims=_claim_matches(ctx, node, "withoutHeaders"),
        query_params=_query_params(node),
        port=port,
        source_labels=node.string_map("sourceLabels"),
        source_namespace=namespace,
        gateways=node.strings("gateways"),
        ignore_uri_case=node.boolean("ignoreUriCase") or False,
    )


def _single_match(node: Node, key: str, *, empty_prefix_ok: bool = False) -> StringMatch | None:
    value = node.get(key)
    if value is None:
        return None
    return c.string_match(node.rep, node.at(key), value, empty_prefix_ok=empty_prefix_ok)


CLAIM_PREFIX = "@request.auth.claims"
_CLAIM_BRACKETS = re.compile(r"(?:\[[^\[\]]+\])+")


def claim_route_path(name: str) -> tuple[str, ...] | None:
    """``@request.auth.claims.a.b`` or ``@request.auth.claims[a][b]`` → ``("a", "b")``
    (istio pkg/jwt/routing.go ToRoutingClaim); None when malformed."""
    rest = name[len(CLAIM_PREFIX):]
    if rest.startswith(".") and len(rest) > 1:
        parts = tuple(rest[1:].split("."))
        return parts if all(parts) else None
    if _CLAIM_BRACKETS.fullmatch(rest):
        return tuple(re.findall(r"\[([^\[\]]+)\]", rest))
    return None


def _claim_matches(ctx: _Context, node: Node, key: str) -> tuple[tuple[tuple[str, ...], StringMatch], ...]:
    """JWT claim based routing: Istio's validation refuses it on a
    VirtualService bound to no gateway; the claims are those of the token
    jwt_authn verified (the snapshot decides what a sidecar makes of them)."""
    result = []
    for path, name, value in node.entries(key):
        if not name.startswith(CLAIM_PREFIX) or value is None:
            continue
        if not ctx.applies_to_gateway:
            node.rep.error(path, "JWT claim based routing is only supported for gateways (this VirtualService "
                                 "is bound to no gateway)")
            continue
        claim = claim_route_path(name)
        if claim is None:
            node.rep.error(path, f"{name!r}: expected @request.auth.claims.NAME[.NESTED] or "
                                 "@request.auth.claims[NAME][NESTED]")
            continue
        match = c.string_match(node.rep, path, value)
        if match is not None:
            result.append((claim, match))
    return tuple(result)


def _header_matches(ctx: _Context, node: Node, key: str) -> tuple[tuple[str, StringMatch], ...]:
    result = []
    for path, name, value in node.entries(key):
        if value is None:
            node.rep.error(path, "must not be null (use {} to require that the header is present)")
            continue
        if name.startswith(CLAIM_PREFIX):
            continue  # _claim_matches
        if not c.HEADER_NAME.fullmatch(name):
            node.rep.error(path, f"{name!r} is not a valid header name")
            continue
        if name != name.lower():
            node.rep.warn(
                path,
                "header names in matches must be lowercase in Istio's API; matched as "
                f"{name.lower()!r} (header names are case-insensitive)",
            )
        if key == "withoutHeaders" and isinstance(value, dict) and value.get("regex") == "*":
            # Istio's special case: regex "*" in withoutHeaders means "header present".
            Node(node.rep, path, value, c.STRING_MATCH)
            result.append((name.lower(), StringMatch("present")))
            continue
        match = c.string_match(node.rep, path, value)
        if match is not None:
            result.append((name.lower(), match))
    return tuple(result)


def _query_params(node: Node) -> tuple[tuple[str, StringMatch], ...]:
    result = []
    for path, name, value in node.entries("queryParams"):
        match = c.string_match(node.rep, path, value)
        if match is not None:
            result.append((name, match))
    return tuple(result)


# -- route destinations -----------------------------------------------------


def _route_destination(node: Node) -> HTTPRouteDestination:
    dest_node = node.child("destination", c.DESTINATION, required=True)
    dest = c.destination(dest_node) if dest_node is not None else Destination(host="")
    weight = node.integer("weight", lo=0, hi=INT32_MAX)
    return HTTPRouteDestination(
        destination=dest,
        weight=weight or 0,
        weight_set=node.get("weight") is not None,
        headers=c.headers(node, "headers"),
    )


def _check_weights(node: Node, route: tuple[HTTPRouteDestination, ...]) -> None:
    # A single destination takes all traffic whatever its weight; with several,
    # Istio refuses an all-zero split (unset weights count as 0).
    if len(route) > 1 and sum(d.weight for d in route) == 0:
        node.error("route", "total weight is 0: with several destinations, at least one needs a weight > 0")


# -- redirect, direct response, rewrite ---------------------------------------


def _redirect(parent: Node) -> HTTPRedirect | None:
    node = parent.child("redirect", REDIRECT)
    if node is None:
        return None
    uri = node.string("uri")
    prefix = node.string("prefixRewrite")
    if node.has("prefixRewrite") and node.has("uri"):
        node.error("prefixRewrite", "uri and prefixRewrite cannot both be set")
    port = node.integer("port", lo=0, hi=65535) or None  # 0 means "keep the port"
    derive = node.enum("derivePort", ("FROM_PROTOCOL_DEFAULT", "FROM_REQUEST_PORT"))
    if node.has("port") and node.has("derivePort"):
        node.rep.error(node.path, "port and derivePort cannot both be set")
    scheme = node.string("scheme")
    if scheme is not None and scheme not in ("http", "https"):
        node.error("scheme", f"must be 'http' or 'https', got {scheme!r}")
        scheme = None
    code = node.integer("redirectCode", lo=0, hi=None)
    if code and not 300 <= code <= 399:
        node.error("redirectCode", "must be a 3xx status code")
        code = None
    targets = ("uri", "authority", "port", "derivePort", "scheme", "prefixRewrite")
    if not any(node.has(k) for k in targets):
        node.rep.error(
            node.path, "redirect must set at least one of uri, authority, scheme, port or derivePort"
        )
    return HTTPRedirect(
        uri=uri,
        authority=node.string("authority"),
        port=port,
        derive_port=derive,
        scheme=scheme,
        redirect_code=code or 301,
        prefix_rewrite=prefix,
    )


def _direct_response(parent: Node) -> HTTPDirectResponse | None:
    node = parent.child("directResponse", DIRECT_RESPONSE)
    if node is None:
        return None
    status = node.integer("status", lo=200, hi=599, required=True)
    body = _body(node)
    return HTTPDirectResponse(status=status or 200, body=body)


def _body(parent: Node) -> bytes | None:
    node = parent.child("body", HTTP_BODY)
    if node is None:
        return None
    if node.has("string") and node.has("bytes"):
        node.rep.error(node.path, "only one of string or bytes may be set")
        return None
    if node.has("bytes"):
        body = _base64(node, "bytes")
    else:
        text = node.string("string")
        body = text.encode("utf-8", "surrogatepass") if text is not None else None
    if body is None:
        return None
    if len(body) > MAX_BODY:
        node.rep.error(node.path, "body must be at most 1 MiB")
        return None
    if len(body) > WARN_BODY:
        node.rep.warn(node.path, "large direct response bodies (over 100 KiB) are discouraged by Istio")
    return body


def _base64(node: Node, key: str) -> bytes | None:
    value = node.get(key)
    if isinstance(value, bytes):  # YAML !!binary
        return value
    text = node.string(key)
    if text is None:
        return None
    # Protobuf's JSON mapping accepts standard and URL-safe base64, padded or not.
    normalized = text.strip().replace("-", "+").replace("_", "/")
    normalized += "=" * (-len(normalized) % 4)
    try:
        return base64.b64decode(normalized, validate=True)
    except (binascii.Error, ValueError):
        node.error(key, "must be base64-encoded")
        return None


def _rewrite(parent: Node) -> HTTPRewrite | None:
    node = parent.child("rewrite", REWRITE)
    if node is None:
        return None
    uri = node.string("uri")
    regex = _regex_rewrite(node)
    if node.has("uri") and node.has("uriRegexRewrite"):
        node.rep.error(node.path, "only one of uri or uriRegexRewrite may be set")
    if not any(node.has(k) for k in ("uri", "authority", "uriRegexRewrite")):
        node.rep.error(node.path, "rewrite must set at least one of uri, uriRegexRewrite or authority")
    return HTTPRewrite(uri=uri, authority=node.string("authority"), uri_regex_rewrite=regex)


def _regex_rewrite(parent: Node) -> RegexRewrite | None:
    node = parent.child("uriRegexRewrite", REGEX_REWRITE)
    if node is None:
        return None
    match = node.string("match", required=True, nonempty=True)
    rewrite = node.string("rewrite", required=True, nonempty=True)
    if match:
        problem = c.regex_problem(match)
        if problem:
            node.error("match", problem)
            return None
    if match is None or rewrite is None:
        return None
    problem = _rewrite_problem(match, rewrite)
    if problem:
        # Envoy checks the substitution with RE2 and would reject the route.
        node.error("rewrite", problem)
        return None
    return RegexRewrite(match=match, rewrite=rewrite)


def _rewrite_problem(match: str, rewrite: str) -> str | None:
    """Why RE2 rejects ``rewrite`` as a substitution for ``match``: only \\0-\\9
    (up to the pattern's group count) and \\\\ may follow a backslash."""
    groups = re2.compile(match, c._RE2_OPTIONS).groups
    i = 0
    while i < len(rewrite):
        if rewrite[i] == "\\":
            nxt = rewrite[i + 1] if i + 1 < len(rewrite) else ""
            if nxt.isdigit():
                if int(nxt) > groups:
                    return f"\\{nxt} refers to a group the pattern does not have ({groups} group(s))"
            elif nxt != "\\":
                return f"invalid escape {rewrite[i:i + 2]!r} (only \\0-\\9 and \\\\ are allowed)"
            i += 2
            continue
        i += 1
    return None


def _check_authority(node: Node, rewrite: HTTPRewrite | None, headers: Headers | None) -> None:
    # Istio refuses to rewrite the authority in two places at once.
    if rewrite is None or rewrite.authority is None or headers is None or headers.request is None:
        return
    names = {name for name, _ in (*headers.request.set, *headers.request.add)}
    if names & {"host", ":authority"}:
        node.error("headers", "the authority is already rewritten by rewrite.authority")


# -- retries, fault injection -------------------------------------------------


def _retries(parent: Node) -> HTTPRetry | None:
    node = parent.child("retries", RETRY)
    if node is None:
        return None
    attempts = node.integer("attempts", lo=0) or 0
    per_try = node.duration("perTryTimeout")
    retry_on = node.string("retryOn")
    if retry_on is not None:
        _check_retry_on(node, retry_on)
    remote = node.boolean("retryRemoteLocalities")
    others = [k for k in ("perTryTimeout", "retryOn", "retryRemoteLocalities") if node.has(k)]
    if attempts == 0 and others:
        # Istio's rule: with 0 attempts (also the default) retries are off, so
        # any other retry setting is a mistake.
        node.error("attempts", f"is 0 or unset (retries disabled), but {', '.join(others)} is set")
    return HTTPRetry(
        attempts=attempts,
        per_try_timeout=per_try,
        retry_on=retry_on,
        retry_remote_localities=remote,
        retry_ignore_previous_hosts=node.boolean("retryIgnorePreviousHosts"),
        backoff=node.duration("backoff"),
    )


def _check_retry_on(node: Node, retry_on: str) -> None:
    for policy in retry_on.split(","):
        name = policy.strip()
        if name in RETRY_ON or (name.isdigit() and int(name) in _HTTP_STATUSES):
            continue
        node.error("retryOn", f"{name!r} is not a valid retry condition")


def _fault(parent: Node) -> HTTPFaultInjection | None:
    node = parent.child("fault", FAULT)
    if node is None:
        return None
    if not node.has("delay") and not node.has("abort"):
        node.rep.error(node.path, "fault injection must set delay and/or abort")
        return None
    delay = _delay(node)
    abort = _abort(node)
    if delay is None and abort is None:
        return None
    return HTTPFaultInjection(delay=delay, abort=abort)


def _fault_percentage(node: Node) -> float | None:
    # Unset means 0%: Istio documents that no request is delayed/aborted then.
    if node.has("percent") and node.has("percentage"):
        node.rep.error(node.path, "percent and percentage cannot both be set")
        return None
    if node.has("percent"):
        node.warn("percent", "deprecated: use percentage: {value: N}")
        value = node.integer("percent", lo=0, hi=100)
        return float(value) if value is not None else None
    return c.percent(node, "percentage", fault=True) if node.has("percentage") else 0.0


def _delay(parent: Node) -> FaultDelay | None:
    node = parent.child("delay", DELAY)
    if node is None:
        return None
    percentage = _fault_percentage(node)
    fixed = node.duration("fixedDelay")
    if not node.has("fixedDelay"):
        node.error("fixedDelay", "is required")
    if fixed is None or percentage is None:
        return None
    return FaultDelay(fixed_delay=fixed, percentage=percentage)


def _abort(parent: Node) -> FaultAbort | None:
    node = parent.child("abort", ABORT)
    if node is None:
        return None
    percentage = _fault_percentage(node)
    set_kinds = [k for k in ("httpStatus", "grpcStatus", "http2Error") if node.has(k)]
    if len(set_kinds) > 1:
        node.rep.error(
            node.path, f"only one of httpStatus or grpcStatus may be set, got {', '.join(set_kinds)}"
        )
        return None
    if node.has("http2Error"):
        node.error("http2Error", "HTTP/2 error aborts are not supported (Istio rejects them too)")
        return None
    status = node.integer("httpStatus", lo=200, hi=599)
    grpc = node.enum("grpcStatus", sorted(GRPC_STATUS))
    if not set_kinds:
        node.rep.warn(node.path, "abort without httpStatus or grpcStatus has no effect")
        return None
    if (status is None and grpc is None) or percentage is None:
        return None
    return FaultAbort(http_status=status, grpc_status=grpc, percentage=percentage)


# -- mirroring, CORS ----------------------------------------------------------


def _mirrors(node: Node) -> tuple[HTTPMirrorPolicy, ...]:
    """``mirror`` + ``mirrorPercentage``/``mirrorPercent`` and ``mirrors[]``,
    normalised into one list of mirror policies."""
    legacy_percentage = _legacy_mirror_percentage(node)
    result = []
    mirror = node.child("mirror", c.DESTINATION)
    if mirror is not None:
        result.append(HTTPMirrorPolicy(destination=c.destination(mirror), percentage=legacy_percentage))
    elif node.has("mirrorPercentage") or node.has("mirrorPercent"):
        key = "mirrorPercentage" if node.has("mirrorPercentage") else "mirrorPercent"
        node.warn(key, "has no effect without mirror")
    for policy in node.children("mirrors", MIRROR_POLICY):
        dest = policy.child("destination", c.DESTINATION, required=True)
        if dest is None:
            continue
        result.append(
            HTTPMirrorPolicy(destination=c.destination(dest), percentage=c.percent(policy, "percentage"))
        )
    return tuple(result)


def _legacy_mirror_percentage(node: Node) -> float | None:
    percentage = c.percent(node, "mirrorPercentage")
    if node.has("mirrorPercent"):
        node.warn("mirrorPercent", "deprecated: use mirrorPercentage: {value: N}")
        legacy = node.integer("mirrorPercent", lo=0, hi=100)
        if node.has("mirrorPercentage"):
            node.warn("mirrorPercent", "ignored because mirrorPercentage is set")
        elif legacy is not None:
            return float(legacy)
    return percentage


def _cors(parent: Node) -> CorsPolicy | None:
    node = parent.child("corsPolicy", CORS)
    if node is None:
        return None
    origins = []
    for path, value in node.items("allowOrigins"):
        match = c.string_match(node.rep, path, value, presence_ok=False)
        if match is not None:
            origins.append(match)
    if node.has("allowOrigin"):
        node.warn("allowOrigin", "deprecated: use allowOrigins")
        legacy = node.strings("allowOrigin")
        if node.has("allowOrigins"):
            node.warn("allowOrigin", "ignored because allowOrigins is set")
        else:
            # "*" allowed any origin; the other entries were exact origins.
            origins = [StringMatch("regex", ".*") if o == "*" else StringMatch("exact", o) for o in legacy]
    methods = node.strings("allowMethods")
    for i, method in enumerate(methods):
        if method not in CORS_METHODS:
            node.rep.error(f"{node.at('allowMethods')}[{i}]", f"{method!r} is not a supported HTTP method")
    max_age = node.duration("maxAge")
    if max_age is not None and max_age != int(max_age):
        node.error("maxAge", "must be a whole number of seconds")
        max_age = None
    unmatched = node.enum("unmatchedPreflights", ("UNSPECIFIED", "FORWARD", "IGNORE"))
    return CorsPolicy(
        allow_origins=tuple(origins),
        allow_methods=methods,
        allow_headers=_cors_headers(node, "allowHeaders"),
        expose_headers=_cors_headers(node, "exposeHeaders"),
        max_age=max_age,
        allow_credentials=node.boolean("allowCredentials"),
        unmatched_preflights="IGNORE" if unmatched == "IGNORE" else "FORWARD",
    )


def _cors_headers(node: Node, key: str) -> tuple[str, ...]:
    names = node.strings(key)
    for i, name in enumerate(names):
        if name != "*" and not c.HEADER_NAME.fullmatch(name):
            node.rep.error(f"{node.at(key)}[{i}]", f"{name!r} is not a valid header name")
    return names
