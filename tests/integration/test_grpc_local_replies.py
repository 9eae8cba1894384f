"""Local replies to gRPC requests are trailers-only gRPC statuses (Envoy's
sendLocalReply, spec §2.3): a real grpcio client over h2c through the
sidecar, and the same request over HTTP/1.1 and HTTP/2 (h2 library)."""

from __future__ import annotations

import asyncio

import grpc
import h2.events
import pytest

from tests.harness import free_port, raw_request, running_proxy, service_entry
from tests.integration.test_http2 import H2Client

VS = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - match: [{uri: {prefix: /pkg.Svc/Denied}}]
    fault: {abort: {httpStatus: 403, percentage: {value: 100}}}
    route: [{destination: {host: reviews}}]
  - match: [{uri: {prefix: /pkg.Svc/Limited}}]
    fault: {abort: {httpStatus: 429, percentage: {value: 100}}}
    route: [{destination: {host: reviews}}]
  - match: [{uri: {prefix: /pkg.Svc/}}]
    route: [{destination: {host: reviews}}]
"""


def mesh() -> dict[str, str]:
    dead = free_port()  # nothing listens: connection refused (UF)
    return {"10-registry.yaml": service_entry("reviews", [(dead, {"app": "reviews"})]), "20-vs.yaml": VS}


def grpc_call(port: int, method: str) -> tuple[grpc.StatusCode, str]:
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.default_authority", "reviews:9080")]) as ch:
        call = ch.unary_unary(method)  # raw bytes both ways: no generated code needed
        try:
            call(b"\x08\x01", timeout=10)
        except grpc.RpcError as exc:
            return exc.code(), exc.details()
    raise AssertionError("the call succeeded")


@pytest.mark.parametrize(("method", "code", "message"), [
    ("/pkg.Svc/Get", grpc.StatusCode.UNAVAILABLE, "upstream connect error"),  # 503 UF -> 14
    ("/pkg.Svc/Denied", grpc.StatusCode.PERMISSION_DENIED, "fault filter abort"),  # 403 -> 7
    ("/pkg.Svc/Limited", grpc.StatusCode.UNAVAILABLE, "fault filter abort"),  # 429 -> 14
    ("/other.Svc/Get", grpc.StatusCode.UNIMPLEMENTED, ""),  # 404 NR -> 12
])
async def test_grpcio_client_gets_grpc_statuses(method: str, code: grpc.StatusCode, message: str) -> None:
    with running_proxy(mesh()) as px:
        got_code, details = await asyncio.to_thread(grpc_call, px.outbound, method)
        assert got_code == code, (got_code, details)
        assert details.startswith(message), details


async def test_trailers_only_on_http2_and_http11() -> None:
    with running_proxy(mesh()) as px:
        c = await asyncio.to_thread(H2Client, px.outbound)
        try:
            sid = c.request("/pkg.Svc/Denied", [(b"content-type", b"application/grpc"), (b"te", b"trailers")])
            evs = await asyncio.to_thread(c.events, lambda g: any(
                isinstance(e, h2.events.StreamEnded) and e.stream_id == sid for e in g))
            mine = [e for e in evs if getattr(e, "stream_id", None) == sid]
            # One HEADERS frame with END_STREAM: no DATA, no separate trailers.
            assert isinstance(mine[0], h2.events.ResponseReceived) and mine[0].stream_ended is not None
            assert not any(isinstance(e, (h2.events.DataReceived, h2.events.TrailersReceived)) for e in mine)
            headers = dict(mine[0].headers)
            assert headers[b":status"] == b"200"
            assert headers[b"content-type"] == b"application/grpc"
            assert headers[b"grpc-status"] == b"7"
            assert headers[b"grpc-message"] == b"fault filter abort"
        finally:
            c.close()
        # HTTP/1.1: the same statuses, content-length 0.
        raw = await raw_request(px.outbound, b"POST /pkg.Svc/Get HTTP/1.1\r\nHost: reviews:9080\r\n"
                                b"content-type: application/grpc+proto\r\ncontent-length: 0\r\n\r\n")
        head = raw.split(b"\r\n\r\n")[0].lower()
        assert head.startswith(b"http/1.1 200"), raw
        assert b"\r\ngrpc-status: 14\r\n" in head and b"\r\ncontent-length: 0" in head
        assert b"\r\ngrpc-message: upstream connect error" in head
        # gRPC-Web is not gRPC: its local replies stay HTTP (no grpc_web filter).
        raw = await raw_request(px.outbound, b"POST /pkg.Svc/Get HTTP/1.1\r\nHost: reviews:9080\r\n"
                                b"content-type: application/grpc-web\r\ncontent-length: 0\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 503"), raw


def slow_mesh(port: int, timeout: str | None) -> dict[str, str]:
    vs = f"""
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews}}
spec:
  hosts: [reviews]
  http:
  - route: [{{destination: {{host: reviews}}}}]
{f"    timeout: {timeout}" if timeout else ""}
"""
    return {"10-registry.yaml": service_entry("reviews", [(port, {"app": "reviews"})]), "20-vs.yaml": vs}


def grpc_post(timeout: bytes | None, ctype: bytes = b"application/grpc") -> bytes:
    return (b"POST /pkg.Svc/Slow HTTP/1.1\r\nHost: reviews:9080\r\ncontent-type: " + ctype + b"\r\n"
            + (b"grpc-timeout: " + timeout + b"\r\n" if timeout else b"") + b"content-length: 0\r\n\r\n")


async def test_grpc_timeout_honoured_and_capped_by_the_route_timeout() -> None:
    from aiohttp import web

    from tests.harness import Upstream

    async def slow(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(2.0)
        return web.Response(text="late")

    async with Upstream("reviews", slow) as up:
        # No VirtualService timeout: grpc-timeout alone sets the deadline.
        with running_proxy(slow_mesh(up.port, None)) as px:
            raw = await raw_request(px.outbound, grpc_post(b"300m"), read_timeout=10)
            head = raw.split(b"\r\n\r\n")[0].lower()
            assert head.startswith(b"http/1.1 200") and b"\r\ngrpc-status: 14\r\n" in head, raw
            assert b"\r\ngrpc-message: upstream request timeout" in head
            # Not gRPC (or a malformed header): no deadline, the upstream's answer.
            for req in (grpc_post(b"300m", b"application/json"), grpc_post(b"300x")):
                raw = await raw_request(px.outbound, req, read_timeout=10)
                assert raw.startswith(b"HTTP/1.1 200") and raw.endswith(b"late"), raw
        # A VirtualService timeout caps a longer grpc-timeout (Istio's max_grpc_timeout).
        with running_proxy(slow_mesh(up.port, "0.3s")) as px:
            raw = await raw_request(px.outbound, grpc_post(b"20S"), read_timeout=10)
            assert b"\r\ngrpc-status: 14\r\n" in raw.split(b"\r\n\r\n")[0].lower(), raw
            c = await asyncio.to_thread(H2Client, px.outbound)
            try:
                sid = c.request("/pkg.Svc/Slow", [(b"content-type", b"application/grpc"), (b"grpc-timeout", b"20S")])
                headers, _, _ = await asyncio.to_thread(c.response, sid)
                assert headers is not None and headers[b"grpc-status"] == b"14", headers
            finally:
                c.close()
