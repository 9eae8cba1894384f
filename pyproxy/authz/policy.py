"""AuthorizationPolicy evaluation: Envoy's RBAC filters as istiod builds
them, compiled once per snapshot into plain predicates.

Order (``istio: pilot/pkg/security/authz/builder/builder.go``; reference
page "Authorization Policy"): AUDIT never changes the decision; a matching
DENY policy denies; with no ALLOW policy for the workload the request is
allowed; otherwise some ALLOW policy must match. A rule matches when any of
its sources (or none given), any of its operations (or none given) and all of
its conditions match; inside a source or operation the fields are ANDed,
the values of a field ORed, and ``notX`` values must all miss.

String values have Istio's forms: exact ``abc``, prefix ``abc*``, suffix
``*abc`` and presence ``*`` (non-empty); ``hosts`` compare case-insensitively;
``paths`` accept ``{*}``/``{**}`` templates. Identity fields follow
``istio: pilot/pkg/security/authz/model`` (principals compared with
``spiffe://`` in front, namespaces as ``.*/ns/<ns>/.*`` on the principal), so a
plaintext peer (no principal) matches no ``principals`` value and every
``notPrincipals`` value.

Policies with the ``istio.io/dry-run: "true"`` annotation run as Envoy's
shadow rules: evaluated and counted, never enforced.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..config._security import claim_path, header_name
from ..config.model import AuthorizationPolicy, AuthzCondition, AuthzOperation, AuthzRule, AuthzSource
from .jwt import Identity, claim_strings

ALLOW = "ALLOW"
DENY = "DENY"
AUDIT = "AUDIT"


@dataclass(slots=True)
class Request:
    """What a policy can look at, gathered once per checked request."""

    method: str
    path: str  # normalised, without the query
    host: str  # :authority as sent (with any port)
    port: int  # destination (workload) port
    headers: Mapping[bytes, bytes]  # duplicates joined with ","
    source_ip: str = ""  # the direct peer
    remote_ip: str = ""  # the original client (XFF with trusted proxies), else the peer
    destination_ip: str = ""
    principal: str = ""  # peer certificate identity ("spiffe://..."), "" for plaintext
    sni: str = ""
    jwt: Identity | None = None


Predicate = Callable[[Request], bool]


# -- string forms ------------------------------------------------------------------


def string_matcher(value: str, *, ignore_case: bool = False) -> Callable[[str], bool]:
    """Istio's exact / prefix ``x*`` / suffix ``*x`` / presence ``*``."""
    if value == "*":
        return bool  # present and non-empty
    if ignore_case:
        value = value.lower()
    if value.endswith("*"):
        prefix = value[:-1]
        if ignore_case:
            return lambda s: s.lower().startswith(prefix)
        return lambda s: s.startswith(prefix)
    if value.startswith("*"):
        suffix = value[1:]
        if ignore_case:
            return lambda s: s.lower().endswith(suffix)
        return lambda s: s.endswith(suffix)
    if ignore_case:
        return lambda s: s.lower() == value
    return lambda s: s == value


def path_matcher(value: str) -> Callable[[str], bool]:
    if "{" in value:
        parts = []
        segments = value.split("/")
        for segment in segments:
            if segment == "{*}":
                parts.append("[^/]+")
            elif segment == "{**}":
                # Zero or more segments: "/a/{**}" matches "/a/" and "/a/b/c".
                parts.append(".*")
            else:
                parts.append(re.escape(segment))
        rx = re.compile("/".join(parts))
        return lambda s: rx.fullmatch(s) is not None
    return string_matcher(value)


def principal_matcher(value: str) -> Callable[[str], bool]:
    """``principals`` / ``source.principal``: compared with ``spiffe://`` in
    front; ``*`` means any authenticated peer."""
    if value == "*":
        return bool
    if value.endswith("*"):
        prefix = "spiffe://" + value[:-1]
        return lambda s: s.startswith(prefix)
    if value.startswith("*"):
        suffix = value[1:]
        return lambda s: s.startswith("spiffe://") and s.endswith(suffix)
    exact = "spiffe://" + value
    return lambda s: s == exact


def namespace_matcher(value: str) -> Callable[[str], bool]:
    """``namespaces``: regex ``.*/ns/<ns>/.*`` on the principal, each ``*`` → ``.*``."""
    rx = re.compile(".*/ns/" + ".*".join(re.escape(p) for p in value.split("*")) + "/.*")
    return lambda s: bool(s) and rx.fullmatch(s) is not None


def service_account_matcher(value: str, policy_namespace: str) -> Callable[[str], bool]:
    ns, _, sa = value.rpartition("/")
    ns = ns or policy_namespace
    rx = re.compile(f"spiffe://.+/ns/{re.escape(ns)}/(.+/|)sa/{re.escape(sa)}(/.+)?")
    return lambda s: bool(s) and rx.fullmatch(s) is not None


def trust_domain_matcher(value: str) -> Callable[[str], bool]:
    match = string_matcher(value)
    return lambda s: s.startswith("spiffe://") and match(s[9:].partition("/")[0])


def ip_matcher(value: str) -> Callable[[str], bool]:
    net = ipaddress.ip_network(value, strict=False)

    def match(s: str) -> bool:
        if not s:
            return False
        try:
            return ipaddress.ip_address(s) in net
        except ValueError:
            return False

    return match


def port_matcher(value: str) -> Callable[[int], bool]:
    port = int(value)
    return lambda p: p == port


# -- fields ------------------------------------------------------------------------


def _field(values: tuple[str, ...], not_values: tuple[str, ...], make: Callable[[str], Callable[[Any], bool]],
           get: Callable[[Request], Any]) -> Predicate | None:
    """One field and its notX twin: any value matches AND no not-value matches.
    (Plain loops, not any() over generators: this runs per request.)"""
    if not values and not not_values:
        return None
    pos = tuple(make(v) for v in values)
    neg = tuple(make(v) for v in not_values)

    def check(req: Request) -> bool:
        x = get(req)
        if pos:
            for m in pos:
                if m(x):
                    break
            else:
                return False
        for m in neg:
            if m(x):
                return False
        return True

    return check


def _multi(values: tuple[str, ...], not_values: tuple[str, ...], make: Callable[[str], Callable[[str], bool]],
           get: Callable[[Request], tuple[str, ...]]) -> Predicate | None:
    """Like _field for attributes with several values (a list claim, the
    token's audiences): a value matches if it matches any of them."""
    if not values and not not_values:
        return None
    pos = tuple(make(v) for v in values)
    neg = tuple(make(v) for v in not_values)

    def check(req: Request) -> bool:
        xs = get(req)
        if pos and not any(m(x) for m in pos for x in xs):
            return False
        return not any(m(x) for m in neg for x in xs)

    return check


def _jwt_principal(req: Request) -> str:
    return req.jwt.principal if req.jwt is not None and req.jwt.issuer and req.jwt.subject else ""


def _request_principal_matcher(value: str) -> Callable[[str], bool]:
    # "*" needs a token with a non-empty iss and sub (requestPrincipalGenerator).
    return bool if value == "*" else string_matcher(value)


def _header(name: bytes) -> Callable[[Request], str]:
    return lambda req: req.headers.get(name, b"").decode("latin-1")


def _all(preds: Iterable[Predicate | None]) -> Predicate:
    checks = tuple(p for p in preds if p is not None)
    if not checks:
        return lambda req: True
    if len(checks) == 1:
        return checks[0]

    def every(req: Request) -> bool:
        for p in checks:
            if not p(req):
                return False
        return True

    return every


def _any(preds: Iterable[Predicate]) -> Predicate:
    checks = tuple(preds)
    if not checks:
        return lambda req: True  # not given: anything
    if len(checks) == 1:
        return checks[0]

    def some(req: Request) -> bool:
        for p in checks:
            if p(req):
                return True
        return False

    return some


def compile_source(src: AuthzSource, namespace: str) -> Predicate:
    return _all((
        _field(src.principals, src.not_principals, principal_matcher, lambda r: r.principal),
        _field(src.request_principals, src.not_request_principals, _request_principal_matcher, _jwt_principal),
        _field(src.namespaces, src.not_namespaces, namespace_matcher, lambda r: r.principal),
        _field(src.service_accounts, src.not_service_accounts,
               lambda v: service_account_matcher(v, namespace), lambda r: r.principal),
        _field(src.ip_blocks, src.not_ip_blocks, ip_matcher, lambda r: r.source_ip),
        _field(src.remote_ip_blocks, src.not_remote_ip_blocks, ip_matcher, lambda r: r.remote_ip),
    ))


def compile_operation(op: AuthzOperation) -> Predicate:
    return _all((
        _field(op.hosts, op.not_hosts, lambda v: string_matcher(v, ignore_case=True), lambda r: r.host),
        _field(op.ports, op.not_ports, port_matcher, lambda r: r.port),
        _field(op.methods, op.not_methods, string_matcher, lambda r: r.method),
        _field(op.paths, op.not_paths, path_matcher, lambda r: r.path),
    ))


def compile_condition(cond: AuthzCondition, namespace: str) -> Predicate:
    key, values, not_values = cond.key, cond.values, cond.not_values
    pred: Predicate | None
    if key.startswith("request.headers["):
        name = header_name(key).lower().encode("latin-1")
        pred = _field(values, not_values, string_matcher, _header(name))
    elif key.startswith("request.auth.claims["):
        path = claim_path(key)
        pred = _multi(values, not_values, string_matcher,
                      lambda r: claim_strings(r.jwt.claims, path) if r.jwt is not None else ())
    else:
        simple: dict[str, tuple[Callable[[str], Callable[[Any], bool]], Callable[[Request], Any]]] = {
            "source.ip": (ip_matcher, lambda r: r.source_ip),
            "remote.ip": (ip_matcher, lambda r: r.remote_ip),
            "destination.ip": (ip_matcher, lambda r: r.destination_ip),
            "destination.port": (port_matcher, lambda r: r.port),
            "source.principal": (principal_matcher, lambda r: r.principal),
            "source.namespace": (namespace_matcher, lambda r: r.principal),
            "source.serviceAccount": (lambda v: service_account_matcher(v, namespace), lambda r: r.principal),
            "source.trustDomain": (trust_domain_matcher, lambda r: r.principal),
            "request.auth.principal": (_request_principal_matcher, _jwt_principal),
            "request.auth.presenter": (string_matcher, lambda r: r.jwt.presenter if r.jwt is not None else ""),
            "connection.sni": (string_matcher, lambda r: r.sni),
        }
        if key == "request.auth.audiences":
            pred = _multi(values, not_values, string_matcher,
                          lambda r: r.jwt.audiences if r.jwt is not None else ())
        else:
            make, get = simple[key]  # the loader refused any other key
            pred = _field(values, not_values, make, get)
    assert pred is not None  # the loader requires values or notValues
    return pred


def compile_rule(rule: AuthzRule, namespace: str) -> Predicate:
    return _all((
        _any(compile_source(s, namespace) for s in rule.sources) if rule.sources else None,
        _any(compile_operation(o) for o in rule.operations) if rule.operations else None,
        *(compile_condition(c, namespace) for c in rule.conditions),
    ))


# -- policies ----------------------------------------------------------------------


@dataclass(slots=True)
class CompiledPolicy:
    name: str  # "namespace/name"
    action: str
    dry_run: bool
    rules: tuple[Predicate, ...]

    def matches(self, req: Request) -> int:
        """The index of the first matching rule, or -1. No rules: never matches."""
        for i, rule in enumerate(self.rules):
            if rule(req):
                return i
        return -1


def compile_policy(policy: AuthorizationPolicy) -> CompiledPolicy:
    ns = policy.meta.namespace
    return CompiledPolicy(f"{ns}/{policy.meta.name}", policy.action, policy.dry_run,
                          tuple(compile_rule(r, ns) for r in policy.rules))


@dataclass(slots=True)
class Decision:
    allowed: bool
    policy: str  # the deciding policy ("ns/name"), "" when none decided
    # (policy, "shadow_allowed" | "shadow_denied") of dry-run policies, and
    # (policy, "audit") of matching AUDIT policies.
    shadow: list[tuple[str, str]] = field(default_factory=list)

    @property
    def effective_policy(self) -> str:
        """Envoy's response detail names the matched policy or "none"."""
        return self.policy or "none"


class Engine:
    """The AuthorizationPolicies that apply to one proxy."""

    __slots__ = ("allow", "audit", "deny", "shadow_allow", "shadow_deny")

    def __init__(self, policies: Iterable[AuthorizationPolicy]) -> None:
        compiled = [compile_policy(p) for p in policies]
        self.deny = tuple(p for p in compiled if p.action == DENY and not p.dry_run)
        self.allow = tuple(p for p in compiled if p.action == ALLOW and not p.dry_run)
        self.audit = tuple(p for p in compiled if p.action == AUDIT)
        self.shadow_deny = tuple(p for p in compiled if p.action == DENY and p.dry_run)
        self.shadow_allow = tuple(p for p in compiled if p.action == ALLOW and p.dry_run)

    def __bool__(self) -> bool:
        return bool(self.deny or self.allow or self.audit or self.shadow_deny or self.shadow_allow)

    def check(self, req: Request) -> Decision:
        decision = self._enforced(req)
        if self.audit or self.shadow_deny or self.shadow_allow:
            self._shadow(req, decision.shadow)
        return decision

    def _enforced(self, req: Request) -> Decision:
        for p in self.deny:
            if p.matches(req) >= 0:
                return Decision(False, p.name)
        if not self.allow:
            return Decision(True, "")
        for p in self.allow:
            if p.matches(req) >= 0:
                return Decision(True, p.name)
        return Decision(False, "")

    def _shadow(self, req: Request, out: list[tuple[str, str]]) -> None:
        for p in self.audit:
            if p.matches(req) >= 0:
                out.append((p.name, "audit"))
        for p in self.shadow_deny:
            out.append((p.name, "shadow_denied" if p.matches(req) >= 0 else "shadow_allowed"))
        if self.shadow_allow:
            matched = [p for p in self.shadow_allow if p.matches(req) >= 0]
            if matched:
                out.extend((p.name, "shadow_allowed") for p in matched)
            else:
                out.extend((p.name, "shadow_denied") for p in self.shadow_allow)


def applies(selector: tuple[tuple[str, str], ...] | None, namespace: str, proxy_namespace: str,
            labels: Mapping[str, str], root_namespace: str) -> bool:
    """Scope: the proxy's namespace, or the root namespace (mesh-wide), with
    the selector (if any) matching the proxy's labels."""
    if namespace != proxy_namespace and namespace != root_namespace:
        return False
    return selector is None or all(labels.get(k) == v for k, v in selector)
