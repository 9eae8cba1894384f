"""The security filters before the route lookup (authz/guard.py): which proxies and sides
enforce, Envoy's replies, header rewriting and counters. Real Exchange
objects over the stub connection of routing_util; no sockets."""

from __future__ import annotations

import json
import random
import textwrap

from pyproxy.authz.guard import SecurityStats
from pyproxy.config.loader import load_text
from pyproxy.http.exchange import INBOUND
from pyproxy.snapshot import BuildContext, ProxyIdentity, Snapshot, build_snapshot

from .fakes import StubConn, StubLoop, StubWorker
from .routing_util import head_of, request, service_entry
from .test_jwt import ISS, RSA_JWKS, sign

APP = service_entry("reviews", [("10.0.0.1", 9080, {})])


def snap(text: str, *, gateway: str = "", labels: dict[str, str] | None = None) -> Snapshot:
    loaded = load_text(APP + "\n---\n" + textwrap.dedent(text), "t.yaml")
    assert loaded.ok, [str(e) for e in loaded.errors]
    ident = ProxyIdentity(workload="reviews", labels=tuple((labels or {"app": "reviews"}).items()), gateway=gateway)
    s = build_snapshot(loaded, ident, BuildContext(StubLoop(), random.Random(1)))  # type: ignore[arg-type]
    filters = s.security_filters[1]
    assert filters
    stats = SecurityStats()  # this test's own counters
    for f in {*filters, *s.security_filters[0]}:
        f.stats = stats
    return s


def stats_of(s: Snapshot) -> SecurityStats:
    return s.security_filters[1][0].stats


def go(s: Snapshot, path: str = "/", *, inbound: bool = True, method: str = "GET",
       headers: dict[str, str] | None = None, peer: str = "10.1.2.3",
       host: str = "reviews:9080") -> tuple[int, bytes, StubConn, object]:
    worker = StubWorker(s)
    from pyproxy.filters.mirror import Mirror

    worker.mirror = Mirror(worker.loop, worker.rng)  # type: ignore[attr-defined,arg-type]
    conn = StubConn(worker, (peer, 40000))
    if inbound:
        conn.direction = INBOUND
    ex = request(path, headers, method=method, host=host, conn=conn)
    ex.request_complete = True
    ex.start()
    resp = conn.response
    if not resp:
        return 0, b"", conn, ex  # forwarded (attempt queued)
    head, _, body = resp.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), head + b"\r\n\r\n" + body, conn, ex


POLICY = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: viewer, namespace: default}
spec:
  selector: {matchLabels: {app: reviews}}
  rules: [{to: [{operation: {methods: [GET]}}]}]
"""


def test_denied_request_gets_envoys_403_without_a_flag() -> None:
    s = snap(POLICY)
    status, resp, _, ex = go(s, method="POST")
    assert status == 403
    assert resp.endswith(b"\r\n\r\nRBAC: access denied")
    assert b"content-type: text/plain" in resp
    assert ex.flag_string == "-"  # type: ignore[attr-defined]
    assert ex.authz_policy == "none"  # type: ignore[attr-defined]
    assert stats_of(s).rbac == {("none", "denied"): 1}


def test_allowed_request_is_forwarded_and_counted() -> None:
    s = snap(POLICY)
    status, _, _, ex = go(s)
    assert status == 0 and ex.upstream_head  # type: ignore[attr-defined]
    assert stats_of(s).rbac == {("default/viewer", "allowed"): 1}


def test_sidecar_outbound_is_never_enforced_but_a_gateway_is() -> None:
    s = snap(POLICY)
    assert s.security_filters[0] == ()
    assert go(s, method="POST", inbound=False)[0] != 403
    gw = snap(POLICY.replace("app: reviews}", "app: gw}"), gateway="default/gw", labels={"app": "gw"})
    assert go(gw, method="POST", inbound=False)[0] == 403


def test_policy_for_other_workloads_or_namespaces_builds_no_filters() -> None:
    loaded = load_text(APP + "\n---\n" + POLICY.replace("app: reviews}", "app: ratings}") + "\n---\n"
                       + POLICY.replace("namespace: default", "namespace: other"), "t.yaml")
    s = build_snapshot(loaded, ProxyIdentity(labels=(("app", "reviews"),)),
                       BuildContext(StubLoop(), random.Random(1)))  # type: ignore[arg-type]
    assert s.security_filters == ((), ())  # nothing runs per request


def test_mesh_wide_policy_from_the_root_namespace() -> None:
    s = snap(POLICY.replace("namespace: default", "namespace: istio-system"))
    assert go(s, method="DELETE")[0] == 403


RA = f"""
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: jwt, namespace: default}}
spec:
  jwtRules:
  - issuer: {ISS}
    jwks: '{json.dumps(RSA_JWKS)}'
    outputClaimToHeaders: [{{header: x-user, claim: sub}}]
"""

REQUIRE = """
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: require-jwt, namespace: default}
spec:
  rules: [{from: [{source: {requestPrincipals: ["*"]}}]}]
"""


def test_jwt_valid_token_sets_identity_and_rewrites_headers() -> None:
    s = snap(RA)
    status, _, _, ex = go(s, headers={"authorization": "Bearer " + sign(), "x-user": "spoofed"})
    assert status == 0
    _, head = head_of(ex)  # type: ignore[arg-type]
    assert b"authorization" not in head  # forwardOriginalToken: false
    assert head[b"x-user"] == [b"alice"]  # the client's value is overwritten
    assert ex.auth is not None and ex.auth.principal == f"{ISS}/alice"  # type: ignore[attr-defined]


def test_jwt_invalid_token_gets_401_with_challenge() -> None:
    s = snap(RA)
    status, resp, _, _ = go(s, "/productpage?x=1", headers={"authorization": "Bearer " + sign(exp=1)})
    assert status == 401
    assert resp.endswith(b"Jwt is expired")
    assert b'www-authenticate: Bearer realm="http://reviews:9080/productpage", error="invalid_token"' in resp


def test_missing_token_passes_unless_a_policy_requires_one() -> None:
    assert go(snap(RA))[0] == 0
    s = snap(RA + REQUIRE)
    assert go(s)[0] == 403
    assert go(s, headers={"authorization": "Bearer " + sign()})[0] == 0
    assert go(s, headers={"authorization": "Bearer garbage"})[0] == 401


def test_cors_preflight_bypasses_jwt() -> None:
    s = snap(RA)
    status, _, _, _ = go(s, method="OPTIONS", headers={
        "authorization": "Bearer garbage", "origin": "https://a.example", "access-control-request-method": "GET"})
    assert status != 401
    assert stats_of(s).jwt["cors_preflight_bypassed"] == 1


def test_dry_run_policy_is_counted_not_enforced() -> None:
    s = snap("""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-post, namespace: default, annotations: {istio.io/dry-run: "true"}}
spec: {action: DENY, rules: [{to: [{operation: {methods: [POST]}}]}]}
""")
    assert go(s, method="POST")[0] == 0
    assert go(s, method="GET")[0] == 0
    assert stats_of(s).rbac == {
        ("default/deny-post", "shadow_denied"): 1, ("default/deny-post", "shadow_allowed"): 1}


CLAIM_ROUTES = f"""
---
{service_entry("v1", [("10.0.0.2", 9080, {})]).strip()}
---
{service_entry("v2", [("10.0.0.3", 9080, {})]).strip()}
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: gw, namespace: default}}
spec:
  selector: {{app: gw}}
  servers: [{{port: {{number: 80, name: http, protocol: HTTP}}, hosts: ["*"]}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: claims, namespace: default}}
spec:
  hosts: [v1]
  gateways: [gw, mesh]
  http:
  - match:
    - headers: {{"@request.auth.claims.groups": {{exact: group1}}}}
    - headers: {{"@request.auth.claims[org][tier]": {{prefix: gold}}}}
      withoutHeaders: {{"@request.auth.claims.blocked": {{exact: "yes"}}}}
    route: [{{destination: {{host: v2}}}}]
  - route: [{{destination: {{host: v1}}}}]
"""


def _cluster(ex: object) -> str:
    return ex.cluster.name.split("|")[3].split(".")[0]  # type: ignore[attr-defined]


def test_claim_based_routing_at_the_gateway() -> None:
    s = snap(RA + CLAIM_ROUTES, gateway="default/gw", labels={"app": "gw"})
    assert not [w for w in s.warnings if "claim" in w]

    def via(claims: dict | None) -> str:
        headers = {"authorization": "Bearer " + sign(claims)} if claims is not None else {}
        status, _, _, ex = go(s, "/", inbound=False, headers=headers, host="v1")
        assert status == 0
        return _cluster(ex)

    assert via(None) == "v1"  # no token: no claims
    assert via({"groups": ["group2", "group1"]}) == "v2"  # a list claim: any element
    assert via({"groups": "group2"}) == "v1"
    assert via({"org": {"tier": "gold-plus"}}) == "v2"  # nested, prefix
    assert via({"org": {"tier": "gold"}, "blocked": "yes"}) == "v1"  # withoutHeaders claim


def test_claim_matches_on_a_sidecar_never_match_with_a_warning() -> None:
    loaded = load_text(APP + "\n---\n" + RA + CLAIM_ROUTES, "t.yaml")
    s = build_snapshot(loaded, ProxyIdentity(labels=(("app", "client"),)),
                       BuildContext(StubLoop(), random.Random(1)))  # type: ignore[arg-type]
    assert [w for w in s.warnings if "JWT claim matches" in w]
    worker = StubWorker(s)
    from pyproxy.filters.mirror import Mirror

    worker.mirror = Mirror(worker.loop, worker.rng)  # type: ignore[attr-defined,arg-type]
    ex = request("/", {"authorization": "Bearer " + sign({"groups": ["group1"]})}, host="v1",
                 conn=StubConn(worker))
    ex.request_complete = True
    ex.start()
    assert _cluster(ex) == "v1"


def test_rbac_answers_before_the_router_at_a_gateway() -> None:
    # Envoy's RBAC filter runs before the router: a host no route serves gets 403, not 404 NR.
    gw = snap(CLAIM_ROUTES + "\n---\n" + POLICY.replace("app: reviews}", "app: gw}"), gateway="default/gw",
              labels={"app": "gw"})
    assert go(gw, method="POST", inbound=False, host="unknown.example")[0] == 403
    assert go(gw, method="GET", inbound=False, host="unknown.example")[0] == 404


def test_grpc_requests_get_grpc_status_instead_of_an_http_error() -> None:
    s = snap(POLICY + "\n---\n" + RA)
    status, resp, _, _ = go(s, "/pkg.Svc/Method", method="POST", headers={"content-type": "application/grpc"})
    assert status == 200
    assert b"grpc-status: 7\r\n" in resp and b"grpc-message: RBAC: access denied\r\n" in resp
    status, resp, _, _ = go(s, "/pkg.Svc/Method", method="POST",
                            headers={"content-type": "application/grpc", "authorization": "Bearer x.y.z"})
    assert status == 200 and b"grpc-status: 16\r\n" in resp and b"www-authenticate: Bearer" in resp
