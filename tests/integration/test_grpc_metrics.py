"""gRPC telemetry as Istio reports it, checked from /stats/prometheus with
prometheus-client's parser: request_protocol="grpc", grpc_response_status
from trailers-only replies (local ones and an upstream's) and from the HTTP
status, and istio_request_messages_total / istio_response_messages_total
counted from the messages' 5-byte prefixes. Real grpcio client, real proxy
process, a real HTTP/1.1 upstream answering with grpc-status in its headers."""

from __future__ import annotations

import asyncio
import base64

import grpc
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import Upstream, http_get, raw_request, running_proxy, service_entry
from tests.integration.test_grpc_local_replies import VS, grpc_call


def frame(payload: bytes) -> bytes:
    return b"\x00" + len(payload).to_bytes(4, "big") + payload


def scrape(px) -> list:  # type: ignore[no-untyped-def]
    status, body = http_get(px.stats_url + "/stats/prometheus")
    assert status == 200
    return list(text_string_to_metric_families(body.decode()))


def samples(fams: list, name: str) -> list:
    return [s for f in fams for s in f.samples if s.name == name]


async def test_grpc_labels_and_message_counters() -> None:
    async def answer(request: web.Request) -> web.StreamResponse:
        await request.read()
        # A "trailers-only"-style answer over HTTP/1.1: grpc-status in the
        # headers, two response messages in the body.
        return web.Response(body=frame(b"one") + frame(b"two"),
                            headers={"content-type": "application/grpc", "grpc-status": "0"})

    async with Upstream("reviews", answer) as up:
        mesh = {"10-registry.yaml": service_entry("reviews", [(up.port, {"app": "reviews"})]), "20-vs.yaml": VS}
        with running_proxy(mesh) as px:
            # Local replies: a 403 fault (grpc-status 7) twice, over h2c with grpcio.
            for _ in range(2):
                code, _ = await asyncio.to_thread(grpc_call, px.outbound, "/pkg.Svc/Denied")
                assert code == grpc.StatusCode.PERMISSION_DENIED
            # Proxied over HTTP/1.1: three request messages, two response messages.
            req = frame(b"ab") + frame(b"cd") + frame(b"ef")
            raw = await raw_request(px.outbound, b"POST /pkg.Svc/Get HTTP/1.1\r\nHost: reviews:9080\r\n"
                                    b"content-type: application/grpc\r\ncontent-length: "
                                    + str(len(req)).encode() + b"\r\n\r\n" + req)
            assert raw.startswith(b"HTTP/1.1 200") and b"grpc-status: 0" in raw, raw
            # Not gRPC: request_protocol "http", grpc_response_status "".
            raw = await raw_request(px.outbound, b"GET /pkg.Svc/Get HTTP/1.1\r\nHost: reviews:9080\r\n\r\n")
            assert raw.startswith(b"HTTP/1.1 200"), raw

            fams = await asyncio.to_thread(scrape, px)
            got = {(s.labels["request_protocol"], s.labels["response_code"], s.labels["grpc_response_status"],
                    s.labels["response_flags"]): s.value for s in samples(fams, "istio_requests_total")}
            assert got == {("grpc", "200", "7", "FI"): 2, ("grpc", "200", "0", "-"): 1, ("http", "200", "", "-"): 1}, got
            req_msgs = {s.labels["destination_workload"]: s for s in samples(fams, "istio_request_messages_total")}
            resp_msgs = {s.labels["destination_workload"]: s.value
                         for s in samples(fams, "istio_response_messages_total")}
            # Proxied: 3 request and 2 response messages, to the endpoint's
            # workload. The fault aborts answered at the request's headers:
            # its body was never read (as Envoy), no messages, no destination.
            assert {k: s.value for k, s in req_msgs.items()} == {"reviews": 3, "unknown": 0}, req_msgs
            assert resp_msgs == {"reviews": 2, "unknown": 0}, resp_msgs
            labels = req_msgs["reviews"].labels
            assert "request_protocol" not in labels and "grpc_response_status" not in labels
            assert labels["reporter"] == "source" and labels["destination_service_name"] == "reviews"
            assert len(labels) == 20


async def test_grpc_web_passes_through_and_is_reported_as_grpc() -> None:
    """gRPC-Web is not translated: the upstream (a gRPC-Web server) gets the
    request as sent, over HTTP/1.1 from an HTTP/1.1 or an HTTP/2 client, and
    the client gets its body with the trailers frame untouched. Telemetry
    reports the call as gRPC (Istio does after its grpc_web filter), the
    status from the trailers frame."""
    from tests.integration.test_http2 import H2Client

    seen: list[tuple[str, bytes]] = []
    status = b"grpc-status:5\r\ngrpc-message:no\r\n"
    trailers = b"\x80" + len(status).to_bytes(4, "big") + status

    async def grpc_web_server(request: web.Request) -> web.StreamResponse:
        ctype = request.headers["content-type"]
        seen.append((ctype, await request.read()))
        body = frame(b"r1") + frame(b"r2") + trailers
        if ctype == "application/grpc-web-text":
            body = base64.b64encode(body)
        return web.Response(body=body, headers={"content-type": ctype})

    async with Upstream("reviews", grpc_web_server) as up:
        mesh = {"10-registry.yaml": service_entry("reviews", [(up.port, {"app": "reviews"})]), "20-vs.yaml": VS}
        with running_proxy(mesh) as px:
            req = frame(b"q")
            raw = await raw_request(px.outbound, b"POST /pkg.Svc/Get HTTP/1.1\r\nHost: reviews:9080\r\n"
                                    b"content-type: application/grpc-web+proto\r\nx-grpc-web: 1\r\n"
                                    b"content-length: " + str(len(req)).encode() + b"\r\n\r\n" + req)
            assert raw.startswith(b"HTTP/1.1 200"), raw
            assert raw.endswith(frame(b"r1") + frame(b"r2") + trailers), raw
            c = await asyncio.to_thread(H2Client, px.outbound)
            try:
                sid = c.request("/pkg.Svc/Get", [(b"content-type", b"application/grpc-web-text")], end=False)
                c.conn.send_data(sid, b"AAAAAAFx", end_stream=True)
                c.flush()
                headers, body, _ = await asyncio.to_thread(c.response, sid)
            finally:
                c.close()
            assert headers is not None and headers[b":status"] == b"200"
            assert body == base64.b64encode(frame(b"r1") + frame(b"r2") + trailers)
            fams = await asyncio.to_thread(scrape, px)
    assert seen == [("application/grpc-web+proto", req), ("application/grpc-web-text", b"AAAAAAFx")]
    got = {(s.labels["request_protocol"], s.labels["grpc_response_status"]): s.value
           for s in samples(fams, "istio_requests_total")}
    # The text variant's trailers are base64 in the body: not read, so its
    # status is the HTTP status mapped (200 -> 2).
    assert got == {("grpc", "5"): 1, ("grpc", "2"): 1}, got
    # Binary gRPC-Web is counted (1 request, 2 response messages, the trailers
    # frame is none); the base64 text variant is not decoded, so not counted.
    assert [s.value for s in samples(fams, "istio_request_messages_total")] == [1]
    assert [s.value for s in samples(fams, "istio_response_messages_total")] == [2]
