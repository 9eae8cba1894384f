"""AuthorizationPolicy and RequestAuthentication on a real proxy process:
policies on the inbound side with plaintext peers, a jwksUri server that is
down, comes up and goes away again, and policy reloads under load."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.harness import Upstream, free_port, http_get, running_proxy
from tests.unit.test_jwt import ISS, RSA_JWKS, sign

LABELS = ["--labels", "app=reviews,version=v1"]

POLICIES = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: require-mtls-for-secure, namespace: default}
spec:
  selector: {matchLabels: {app: reviews}}
  action: DENY
  rules:
  - from: [{source: {notPrincipals: ["*"]}}]
    to: [{operation: {paths: ["/secure*"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: readers, namespace: default}
spec:
  selector: {matchLabels: {app: reviews}}
  rules:
  - to: [{operation: {methods: [GET, HEAD], paths: ["/api/*", "/secure/*"]}}]
  - to: [{operation: {methods: [POST], paths: ["/api/*"]}}]
    when: [{key: "request.headers[x-role]", values: [admin]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: not-for-ratings, namespace: default}
spec:
  selector: {matchLabels: {app: ratings}}
  rules: [{}]
"""


async def fetch(session: aiohttp.ClientSession, url: str, method: str = "GET",
                headers: dict[str, str] | None = None) -> tuple[int, str]:
    async with session.request(method, url, headers=headers) as r:
        return r.status, await r.text()


async def test_policies_on_the_inbound_side_with_plaintext_peers(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    async with Upstream("reviews") as app:
        with running_proxy({"authz.yaml": POLICIES}, app_port=app.port,
                           args=[*LABELS, "--access-log", str(log), "--access-log-format", "json"]) as px:
            async with aiohttp.ClientSession() as s:
                url = px.inbound_url
                cases = [
                    ("GET", "/api/books", {}, 200),
                    ("HEAD", "/api/books", {}, 200),
                    ("POST", "/api/books", {}, 403),
                    ("POST", "/api/books", {"x-role": "admin"}, 200),
                    ("POST", "/api/books", {"x-role": "guest"}, 403),
                    ("DELETE", "/api/books", {"x-role": "admin"}, 403),
                    ("GET", "/secure/data", {}, 403),  # DENY: plaintext peer has no principal
                    ("GET", "/other", {}, 403),  # no ALLOW rule matches
                    ("GET", "/api/books?q=/secure", {}, 200),  # the query is not part of the path
                ]
                got = []
                for method, path, headers, _ in cases:
                    status, body = await fetch(s, url + path, method, headers)
                    got.append((method, path, headers, status))
                    if status == 403:
                        assert body == "RBAC: access denied"
                assert got == cases
            # Denied requests never reached the app.
            assert sorted((x.method, x.path) for x in app.seen) == sorted(
                [("GET", "/api/books"), ("HEAD", "/api/books"), ("POST", "/api/books"), ("GET", "/api/books?q=/secure")])
            _, stats = http_get(px.admin_url + "/stats?filter=rbac")
            text = stats.decode()
            assert "rbac.default/readers.allowed: 4" in text
            assert "rbac.none.denied: 4" in text
            assert "rbac.default/require-mtls-for-secure.denied: 1" in text
            _, prom = http_get(px.stats_url + "/stats/prometheus")
            assert b'pyproxy_rbac_total{policy="default/readers",result="allowed"} 4.0' in prom
            # The server side counts the 403s in istio_requests_total, with no response flag.
            assert b'response_code="403"' in prom and b'response_flags="-"' in prom
        deadline = time.monotonic() + 5
        lines: list[dict] = []
        while time.monotonic() < deadline and len(lines) < len(cases):
            lines = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
            await asyncio.sleep(0.1)
        by_path = {(d["method"], d["path"], d["response_code"]): d for d in lines}
        assert by_path[("GET", "/secure/data", 403)]["rbac_policy"] == "default/require-mtls-for-secure"
        assert by_path[("GET", "/other", 403)]["rbac_policy"] == "none"
        assert by_path[("GET", "/api/books", 200)]["rbac_policy"] == "default/readers"
        assert all(d["response_flags"] == "-" for d in lines)


RA = """
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: jwt, namespace: default}
spec:
  selector: {matchLabels: {app: reviews}}
  jwtRules:
  - issuer: ISSUER
    jwksUri: JWKS_URI
    timeout: 1s
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: require-jwt, namespace: default}
spec:
  selector: {matchLabels: {app: reviews}}
  rules: [{from: [{source: {requestPrincipals: ["*"]}}]}]
"""


async def test_jwks_uri_fails_closed_then_recovers_and_survives_the_server_going_away() -> None:
    jwks_port = free_port()
    uri = f"http://127.0.0.1:{jwks_port}/jwks.json"

    async def serve_jwks(request: web.Request) -> web.StreamResponse:
        return web.json_response(RSA_JWKS)

    now = time.time()
    token = sign({"exp": now + 3600, "iat": now})
    bearer = {"authorization": "Bearer " + token}
    async with Upstream("reviews") as app:
        config = RA.replace("ISSUER", ISS).replace("JWKS_URI", uri)
        with running_proxy({"jwt.yaml": config}, app_port=app.port, args=LABELS) as px:
            async with aiohttp.ClientSession() as s:
                url = px.inbound_url + "/productpage"
                # Keys never fetched: every token of the issuer is refused.
                status, body = await fetch(s, url, headers=bearer)
                assert (status, body) == (401, "Jwt verification fails")
                assert (await fetch(s, url))[0] == 403  # no token: RBAC requires one
                jwks = Upstream("jwks", serve_jwks, port=jwks_port)
                await jwks.start()
                try:
                    deadline = time.monotonic() + 30
                    while True:
                        status, body = await fetch(s, url, headers=bearer)
                        if status == 200 or time.monotonic() > deadline:
                            break
                        await asyncio.sleep(0.2)
                    assert status == 200, body
                    # The token was removed before the app (forwardOriginalToken: false).
                    assert "authorization" not in app.seen[-1].headers
                finally:
                    await jwks.stop()
                # The key server is gone: the last good key set stays in force.
                fresh = sign({"exp": now + 3600, "iat": now, "n": 2})
                assert (await fetch(s, url, headers={"authorization": "Bearer " + fresh}))[0] == 200
                status, body = await fetch(s, url, headers={"authorization": "Bearer " + token[:-4] + "AAAA"})
                assert (status, body) == (401, "Jwt verification fails")
            _, stats = http_get(px.admin_url + "/stats?filter=jwt_authn")
            counts = dict(line.split(": ") for line in stats.decode().splitlines())
            # No token (passes jwt_authn, then RBAC refuses), the first 200, the fresh token.
            assert counts["http.jwt_authn.allowed"] == "3"
            assert int(counts["http.jwt_authn.denied"]) >= 2  # never fetched (polled), then a bad signature


async def test_policy_reloads_under_load_fail_no_allowed_request() -> None:
    async with Upstream("reviews") as app:
        with running_proxy({"authz.yaml": POLICIES}, app_port=app.port, args=LABELS) as px:
            url = px.inbound_url + "/api/books"
            failures: list[int] = []
            done = 0
            stop = asyncio.Event()

            async def client(s: aiohttp.ClientSession) -> None:
                nonlocal done
                while not stop.is_set():
                    status, _ = await fetch(s, url)
                    done += 1
                    if status != 200:
                        failures.append(status)

            async with aiohttp.ClientSession() as s:
                tasks = [asyncio.create_task(client(s)) for _ in range(4)]
                loop = asyncio.get_running_loop()
                for i in range(6):
                    # Each version changes other rules; GET /api/* stays allowed.
                    extra = f"""
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: deny-{i}, namespace: default}}
spec:
  action: DENY
  rules: [{{to: [{{operation: {{paths: ["/blocked-{i}"]}}}}]}}]
"""
                    px.write_config("authz.yaml", POLICIES + extra)
                    result = await loop.run_in_executor(None, px.reload)
                    assert result["http_status"] == 200, result
                    blocked, _ = await fetch(s, px.inbound_url + f"/blocked-{i}")
                    assert blocked == 403
                    await asyncio.sleep(0.2)
                stop.set()
                await asyncio.gather(*tasks)
            assert failures == []
            assert done > 50


CLAIM_GATEWAY = """
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw, namespace: default}
spec:
  selector: {istio: ingressgateway}
  servers: [{port: {number: 8080, name: http, protocol: HTTP}, hosts: ["*"]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: by-claim, namespace: default}
spec:
  hosts: ["*"]
  gateways: [gw]
  http:
  - match:
    - headers: {"@request.auth.claims.groups": {exact: group1}}
    route: [{destination: {host: v2}}]
  - route: [{destination: {host: v1}}]
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: ingress-jwt, namespace: istio-system}
spec:
  selector: {matchLabels: {istio: ingressgateway}}
  jwtRules: [{issuer: ISSUER, jwks: 'JWKS'}]
"""


async def test_claim_based_routing_at_the_gateway() -> None:
    from tests.harness import service_entry

    now = time.time()
    async with Upstream("v1") as v1, Upstream("v2") as v2:
        cfg = (service_entry("v1", [(v1.port, {})]) + "---\n" + service_entry("v2", [(v2.port, {})]) + "---\n"
               + CLAIM_GATEWAY.replace("ISSUER", ISS).replace("JWKS", json.dumps(RSA_JWKS)))
        with running_proxy(cfg, args=["--gateway", "gw", "--labels", "istio=ingressgateway"]) as px:
            async with aiohttp.ClientSession() as s:
                async def upstream(headers: dict[str, str]) -> str:
                    status, body = await fetch(s, px.outbound_url + "/page", headers=headers)
                    assert status == 200, body
                    return json.loads(body)["upstream"]

                group1 = sign({"groups": ["group1"], "exp": now + 3600})
                group2 = sign({"groups": ["group2"], "exp": now + 3600})
                assert await upstream({}) == "v1"
                assert await upstream({"authorization": "Bearer " + group1}) == "v2"
                assert await upstream({"authorization": "Bearer " + group2}) == "v1"
                status, body = await fetch(s, px.outbound_url + "/page", headers={"authorization": "Bearer x.y"})
                assert (status, body) == (
                    401, "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections")
    assert "authorization" not in v2.seen[0].headers  # the token is not forwarded


async def test_denied_grpc_request_over_h2c_gets_grpc_status_7() -> None:
    from tests.integration.test_http2 import CURL, curl

    if CURL is None:
        pytest.skip("curl with HTTP/2 is not installed")
    async with Upstream("reviews") as app:
        with running_proxy({"authz.yaml": POLICIES}, app_port=app.port, args=LABELS) as px:
            out = await asyncio.to_thread(curl, "-i", "-X", "POST", "-H", "content-type: application/grpc",
                                          "-H", "te: trailers", "--data-binary", "x",
                                          f"http://127.0.0.1:{px.inbound}/pkg.Books/Delete")
            assert out.returncode == 0, out.stderr
            text = out.stdout.decode()
            assert text.startswith("HTTP/2 200"), text
            assert "grpc-status: 7\r\n" in text and "grpc-message: RBAC: access denied\r\n" in text
    assert app.seen == []


BYPASS_POLICY = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: default}
spec:
  action: DENY
  rules: [{to: [{operation: {paths: ["/admin*"]}}]}]
"""


async def test_path_policies_see_the_normalised_path() -> None:
    """A DENY on /admin* is not bypassed by dot segments, escaped unreserved
    characters, backslashes or (with MERGE_SLASHES) doubled slashes; what
    is allowed reaches the app normalised."""
    from tests.harness import raw_request

    async with Upstream("reviews") as app:
        with running_proxy(BYPASS_POLICY, app_port=app.port,
                           args=[*LABELS, "--path-normalization", "MERGE_SLASHES"]) as px:
            async def status(target: str) -> int:
                resp = await raw_request(px.inbound, f"GET {target} HTTP/1.1\r\nHost: reviews\r\n\r\n".encode())
                return int(resp.split(b" ", 2)[1])

            for target in ("/admin", "/a/../admin", "/%61dmin", "/./admin", "/public/../admin/x",
                           "//admin", "/x/..//admin", "/%2e%2e/admin", "/\\\\admin"):
                got = await status(target)
                assert got in (400, 403), (target, got)
            assert await status("/public/./page") == 200
            assert await status("/%2561dmin") == 200  # "%25" stays encoded: the path is /%2561dmin, not /admin
    assert [s.path for s in app.seen] == ["/public/page", "/%2561dmin"]
