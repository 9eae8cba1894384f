"""pyproxy's OTLP span encoder must produce exactly what the OpenTelemetry
SDK's encoder produces (compared as parsed protobuf messages)."""

from __future__ import annotations

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, TraceFlags, TraceState
from opentelemetry.trace.status import Status, StatusCode

from pyproxy.observability.otlp import encode_envelope, encode_span, from_env, request_body

RESOURCE = Resource.create({"service.name": "reviews.default", "k8s.pod.count": 3, "ratio": 0.5,
                            "flag": True, "tags": ("a", "b")})
SCOPE = InstrumentationScope("pyproxy", "0.1.0")
SAMPLED = TraceFlags(TraceFlags.SAMPLED)


def _spans() -> list[ReadableSpan]:
    trace = 0x4BF92F3577B34DA6A3CE929D0E0E4736
    remote_parent = SpanContext(trace, 0x00F067AA0BA902B7, True, SAMPLED)
    server = SpanContext(trace, 0x1111111111111111, False, SAMPLED,
                         trace_state=TraceState([("vendor", "abc"), ("other", "x1")]))
    return [
        ReadableSpan("GET /reviews/0", server, remote_parent, RESOURCE,
                     {"http.request.method": "GET", "http.response.status_code": 200, "neg": -5,
                      "empty": "", "zero": 0, "false": False, "pi": 3.25, "unicode": "é✓",
                      "url.path": "/" + "p" * 200, "edge": "e" * 105},
                     kind=SpanKind.SERVER, status=Status(StatusCode.UNSET),
                     start_time=1_700_000_000_123_456_789, end_time=1_700_000_000_223_456_789,
                     instrumentation_scope=SCOPE),
        ReadableSpan("GET /reviews/0", SpanContext(trace, 0x2222222222222222, False, SAMPLED), server,
                     RESOURCE, {"upstream_address": "127.0.0.11:9080", "server.port": 9080},
                     kind=SpanKind.CLIENT, status=Status(StatusCode.ERROR, "upstream reset"),
                     start_time=1_700_000_000_130_000_000, end_time=1_700_000_000_200_000_000,
                     instrumentation_scope=SCOPE),
        ReadableSpan("x" * 300, SpanContext(1, 1, False, SAMPLED), None, RESOURCE, {},
                     kind=SpanKind.SERVER, status=Status(StatusCode.OK),
                     start_time=1, end_time=2, instrumentation_scope=SCOPE),
    ]


def test_encoding_matches_the_sdk_encoder_field_for_field() -> None:
    spans = _spans()
    expected = encode_spans(spans)
    body = request_body(encode_envelope(RESOURCE, SCOPE), [encode_span(s) for s in spans])
    ours = ExportTraceServiceRequest.FromString(body)
    assert ours == expected, f"ours:\n{ours}\nSDK:\n{expected}"
    # and the parsed message re-serialises to the same bytes protobuf would write
    assert ours.SerializeToString() == expected.SerializeToString()


def test_from_env_reads_the_otlp_variables_and_defers_tls_client_settings() -> None:
    assert from_env({}) is None
    p = from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/",
                  "OTEL_EXPORTER_OTLP_HEADERS": "x-token=a%20b, tenant=t1",
                  "OTEL_EXPORTER_OTLP_TIMEOUT": "3", "OTEL_EXPORTER_OTLP_COMPRESSION": "gzip"})
    assert p is not None
    assert (p.host, p.port, p.path, p.timeout) == ("collector", 4318, "/v1/traces", 3.0)
    assert p.headers["x-token"] == "a b" and p.headers["tenant"] == "t1"
    assert p.headers["Content-Encoding"] == "gzip"
    assert (p.max_queue, p.max_batch, p.schedule_delay) == (2048, 512, 5.0)  # the SDK's defaults
    b = from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_BSP_SCHEDULE_DELAY": "250",
                  "OTEL_BSP_MAX_QUEUE_SIZE": "100", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "10"})
    assert b is not None and (b.max_queue, b.max_batch, b.schedule_delay) == (100, 10, 0.25)
    bad = from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_BSP_SCHEDULE_DELAY": "soon",
                    "OTEL_EXPORTER_OTLP_TIMEOUT": "-1"})
    assert bad is not None and (bad.schedule_delay, bad.timeout) == (5.0, 10.0)
    t = from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://ignored:1",
                  "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://traces.example:8443/custom"})
    assert t is not None and (t.https, t.host, t.port, t.path) == (True, "traces.example", 8443, "/custom")
    assert from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
                     "OTEL_EXPORTER_OTLP_CERTIFICATE": "/etc/ca.pem"}) is None
    assert from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
                     "OTEL_EXPORTER_OTLP_COMPRESSION": "zstd"}) is None
