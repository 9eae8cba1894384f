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
