"""AuthorizationPolicy with identities from real certificates: sidecars
talking ISTIO_MUTUAL (certificates from pyproxy's own CA), the server's
policies matching the client's SPIFFE identity (principals, namespaces,
serviceAccounts, notPrincipals), and a plaintext client refused where the
policies require mTLS."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyproxy.security.ca import init_ca, issue_to_dir
from tests.harness import Upstream, raw_request, running_proxy

REVIEWS = "reviews.default.svc.cluster.local"

POLICIES = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: reviews-viewer, namespace: default}
spec:
  selector: {matchLabels: {app: reviews}}
  rules:
  - from: [{source: {principals: ["cluster.local/ns/default/sa/bookinfo-productpage"]}}]
    to: [{operation: {methods: [GET]}}]
  - from: [{source: {namespaces: ["other"]}}]
    to: [{operation: {paths: ["/from-other"]}}]
  - from: [{source: {serviceAccounts: ["bookinfo-ratings"]}}]
    to: [{operation: {paths: ["/ratings-only"]}}]
  - to: [{operation: {paths: ["/public"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: require-mtls, namespace: default}
spec:
  selector: {matchLabels: {app: reviews}}
  action: DENY
  rules:
  - from: [{source: {notPrincipals: ["*"]}}]
    to: [{operation: {notPaths: ["/public"]}}]
"""


def entry(port: int) -> str:
    return f"""
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: reviews, namespace: default}}
spec:
  hosts: [{REVIEWS}]
  location: MESH_INTERNAL
  ports: [{{number: 9080, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1, ports: {{http: {port}}}, labels: {{app: reviews}}, serviceAccount: bookinfo-reviews}}]
"""


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {REVIEWS}\r\n\r\n".encode()


def status(resp: bytes) -> int:
    return int(resp.split(b" ", 2)[1])


@pytest.fixture(scope="module")
def creds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    ca = tmp_path_factory.mktemp("authz-ca")
    init_ca(ca)
    base = tmp_path_factory.mktemp("authz-creds")
    out = {}
    for ns, sa in (("default", "bookinfo-reviews"), ("default", "bookinfo-productpage"),
                   ("default", "bookinfo-ratings"), ("other", "bookinfo-details")):
        issue_to_dir(ca, base / sa, ns, sa)
        out[sa] = base / sa
    return out


async def test_policies_match_identities_from_real_certificates(creds: dict[str, Path]) -> None:
    async with Upstream("reviews") as app:
        with running_proxy(POLICIES, app_port=app.port, args=[
                "--certs", str(creds["bookinfo-reviews"]), "--labels", "app=reviews,version=v1"]) as server:
            clients = {}
            results: dict[str, dict[str, int]] = {}
            for sa, ns in (("bookinfo-productpage", "default"), ("bookinfo-ratings", "default"),
                           ("bookinfo-details", "other")):
                with running_proxy(entry(server.inbound), args=[
                        "--certs", str(creds[sa]), "--namespace", ns, "--labels", f"app={sa}"]) as client:
                    clients[sa] = client
                    results[sa] = {p: status(await raw_request(client.outbound, get(p)))
                                   for p in ("/reviews/1", "/from-other", "/ratings-only", "/public")}
            plaintext = {p: status(await raw_request(server.inbound, get(p)))
                         for p in ("/reviews/1", "/from-other", "/ratings-only", "/public")}
    assert results["bookinfo-productpage"] == {"/reviews/1": 200, "/from-other": 200, "/ratings-only": 200,
                                               "/public": 200}  # principals: any GET
    assert results["bookinfo-ratings"] == {"/reviews/1": 403, "/from-other": 403, "/ratings-only": 200,
                                           "/public": 200}  # serviceAccounts
    assert results["bookinfo-details"] == {"/reviews/1": 403, "/from-other": 200, "/ratings-only": 403,
                                           "/public": 200}  # namespaces
    # A plaintext peer has no principal: the DENY on notPrincipals ["*"] refuses it but for /public.
    assert plaintext == {"/reviews/1": 403, "/from-other": 403, "/ratings-only": 403, "/public": 200}
