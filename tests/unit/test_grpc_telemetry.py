"""Unit tests (no sockets) for gRPC telemetry: the message counter over
length-prefixed frames fed in arbitrary pieces, grpc_response_status as
Envoy's getGrpcStatus picks it, and the Istio metrics a gRPC call records
(request_protocol, grpc_response_status, the message counters and their
20 labels)."""

from __future__ import annotations

import random
from types import SimpleNamespace

from prometheus_client.parser import text_string_to_metric_families

from pyproxy.http.grpc import GrpcCall, MessageCounter, is_grpc, is_grpc_web, status_label
from pyproxy.observability.metrics import (
    ISTIO_LABELS,
    MESSAGE_LABELS,
    IstioMetrics,
    merge_states,
    render_prometheus,
)
from pyproxy.snapshot import ProxyIdentity


def _frame(payload: bytes, flag: int = 0) -> bytes:
    return bytes([flag]) + len(payload).to_bytes(4, "big") + payload


def test_message_counter_counts_frames_whatever_the_pieces() -> None:
    rng = random.Random(7)
    frames = [_frame(b""), _frame(b"x" * 3), _frame(b"y" * 70000), _frame(b"z"), _frame(b"\x00" * 5)]
    stream = b"".join(frames)
    for _ in range(200):
        c = MessageCounter()
        i = 0
        while i < len(stream):
            step = rng.choice((1, 2, 3, 4, 5, 6, 7, 100, 70000))
            c.feed(stream[i:i + step])
            i += step
        assert c.count == len(frames)
    whole = MessageCounter()
    whole.feed(stream)
    assert whole.count == 5 and whole.skip == 0 and whole.head == b""


def test_message_counter_counts_a_message_at_its_first_byte_and_skips_grpc_web_trailers() -> None:
    c = MessageCounter()
    c.feed(b"\x00")  # Envoy's FrameInspector counts at the flag byte
    assert c.count == 1
    c.feed(b"\x00\x00\x00\x02ab")
    assert c.count == 1
    c.feed(_frame(b"grpc-status:0\r\n", 0x80))  # gRPC-Web trailers frame: not a message
    assert c.count == 1
    c.feed(_frame(b"q", 0x01))  # compressed message
    assert c.count == 2


def test_content_types() -> None:
    assert is_grpc(b"application/grpc") and is_grpc(b"application/grpc+proto")
    assert not is_grpc(b"application/grpc-web") and not is_grpc(None)
    assert is_grpc_web(b"application/grpc-web") and is_grpc_web(b"application/grpc-web+proto")
    assert is_grpc_web(b"application/grpc-web-text") and is_grpc_web(b"application/grpc-web-text+proto")
    assert not is_grpc_web(b"application/grpc") and not is_grpc_web(b"application/grpc-webx")


def test_grpc_status_order_is_trailers_headers_then_http_status() -> None:
    call = GrpcCall()
    assert call.status(0) == ""  # no response at all
    assert call.status(200) == "2"  # 200 without grpc-status: UNKNOWN (httpToGrpcStatus)
    assert call.status(503) == "14" and call.status(404) == "12" and call.status(401) == "16"
    call.on_response_headers([(b"content-type", b"application/grpc"), (b"grpc-status", b"7")])
    assert call.status(200) == "7"
    call.on_trailers([(b"grpc-status", b"0"), (b"grpc-message", b"")])
    assert call.status(200) == "0"
    assert status_label(b"16") == "16" and status_label(b"17") == "-1" and status_label(b"x") == "-1"


def _metrics() -> IstioMetrics:
    return IstioMetrics(ProxyIdentity(workload="client-v1", namespace="default", labels=(("app", "client"),)))


def _ex(grpc: GrpcCall | None, status: int = 200, host: bytes = b"greeter") -> SimpleNamespace:
    return SimpleNamespace(status=status, flags=[], flag_string="-", grpc=grpc, cluster=None, direction=0,
                           host=host, peer=None, target_choice=None, start_time=1.0, end_time=1.002,
                           request_bytes=10, response_bytes=20)


def test_grpc_calls_get_their_protocol_status_and_message_counts() -> None:
    m = _metrics()
    for n in range(3):
        call = GrpcCall()
        call.requests.feed(_frame(b"a") * (n + 1))
        call.responses.feed(_frame(b"b") * 2)
        call.header_status = b"0"
        m.record(_ex(call))  # type: ignore[arg-type]
    failed = GrpcCall()
    failed.requests.feed(_frame(b"a"))
    m.record(_ex(failed, status=503))  # type: ignore[arg-type]
    m.record(_ex(None))  # type: ignore[arg-type]  # plain HTTP
    rows = {tuple(r[0]): r[1] for r in m.rows()}
    proto = ISTIO_LABELS.index("request_protocol")
    gstat = ISTIO_LABELS.index("grpc_response_status")
    by = {(k[proto], k[gstat], k[ISTIO_LABELS.index("response_code")]): v for k, v in rows.items()}
    assert by == {("grpc", "0", "200"): 3, ("grpc", "14", "503"): 1, ("http", "", "200"): 1}
    msgs = m.message_rows()
    assert len(msgs) == 1 and len(msgs[0][0]) == len(MESSAGE_LABELS) == 20
    assert msgs[0][1:] == [1 + 2 + 3 + 1, 2 * 3]

    state = {"istio": m.rows(), "istio_messages": msgs, "clusters": {}, "downstream": {},
             "reloads": {"success": 0, "failure": 0}, "started_at": 0.0, "config_version": 1}
    merged = merge_states([state, dict(state)])
    text = render_prometheus(merged).decode()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    req = [s for s in fams["istio_request_messages"].samples if s.name == "istio_request_messages_total"]
    resp = [s for s in fams["istio_response_messages"].samples if s.name == "istio_response_messages_total"]
    assert [s.value for s in req] == [14] and [s.value for s in resp] == [12]
    assert sorted(req[0].labels) == sorted(MESSAGE_LABELS)
    assert req[0].labels["source_workload"] == "client-v1" and req[0].labels["reporter"] == "source"


def test_no_message_families_without_grpc() -> None:
    m = _metrics()
    m.record(_ex(None))  # type: ignore[arg-type]
    state = {"istio": m.rows(), "istio_messages": m.message_rows(), "clusters": {}, "downstream": {},
             "reloads": {"success": 0, "failure": 0}, "started_at": 0.0, "config_version": 1}
    assert b"istio_request_messages" not in render_prometheus(state)


def test_grpc_web_calls() -> None:
    from pyproxy.http.grpc import call_for

    assert call_for(None) is None and call_for(b"application/json") is None
    assert call_for(b"application/grpcx") is None
    assert call_for(b"application/grpc") is not None and not call_for(b"application/grpc-web+proto").text
    text = call_for(b"application/grpc-web-text")
    assert text is not None and text.text
    text.responses.feed(b"AAAAAAJhYg==")  # base64: not counted
    assert text.responses.count == 0
    # Binary gRPC-Web: the trailers frame at the end of the body is the status, split anywhere.
    body = _frame(b"msg") + _frame(b"grpc-status:5\r\ngrpc-message:not%20found\r\n", 0x80)
    for cut in range(1, len(body)):
        call = call_for(b"application/grpc-web+proto")
        assert call is not None
        call.responses.feed(body[:cut])
        call.responses.feed(body[cut:])
        assert call.responses.count == 1 and call.status(200) == "5", cut
