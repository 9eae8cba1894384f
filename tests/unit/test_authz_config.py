"""AuthorizationPolicy and RequestAuthentication loading: typed objects and
Istio's validation as located diagnostics (config/_security.py)."""

from __future__ import annotations

import json
import textwrap

import pytest

from pyproxy.config.loader import load_text
from pyproxy.config.model import (
    AuthorizationPolicy,
    AuthzCondition,
    AuthzOperation,
    AuthzRule,
    AuthzSource,
    ClaimToHeader,
    JWTHeader,
    RequestAuthentication,
)

from .test_jwt import RSA_JWKS


def load(text: str):  # type: ignore[no-untyped-def]
    return load_text(textwrap.dedent(text), "t.yaml")


def errors(text: str) -> list[str]:
    return [str(e) for e in load(text).errors]


def ap(spec: str, version: str = "v1", annotations: str = "") -> str:
    return (f"apiVersion: security.istio.io/{version}\nkind: AuthorizationPolicy\n"
            f"metadata: {{name: p, namespace: ns{annotations}}}\nspec:\n" + textwrap.indent(textwrap.dedent(spec), "  "))


@pytest.mark.parametrize("version", ["v1", "v1beta1"])
def test_authorization_policy_every_field_parses(version: str) -> None:
    cfg = load(ap("""
        selector: {matchLabels: {app: reviews}}
        action: DENY
        rules:
        - from:
          - source:
              principals: [cluster.local/ns/a/sa/b]
              notPrincipals: ["*"]
              requestPrincipals: ["iss/sub"]
              notRequestPrincipals: ["*"]
              namespaces: [a]
              notNamespaces: [b]
              ipBlocks: [10.0.0.0/8]
              notIpBlocks: [10.1.0.0/16]
              remoteIpBlocks: [192.0.2.1]
              notRemoteIpBlocks: ["2001:db8::/32"]
          - source: {serviceAccounts: [ns/sa], notServiceAccounts: [other]}
          to:
          - operation:
              hosts: [a.example]
              notHosts: ["*.b"]
              ports: ["8080"]
              notPorts: ["9090"]
              methods: [GET]
              notMethods: [DELETE]
              paths: ["/api/{*}/x/{**}"]
              notPaths: ["/admin*"]
          when:
          - {key: "request.headers[x-a]", values: ["1"], notValues: ["2"]}
          - {key: "request.auth.claims[realm][role]", values: [admin]}
          - {key: destination.port, values: ["80"]}
        """, version))
    assert cfg.ok, [str(e) for e in cfg.errors]
    assert not cfg.warnings, [str(w) for w in cfg.warnings]
    (policy,) = cfg.resources
    assert isinstance(policy, AuthorizationPolicy)
    assert policy.selector == (("app", "reviews"),)
    assert policy.action == "DENY" and not policy.dry_run
    assert policy.rules == (AuthzRule(
        sources=(AuthzSource(principals=("cluster.local/ns/a/sa/b",), not_principals=("*",),
                             request_principals=("iss/sub",), not_request_principals=("*",),
                             namespaces=("a",), not_namespaces=("b",), ip_blocks=("10.0.0.0/8",),
                             not_ip_blocks=("10.1.0.0/16",), remote_ip_blocks=("192.0.2.1",),
                             not_remote_ip_blocks=("2001:db8::/32",)),
                 AuthzSource(service_accounts=("ns/sa",), not_service_accounts=("other",))),
        operations=(AuthzOperation(hosts=("a.example",), not_hosts=("*.b",), ports=("8080",), not_ports=("9090",),
                                   methods=("GET",), not_methods=("DELETE",), paths=("/api/{*}/x/{**}",),
                                   not_paths=("/admin*",)),),
        conditions=(AuthzCondition("request.headers[x-a]", ("1",), ("2",)),
                    AuthzCondition("request.auth.claims[realm][role]", ("admin",)),
                    AuthzCondition("destination.port", ("80",))),
    ),)


def test_defaults_and_dry_run_annotation() -> None:
    (policy,) = load(ap("{}", annotations=', annotations: {istio.io/dry-run: "true"}')).resources
    assert isinstance(policy, AuthorizationPolicy)
    assert (policy.action, policy.rules, policy.selector, policy.dry_run) == ("ALLOW", (), None, True)


BAD = [
    ("rules: [{from: [{source: {ipBlocks: [10.0.0.0/33]}}]}]",
     "spec.rules[0].from[0].source.ipBlocks[0]: '10.0.0.0/33' is not an IP address or CIDR block"),
    ("rules: [{from: [{source: {notRemoteIpBlocks: [not-an-ip]}}]}]",
     "spec.rules[0].from[0].source.notRemoteIpBlocks[0]: 'not-an-ip' is not an IP address or CIDR block"),
    ("rules: [{to: [{operation: {ports: [\"99999\"]}}]}]",
     "spec.rules[0].to[0].operation.ports[0]: '99999' is not a port number (0-65535)"),
    ("rules: [{when: [{key: request.foo, values: [x]}]}]",
     "spec.rules[0].when[0].key: unknown attribute 'request.foo' (see Istio's authorization policy conditions)"),
    ("rules: [{when: [{key: source.ip, values: [bad]}]}]",
     "spec.rules[0].when[0].values[0]: 'bad' is not an IP address or CIDR block"),
    ("rules: [{when: [{key: destination.port, notValues: [http]}]}]",
     "spec.rules[0].when[0].notValues[0]: 'http' is not a port number (0-65535)"),
    ("rules: [{when: [{key: \"request.headers[x]\"}]}]",
     "spec.rules[0].when[0]: at least one of values or notValues must be set for key request.headers[x]"),
    ("rules: [{when: [{key: \"request.headers[]\", values: [a]}]}]",
     "spec.rules[0].when[0].key: 'request.headers[]': must have the form request.headers[NAME]"),
    ("rules: [{when: [{key: request.auth.claims, values: [a]}]}]",
     ("spec.rules[0].when[0].key: 'request.auth.claims': must have the form request.auth.claims[NAME] "
     "(nested: [NAME][NAME])")),
    ("rules: [{to: [{operation: {paths: [\"/a/{**}/b\"]}}]}]",
     "spec.rules[0].to[0].operation.paths[0]: '/a/{**}/b': {**} must be the last segment"),
    ("rules: [{to: [{operation: {paths: [\"/a/x{*}\"]}}]}]",
     ("spec.rules[0].to[0].operation.paths[0]: '/a/x{*}': only whole-segment {*} and {**} templates are "
     "supported, got 'x{*}'")),
    ("rules: [{from: [{source: {principals: [\"a*b\"]}}]}]",
     "spec.rules[0].from[0].source.principals[0]: 'a*b': '*' is only supported at the start or the end of a value"),
    ("rules: [{from: [{source: {}}]}]",
     "spec.rules[0].from[0].source: must set at least one field (an empty source is refused by Istio)"),
    ("rules: [{from: [{}]}]", "spec.rules[0].from[0].source: is required"),
    ("rules: [{from: []}]", "spec.rules[0].from: must not be empty (omit it to match any source)"),
    ("rules: [{to: [{operation: {methods: [\"\"]}}]}]", "spec.rules[0].to[0].operation.methods[0]: must not be empty"),
    ("rules: [{from: [{source: {serviceAccounts: [a], principals: [b]}}]}]",
     "spec.rules[0].from[0].source: serviceAccounts cannot be combined with principals or namespaces"),
    ("action: ALLOW\nprovider: {name: x}", "spec.provider: is only allowed with action CUSTOM"),
    ("action: MAYBE", "spec.action: must be one of ALLOW, DENY, AUDIT, CUSTOM, got 'MAYBE'"),
    ("action: CUSTOM\nprovider: {name: ext}\nrules: [{}]",
     ("spec.action: CUSTOM (ext_authz provider) is not supported by pyproxy; the policy would be unenforced, so it "
     "is refused rather than failing open")),
]


@pytest.mark.parametrize("spec,message", BAD, ids=[m.split(":")[0] + m.split(":")[1][:20] for _, m in BAD])
def test_invalid_policies_are_errors_with_their_path(spec: str, message: str) -> None:
    cfg = load(ap(spec))
    assert [str(e) for e in cfg.errors] == [f"t.yaml#0: {message}"]
    assert cfg.resources == ()


def test_bad_dry_run_annotation() -> None:
    assert errors(ap("{}", annotations=", annotations: {istio.io/dry-run: maybe}")) == [
        "t.yaml#0: metadata.annotations.istio.io/dry-run: must be \"true\" or \"false\", got 'maybe'"]


def ra(spec: str, version: str = "v1") -> str:
    return (f"apiVersion: security.istio.io/{version}\nkind: RequestAuthentication\nmetadata: {{name: r, namespace: ns}}\n"
            "spec:\n" + textwrap.indent(textwrap.dedent(spec), "  "))


@pytest.mark.parametrize("version", ["v1", "v1beta1"])
def test_request_authentication_every_field_parses(version: str) -> None:
    jwks = json.dumps(RSA_JWKS)
    cfg = load(ra(f"""
        selector: {{matchLabels: {{app: gw}}}}
        jwtRules:
        - issuer: https://issuer.example
          audiences: [a, b]
          jwks: '{jwks}'
          fromHeaders: [{{name: X-Token, prefix: "Tok "}}]
          fromParams: [tok]
          fromCookies: [session]
          outputPayloadToHeader: x-payload
          forwardOriginalToken: true
          outputClaimToHeaders: [{{header: x-sub, claim: sub}}, {{header: x-nested, claim: a.b}}]
          timeout: 2s
          spaceDelimitedClaims: [roles]
        - issuer: other
          jwksUri: https://keys.example/jwks.json
        """, version))
    assert cfg.ok, [str(e) for e in cfg.errors]
    assert not cfg.warnings, [str(w) for w in cfg.warnings]
    (res,) = cfg.resources
    assert isinstance(res, RequestAuthentication)
    first, second = res.jwt_rules
    assert res.selector == (("app", "gw"),)
    assert (first.issuer, first.audiences, first.jwks, first.from_headers, first.from_params, first.from_cookies) == (
        "https://issuer.example", ("a", "b"), jwks, (JWTHeader("x-token", "Tok "),), ("tok",), ("session",))
    assert (first.output_payload_to_header, first.forward_original_token, first.timeout) == ("x-payload", True, 2.0)
    assert first.output_claim_to_headers == (ClaimToHeader("x-sub", "sub"), ClaimToHeader("x-nested", "a.b"))
    assert first.space_delimited_claims == ("roles",)
    assert (second.issuer, second.jwks_uri, second.forward_original_token) == ("other", "https://keys.example/jwks.json",
                                                                              False)


BAD_RA = [
    ("jwtRules: [{jwksUri: 'https://k'}]", "spec.jwtRules[0].issuer: is required"),
    ("jwtRules: [{issuer: a, jwksUri: 'ftp://k'}]", "spec.jwtRules[0].jwksUri: 'ftp://k' is not an http:// or https:// URL"),
    ("jwtRules: [{issuer: a, jwks: 'nope'}]", "spec.jwtRules[0].jwks: Jwks is an invalid JSON"),
    ("jwtRules: [{issuer: a, jwks: '{\"keys\": [{\"kty\": \"RSA\", \"n\": \"x\"}]}'}]",
     "spec.jwtRules[0].jwks: keys[0]: not a valid RSA key: Not a public or private key"),
    ("jwtRules: [{issuer: a, fromHeaders: [{prefix: x}]}]", "spec.jwtRules[0].fromHeaders[0].name: is required"),
    ("jwtRules: [{issuer: a, outputClaimToHeaders: [{header: 'bad header', claim: sub}]}]",
     "spec.jwtRules[0].outputClaimToHeaders[0].header: 'bad header' is not a valid header name"),
    ("jwtRules: [{issuer: a, timeout: 5}]",
     "spec.jwtRules[0].timeout: expected a duration string, got integer 5; use a duration like '5s', '100ms' or '1m30s'"),
    ("jwtRules: [{issuer: a}, {issuer: a}]", "spec.jwtRules[1].issuer: 'a' is already used by spec.jwtRules[0]"),
]


@pytest.mark.parametrize("spec,message", BAD_RA, ids=[m.split(":")[0] for _, m in BAD_RA])
def test_invalid_request_authentications(spec: str, message: str) -> None:
    assert errors(ra(spec)) == [f"t.yaml#0: {message}"]


def test_networking_api_version_is_refused_for_security_kinds() -> None:
    cfg = load(ap("{}").replace("security.istio.io/v1", "networking.istio.io/v1"))
    assert [str(w) for w in cfg.warnings] == [
        ("t.yaml#0: apiVersion: networking.istio.io/v1 is not supported for AuthorizationPolicy "
        "(use security.istio.io/v1 or v1beta1); ns/p ignored")]


def test_target_refs_apply_to_no_pyproxy_proxy() -> None:
    cfg = load(ap("targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: gw}]\nrules: [{}]"))
    assert cfg.ok
    (policy,) = cfg.resources
    assert isinstance(policy, AuthorizationPolicy) and policy.targeted
    assert [str(w) for w in cfg.warnings] == [
        ("t.yaml#0: spec.targetRefs: policies attached with targetRef(s) apply to Kubernetes Gateways and "
        "waypoints, not to pyproxy sidecars or --gateway proxies; this policy applies to no pyproxy proxy")]
    assert errors(ap("targetRef: {kind: Service, name: s, typo: 1}")) == [
        "t.yaml#0: spec.targetRef.typo: unknown field 'typo' in PolicyTargetReference"]
