"""AuthorizationPolicy evaluation (pyproxy/authz/policy.py) against a table
built from Istio's reference pages ("Authorization Policy", "Authorization
Policy Conditions", the authz tasks) and the edge cases of the zero-trust
spec §5.2-5.3. Policies are loaded from YAML through the real loader."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from typing import Any

import pytest

from pyproxy.authz.jwt import Identity
from pyproxy.authz.policy import Engine, Request, applies
from pyproxy.config.loader import load_text
from pyproxy.config.model import AuthorizationPolicy

SA_A = "spiffe://cluster.local/ns/default/sa/sleep"
SA_FOO = "spiffe://cluster.local/ns/foo/sa/admin"
SA_BAR_NESTED = "spiffe://td.example/ns/bar/sa/api"


def policies(text: str) -> list[AuthorizationPolicy]:
    docs = []
    for i, body in enumerate(textwrap.dedent(text).strip().split("\n---\n")):
        head = f"apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p{i}, namespace: default}}\n"
        if body.lstrip().startswith("metadata:") or body.lstrip().startswith("apiVersion"):
            head = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        docs.append(head + body.strip())
    loaded = load_text("\n---\n".join(docs), "t.yaml")
    assert loaded.ok, [str(e) for e in loaded.errors]
    out = [r for r in loaded.resources if isinstance(r, AuthorizationPolicy)]
    assert len(out) == len(docs)
    return out


def token(iss: str = "https://issuer.example", sub: str = "alice", **claims: Any) -> Identity:
    aud = claims.get("aud", ())
    return Identity(iss, sub, tuple(aud) if isinstance(aud, list) else ((aud,) if aud else ()),
                    claims.get("azp", ""), {"iss": iss, "sub": sub, **claims}, "", None, None)


@dataclass
class R:
    method: str = "GET"
    path: str = "/"
    host: str = "reviews:9080"
    port: int = 9080
    headers: dict[str, str] = field(default_factory=dict)
    source_ip: str = "10.1.2.3"
    remote_ip: str = ""
    destination_ip: str = "10.9.9.9"
    principal: str = ""
    sni: str = ""
    jwt: Identity | None = None

    def build(self) -> Request:
        return Request(self.method, self.path, self.host, self.port,
                       {k.lower().encode(): v.encode() for k, v in self.headers.items()},
                       self.source_ip, self.remote_ip or self.source_ip, self.destination_ip,
                       self.principal, self.sni, self.jwt)


def allowed(spec: str, req: R) -> bool:
    return Engine(policies(spec)).check(req.build()).allowed


# (policy YAML, request, allowed?) -- one row per documented behaviour.
TABLE: list[tuple[str, str, R, bool]] = [
    # --- evaluation order and edge cases (spec §5.1-5.2) ---
    ("allow-nothing: spec {} denies all", "spec: {}", R(), False),
    ("ALLOW with rules: [] denies all", "spec: {rules: []}", R(), False),
    ("ALLOW rules [{}] allows all", "spec: {rules: [{}]}", R(), True),
    ("DENY rules [{}] denies all", "spec: {action: DENY, rules: [{}]}", R(), False),
    ("DENY without rules has no effect", "spec: {action: DENY}", R(), True),
    ("AUDIT never changes the decision", "spec: {action: AUDIT, rules: [{}]}", R(), True),
    ("DENY is evaluated before ALLOW", """
        spec: {rules: [{}]}
        ---
        spec: {action: DENY, rules: [{to: [{operation: {paths: ["/admin"]}}]}]}""", R(path="/admin"), False),
    ("DENY that does not match leaves ALLOW to decide", """
        spec: {rules: [{}]}
        ---
        spec: {action: DENY, rules: [{to: [{operation: {paths: ["/admin"]}}]}]}""", R(path="/x"), True),
    ("an ALLOW policy that matches nothing denies",
     "spec: {rules: [{to: [{operation: {methods: [POST]}}]}]}", R(method="GET"), False),
    ("any ALLOW policy matching allows", """
        spec: {rules: [{to: [{operation: {methods: [POST]}}]}]}
        ---
        spec: {rules: [{to: [{operation: {methods: [GET]}}]}]}""", R(method="GET"), True),
    ("rules are ORed", "spec: {rules: [{to: [{operation: {paths: [/a]}}]}, {to: [{operation: {paths: [/b]}}]}]}",
     R(path="/b"), True),
    ("from, to and when are ANDed", """
        spec:
          rules:
          - from: [{source: {ipBlocks: ["10.1.0.0/16"]}}]
            to: [{operation: {methods: [GET]}}]
            when: [{key: "request.headers[x-env]", values: [prod]}]""", R(headers={"x-env": "dev"}), False),
    ("from entries are ORed",
     "spec: {rules: [{from: [{source: {ipBlocks: [192.0.2.1]}}, {source: {ipBlocks: [10.1.2.3]}}]}]}",
     R(), True),
    ("fields inside one source are ANDed",
     "spec: {rules: [{from: [{source: {ipBlocks: [10.1.2.3], principals: [cluster.local/ns/default/sa/sleep]}}]}]}",
     R(), False),
    # --- string forms ---
    ("methods exact", "spec: {rules: [{to: [{operation: {methods: [GET]}}]}]}", R(method="GET"), True),
    ("methods are case-sensitive", "spec: {rules: [{to: [{operation: {methods: [get]}}]}]}", R(method="GET"), False),
    ("methods prefix", "spec: {rules: [{to: [{operation: {methods: [\"P*\"]}}]}]}", R(method="PUT"), True),
    ("paths exact does not match a longer path", "spec: {rules: [{to: [{operation: {paths: [/api]}}]}]}",
     R(path="/api/x"), False),
    ("paths prefix x*", "spec: {rules: [{to: [{operation: {paths: [\"/api/*\"]}}]}]}", R(path="/api/v1/x"), True),
    ("prefix x* matches x itself", "spec: {rules: [{to: [{operation: {paths: [\"/api*\"]}}]}]}",
     R(path="/api"), True),
    ("paths suffix *x", "spec: {rules: [{to: [{operation: {paths: [\"*.png\"]}}]}]}", R(path="/img/a.png"), True),
    ("paths suffix *x misses", "spec: {rules: [{to: [{operation: {paths: [\"*.png\"]}}]}]}", R(path="/a.png/x"),
     False),
    ("paths presence *", "spec: {rules: [{to: [{operation: {paths: [\"*\"]}}]}]}", R(path="/"), True),
    ("paths are case-sensitive", "spec: {rules: [{to: [{operation: {paths: [/Admin]}}]}]}", R(path="/admin"),
     False),
    ("path template {*} is one segment", "spec: {rules: [{to: [{operation: {paths: [\"/user/{*}/profile\"]}}]}]}",
     R(path="/user/42/profile"), True),
    ("path template {*} is not two segments",
     "spec: {rules: [{to: [{operation: {paths: [\"/user/{*}/profile\"]}}]}]}", R(path="/user/4/2/profile"), False),
    ("path template {*} is not an empty segment",
     "spec: {rules: [{to: [{operation: {paths: [\"/user/{*}/profile\"]}}]}]}", R(path="/user//profile"), False),
    ("path template {**} is any number of segments",
     "spec: {rules: [{to: [{operation: {paths: [\"/files/{**}\"]}}]}]}", R(path="/files/a/b/c.txt"), True),
    ("path template {**} after {*}", "spec: {rules: [{to: [{operation: {paths: [\"/{*}/files/{**}\"]}}]}]}",
     R(path="/u1/files/a/b"), True),
    ("notPaths: must match none", "spec: {rules: [{to: [{operation: {notPaths: [\"/admin*\"]}}]}]}",
     R(path="/admin/x"), False),
    ("notPaths: other paths pass", "spec: {rules: [{to: [{operation: {notPaths: [\"/admin*\"]}}]}]}",
     R(path="/public"), True),
    ("paths and notPaths together",
     "spec: {rules: [{to: [{operation: {paths: [\"/api/*\"], notPaths: [\"/api/internal*\"]}}]}]}",
     R(path="/api/internal/x"), False),
    ("notMethods", "spec: {rules: [{to: [{operation: {notMethods: [DELETE]}}]}]}", R(method="DELETE"), False),
    # --- hosts: case-insensitive, the port is part of the value ---
    ("hosts case-insensitive", "spec: {rules: [{to: [{operation: {hosts: [Reviews.Example]}}]}]}",
     R(host="reviews.example"), True),
    ("hosts exact does not match host:port", "spec: {rules: [{to: [{operation: {hosts: [reviews]}}]}]}",
     R(host="reviews:9080"), False),
    ("hosts 'reviews:*' matches host:port", "spec: {rules: [{to: [{operation: {hosts: [reviews, \"reviews:*\"]}}]}]}",
     R(host="reviews:9080"), True),
    ("hosts suffix", "spec: {rules: [{to: [{operation: {hosts: [\"*.example.com\"]}}]}]}",
     R(host="API.Example.com"), True),
    ("notHosts", "spec: {rules: [{to: [{operation: {notHosts: [\"admin.*\"]}}]}]}", R(host="ADMIN.example"), False),
    # --- ports ---
    ("ports", "spec: {rules: [{to: [{operation: {ports: [\"9080\"]}}]}]}", R(port=9080), True),
    ("ports mismatch", "spec: {rules: [{to: [{operation: {ports: [\"8080\"]}}]}]}", R(port=9080), False),
    ("notPorts", "spec: {rules: [{to: [{operation: {notPorts: [\"9080\"]}}]}]}", R(port=9080), False),
    # --- principals (peer certificate) ---
    ("principals exact", "spec: {rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/sleep]}}]}]}",
     R(principal=SA_A), True),
    ("principals: plaintext peer never matches",
     "spec: {rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/sleep]}}]}]}", R(), False),
    ("principals '*' = any authenticated peer", "spec: {rules: [{from: [{source: {principals: [\"*\"]}}]}]}",
     R(principal=SA_FOO), True),
    ("principals '*' refuses plaintext", "spec: {rules: [{from: [{source: {principals: [\"*\"]}}]}]}", R(), False),
    ("principals prefix", "spec: {rules: [{from: [{source: {principals: [\"cluster.local/ns/foo/*\"]}}]}]}",
     R(principal=SA_FOO), True),
    ("principals suffix", "spec: {rules: [{from: [{source: {principals: [\"*/sa/admin\"]}}]}]}",
     R(principal=SA_FOO), True),
    ("principals exact needs the whole identity",
     "spec: {rules: [{from: [{source: {principals: [cluster.local/ns/foo]}}]}]}", R(principal=SA_FOO), False),
    ("DENY notPrincipals '*' refuses plaintext (require mTLS)",
     "spec: {action: DENY, rules: [{from: [{source: {notPrincipals: [\"*\"]}}]}]}", R(), False),
    ("DENY notPrincipals '*' lets mTLS peers through",
     "spec: {action: DENY, rules: [{from: [{source: {notPrincipals: [\"*\"]}}]}]}", R(principal=SA_A), True),
    # --- namespaces ---
    ("namespaces", "spec: {rules: [{from: [{source: {namespaces: [foo]}}]}]}", R(principal=SA_FOO), True),
    ("namespaces other", "spec: {rules: [{from: [{source: {namespaces: [foo]}}]}]}", R(principal=SA_A), False),
    ("namespaces need mTLS", "spec: {rules: [{from: [{source: {namespaces: [\"*\"]}}]}]}", R(), False),
    ("namespaces wildcard", "spec: {rules: [{from: [{source: {namespaces: [\"f*\"]}}]}]}", R(principal=SA_FOO),
     True),
    ("notNamespaces", "spec: {action: DENY, rules: [{from: [{source: {notNamespaces: [foo]}}]}]}",
     R(principal=SA_A), False),
    # --- serviceAccounts ---
    ("serviceAccounts ns/sa", "spec: {rules: [{from: [{source: {serviceAccounts: [foo/admin]}}]}]}",
     R(principal=SA_FOO), True),
    ("serviceAccounts sa = the policy's namespace", "spec: {rules: [{from: [{source: {serviceAccounts: [sleep]}}]}]}",
     R(principal=SA_A), True),
    ("serviceAccounts other namespace", "spec: {rules: [{from: [{source: {serviceAccounts: [admin]}}]}]}",
     R(principal=SA_FOO), False),
    ("serviceAccounts any trust domain", "spec: {rules: [{from: [{source: {serviceAccounts: [bar/api]}}]}]}",
     R(principal=SA_BAR_NESTED), True),
    # --- IP blocks ---
    ("ipBlocks CIDR", "spec: {rules: [{from: [{source: {ipBlocks: [\"10.1.0.0/16\"]}}]}]}", R(), True),
    ("ipBlocks single IP", "spec: {rules: [{from: [{source: {ipBlocks: [10.1.2.4]}}]}]}", R(), False),
    ("notIpBlocks", "spec: {rules: [{from: [{source: {notIpBlocks: [\"10.0.0.0/8\"]}}]}]}", R(), False),
    ("ipBlocks IPv6", "spec: {rules: [{from: [{source: {ipBlocks: [\"2001:db8::/32\"]}}]}]}",
     R(source_ip="2001:db8::1"), True),
    ("remoteIpBlocks use the original client", "spec: {rules: [{from: [{source: {remoteIpBlocks: [203.0.113.7]}}]}]}",
     R(remote_ip="203.0.113.7"), True),
    ("remoteIpBlocks are not the peer", "spec: {rules: [{from: [{source: {remoteIpBlocks: [10.1.2.3]}}]}]}",
     R(remote_ip="203.0.113.7"), False),
    ("notRemoteIpBlocks", "spec: {rules: [{from: [{source: {notRemoteIpBlocks: [\"203.0.113.0/24\"]}}]}]}",
     R(remote_ip="203.0.113.7"), False),
    ("notServiceAccounts", "spec: {action: DENY, rules: [{from: [{source: {notServiceAccounts: [foo/admin]}}]}]}",
     R(principal=SA_A), False),
    # --- requestPrincipals (JWT iss/sub) ---
    ("requestPrincipals exact", "spec: {rules: [{from: [{source: {requestPrincipals: [\"https://issuer.example/alice\"]}}]}]}",
     R(jwt=token()), True),
    ("requestPrincipals '*' needs a token", "spec: {rules: [{from: [{source: {requestPrincipals: [\"*\"]}}]}]}",
     R(), False),
    ("requestPrincipals '*' with a token", "spec: {rules: [{from: [{source: {requestPrincipals: [\"*\"]}}]}]}",
     R(jwt=token()), True),
    ("requestPrincipals '*' needs a sub", "spec: {rules: [{from: [{source: {requestPrincipals: [\"*\"]}}]}]}",
     R(jwt=token(sub="")), False),
    ("requestPrincipals iss/*", "spec: {rules: [{from: [{source: {requestPrincipals: [\"https://issuer.example/*\"]}}]}]}",
     R(jwt=token(sub="bob")), True),
    ("requestPrincipals */sub", "spec: {rules: [{from: [{source: {requestPrincipals: [\"*/bob\"]}}]}]}",
     R(jwt=token(sub="bob")), True),
    ("notRequestPrincipals '*' denies requests without a token",
     "spec: {action: DENY, rules: [{from: [{source: {notRequestPrincipals: [\"*\"]}}]}]}", R(), False),
    # --- when conditions ---
    ("when header values", "spec: {rules: [{when: [{key: \"request.headers[X-Env]\", values: [prod, \"stag*\"]}]}]}",
     R(headers={"x-env": "staging"}), True),
    ("when header missing", "spec: {rules: [{when: [{key: \"request.headers[x-env]\", values: [\"*\"]}]}]}",
     R(), False),
    ("when header notValues", "spec: {rules: [{when: [{key: \"request.headers[x-env]\", notValues: [dev]}]}]}",
     R(headers={"x-env": "dev"}), False),
    ("when header notValues with the header missing matches",
     "spec: {rules: [{when: [{key: \"request.headers[x-env]\", notValues: [dev]}]}]}", R(), True),
    ("when values and notValues", """
        spec: {rules: [{when: [{key: "request.headers[x-env]", values: ["*"], notValues: [dev]}]}]}""",
     R(headers={"x-env": "prod"}), True),
    ("every when must hold", """
        spec: {rules: [{when: [{key: "request.headers[a]", values: ["1"]}, {key: "request.headers[b]", values: ["2"]}]}]}""",
     R(headers={"a": "1", "b": "3"}), False),
    ("when source.ip", "spec: {rules: [{when: [{key: source.ip, values: [\"10.1.0.0/16\"]}]}]}", R(), True),
    ("when remote.ip", "spec: {rules: [{when: [{key: remote.ip, notValues: [203.0.113.7]}]}]}",
     R(remote_ip="203.0.113.7"), False),
    ("when destination.ip", "spec: {rules: [{when: [{key: destination.ip, values: [10.9.9.9]}]}]}", R(), True),
    ("when destination.port", "spec: {rules: [{when: [{key: destination.port, values: [\"9080\"]}]}]}", R(), True),
    ("when source.namespace", "spec: {rules: [{when: [{key: source.namespace, values: [foo]}]}]}",
     R(principal=SA_FOO), True),
    ("when source.principal", "spec: {rules: [{when: [{key: source.principal, values: [cluster.local/ns/foo/sa/admin]}]}]}",
     R(principal=SA_FOO), True),
    ("when source.principal plaintext", "spec: {rules: [{when: [{key: source.principal, values: [\"*\"]}]}]}",
     R(), False),
    ("when source.serviceAccount", "spec: {rules: [{when: [{key: source.serviceAccount, values: [foo/admin]}]}]}",
     R(principal=SA_FOO), True),
    ("when source.trustDomain", "spec: {rules: [{when: [{key: source.trustDomain, values: [td.example]}]}]}",
     R(principal=SA_BAR_NESTED), True),
    ("when connection.sni", "spec: {rules: [{when: [{key: connection.sni, values: [\"*.svc.cluster.local\"]}]}]}",
     R(sni="outbound_.9080_._.reviews.default.svc.cluster.local"), True),
    ("when request.auth.principal", "spec: {rules: [{when: [{key: request.auth.principal, values: [\"https://issuer.example/alice\"]}]}]}",
     R(jwt=token()), True),
    ("when request.auth.audiences", "spec: {rules: [{when: [{key: request.auth.audiences, values: [bookstore]}]}]}",
     R(jwt=token(aud=["web", "bookstore"])), True),
    ("when request.auth.presenter", "spec: {rules: [{when: [{key: request.auth.presenter, values: [\"app*\"]}]}]}",
     R(jwt=token(azp="app-1")), True),
    ("when claims: list claim, any element", "spec: {rules: [{when: [{key: \"request.auth.claims[groups]\", values: [group1]}]}]}",
     R(jwt=token(groups=["group2", "group1"])), True),
    ("when claims: string claim", "spec: {rules: [{when: [{key: \"request.auth.claims[role]\", values: [admin]}]}]}",
     R(jwt=token(role="user")), False),
    ("when claims: nested", "spec: {rules: [{when: [{key: \"request.auth.claims[realm][role]\", values: [admin]}]}]}",
     R(jwt=token(realm={"role": "admin"})), True),
    ("when claims: without a token", "spec: {rules: [{when: [{key: \"request.auth.claims[groups]\", values: [\"*\"]}]}]}",
     R(), False),
    ("when claims: notValues on a list", "spec: {rules: [{when: [{key: \"request.auth.claims[groups]\", notValues: [banned]}]}]}",
     R(jwt=token(groups=["ok", "banned"])), False),
    # --- duplicate headers are one comma-joined value (Envoy) ---
    ("duplicate headers joined", "spec: {rules: [{when: [{key: \"request.headers[x-a]\", values: [\"1,2\"]}]}]}",
     R(headers={"x-a": "1,2"}), True),
    # --- dry run ---
    ("dry-run DENY is not enforced", """
        metadata: {name: shadow, namespace: default, annotations: {istio.io/dry-run: "true"}}
        spec: {action: DENY, rules: [{}]}""", R(), True),
    ("dry-run ALLOW does not count as an ALLOW policy", """
        metadata: {name: shadow, namespace: default, annotations: {istio.io/dry-run: "true"}}
        spec: {}""", R(), True),
]


@pytest.mark.parametrize("spec,req,expected", [row[1:] for row in TABLE], ids=[row[0] for row in TABLE])
def test_policy_table(spec: str, req: R, expected: bool) -> None:
    assert allowed(spec, req) is expected


def test_table_covers_every_field_and_condition_key() -> None:
    from pyproxy.config._security import OPERATION, PLAIN_KEYS, SOURCE

    text = "\n".join(row[1] for row in TABLE)
    for name in sorted(SOURCE.parsed | OPERATION.parsed | PLAIN_KEYS | {"request.headers[", "request.auth.claims["}):
        assert name in text, f"no table row uses {name}"


def test_decision_names_the_deciding_policy_and_shadow_results() -> None:
    engine = Engine(policies("""
        metadata: {name: shadow-deny, namespace: default, annotations: {istio.io/dry-run: "true"}}
        spec: {action: DENY, rules: [{to: [{operation: {paths: ["/x"]}}]}]}
        ---
        metadata: {name: viewers, namespace: default}
        spec: {rules: [{to: [{operation: {methods: [GET]}}]}]}
        ---
        metadata: {name: audit-all, namespace: default}
        spec: {action: AUDIT, rules: [{}]}"""))
    d = engine.check(R(path="/x").build())
    assert (d.allowed, d.policy) == (True, "default/viewers")
    assert sorted(d.shadow) == [("default/audit-all", "audit"), ("default/shadow-deny", "shadow_denied")]
    d = engine.check(R(method="POST", path="/y").build())
    assert (d.allowed, d.effective_policy) == (False, "none")
    assert ("default/shadow-deny", "shadow_allowed") in d.shadow


def test_scope_namespace_root_and_selector() -> None:
    labels = {"app": "reviews", "version": "v1"}
    assert applies(None, "default", "default", labels, "istio-system")
    assert applies(None, "istio-system", "default", labels, "istio-system")  # mesh-wide
    assert not applies(None, "other", "default", labels, "istio-system")
    assert applies((("app", "reviews"),), "default", "default", labels, "istio-system")
    assert not applies((("app", "ratings"),), "default", "default", labels, "istio-system")
    assert applies((("app", "reviews"),), "mesh-root", "default", labels, "mesh-root")
