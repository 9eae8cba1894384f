"""Path normalisation before routing (issue 12 item 3), with a normalising
application behind the proxy.

The application is Python's http.server that, like many real ones, decodes
and resolves the path it receives before choosing what to serve: without
normalisation in the proxy, ``/public/../admin/secret`` passes an ``/admin``
deny rule and the application serves ``/admin/secret``. Every case asserts
the exact request line the application received (or that it received
nothing)."""

from __future__ import annotations

import http.server
import posixpath
import threading
import urllib.parse
from collections.abc import Iterator
from typing import Self

import pytest

from tests.harness import raw_request, running_proxy, service_entry

RULES = """---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: svc}
spec:
  hosts: [svc]
  http:
  - match: [{uri: {prefix: /admin}}]
    directResponse: {status: 403, body: {string: denied}}
  - match: [{uri: {prefix: /foo}}]
    route: [{destination: {host: svc}}]
    headers: {request: {set: {x-route: foo}}}
  - match: [{uri: {prefix: /public}}]
    route: [{destination: {host: svc}}]
    headers: {request: {set: {x-route: public}}}
"""


class NormalisingApp:
    """http.server on a thread: records each request line and the route
    header, and answers with the resource it resolved the path to."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []
        app = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                app.seen.append((self.requestline, self.headers.get("x-route", "")))
                path = urllib.parse.urlsplit(self.path).path
                served = posixpath.normpath(urllib.parse.unquote(path).replace("\\", "/"))
                body = f"served {served}".encode()
                self.send_response(200)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def app() -> Iterator[NormalisingApp]:
    with NormalisingApp() as a:
        yield a


async def _get(port: int, target: bytes) -> bytes:
    return await raw_request(port, b"GET " + target + b" HTTP/1.1\r\nHost: svc\r\n\r\n")


# (target, status, request line the app receives or None, route header)
BASE_CASES: list[tuple[bytes, int, str | None, str]] = [
    (b"/public/../admin/secret", 403, None, ""),
    (b"/./admin/secret", 403, None, ""),
    (b"/public/%2e%2e/admin/secret", 403, None, ""),
    (b"/public/%2E./admin/secret", 403, None, ""),
    (b"/%61dmin/secret", 403, None, ""),
    (b"/public\\..\\admin/secret", 403, None, ""),
    (b"/bar/../foo", 200, "GET /foo HTTP/1.1", "foo"),
    (b"/f%6Fo", 200, "GET /foo HTTP/1.1", "foo"),
    (b"/foo/..", 404, None, ""),
    (b"/public/a/./b/../c?q=/../x%2e&r=%61", 200, "GET /public/a/c?q=/../x%2e&r=%61 HTTP/1.1", "public"),
    (b"/public/%7euser/%2Fetc", 200, "GET /public/~user/%2Fetc HTTP/1.1", "public"),
    (b"/public//admin", 200, "GET /public//admin HTTP/1.1", "public"),
    (b"/public/x%00", 400, None, ""),
]


async def test_paths_are_normalised_before_routing_and_forwarded_normalised(app: NormalisingApp) -> None:
    with running_proxy(service_entry("svc", [(app.port, {})]) + RULES) as px:
        failures = []
        for target, status, line, route in BASE_CASES:
            before = len(app.seen)
            answer = await _get(px.outbound, target)
            got = app.seen[before:]
            if not answer.startswith(b"HTTP/1.1 %d " % status):
                failures.append(f"{target!r}: expected {status}, got {answer[:80]!r}")
            want = [(line, route)] if line else []
            if got != want:
                failures.append(f"{target!r}: the app received {got!r}, expected {want!r}")
            if status == 403 and b"served /admin" in answer:
                failures.append(f"{target!r}: the app served /admin")
    assert not failures, "\n".join(failures)


async def test_without_normalisation_the_deny_rule_is_bypassed(app: NormalisingApp) -> None:
    """``--path-normalization NONE`` (mesh NONE): the raw path is matched
    and forwarded, and the normalising app serves /admin/secret. This is
    what BASE prevents (the test above)."""
    with running_proxy(service_entry("svc", [(app.port, {})]) + RULES,
                       args=["--path-normalization", "none"]) as px:
        answer = await _get(px.outbound, b"/public/../admin/secret")
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"served /admin/secret"), answer
    assert app.seen == [("GET /public/../admin/secret HTTP/1.1", "public")]


@pytest.mark.parametrize("mode,via", [("MERGE_SLASHES", "flag"), ("DECODE_AND_MERGE_SLASHES", "env")])
async def test_merge_and_decode_modes(app: NormalisingApp, mode: str, via: str) -> None:
    args = ["--path-normalization", mode] if via == "flag" else []
    env = {"PYPROXY_PATH_NORMALIZATION": mode} if via == "env" else {}
    cases: list[tuple[bytes, int, str | None]] = [
        (b"//admin/secret", 403, None),
        (b"/public//a///b/", 200, "GET /public/a/b/ HTTP/1.1"),
    ]
    if mode == "DECODE_AND_MERGE_SLASHES":
        cases += [(b"/public%2f..%2fadmin/secret", 403, None),
                  (b"/public%5Ca%2Fb", 200, "GET /public/a/b HTTP/1.1")]
    else:
        # Escaped slashes are data here: the path stays under /public.
        cases += [(b"/public%2f..%2fadmin/secret", 200, "GET /public%2f..%2fadmin/secret HTTP/1.1")]
    with running_proxy(service_entry("svc", [(app.port, {})]) + RULES, args=args, env=env) as px:
        failures = []
        for target, status, line in cases:
            before = len(app.seen)
            answer = await _get(px.outbound, target)
            got = [s[0] for s in app.seen[before:]]
            if not answer.startswith(b"HTTP/1.1 %d " % status) or got != ([line] if line else []):
                failures.append(f"{target!r}: {answer[:40]!r}, app received {got!r}")
    assert not failures, "\n".join(failures)


def test_an_unknown_mode_is_refused_with_the_flag_name() -> None:
    import subprocess
    import sys

    from tests.harness import ROOT

    res = subprocess.run([sys.executable, "-m", "pyproxy", "run", "--config", "/nonexistent",
                          "--path-normalization", "SOMETIMES"], capture_output=True, text=True, cwd=str(ROOT),
                         timeout=60, check=False)
    assert res.returncode != 0
    assert "--path-normalization" in res.stderr and "DECODE_AND_MERGE_SLASHES" in res.stderr, res.stderr
