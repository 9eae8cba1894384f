"""AuthorizationPolicy and RequestAuthentication parsing and validation
(internal to the loader).

Field lists follow istio/api security/v1beta1/authorization_policy.proto and
request_authentication.proto / jwt.proto (the same messages serve
security.istio.io/v1). The checks are Istio's validation
(pkg/config/validation: ValidateAuthorizationPolicy,
ValidateRequestAuthentication; pkg/config/security: ValidateAttribute,
ValidateIPs, ValidatePorts, CheckValidPathTemplate), so a document Istio would
refuse at apply time is an error here, with its field path.
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

from . import _common as c
from ._reader import Node, Report, message
from .model import (
    AuthorizationPolicy,
    AuthzCondition,
    AuthzOperation,
    AuthzRule,
    AuthzSource,
    ClaimToHeader,
    JWTHeader,
    JWTRule,
    Meta,
    RequestAuthentication,
)

TARGET_REF = message("PolicyTargetReference", "group kind name namespace")
AUTHORIZATION_POLICY = message("AuthorizationPolicy", "selector rules action provider targetRef targetRefs")
RULE = message("Rule", "from to when")
FROM = message("Rule.From", "source")
TO = message("Rule.To", "operation")
SOURCE_FIELDS = (
    "principals notPrincipals requestPrincipals notRequestPrincipals namespaces notNamespaces "
    "serviceAccounts notServiceAccounts ipBlocks notIpBlocks remoteIpBlocks notRemoteIpBlocks"
)
OPERATION_FIELDS = "hosts notHosts ports notPorts methods notMethods paths notPaths"
SOURCE = message("Source", SOURCE_FIELDS)
OPERATION = message("Operation", OPERATION_FIELDS)
CONDITION = message("Condition", "key values notValues")
PROVIDER = message("ExtensionProvider", "name")

REQUEST_AUTHENTICATION = message("RequestAuthentication", "selector jwtRules targetRef targetRefs")
JWT_RULE = message(
    "JWTRule",
    "issuer audiences jwksUri jwks fromHeaders fromParams fromCookies outputPayloadToHeader "
    "forwardOriginalToken outputClaimToHeaders timeout spaceDelimitedClaims",
)
JWT_HEADER = message("JWTHeader", "name prefix")
CLAIM_TO_HEADER = message("ClaimToHeader", "header claim")

ACTIONS = ("ALLOW", "DENY", "AUDIT", "CUSTOM")
DRY_RUN = "istio.io/dry-run"
# strconv.ParseBool, which Istio uses for the dry-run annotation.
_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})

# `when` keys (istio pilot/pkg/security/authz/model/model.go; reference page
# "Authorization Policy Conditions"). Keys with a [name] part are matched by prefix.
PLAIN_KEYS = frozenset({
    "source.ip", "remote.ip", "source.namespace", "source.principal", "source.serviceAccount",
    "source.trustDomain", "request.auth.principal", "request.auth.audiences", "request.auth.presenter",
    "destination.ip", "destination.port", "connection.sni",
})
IP_KEYS = frozenset({"source.ip", "remote.ip", "destination.ip"})
_HEADER_KEY = re.compile(r"request\.headers\[([^\[\]]+)\]")
# request.auth.claims[a] or nested request.auth.claims[a][b]...
_CLAIM_KEY = re.compile(r"request\.auth\.claims((?:\[[^\[\]]+\])+)")
_SEGMENT = re.compile(r"\[([^\[\]]+)\]")
# An Istio outputClaimToHeaders header name (validation: letters, digits, '-', '_').
_HEADER_NAME = re.compile(r"[-_A-Za-z0-9]+")


def _targeted(spec: Node) -> bool:
    """targetRef(s) bind a policy to a Kubernetes Gateway or a waypoint's
    Service, never to a sidecar; pyproxy serves neither, so such a policy
    applies to no pyproxy proxy (warned, not treated as namespace-wide)."""
    refs = spec.children("targetRefs", TARGET_REF)
    ref = spec.child("targetRef", TARGET_REF)
    if ref is None and not refs:
        return False
    if spec.has("selector"):
        spec.error("selector", "only one of selector or targetRef(s) can be set")
    spec.warn("targetRefs" if refs else "targetRef",
              "policies attached with targetRef(s) apply to Kubernetes Gateways and waypoints, not to "
              "pyproxy sidecars or --gateway proxies; this policy applies to no pyproxy proxy")
    return True


def parse_authorization_policy(meta: Meta, spec: Node) -> AuthorizationPolicy:
    targeted = _targeted(spec)
    selector = c.selector_labels(spec, "selector", match_labels=True)
    action = spec.enum("action", ACTIONS) or "ALLOW"
    if action == "CUSTOM":
        # Refused, not warned: CUSTOM hands the decision to an ext_authz
        # server pyproxy does not call. Loading the policy without it would
        # let through every request the provider was meant to check (fail
        # open); refusing keeps the previous config in force instead.
        spec.error("action", "CUSTOM (ext_authz provider) is not supported by pyproxy; the policy would be "
                             "unenforced, so it is refused rather than failing open")
    if spec.has("provider"):
        provider = spec.child("provider", PROVIDER)
        if action != "CUSTOM":
            spec.error("provider", "is only allowed with action CUSTOM")
        elif provider is not None:
            provider.string("name", required=True, nonempty=True)
    rules = tuple(r for r in (_rule(spec.rep, node) for node in spec.children("rules", RULE)) if r is not None)
    return AuthorizationPolicy(meta=meta, selector=selector, action=action, rules=rules,
                               dry_run=_dry_run(spec.rep, meta), targeted=targeted)


def _dry_run(rep: Report, meta: Meta) -> bool:
    value = dict(meta.annotations).get(DRY_RUN)
    if value is None:
        return False
    if value in _TRUE:
        return True
    if value not in _FALSE:
        rep.error(f"metadata.annotations.{DRY_RUN}", f"must be \"true\" or \"false\", got {value!r}")
    return False


def _rule(rep: Report, node: Node) -> AuthzRule | None:
    before = len(rep.errors)
    sources = []
    if node.has("from") and node.get("from") == []:
        node.error("from", "must not be empty (omit it to match any source)")
    for f in node.children("from", FROM):
        src = f.child("source", SOURCE)
        if src is None:
            f.error("source", "is required")
            continue
        sources.append(_source(src))
    operations = []
    if node.has("to") and node.get("to") == []:
        node.error("to", "must not be empty (omit it to match any operation)")
    for t in node.children("to", TO):
        op = t.child("operation", OPERATION)
        if op is None:
            t.error("operation", "is required")
            continue
        operations.append(_operation(op))
    conditions = [cond for cond in (_condition(n) for n in node.children("when", CONDITION)) if cond is not None]
    if len(rep.errors) != before:
        return None
    return AuthzRule(tuple(sources), tuple(operations), tuple(conditions))


def _values(node: Node, key: str) -> tuple[str, ...]:
    values = node.strings(key)
    for i, value in enumerate(values):
        if not value:
            node.rep.error(f"{node.at(key)}[{i}]", "must not be empty")
    return values


def _source(node: Node) -> AuthzSource:
    fields = {name: _values(node, name) for name in SOURCE.parsed}
    if not any(fields.values()):
        node.rep.error(node.path, "must set at least one field (an empty source is refused by Istio)")
    for name in ("ipBlocks", "notIpBlocks", "remoteIpBlocks", "notRemoteIpBlocks"):
        _check_ips(node, name, fields[name])
    accounts = fields["serviceAccounts"] + fields["notServiceAccounts"]
    if accounts:
        if any(fields[k] for k in ("principals", "notPrincipals", "namespaces", "notNamespaces")):
            node.rep.error(node.path, "serviceAccounts cannot be combined with principals or namespaces")
        for name in ("serviceAccounts", "notServiceAccounts"):
            for i, value in enumerate(fields[name]):
                if "*" in value or value.count("/") > 1:
                    node.rep.error(f"{node.at(name)}[{i}]",
                                   "must be SERVICE_ACCOUNT or NAMESPACE/SERVICE_ACCOUNT, without wildcards")
    for name in ("principals", "notPrincipals", "requestPrincipals", "notRequestPrincipals"):
        _check_wildcards(node, name, fields[name])
    return AuthzSource(
        principals=fields["principals"], not_principals=fields["notPrincipals"],
        request_principals=fields["requestPrincipals"], not_request_principals=fields["notRequestPrincipals"],
        namespaces=fields["namespaces"], not_namespaces=fields["notNamespaces"],
        service_accounts=fields["serviceAccounts"], not_service_accounts=fields["notServiceAccounts"],
        ip_blocks=fields["ipBlocks"], not_ip_blocks=fields["notIpBlocks"],
        remote_ip_blocks=fields["remoteIpBlocks"], not_remote_ip_blocks=fields["notRemoteIpBlocks"],
    )


def _operation(node: Node) -> AuthzOperation:
    fields = {name: _values(node, name) for name in OPERATION.parsed}
    if not any(fields.values()):
        node.rep.error(node.path, "must set at least one field (an empty operation is refused by Istio)")
    for name in ("ports", "notPorts"):
        _check_ports(node, name, fields[name])
    for name in ("paths", "notPaths"):
        for i, path in enumerate(fields[name]):
            problem = path_template_problem(path)
            if problem:
                node.rep.error(f"{node.at(name)}[{i}]", problem)
    for name in ("hosts", "notHosts", "methods", "notMethods"):
        _check_wildcards(node, name, fields[name])
    return AuthzOperation(
        hosts=fields["hosts"], not_hosts=fields["notHosts"], ports=fields["ports"], not_ports=fields["notPorts"],
        methods=fields["methods"], not_methods=fields["notMethods"], paths=fields["paths"],
        not_paths=fields["notPaths"],
    )


def _check_wildcards(node: Node, name: str, values: tuple[str, ...]) -> None:
    # Istio's string forms: exact, "x*", "*x", "*". A "*" anywhere else would
    # be compared literally by Envoy, which is never what the author meant.
    for i, value in enumerate(values):
        if value != "*" and "*" in value[1:-1]:
            node.rep.error(f"{node.at(name)}[{i}]",
                           f"{value!r}: '*' is only supported at the start or the end of a value")
        elif value.startswith("*") and value.endswith("*") and value != "*":
            node.rep.error(f"{node.at(name)}[{i}]", f"{value!r}: use either a prefix or a suffix wildcard, not both")


def _check_ips(node: Node, name: str, values: tuple[str, ...]) -> None:
    for i, value in enumerate(values):
        problem = ip_problem(value)
        if problem:
            node.rep.error(f"{node.at(name)}[{i}]", problem)


def _check_ports(node: Node, name: str, values: tuple[str, ...]) -> None:
    for i, value in enumerate(values):
        problem = port_problem(value)
        if problem:
            node.rep.error(f"{node.at(name)}[{i}]", problem)


def ip_problem(value: str) -> str | None:
    try:
        if "/" in value:
            ipaddress.ip_network(value, strict=False)
        else:
            ipaddress.ip_address(value)
    except ValueError:
        return f"{value!r} is not an IP address or CIDR block"
    return None


def port_problem(value: str) -> str | None:
    if not value.isdigit() or not value.isascii() or int(value) > 65535:
        return f"{value!r} is not a port number (0-65535)"
    return None


def path_template_problem(path: str) -> str | None:
    """Istio's CheckValidPathTemplate: ``{*}`` matches one segment, ``{**}``
    any number of segments and must be the last; both must be whole segments
    and cannot be mixed with the ``*`` prefix/suffix forms."""
    if "{" not in path and "}" not in path:
        return None
    if path.startswith("*") or path.endswith("*"):
        return f"{path!r}: a path template cannot be combined with a '*' prefix or suffix wildcard"
    segments = path.split("/")
    for i, segment in enumerate(segments):
        if "{" not in segment and "}" not in segment:
            if "*" in segment:
                return f"{path!r}: '*' inside a path template must be written {{*}} or {{**}}"
            continue
        if segment not in ("{*}", "{**}"):
            return f"{path!r}: only whole-segment {{*}} and {{**}} templates are supported, got {segment!r}"
        if segment == "{**}" and i != len(segments) - 1:
            return f"{path!r}: {{**}} must be the last segment"
    return None


def condition_problem(key: str) -> str | None:
    if key in PLAIN_KEYS:
        return None
    if key.startswith("request.headers"):
        return None if _HEADER_KEY.fullmatch(key) else f"{key!r}: must have the form request.headers[NAME]"
    if key.startswith("request.auth.claims"):
        return None if _CLAIM_KEY.fullmatch(key) else (
            f"{key!r}: must have the form request.auth.claims[NAME] (nested: [NAME][NAME])")
    if key.startswith("experimental.envoy.filters."):
        return f"{key!r}: Envoy filter metadata conditions are not supported by pyproxy"
    return f"unknown attribute {key!r} (see Istio's authorization policy conditions)"


def claim_path(key: str) -> tuple[str, ...]:
    """``request.auth.claims[a][b]`` → ``("a", "b")``."""
    m = _CLAIM_KEY.fullmatch(key)
    return tuple(_SEGMENT.findall(m.group(1))) if m else ()


def header_name(key: str) -> str:
    m = _HEADER_KEY.fullmatch(key)
    return m.group(1) if m else ""


def _condition(node: Node) -> AuthzCondition | None:
    key = node.string("key", required=True, nonempty=True)
    values = _values(node, "values")
    not_values = _values(node, "notValues")
    if key is None:
        return None
    problem = condition_problem(key)
    if problem:
        node.error("key", problem)
        return None
    if not values and not not_values:
        node.rep.error(node.path, f"at least one of values or notValues must be set for key {key}")
        return None
    for name, vals in (("values", values), ("notValues", not_values)):
        if key in IP_KEYS:
            _check_ips(node, name, vals)
        elif key == "destination.port":
            _check_ports(node, name, vals)
    return AuthzCondition(key, values, not_values)


# -- RequestAuthentication --------------------------------------------------------


def parse_request_authentication(meta: Meta, spec: Node) -> RequestAuthentication:
    targeted = _targeted(spec)
    selector = c.selector_labels(spec, "selector", match_labels=True)
    rules = []
    issuers: dict[str, str] = {}
    for node in spec.children("jwtRules", JWT_RULE):
        rule = _jwt_rule(node)
        if rule is None:
            continue
        if rule.issuer in issuers:
            # Istio: "jwtRule[i]: issuer X is duplicated".
            node.error("issuer", f"{rule.issuer!r} is already used by {issuers[rule.issuer]}")
            continue
        issuers[rule.issuer] = node.path
        rules.append(rule)
    return RequestAuthentication(meta=meta, selector=selector, jwt_rules=tuple(rules), targeted=targeted)


def _jwt_rule(node: Node) -> JWTRule | None:
    rep = node.rep
    before = len(rep.errors)
    issuer = node.string("issuer", required=True, nonempty=True)
    audiences = _values(node, "audiences")
    jwks_uri = node.string("jwksUri") or ""
    if jwks_uri:
        parts = urlsplit(jwks_uri)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            node.error("jwksUri", f"{jwks_uri!r} is not an http:// or https:// URL")
    jwks = node.string("jwks") or ""
    if jwks:
        problem = jwks_problem(jwks)
        if problem:
            node.error("jwks", problem)
    if jwks and jwks_uri:
        node.warn("jwksUri", "both jwks and jwksUri are set: the inline jwks is used, as Istio does")
    headers = []
    for h in node.children("fromHeaders", JWT_HEADER):
        name = h.string("name", required=True, nonempty=True)
        prefix = h.string("prefix") or ""
        if name is not None:
            headers.append(JWTHeader(name.lower(), prefix))
    params = _values(node, "fromParams")
    cookies = _values(node, "fromCookies")
    payload_header = node.string("outputPayloadToHeader") or ""
    if payload_header and not _HEADER_NAME.fullmatch(payload_header):
        node.error("outputPayloadToHeader", f"{payload_header!r} is not a valid header name")
    claims = []
    for ch in node.children("outputClaimToHeaders", CLAIM_TO_HEADER):
        header = ch.string("header", required=True, nonempty=True)
        claim = ch.string("claim", required=True, nonempty=True)
        if header is not None and not _HEADER_NAME.fullmatch(header):
            ch.error("header", f"{header!r} is not a valid header name")
        elif header is not None and claim is not None:
            claims.append(ClaimToHeader(header.lower(), claim))
    timeout = node.duration("timeout")
    space = _values(node, "spaceDelimitedClaims")
    if issuer is None or len(rep.errors) != before:
        return None
    return JWTRule(
        issuer=issuer, audiences=audiences, jwks_uri=jwks_uri, jwks=jwks, from_headers=tuple(headers),
        from_params=params, from_cookies=cookies, output_payload_to_header=payload_header.lower(),
        forward_original_token=node.boolean("forwardOriginalToken") or False,
        output_claim_to_headers=tuple(claims), timeout=timeout, space_delimited_claims=space,
    )


def jwks_problem(text: str) -> str | None:
    """Why an inline JWKS is unusable (Envoy's wording), or None: every key must load."""
    from ..authz.jwt import load_jwks  # the JWT module owns key parsing

    try:
        load_jwks(text)
    except ValueError as exc:
        return str(exc)
    return None
