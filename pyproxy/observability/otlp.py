"""OTLP/HTTP span export without holding the interpreter for long.

Why not the SDK's ``BatchSpanProcessor`` + ``OTLPSpanExporter``: its export
thread turns each batch of spans into protobuf objects in Python, about
40 µs of CPU per span, all of it holding the GIL. At Istio's default 1 %
sampling that is a 10–25 ms stretch every few seconds during which the
event loop gets the interpreter only every 5 ms (the switch interval): in
the benchmark it added several milliseconds to p99 latency at 50
connections.

``OtlpHttpProcessor`` is an SDK ``SpanProcessor`` that instead encodes each
finished span straight into OTLP protobuf bytes on the event loop (a few µs
of byte joins, with the same field values as the SDK's encoder, which a
test checks field for field), queues the bytes, and leaves only the HTTP
POST to a background thread, which blocks in the socket with the GIL
released. The wire format is the OTLP/HTTP ``ExportTraceServiceRequest``;
the ``OTEL_EXPORTER_OTLP_*`` variables it honours are listed in
``from_env``. Settings it does not implement (client certificates, a custom
CA) make ``from_env`` return None, and the caller falls back to the SDK's
exporter.
"""

from __future__ import annotations

import collections
import gzip
import http.client
import logging
import struct
import threading
import time
import urllib.parse
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor

log = logging.getLogger("pyproxy.tracing")

# The SDK batch processor's defaults (OTEL_BSP_* override them): spans
# waiting for the sender at most (more are dropped and counted), spans per
# POST at most, and how often the sender wakes.
MAX_QUEUE = 2048
MAX_BATCH = 512
SCHEDULE_DELAY = 5.0
RETRYABLE_STATUS = frozenset({429, 502, 503, 504})
MAX_ATTEMPTS = 3

_pack_d = struct.Struct("<d").pack
_pack_q = struct.Struct("<Q").pack
_pack_i = struct.Struct("<I").pack
# Span.flags: "has is_remote" always, "is_remote" when the parent came in
# from another process (the SDK encoder's convention).
_FLAGS_HAS_IS_REMOTE = 0x100
_FLAGS_IS_REMOTE = 0x200


# -- protobuf wire format (only what OTLP spans need) --------------------------

def _varint(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _len_field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2); ``tag`` is its key byte."""
    return tag + _varint(len(payload)) + payload


def _any_value(value: Any) -> bytes:
    """An ``AnyValue`` message (the oneof field is written even when it
    holds a default, as protobuf does for a set oneof)."""
    if value is None:
        return b""
    if isinstance(value, bool):
        return b"\x10" + (b"\x01" if value else b"\x00")
    if isinstance(value, str):
        return _len_field(b"\x0a", value.encode("utf-8"))
    if isinstance(value, int):
        return b"\x18" + _varint(value & 0xFFFFFFFFFFFFFFFF)
    if isinstance(value, float):
        return b"\x21" + _pack_d(value)
    if isinstance(value, bytes):
        return _len_field(b"\x3a", value)
    if isinstance(value, Sequence):
        array = b"".join(_len_field(b"\x0a", _any_value(v)) for v in value)
        return _len_field(b"\x2a", array)
    return _len_field(b"\x0a", str(value).encode("utf-8"))


# Single-byte lengths, and the encoded ``KeyValue.key`` of attribute names
# seen so far (a few dozen names in all).
_BYTE = [bytes((i,)) for i in range(256)]
_KEYS: dict[str, bytes] = {}


def _key(name: str) -> bytes:
    k = _KEYS.get(name)
    if k is None:
        k = _len_field(b"\x0a", name.encode("utf-8"))
        if len(_KEYS) < 1024:
            _KEYS[name] = k
    return k


def _attributes(tag: bytes, attrs: Mapping[str, Any] | None) -> bytes:
    """Repeated ``KeyValue`` under field ``tag``. A short string value (the
    common case) is written inline, without the general encoder's calls."""
    if not attrs:
        return b""
    out: list[bytes] = []
    append = out.append
    byte = _BYTE
    for name, value in attrs.items():
        k = _key(name)
        if type(value) is str:
            vb = value.encode("utf-8")
            n = len(vb)
            total = len(k) + n + 4  # key field, then value field of an AnyValue of 2 + n bytes
            if total < 128:
                append(tag + byte[total] + k + b"\x12" + byte[n + 2] + b"\x0a" + byte[n] + vb)
                continue
        append(_len_field(tag, k + _len_field(b"\x12", _any_value(value))))
    return b"".join(out)


def encode_span(span: ReadableSpan) -> bytes:
    """One OTLP ``Span`` message (without its field key and length)."""
    ctx = span.get_span_context()
    assert ctx is not None
    parent = span.parent
    parts = [
        b"\x0a\x10" + ctx.trace_id.to_bytes(16, "big"),
        b"\x12\x08" + ctx.span_id.to_bytes(8, "big"),
    ]
    if ctx.trace_state:
        parts.append(_len_field(b"\x1a", ",".join(f"{k}={v}" for k, v in ctx.trace_state.items()).encode()))
    if parent is not None:
        parts.append(b"\x22\x08" + parent.span_id.to_bytes(8, "big"))
    parts.append(_len_field(b"\x2a", span.name.encode("utf-8")))
    parts.append(b"\x30" + _varint(span.kind.value + 1))  # SDK enum + 1 = OTLP enum
    parts.append(b"\x39" + _pack_q(span.start_time or 0))
    parts.append(b"\x41" + _pack_q(span.end_time or 0))
    parts.append(_attributes(b"\x4a", span.attributes))
    if span.dropped_attributes:
        parts.append(b"\x50" + _varint(span.dropped_attributes))
    status = span.status
    st = b""
    if status.description:
        st += _len_field(b"\x12", status.description.encode("utf-8"))
    if status.status_code.value:
        st += b"\x18" + _varint(status.status_code.value)
    parts.append(_len_field(b"\x7a", st))  # always present, as the SDK sets it
    flags = _FLAGS_HAS_IS_REMOTE | (_FLAGS_IS_REMOTE if parent is not None and parent.is_remote else 0)
    parts.append(b"\x85\x01" + _pack_i(flags))  # field 16, fixed32
    return b"".join(parts)


def encode_envelope(resource: Any, scope: Any) -> tuple[bytes, bytes]:
    """The bytes around a batch of spans of one resource and scope: the
    ``ResourceSpans`` prefix fields and the ``ScopeSpans`` scope, computed
    once; ``request_body`` wraps the spans in them."""
    res = _attributes(b"\x0a", resource.attributes if resource is not None else None)
    scope_msg = b""
    scope_schema = b""
    if scope is not None:
        if scope.name:
            scope_msg += _len_field(b"\x0a", scope.name.encode("utf-8"))
        if scope.version:
            scope_msg += _len_field(b"\x12", scope.version.encode("utf-8"))
        scope_msg += _attributes(b"\x1a", scope.attributes)
        if scope.schema_url:
            scope_schema = _len_field(b"\x1a", scope.schema_url.encode("utf-8"))
    resource_schema = b""
    if resource is not None and resource.schema_url:
        resource_schema = _len_field(b"\x1a", resource.schema_url.encode("utf-8"))
    return (_len_field(b"\x0a", res) + resource_schema, _len_field(b"\x0a", scope_msg) + scope_schema)


def request_body(envelope: tuple[bytes, bytes], spans: Sequence[bytes]) -> bytes:
    """An ``ExportTraceServiceRequest`` with one resource and one scope."""
    resource_part, scope_part = envelope
    scope_spans = scope_part + b"".join(_len_field(b"\x12", s) for s in spans)
    resource_spans = resource_part + _len_field(b"\x12", scope_spans)
    return _len_field(b"\x0a", resource_spans)


# -- the processor -------------------------------------------------------------

class OtlpHttpProcessor(SpanProcessor):
    def __init__(self, url: str, headers: Mapping[str, str] | None = None, timeout: float = 10.0,
                 compression: str = "none", max_queue: int = MAX_QUEUE, max_batch: int = MAX_BATCH,
                 schedule_delay: float = SCHEDULE_DELAY) -> None:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"OTLP endpoint {url!r}: need http:// or https://host[:port]/path")
        self.url = url
        self.https = parsed.scheme == "https"
        self.host = parsed.hostname
        self.port = parsed.port or (443 if self.https else 80)
        self.path = (parsed.path or "/") + (f"?{parsed.query}" if parsed.query else "")
        self.headers = {"Content-Type": "application/x-protobuf", "User-Agent": "pyproxy-otlp"}
        self.headers.update(headers or {})
        self.compression = compression
        if compression in ("gzip", "deflate"):
            self.headers["Content-Encoding"] = compression
        self.timeout = timeout
        self.max_queue = max(1, max_queue)
        self.max_batch = max(1, min(max_batch, self.max_queue))
        self.schedule_delay = max(0.01, schedule_delay)
        # (envelope, encoded span): the envelope is the resource and scope
        # the span belongs to, encoded once per distinct pair.
        self.queue: collections.deque[tuple[tuple[bytes, bytes], bytes]] = collections.deque()
        self.envelopes: dict[tuple[int, int], tuple[Any, Any, tuple[bytes, bytes]]] = {}
        self.wake = threading.Event()
        self.idle = threading.Event()
        self.idle.set()
        self.stopping = False
        self.thread: threading.Thread | None = None
        self.conn: http.client.HTTPConnection | None = None
        self.spans_dropped = 0
        self.spans_sent = 0
        self.export_failures = 0

    # -- SpanProcessor (called on the event loop) ------------------------------

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        if self.stopping:
            return
        if len(self.queue) >= self.max_queue:
            self.spans_dropped += 1
            return
        resource, scope = span.resource, span.instrumentation_scope
        known = self.envelopes.get((id(resource), id(scope)))
        if known is None or known[0] is not resource or known[1] is not scope:
            if len(self.envelopes) > 64:
                self.envelopes.clear()
            known = (resource, scope, encode_envelope(resource, scope))
            self.envelopes[(id(resource), id(scope))] = known
        self.queue.append((known[2], encode_span(span)))
        if self.thread is None:
            # Started on first use, in the process that uses it (after any fork).
            self.thread = threading.Thread(target=self._run, name="pyproxy-otlp", daemon=True)
            self.thread.start()
        if len(self.queue) >= self.max_batch:
            self.wake.set()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        deadline = time.monotonic() + timeout_millis / 1000.0
        if self.thread is None:
            return True
        self.idle.clear()
        self.wake.set()
        while self.queue or not self.idle.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.idle.wait(min(left, 0.05))
        return True

    def shutdown(self) -> None:
        self.force_flush(2000)
        self.stopping = True
        self.wake.set()
        if self.thread is not None:
            self.thread.join(timeout=2.0)
        if self.conn is not None:
            self.conn.close()

    # -- the sender thread -----------------------------------------------------

    def _run(self) -> None:
        while not self.stopping:
            self.wake.wait(self.schedule_delay)
            self.wake.clear()
            self.idle.clear()
            try:
                while self.queue:
                    envelope = self.queue[0][0]
                    batch: list[bytes] = []
                    while self.queue and len(batch) < self.max_batch and self.queue[0][0] is envelope:
                        batch.append(self.queue.popleft()[1])
                    self._send(request_body(envelope, batch), len(batch))
            except Exception:  # the sender must outlive any one failure
                log.exception("span export failed")
            finally:
                self.idle.set()

    def _send(self, body: bytes, count: int) -> None:
        if self.compression == "gzip":
            body = gzip.compress(body)
        elif self.compression == "deflate":
            body = zlib.compress(body)
        delay = 0.5
        for attempt in range(1, MAX_ATTEMPTS + 1):
            status = 0
            try:
                conn = self.conn
                if conn is None:
                    cls = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
                    conn = self.conn = cls(self.host, self.port, timeout=self.timeout)
                conn.request("POST", self.path, body=body, headers=self.headers)
                resp = conn.getresponse()
                resp.read()
                status = resp.status
                if resp.will_close:
                    conn.close()
                    self.conn = None
                if 200 <= status < 300:
                    self.spans_sent += count
                    return
            except (OSError, http.client.HTTPException) as exc:
                if self.conn is not None:
                    self.conn.close()
                    self.conn = None
                err = f"{type(exc).__name__}: {exc}"
            else:
                err = f"HTTP {status}"
            if (status and status not in RETRYABLE_STATUS) or attempt == MAX_ATTEMPTS or self.stopping:
                self.export_failures += 1
                self.spans_dropped += count
                log.warning("tracing: %d spans not exported to %s (%s)", count, self.url, err)
                return
            time.sleep(delay)
            delay *= 2


def _env(env: Mapping[str, str], name: str) -> str | None:
    """The traces-specific variable, else the general one."""
    v = env.get(f"OTEL_EXPORTER_OTLP_TRACES_{name}")
    if v is None or not v.strip():
        v = env.get(f"OTEL_EXPORTER_OTLP_{name}")
    return v.strip() if v is not None and v.strip() else None


def from_env(env: Mapping[str, str]) -> OtlpHttpProcessor | None:
    """The processor for the OTLP/HTTP settings in ``env``, or None when a
    setting needs the SDK's exporter (client certificate or key, a custom CA
    bundle, an unknown compression). Honoured, as the SDK reads them:
    ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` (used as is) or
    ``OTEL_EXPORTER_OTLP_ENDPOINT`` (+ ``/v1/traces``); ``..._HEADERS``
    (``k=v,k2=v2``, URL-encoded values); ``..._TIMEOUT`` (seconds, default
    10); ``..._COMPRESSION`` (``gzip``, ``deflate``, ``none``); and the
    batch processor's ``OTEL_BSP_SCHEDULE_DELAY`` (ms, default 5000),
    ``OTEL_BSP_MAX_QUEUE_SIZE`` (2048), ``OTEL_BSP_MAX_EXPORT_BATCH_SIZE``
    (512). ``OTEL_BSP_EXPORT_TIMEOUT`` is not used: each POST is bounded by
    the OTLP timeout."""
    for name in ("CERTIFICATE", "CLIENT_CERTIFICATE", "CLIENT_KEY"):
        if _env(env, name):
            return None
    compression = (_env(env, "COMPRESSION") or "none").lower()
    if compression not in ("gzip", "deflate", "none"):
        return None
    url = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
    if not url:
        base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
        if not base:
            return None
        url = base.rstrip("/") + "/v1/traces"
    headers: dict[str, str] = {}
    for item in (_env(env, "HEADERS") or "").split(","):
        k, eq, v = item.partition("=")
        if eq and k.strip():
            headers[urllib.parse.unquote(k.strip())] = urllib.parse.unquote(v.strip())
    timeout = _number(_env(env, "TIMEOUT"), 10.0)
    return OtlpHttpProcessor(
        url, headers, timeout, compression,
        max_queue=int(_number(env.get("OTEL_BSP_MAX_QUEUE_SIZE"), MAX_QUEUE)),
        max_batch=int(_number(env.get("OTEL_BSP_MAX_EXPORT_BATCH_SIZE"), MAX_BATCH)),
        schedule_delay=_number(env.get("OTEL_BSP_SCHEDULE_DELAY"), SCHEDULE_DELAY * 1000) / 1000.0,
    )


def _number(raw: str | None, default: float) -> float:
    """A positive number from the environment, else the default (as the SDK
    ignores an unusable value)."""
    try:
        value = float(raw) if raw is not None and raw.strip() else default
    except ValueError:
        return default
    return value if value > 0 else default
