"""Behaviours checked side by side against Envoy 1.40 configured as istiod
configures it (issue 13): what a client and an upstream see through the
real proxy, on real sockets. Each test names the Envoy/Istio behaviour it
pins; docs/differences.md lists what still differs."""

from __future__ import annotations

import asyncio
from pathlib import Path

from aiohttp import web

from tests.harness import Upstream, free_port, raw_request, read_response, running_proxy, service_entry
from tests.integration.obs_helpers import wait_for

SUBSETS = """---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
"""


def vs(http: str, host: str = "reviews") -> str:
    return f"""---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: {host}}}
spec:
  hosts: [{host}]
  http:
{http}
"""


def head_fields(resp: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
    head, _, body = resp.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    fields = [(n.strip().lower(), v.strip()) for n, _, v in (line.partition(":") for line in lines[1:])]
    return int(lines[0].split()[1]), fields, body


def values(fields: list[tuple[str, str]], name: str) -> list[str]:
    return [v for n, v in fields if n == name]


async def echo_headers(request: web.Request) -> web.StreamResponse:
    """The upstream answers with the header lines it received, in order."""
    return web.json_response({"headers": [[k.decode().lower(), v.decode()] for k, v in request.raw_headers]},
                             headers={"server": "app-server"})


async def test_repeated_headers_match_value_by_value_and_ows_is_not_part_of_a_value() -> None:
    async with Upstream("v1") as up:
        cfg = service_entry("reviews", [(up.port, {"version": "v1"})]) + SUBSETS + vs("""
  - match: [{headers: {x-exact: {exact: foo}}, uri: {prefix: /hdr}}]
    directResponse: {status: 200, body: {string: matched}}
  - match: [{withoutHeaders: {x-exact: {exact: foo}}, uri: {prefix: /without}}]
    directResponse: {status: 200, body: {string: matched}}
  - directResponse: {status: 404, body: {string: nomatch}}""")
        with running_proxy(cfg) as px:
            async def get(path: str, lines: str) -> bytes:
                resp = await raw_request(px.outbound, f"GET {path} HTTP/1.1\r\nHost: reviews\r\n{lines}\r\n".encode())
                return head_fields(resp)[2]

            # Envoy 1.40: each value of a repeated header is matched on its own.
            assert await get("/hdr", "x-exact: foo\r\nx-exact: foo\r\n") == b"matched"
            assert await get("/hdr", "x-exact: bar\r\nx-exact: foo\r\n") == b"matched"
            assert await get("/hdr", "x-exact: bar\r\nx-exact: baz\r\n") == b"nomatch"
            assert await get("/hdr", "x-exact: foo, bar\r\n") == b"nomatch"  # one line, one value
            # Whitespace around a value is not part of it (RFC 9110 OWS).
            assert await get("/hdr", "x-exact:   foo \t \r\n") == b"matched"
            # withoutHeaders: only when no value matches.
            assert await get("/without", "x-exact: bar\r\nx-exact: foo\r\n") == b"nomatch"
            assert await get("/without", "x-exact: bar\r\nx-exact: baz\r\n") == b"matched"
            assert await get("/without", "") == b"matched"


async def test_local_replies_have_envoys_shape() -> None:
    async with Upstream("v1", handler=echo_headers) as up:
        cfg = service_entry("reviews", [(up.port, {"version": "v1"})]) + SUBSETS + vs("""
  - match: [{uri: {prefix: /nc}}]
    route: [{destination: {host: reviews, subset: missing}}]
    headers: {response: {set: {x-resp: "yes"}}}
  - match: [{uri: {prefix: /ct}}]
    directResponse: {status: 200, body: {string: "{}"}}
    headers: {response: {set: {content-type: application/json}}}
  - match: [{uri: {prefix: /moved}}]
    directResponse: {status: 301, body: {string: moved}}
  - match: [{uri: {prefix: /empty}}]
    directResponse: {status: 204}
  - route: [{destination: {host: reviews}}]""")
        with running_proxy(cfg) as px:
            async def get(path: str, method: str = "GET") -> tuple[int, list[tuple[str, str]], bytes]:
                # (HEAD: read until close, the response has a length but no body)
                close = "connection: close\r\n" if method == "HEAD" else ""
                return head_fields(await raw_request(
                    px.outbound, f"{method} {path} HTTP/1.1\r\nHost: reviews\r\n{close}\r\n".encode(),
                    until_close=method == "HEAD"))

            # Subset not found: 503 with an empty body, route response ops applied.
            status, fields, body = await get("/nc")
            assert (status, body, values(fields, "content-length"), values(fields, "x-resp")) == (503, b"", ["0"],
                                                                                                   ["yes"])
            assert values(fields, "content-type") == []
            # A route's content-type replaces the default one.
            status, fields, body = await get("/ct")
            assert (status, values(fields, "content-type"), body) == (200, ["application/json"], b"{}")
            # A 3xx direct response carries Location: the request's URL.
            status, fields, body = await get("/moved?a=1")
            assert (status, values(fields, "location"), body) == (301, ["http://reviews/moved?a=1"], b"moved")
            # 204: no content-length, no content-type.
            status, fields, body = await get("/empty")
            assert status == 204 and values(fields, "content-length") == [] and values(fields, "content-type") == []
            # HEAD of a local reply: the GET's fields, no body.
            status, fields, body = await get("/ct", "HEAD")
            assert (values(fields, "content-length"), values(fields, "content-type"), body) == (
                ["2"], ["application/json"], b"")
            # server: overwritten with "envoy" on the outbound side, local or proxied.
            assert values(fields, "server") == ["envoy"]
            status, fields, body = await get("/proxied")
            assert status == 200 and values(fields, "server") == ["envoy"]
            # ...and "istio-envoy" inbound (Istio's inbound HCM server_name).
            resp = await raw_request(px.inbound, b"GET / HTTP/1.1\r\nHost: reviews\r\n\r\n")
            status, fields, _ = head_fields(resp)
            assert values(fields, "server") == ["istio-envoy"], resp


async def test_http10_gets_426_unless_enabled() -> None:
    async with Upstream("v1") as up:
        cfg = service_entry("reviews", [(up.port, {"version": "v1"})])
        request = b"GET / HTTP/1.0\r\nHost: reviews\r\n\r\n"
        with running_proxy(cfg) as px:
            resp = await raw_request(px.outbound, request, until_close=True)
            status, fields, body = head_fields(resp)
            assert (status, body, values(fields, "connection")) == (426, b"Upgrade Required", ["close"])
            assert len(up.seen) == 0
        with running_proxy(cfg, args=["--http10", "on"]) as px:
            resp = await raw_request(px.outbound, request, until_close=True)
            assert head_fields(resp)[0] == 200 and len(up.seen) == 1


async def test_connect_failure_wording_and_flag_order(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    dead = free_port()  # nothing listens there: connection refused
    cfg = service_entry("reviews", [(dead, {"version": "v1"})]) + vs("""
  - match: [{uri: {prefix: /once}}]
    route: [{destination: {host: reviews}}]
    retries: {attempts: 0}
  - route: [{destination: {host: reviews}}]""")
    with running_proxy(cfg, args=["--access-log", str(log)]) as px:
        once = head_fields(await raw_request(px.outbound, b"GET /once HTTP/1.1\r\nHost: reviews\r\n\r\n"))
        retried = head_fields(await raw_request(px.outbound, b"GET /retried HTTP/1.1\r\nHost: reviews\r\n\r\n"))
        await wait_for(lambda: len(log.read_text().splitlines()) == 2 if log.exists() else False,
                       timeout=5, what="two access log lines")
    # Envoy 1.40's bodies for a refused connection, without and after retries.
    assert once[0] == 503 and once[2] == (
        b"upstream connect error or disconnect/reset before headers. reset reason: remote connection failure")
    assert retried[0] == 503 and retried[2] == (
        b"upstream connect error or disconnect/reset before headers. retried and the latest reset reason: "
        b"remote connection failure")
    # Flags in the order Envoy sets them: URX (retries exhausted), then UF.
    lines = log.read_text().splitlines()
    assert '" 503 UF ' in lines[0] and '" 503 URX,UF ' in lines[1], lines


async def test_forwarded_headers_per_listener_kind() -> None:
    """istiod: sidecar listeners have use_remote_address false (XFF passes
    unchanged, XFP kept or set to http); a gateway has it true with
    xff_num_trusted_hops 0 (peer appended to XFF, XFP overwritten)."""
    async with Upstream("v1") as up:
        cfg = service_entry("reviews", [(up.port, {})])
        with running_proxy(cfg, app_port=up.port) as px:
            for port in (px.outbound, px.inbound):
                await raw_request(port, b"GET / HTTP/1.1\r\nHost: reviews\r\nx-forwarded-for: 1.2.3.4\r\n"
                                        b"x-forwarded-proto: https\r\n\r\n")
                h = up.seen[-1].headers
                assert (h.get("x-forwarded-for"), h.get("x-forwarded-proto")) == ("1.2.3.4", "https"), h
                await raw_request(port, b"GET / HTTP/1.1\r\nHost: reviews\r\n\r\n")
                h = up.seen[-1].headers
                assert "x-forwarded-for" not in h and h.get("x-forwarded-proto") == "http", h
        gateway = """---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw}
spec:
  selector: {istio: ingressgateway}
  servers: [{port: {number: 8080, name: http, protocol: HTTP}, hosts: ["*"]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: front}
spec:
  hosts: ["*"]
  gateways: [gw]
  http: [{route: [{destination: {host: reviews}}]}]
"""
        with running_proxy(cfg + gateway, args=["--gateway", "gw"]) as px:
            await raw_request(px.outbound, b"GET / HTTP/1.1\r\nHost: shop\r\nx-forwarded-for: 1.2.3.4\r\n"
                                           b"x-forwarded-proto: https\r\n\r\n")
            h = up.seen[-1].headers
            assert (h.get("x-forwarded-for"), h.get("x-forwarded-proto")) == ("1.2.3.4, 127.0.0.1", "http"), h


async def test_scheme_follows_a_trusted_x_forwarded_proto() -> None:
    async with Upstream("v1") as up:
        cfg = service_entry("reviews", [(up.port, {})]) + vs("""
  - match: [{scheme: {exact: https}, uri: {prefix: /scheme}}]
    directResponse: {status: 200, body: {string: https}}
  - match: [{uri: {prefix: /scheme}}]
    directResponse: {status: 200, body: {string: http}}
  - match: [{uri: {prefix: /old}}]
    redirect: {uri: /new}
  - match: [{uri: {prefix: /noxfp}}]
    route: [{destination: {host: reviews}}]
    headers: {request: {remove: [x-forwarded-proto]}}
  - match: [{uri: {prefix: /rewritten}}]
    route: [{destination: {host: reviews}}]
    rewrite: {authority: other.example}
  - route: [{destination: {host: reviews}}]""")
        with running_proxy(cfg) as px:
            async def get(path: str, extra: str = "") -> tuple[int, list[tuple[str, str]], bytes]:
                return head_fields(await raw_request(
                    px.outbound, f"GET {path} HTTP/1.1\r\nHost: reviews\r\n{extra}\r\n".encode()))

            assert (await get("/scheme", "x-forwarded-proto: https\r\n"))[2] == b"https"
            assert (await get("/scheme"))[2] == b"http"
            _, fields, _ = await get("/old", "x-forwarded-proto: https\r\n")
            assert values(fields, "location") == ["https://reviews/new"]
            # A route's remove of x-forwarded-proto is honoured (the proxy
            # sets it before the route's operations run, as Envoy's HCM).
            await get("/noxfp")
            assert "x-forwarded-proto" not in up.seen[-1].headers
            # te: trailers goes through, reduced to "trailers"; a rewritten
            # authority is kept in x-envoy-original-host.
            await get("/rewritten", "te: trailers, deflate\r\n")
            h = up.seen[-1].headers
            assert (h.get("te"), h.get("host"), h.get("x-envoy-original-host")) == (
                "trailers", "other.example", "reviews"), h


async def test_host_forms_absolute_names_and_wildcard_virtual_services(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    async with Upstream("v1") as up:
        cfg = service_entry("reviews", [(up.port, {})]) + """---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: everything}
spec:
  hosts: ["*.default.svc.cluster.local"]
  http: [{directResponse: {status: 200, body: {string: from-vs}}}]
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: default}
spec:
  outboundTrafficPolicy: {mode: REGISTRY_ONLY}
"""
        with running_proxy(cfg, args=["--access-log", str(log)]) as px:
            async def get(target: str, host: str) -> tuple[int, bytes]:
                status, _, body = head_fields(await raw_request(
                    px.outbound, f"GET {target} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()))
                return status, body

            # The wildcard VirtualService applies to the service it matches...
            assert await get("/", "reviews") == (200, b"from-vs")
            # ...the absolute FQDN (trailing dot) names the service too...
            assert await get("/", "reviews.default.svc.cluster.local.") == (200, b"from-vs")
            # ...but a host in no ServiceEntry gets no virtual host from it:
            # like a sidecar it goes to passthrough, here blocked (502, no flag).
            assert await get("/", "other.default.svc.cluster.local") == (502, b"")
            # Absolute form without a path: Envoy's 404, no flag.
            assert (await get("http://reviews?q=1", "reviews"))[0] == 404
            assert await get("http://reviews/?q=1", "reviews") == (200, b"from-vs")
            await wait_for(lambda: len(log.read_text().splitlines()) == 5 if log.exists() else False,
                           timeout=5, what="five access log lines")
    lines = log.read_text().splitlines()
    assert '" 502 - ' in lines[2] and '" 404 - ' in lines[3], lines


async def test_grpc_status_header_is_retried_under_the_mesh_default(tmp_path: Path) -> None:
    """Istio's default retryOn has unavailable and cancelled: Envoy retries
    a response whose grpc-status header says 14 or 1, even on HTTP/1.1
    (checked against Envoy 1.40: 3 attempts, the last response, URX)."""
    log = tmp_path / "access.log"

    async def grpc(request: web.Request) -> web.StreamResponse:
        code = "14" if request.path == "/unavailable" else "13"
        return web.Response(status=200, headers={"grpc-status": code, "content-type": "application/grpc"})

    async with Upstream("v1", handler=grpc) as up:
        with running_proxy(service_entry("reviews", [(up.port, {})]), args=["--access-log", str(log)]) as px:
            status, fields, _ = head_fields(await raw_request(
                px.outbound, b"POST /unavailable HTTP/1.1\r\nHost: reviews\r\ncontent-length: 0\r\n\r\n"))
            assert (status, values(fields, "grpc-status")) == (200, ["14"])
            assert len(up.seen) == 3  # the first attempt and Istio's 2 retries
            status, _, _ = head_fields(await raw_request(
                px.outbound, b"POST /internal HTTP/1.1\r\nHost: reviews\r\ncontent-length: 0\r\n\r\n"))
            assert status == 200 and len(up.seen) == 4  # internal (13) is not in the default policy
            await wait_for(lambda: len(log.read_text().splitlines()) == 2 if log.exists() else False,
                           timeout=5, what="two access log lines")
    first, second = log.read_text().splitlines()
    assert '" 200 URX ' in first and '" 200 - ' in second, (first, second)


async def test_response_cut_after_its_head_is_upe_and_counted_as_envoy_does(tmp_path: Path) -> None:
    from tests.harness import RawUpstream, read_request_head
    from tests.integration.test_resilience import cluster_stat

    log = tmp_path / "access.log"

    async def truncated(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789")
        await writer.drain()

    async with RawUpstream(truncated) as up:
        with running_proxy(service_entry("reviews", [(up.port, {})]), args=["--access-log", str(log)]) as px:
            data = await raw_request(px.outbound, b"GET / HTTP/1.1\r\nHost: reviews\r\n\r\n", until_close=True)
            assert data.startswith(b"HTTP/1.1 200 ") and data.endswith(b"0123456789")  # then closed
            await wait_for(lambda: log.exists() and len(log.read_text().splitlines()) == 1,
                           timeout=5, what="an access log line")
            # Envoy 1.40: flag UPE (a codec protocol error), counted in
            # upstream_cx_protocol_error, not upstream_rq_rx_reset; the
            # request is completed once.
            assert cluster_stat(px, "reviews", "upstream_cx_protocol_error_total") == 1
            assert cluster_stat(px, "reviews", "upstream_rq_rx_reset_total") == 0
            assert cluster_stat(px, "reviews", "upstream_rq_completed_total") == 1
    assert '" 200 UPE ' in log.read_text(), log.read_text()


async def test_reply_at_the_headers_closes_a_connection_whose_body_was_not_read() -> None:
    """Envoy decides at the request headers: a fault abort (or any reply
    it makes then) to a POST leaves the body unread and closes the
    connection, even when the body came in the same packet; a forwarded
    POST keeps the connection."""
    async with Upstream("v1") as up:
        cfg = service_entry("reviews", [(up.port, {})]) + vs("""
  - match: [{uri: {prefix: /abort}}]
    route: [{destination: {host: reviews}}]
    fault: {abort: {httpStatus: 418, percentage: {value: 100}}}
  - route: [{destination: {host: reviews}}]""")
        with running_proxy(cfg) as px:
            body = b"x" * 10
            post = b"POST /%s HTTP/1.1\r\nHost: reviews\r\ncontent-length: 10\r\n\r\n" + body
            reader, writer = await asyncio.open_connection("127.0.0.1", px.outbound)
            try:
                writer.write(post % b"ok" + post % b"ok")  # pipelined: both forwarded on one connection
                await writer.drain()
                for _ in range(2):
                    status, fields, _ = head_fields(await asyncio.wait_for(read_response(reader), 5))
                    assert status == 200 and values(fields, "connection") == []
            finally:
                writer.close()
            resp = await raw_request(px.outbound, post % b"abort", until_close=True)
            status, fields, _ = head_fields(resp)
            assert (status, values(fields, "connection")) == (418, ["close"])
    assert len(up.seen) == 2
