"""HTTP/2 to upstream endpoints (h2c prior knowledge), on the ``h2``
library's sans-IO state machine, multiplexed: many requests share one
connection.

Three pieces, no task per stream:

- ``H2Endpoint``: a ``ClusterEndpoint`` whose requests go out as HTTP/2
  streams (a cluster whose upstream protocol is HTTP/2, or the client's
  protocol with an HTTP/2 client: see ``settings.upstream_protocol``). Its
  pool of HTTP/2 connections sits next to the HTTP/1.1 pool it inherits
  (used for HTTP/1.1 clients under ``useClientProtocol``, and for upgrade
  requests, which HTTP/2 cannot carry without extended CONNECT).
- ``H2Connection``: the asyncio protocol of one connection, one
  ``h2.connection.H2Connection`` dispatching events to its streams.
- ``H2Attempt``: one stream, the per-try object an ``Exchange`` (or a mirror
  request) holds as its upstream connection. It offers the methods of
  ``UpstreamConnection`` (attach, write, pause/resume reading, detach) and
  calls back the same ``on_upstream_*`` methods, plus
  ``on_upstream_trailers``. A retry acquires a new ``H2Attempt``: a new
  stream, never a reset one.

The codec seam is the byte stream, as on the downstream side
(``http/h2downstream.py``): the Exchange writes its request as HTTP/1.1
bytes (head, body, chunked or not, chunked trailers); ``H2Attempt`` parses
them back with httptools' request parser (about a microsecond, against the
~100 µs ``h2`` spends per request) and sends HEADERS, DATA and trailers.
The HTTP/1.1 upstream path is untouched.

Pool rules (Envoy's HTTP/2 connection pool): a new stream goes on the first
connection that has room (fewer active streams than the peer's
SETTINGS_MAX_CONCURRENT_STREAMS, the DestinationRule's
``maxConcurrentStreams`` and pyproxy's own bound ``MAX_STREAMS``; fewer
requests so far than ``maxRequestsPerConnection``); otherwise it waits
(``http1MaxPendingRequests`` bounds the waiting, overflow is 503 UO) and a
connection is opened when the waiting streams exceed what the connections
being opened will take (``maxConnections`` bounds them, as for HTTP/1.1).
``http2MaxRequests`` (Envoy's max_requests) is counted by the Exchange for
every protocol. A GOAWAY from the upstream drains its connection: no new
streams; streams above its last stream id were not processed and are
reset as REFUSED_STREAM (retried under ``refused-stream``, Istio's
default, as Envoy's RemoteRefusedStreamReset). An idle connection closes
with GOAWAY after ``idleTimeout``.

Flow control: each stream's receive window (``STREAM_WINDOW``) is handed
back only as the client takes the response (an Exchange whose client is
slow pauses its attempt: nothing is acknowledged until it resumes), so a
slow reader stops its own stream and never the others; the connection
window is ``MAX_STREAMS`` stream windows, so paused streams can never
exhaust it. Request bodies go out as the upstream's windows admit; past
``STREAM_BUFFER`` buffered the Exchange stops reading its client.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import deque
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import httptools
from h2.errors import ErrorCodes

from ..http.hpack_static import StaticEncoder
from ..security.upstream import connect as tls_connect
from ..security.upstream import tls_failed, tls_verified
from .cluster import OVERFLOW, ClusterEndpoint
from .connection import MAX_RESPONSE_HEADER_BYTES, MAX_RESPONSE_HEADERS
from .dial import Dial, numeric_address
from .settings import DOWNSTREAM

log = logging.getLogger("pyproxy.upstream.h2")

# pyproxy's own bound on concurrent streams per upstream connection (Envoy's
# default is 2^31-1; Istio's clusters leave it): with STREAM_WINDOW it bounds
# what one connection can make pyproxy hold.
MAX_STREAMS = 128
# Streams assumed allowed before the peer's SETTINGS arrive (RFC 9113 6.5.2
# recommends at least 100).
INITIAL_PEER_STREAMS = 100
STREAM_WINDOW = 1 << 20
CONNECTION_WINDOW = MAX_STREAMS * STREAM_WINDOW
# Request body one stream may buffer beyond the upstream's window before its
# Exchange stops reading the client.
STREAM_BUFFER = 64 << 10
_DEFAULT_WINDOW = 65535
# Output an upstream leaves unread (our acknowledgements of its frames
# included) before the connection is cut (as the downstream side's bound).
MAX_UNREAD_OUTPUT = 8 << 20
# Flood budgets, the client side's numbers (http/h2downstream.py): PING,
# SETTINGS, PRIORITY and unknown frames, a token bucket of CONTROL_BURST
# refilled at CONTROL_RATE per second; empty DATA frames without END_STREAM
# in a row. (WINDOW_UPDATE is not counted: a peer reading a large request
# body legitimately sends many.) Over either: GOAWAY(ENHANCE_YOUR_CALM).
CONTROL_BURST = 1000
CONTROL_RATE = 500.0
MAX_EMPTY_DATA = 10
_CONTROL_EVENTS = (h2.events.PingReceived, h2.events.PingAckReceived, h2.events.RemoteSettingsChanged,
                   h2.events.SettingsAcknowledged, h2.events.PriorityUpdated, h2.events.UnknownFrameReceived)

_CONNECTION_SPECIFIC = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding",
                                  b"upgrade", b"host"})


class _ClientState(h2.connection.H2Connection):
    """The h2 library's state machine, but a graceful GOAWAY (NO_ERROR) does
    not close it: the library moves to CLOSED on any GOAWAY and would then
    refuse every later frame, including those of the streams the upstream
    still answers (and the PING grpc-core sends with its GOAWAY). No stream
    is opened on a connection after its GOAWAY (H2Connection.draining)."""

    def _receive_goaway_frame(self, frame: Any) -> Any:
        result = super()._receive_goaway_frame(frame)
        if frame.error_code == 0:
            self.state_machine.state = h2.connection.ConnectionState.CLIENT_OPEN
        return result


def _h2_state() -> h2.connection.H2Connection:
    config = h2.config.H2Configuration(
        client_side=True, header_encoding=None,
        # What goes out was built by pyproxy from validated requests; what
        # comes in is validated by the library (a malformed response is a
        # protocol error).
        validate_outbound_headers=False, normalize_outbound_headers=False,
    )
    conn = _ClientState(config)
    # Applied at once (the library would wait for the peer's ACK): the
    # peer reads our SETTINGS before any stream, and what it may send only
    # grows with them.
    conn.local_settings = h2.settings.Settings(client=True, initial_values={
        h2.settings.SettingCodes.ENABLE_PUSH: 0,
        h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
        h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: MAX_RESPONSE_HEADER_BYTES,
    })
    # An HPACK bomb ends the connection; lists over 60 KiB below this are a
    # protocol error of their stream only (H2Attempt._on_response).
    conn.decoder.max_header_list_size = 4 * MAX_RESPONSE_HEADER_BYTES
    # Request headers without HPACK's dynamic table, each field's bytes
    # cached per process (http/hpack_static.py, as the downstream codec).
    conn.encoder = StaticEncoder()  # type: ignore[assignment]
    return conn


class H2Attempt:
    """One stream of an upstream HTTP/2 connection; see the module doc."""

    __slots__ = (
        "conn", "endpoint", "sid", "stream", "sink", "parser", "url", "fields", "trailers", "head_done",
        "head_sent", "local_ended", "remote_ended", "out", "out_bytes", "end_pending", "write_paused",
        "read_paused", "unacked", "done", "head_request", "scheme", "reset",
    )

    # What the Exchange's retry logic and tests may check.
    h2 = True

    def __init__(self, conn: H2Connection) -> None:
        self.conn = conn
        self.endpoint: H2Endpoint = conn.endpoint
        self.sid = 0
        self.stream: Any = None
        self.sink: Any = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.fields: list[tuple[bytes, bytes]] = []
        self.trailers: list[tuple[bytes, bytes]] = []
        self.head_done = False
        self.head_sent = False
        self.local_ended = False
        self.remote_ended = False
        self.out: list[bytes] = []  # request body the upstream's windows do not admit yet
        self.out_bytes = 0
        self.end_pending = False
        self.write_paused = False  # the attempt's stream was told to stop sending
        self.read_paused = False  # the client is slow: nothing is acknowledged
        self.unacked = 0
        self.done = False
        self.head_request = False
        self.scheme = b"http"
        self.reset = False

    # -- UpstreamConnection's interface (what an Exchange calls) --------------

    @property
    def closed(self) -> bool:
        return self.done or self.conn.closed

    def attach(self, stream: Any, head_request: bool = False, sink: Any = None) -> None:
        self.stream = stream
        self.sink = sink
        self.head_request = head_request
        scheme = getattr(stream, "scheme", None)
        if scheme:
            self.scheme = scheme

    def write(self, data: bytes) -> None:
        if self.done or self.reset:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            # (An upgrade request never gets here: H2Endpoint sends it over HTTP/1.1.)
            log.exception("unparsable request bytes for an HTTP/2 upstream stream")
            self.fail_soon("protocol_error", ErrorCodes.INTERNAL_ERROR)
            return
        if self.head_done and not self.head_sent and not self.reset:
            self._send_head(False)  # the body follows in later writes
        self.conn.flush()

    def detach(self) -> None:
        self.stream = None

    def pause_reading(self) -> None:
        self.read_paused = True

    def resume_reading(self) -> None:
        if self.read_paused:
            self.read_paused = False
            n = self.unacked
            if n:
                self.unacked = 0
                self.conn.ack(self.sid, n)
                self.conn.flush()

    def close(self) -> None:
        self.stream = None
        self.finish()

    abort = close

    # -- httptools request-parser callbacks (the Exchange's HTTP/1.1 bytes) ----

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.head_done:
            self.trailers.append((name.lower(), value))
        else:
            self.fields.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.head_done = True

    def on_body(self, body: bytes) -> None:
        if not self.head_sent:
            self._send_head(False)
        if body and not self.reset:
            self._send_data(body)

    def on_message_complete(self) -> None:
        if not self.head_sent:
            self._send_head(True)
            self.local_ended = True
            return
        if self.out:
            self.end_pending = True
        else:
            self._end_local()

    # -- sending ------------------------------------------------------------------

    def _send_head(self, end: bool) -> None:
        self.head_sent = True
        authority = b""
        headers = [(b":method", self.parser.get_method()), (b":scheme", self.scheme), (b":authority", b""),
                   (b":path", self.url)]
        append = headers.append
        for name, value in self.fields:
            if name in _CONNECTION_SPECIFIC:
                if name == b"host":
                    authority = value
                continue
            if name == b"te" and value.lower() != b"trailers":
                continue
            append((name, value))
        headers[2] = (b":authority", authority)
        self.fields = []
        self.conn.open_stream(self, headers, end)

    def _send_data(self, data: bytes) -> None:
        if self.out:
            self.out.append(data)
            self.out_bytes += len(data)
        else:
            rest = self.conn.send_window(self, data)
            if rest:
                self.out.append(rest)
                self.out_bytes += len(rest)
        if self.out_bytes > STREAM_BUFFER and not self.write_paused and self.stream is not None:
            self.write_paused = True
            self.stream.on_upstream_write_paused()

    def _end_local(self) -> None:
        self.local_ended = True
        trailers = self.trailers
        if trailers:
            self.trailers = []
            self.conn.send_trailers(self, [(n, v) for n, v in trailers if n not in _CONNECTION_SPECIFIC])
        else:
            self.conn.end_stream(self)

    def drain(self) -> None:
        """The upstream opened its window: send what waits."""
        if not self.out or self.reset:
            return
        data = b"".join(self.out)
        self.out.clear()
        rest = self.conn.send_window(self, data)
        self.out_bytes = len(rest)
        if rest:
            self.out.append(rest)
        elif self.end_pending:
            self.end_pending = False
            self._end_local()
        if self.write_paused and self.out_bytes <= STREAM_BUFFER // 2 and not self.conn.write_paused:
            self.write_paused = False
            if self.stream is not None:
                self.stream.on_upstream_write_resumed()

    # -- events from the connection ------------------------------------------------

    def _on_response(self, raw: list[tuple[bytes, bytes]], ended: bool) -> None:
        status = 0
        headers: list[tuple[bytes, bytes]] = []
        size = 0
        framed = False
        for name, value in raw:
            size += len(name) + len(value) + 4
            if name[:1] == b":":
                if name == b":status":
                    status = int(value)  # (the library checked it: three digits)
                continue
            if name == b"content-length":
                framed = True
            headers.append((name, value))
        if len(headers) > MAX_RESPONSE_HEADERS or size > MAX_RESPONSE_HEADER_BYTES:
            # Envoy 1.40's HTTP/2 codec resets such a stream and reports it
            # as a remote reset: 503 UR, upstream_rq_rx_reset, not a
            # connection protocol error (checked with an upstream sending
            # 70 KiB of headers: "upstream_reset_before_response_started
            # {remote_reset}", http2.header_list_size_too_large).
            self._fail("remote_reset", ErrorCodes.PROTOCOL_ERROR)
            return
        if ended and not framed and status != 204 and status != 304 and not self.head_request:
            # A response that ends with its headers (gRPC's trailers-only
            # response) has an empty body: said so, it stays one HEADERS
            # frame to an HTTP/2 client and needs no chunking on HTTP/1.1.
            headers.append((b"content-length", b"0"))
        stream = self.stream
        if stream is not None:
            stream.on_upstream_headers(self, status, headers, True)

    def _on_data(self, data: bytes, flow_len: int) -> None:
        stream = self.stream
        if stream is None:
            self.conn.ack(self.sid, flow_len)  # nobody reads it: hand the window back
            return
        if data:
            stream.on_upstream_body(data)
        if self.read_paused:
            self.unacked += flow_len
        else:
            self.conn.ack(self.sid, flow_len)

    def _on_trailers(self, raw: list[tuple[bytes, bytes]]) -> None:
        stream = self.stream
        if stream is not None:
            on_trailers = getattr(stream, "on_upstream_trailers", None)  # (a mirror request has none)
            if on_trailers is not None:
                on_trailers([(n, v) for n, v in raw if n[:1] != b":"])

    def _on_remote_end(self) -> None:
        self.remote_ended = True
        stream = self.stream
        if stream is not None:
            self.stream = None
            stream.on_upstream_complete(self)

    def fail_soon(self, reason: str, code: int | None) -> None:
        """``_fail`` from the next loop iteration: the stream is failing
        inside its own call to ``write`` (its Exchange is half way through
        starting the attempt and must not be called back yet)."""
        if code is not None and not self.reset and self.sid:
            self.conn.reset_stream(self.sid, code)
        self.reset = True
        self.endpoint.cluster.loop.call_soon(self._fail, reason, None)

    def _fail(self, reason: str, code: int | None) -> None:
        """The stream cannot go on: reset it (``code``; None when the
        connection is gone or the peer reset it) and tell its stream."""
        if code is not None and not self.reset and self.sid and not (self.local_ended and self.remote_ended):
            self.conn.reset_stream(self.sid, code)
        self.reset = True
        stream = self.stream
        self.stream = None
        self.finish()
        if stream is not None:
            stream.on_upstream_reset(self, reason)

    def finish(self) -> None:
        """The attempt is over (released by its stream, completed, reset):
        cancel what is left of the stream and give its slot back."""
        if self.done:
            return
        self.done = True
        self.stream = None
        conn = self.conn
        if self.sid and not self.reset and not (self.local_ended and self.remote_ended):
            # Released before both sides ended (a retry discarding a response,
            # a timeout, the client gone, a response before the request
            # body): the upstream stops sending.
            self.reset = True
            conn.reset_stream(self.sid, ErrorCodes.CANCEL)
        if self.unacked:
            conn.ack(self.sid, self.unacked)  # (the connection's share of the window)
            self.unacked = 0
        self.out.clear()
        conn.stream_finished(self)


class H2Connection(asyncio.Protocol):
    """One HTTP/2 connection to an upstream endpoint."""

    __slots__ = (
        "endpoint", "transport", "h2", "streams", "active", "requests", "closed", "draining", "counted",
        "created", "idle_since", "idle_timer", "on_made", "write_paused", "peer_settings", "corked",
        "control_tokens", "control_stamp", "empty_data",
    )

    def __init__(self, endpoint: H2Endpoint) -> None:
        self.endpoint = endpoint
        self.transport: Any = None
        self.h2 = _h2_state()
        self.streams: dict[int, H2Attempt] = {}
        self.active = 0  # attempts holding a slot (opened or about to be)
        self.requests = 0
        self.closed = False
        self.draining = False  # no new streams (GOAWAY, drain, max requests)
        self.counted = True
        self.created = 0.0
        self.idle_since = 0.0
        self.idle_timer: Any = None
        self.on_made: Any = None
        self.write_paused = False
        self.peer_settings = False
        self.corked = False
        self.control_tokens = float(CONTROL_BURST)
        self.control_stamp = 0.0
        self.empty_data = 0

    def __repr__(self) -> str:
        return f"<H2Connection {self.endpoint.address} streams={self.active}>"

    # -- pool view --------------------------------------------------------------

    def capacity(self) -> int:
        """Streams this connection may carry at once."""
        settings = self.endpoint.cluster.settings
        peer = self.h2.remote_settings.max_concurrent_streams if self.peer_settings else INITIAL_PEER_STREAMS
        limit = min(peer, MAX_STREAMS)
        if settings.max_concurrent_streams:
            limit = min(limit, settings.max_concurrent_streams)
        return limit

    def has_room(self) -> bool:
        if self.closed or self.draining or self.transport is None:
            return False
        limit = self.endpoint.cluster.settings.max_requests_per_connection
        return self.active < self.capacity() and not (limit and self.requests >= limit)

    def new_attempt(self) -> H2Attempt:
        self.active += 1
        self.requests += 1
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        return H2Attempt(self)

    # -- asyncio.Protocol -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        h2c = self.h2
        h2c.initiate_connection()
        h2c.increment_flow_control_window(CONNECTION_WINDOW - _DEFAULT_WINDOW)
        self.flush()
        on_made = self.on_made
        if on_made is not None:
            self.on_made = None
            on_made(self)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            if log.isEnabledFor(logging.DEBUG):
                log.debug("HTTP/2 protocol error from %s: %s", self.endpoint.address, exc)
            self.endpoint.cluster.stats.upstream_cx_protocol_error += 1
            self.flush()  # the library's GOAWAY
            self._fail_all("protocol_error")
            self.close()
            return
        self.corked = True
        try:
            for ev in events:
                self._on_event(ev)
                if self.closed:
                    return
        finally:
            self.corked = False
        self.flush()
        if self.transport.get_write_buffer_size() > MAX_UNREAD_OUTPUT:
            # An upstream that sends (PINGs, SETTINGS) but does not read our
            # answers: cut it before their acknowledgements pile up.
            log.warning("HTTP/2 upstream %s does not read: connection closed", self.endpoint.address)
            self.endpoint.cluster.stats.upstream_cx_protocol_error += 1
            self.abort()

    def eof_received(self) -> bool | None:
        return None  # close the transport: connection_lost resets what is left

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self.endpoint.cluster.stats.upstream_cx_destroy_remote += 1
        self.closed = True
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        self.endpoint.on_h2_closed(self)
        self._fail_all("connection_termination")

    def pause_writing(self) -> None:
        self.write_paused = True
        for s in list(self.streams.values()):
            if not s.write_paused and s.stream is not None:
                s.write_paused = True
                s.stream.on_upstream_write_paused()

    def resume_writing(self) -> None:
        self.write_paused = False
        for s in list(self.streams.values()):
            if s.write_paused and s.out_bytes <= STREAM_BUFFER // 2:
                s.write_paused = False
                if s.stream is not None:
                    s.stream.on_upstream_write_resumed()

    # -- events -----------------------------------------------------------------------

    def _on_event(self, ev: Any) -> None:
        t = type(ev)
        streams = self.streams
        if t is h2.events.DataReceived:
            if not ev.flow_controlled_length and ev.stream_ended is None:
                self.empty_data += 1
                if self.empty_data > MAX_EMPTY_DATA:
                    self._calm("empty DATA flood")
                    return
            else:
                self.empty_data = 0
            s = streams.get(ev.stream_id)
            if s is None:
                self.ack(ev.stream_id, ev.flow_controlled_length)
            else:
                s._on_data(ev.data, ev.flow_controlled_length)
        elif t is h2.events.ResponseReceived:
            s = streams.get(ev.stream_id)
            if s is not None:
                s._on_response(ev.headers, ev.stream_ended is not None)
        elif t is h2.events.StreamEnded:
            s = streams.get(ev.stream_id)
            if s is not None:
                s._on_remote_end()
        elif t is h2.events.TrailersReceived:
            s = streams.get(ev.stream_id)
            if s is not None:
                s._on_trailers(ev.headers)
        elif t is h2.events.WindowUpdated:
            if ev.stream_id:
                s = streams.get(ev.stream_id)
                if s is not None:
                    s.drain()
            else:
                for s in list(streams.values()):
                    s.drain()
        elif t is h2.events.StreamReset:
            s = streams.get(ev.stream_id)
            if s is not None:
                s.reset = True
                # Envoy's RemoteRefusedStreamReset: the upstream did not
                # process the request, safe to retry (refused-stream).
                s._fail("refused_stream" if ev.error_code == ErrorCodes.REFUSED_STREAM else "remote_reset", None)
        elif t is h2.events.RemoteSettingsChanged:
            self._control()
            if self.closed:
                return
            self.peer_settings = True
            self.endpoint.serve_pending(self)
            if h2.settings.SettingCodes.INITIAL_WINDOW_SIZE in ev.changed_settings:
                for s in list(streams.values()):
                    s.drain()
        elif t is h2.events.ConnectionTerminated:
            self._on_goaway(ev.last_stream_id)
        elif t in _CONTROL_EVENTS:
            self._control()

    def _control(self) -> None:
        now = self.endpoint.cluster.loop.time()
        self.control_tokens = min(CONTROL_BURST,
                                  self.control_tokens + (now - self.control_stamp) * CONTROL_RATE) - 1
        self.control_stamp = now
        if self.control_tokens < 0:
            self._calm("control frame flood")

    def _calm(self, why: str) -> None:
        """A flood (Envoy's upstream codec has the same budgets): GOAWAY
        (ENHANCE_YOUR_CALM), the streams fail as on a protocol error (502 UPE
        before their response, a reset after)."""
        log.warning("HTTP/2 upstream %s: connection closed: %s", self.endpoint.address, why)
        self.endpoint.cluster.stats.upstream_cx_protocol_error += 1
        try:
            self.h2.close_connection(ErrorCodes.ENHANCE_YOUR_CALM)
        except h2.exceptions.ProtocolError:
            pass
        self.corked = False
        self.flush()
        self._fail_all("protocol_error")
        self.close()

    def _on_goaway(self, last_stream_id: int | None) -> None:
        """The upstream drains this connection: no new streams. Streams
        above ``last_stream_id`` were not processed (RFC 9113 6.8): they are
        refused, and may be retried elsewhere."""
        self.draining = True
        last = last_stream_id if last_stream_id is not None else 0
        for sid, s in sorted(self.streams.items()):
            if sid > last:
                s.reset = True
                s._fail("refused_stream", None)
        if not self.active:
            self.close()
        else:
            self.endpoint.serve_pending(None)

    # -- used by the attempts ---------------------------------------------------------------

    def open_stream(self, s: H2Attempt, headers: list[tuple[bytes, bytes]], end: bool) -> None:
        if self.closed:
            s.fail_soon("connection_termination", None)
            return
        h2c = self.h2
        try:
            sid = h2c.get_next_available_stream_id()
            h2c.send_headers(sid, headers, end_stream=end)
        except (h2.exceptions.ProtocolError, h2.exceptions.NoAvailableStreamIDError):
            # (The peer lowered its stream limit meanwhile, or the ids ran
            # out.) Nothing was sent: safe to retry.
            self.draining = True
            s.fail_soon("refused_stream", None)
            return
        s.sid = sid
        self.streams[sid] = s

    def send_window(self, s: H2Attempt, data: bytes) -> bytes:
        """Send what the flow-control windows admit; the rest is returned."""
        h2c = self.h2
        try:
            window = h2c.local_flow_control_window(s.sid)
        except (h2.exceptions.StreamClosedError, KeyError):
            return b""
        frame = h2c.max_outbound_frame_size
        n = len(data)
        if n <= window and n <= frame:
            h2c.send_data(s.sid, data)
            return b""
        mv = memoryview(data)
        sent = 0
        while sent < n and window > 0:
            size = min(frame, window, n - sent)
            h2c.send_data(s.sid, mv[sent:sent + size].tobytes())
            sent += size
            window -= size
        return data[sent:] if sent < n else b""

    def send_trailers(self, s: H2Attempt, trailers: list[tuple[bytes, bytes]]) -> None:
        try:
            self.h2.send_headers(s.sid, trailers, end_stream=True)
        except h2.exceptions.ProtocolError:
            self.end_stream(s)

    def end_stream(self, s: H2Attempt) -> None:
        try:
            self.h2.end_stream(s.sid)
        except h2.exceptions.ProtocolError:
            pass  # (reset meanwhile)

    def reset_stream(self, sid: int, code: int) -> None:
        if self.closed:
            return
        try:
            self.h2.reset_stream(sid, code)
        except h2.exceptions.ProtocolError:
            pass
        self.flush()

    def ack(self, sid: int, n: int) -> None:
        if n and not self.closed:
            self.h2.acknowledge_received_data(n, sid)
            self.flush()

    def stream_finished(self, s: H2Attempt) -> None:
        if s.sid and self.streams.get(s.sid) is s:
            del self.streams[s.sid]
        self.active -= 1
        self.flush()
        if self.closed:
            return
        ep = self.endpoint
        limit = ep.cluster.settings.max_requests_per_connection
        if limit and self.requests >= limit and not self.draining:
            ep.cluster.stats.upstream_cx_max_requests += 1
            self.draining = True
        if not self.active:
            if self.draining or (ep.cluster.draining and not ep.h2_pending):
                self.close()
                return
            self._idle()
        ep.serve_pending(self)

    # -- idle and close -------------------------------------------------------------------

    def _idle(self) -> None:
        loop = self.endpoint.cluster.loop
        self.idle_since = loop.time()
        if self.idle_timer is None:
            self.idle_timer = loop.call_later(self.endpoint.cluster.settings.idle_timeout, self._on_idle_timer)

    def _on_idle_timer(self) -> None:
        """Envoy's idle timeout: a connection without streams for
        ``idleTimeout`` closes with GOAWAY (one timer per connection, armed
        when it becomes idle and moved on, not re-created, per request)."""
        self.idle_timer = None
        if self.closed or self.active:
            return
        cluster = self.endpoint.cluster
        left = self.idle_since + cluster.settings.idle_timeout - cluster.loop.time()
        if left > 0.002:
            self.idle_timer = cluster.loop.call_later(left, self._on_idle_timer)
            return
        cluster.stats.upstream_cx_idle_timeout += 1
        self.close()

    def drain(self) -> None:
        """No new streams; close once the last one ends."""
        self.draining = True
        if not self.active:
            self.close()

    def flush(self) -> None:
        if self.corked or self.transport is None or self.closed:
            return
        data = self.h2.data_to_send()
        if data:
            self.transport.write(data)

    def close(self) -> None:
        """GOAWAY and close. Attempts still open are told of a reset."""
        if self.closed:
            return
        if self.transport is not None:
            # (After a protocol error the library has queued its GOAWAY with
            # the error code and closed: a second, NO_ERROR one would hide it.)
            if self.h2.state_machine.state is not h2.connection.ConnectionState.CLOSED:
                try:
                    self.h2.close_connection(ErrorCodes.NO_ERROR)
                except h2.exceptions.ProtocolError:
                    pass
            self.corked = False  # (closing inside data_received: the GOAWAY goes now)
            self.flush()
        self.closed = True
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        self.endpoint.on_h2_closed(self)
        if self.transport is not None:
            self.transport.close()
        self._fail_all("connection_termination")

    def abort(self) -> None:
        self.closed = True
        self.endpoint.on_h2_closed(self)
        if self.transport is not None:
            self.transport.abort()
        self._fail_all("connection_termination")

    def _fail_all(self, reason: str) -> None:
        for s in list(self.streams.values()):
            s.reset = True
            s._fail(reason, None)
        self.streams.clear()


class H2Endpoint(ClusterEndpoint):
    """An endpoint spoken to in HTTP/2 (see the module doc). Its HTTP/1.1
    pool (inherited) serves HTTP/1.1 clients under the client's protocol
    and upgrade requests."""

    __slots__ = ("h2_conns", "h2_pending", "h2_connecting", "h2_client_only")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.h2_conns: list[H2Connection] = []
        self.h2_pending: deque[Any] = deque()
        self.h2_connecting = 0
        # useClientProtocol: HTTP/2 only for HTTP/2 clients.
        self.h2_client_only = self.cluster.settings.upstream_protocol == DOWNSTREAM

    def _wants_h1(self, stream: Any) -> bool:
        if getattr(stream, "upgrade", False):
            return True  # (Upgrade needs HTTP/1.1; HTTP/2 would need extended CONNECT)
        return self.h2_client_only and getattr(stream, "version", "1.1") != "2"

    def acquire(self, stream: Any) -> Any:
        if self._wants_h1(stream):
            return ClusterEndpoint.acquire(self, stream)
        cluster = self.cluster
        settings = cluster.settings
        for conn in self.h2_conns:
            if conn.has_room():
                duration = settings.max_connection_duration
                if duration and cluster.loop.time() - conn.created >= duration:
                    cluster.stats.upstream_cx_max_duration_reached += 1
                    conn.drain()
                    continue
                return conn.new_attempt()
        stats = cluster.stats
        if stats.upstream_rq_pending_active >= settings.max_pending:
            stats.upstream_rq_pending_overflow += 1
            return OVERFLOW
        self.h2_pending.append(stream)
        stats.upstream_rq_pending_active += 1
        stats.upstream_rq_pending_total += 1
        self._h2_maybe_connect()
        return None

    def cancel_pending(self, stream: Any) -> None:
        try:
            self.h2_pending.remove(stream)
        except ValueError:
            ClusterEndpoint.cancel_pending(self, stream)
            return
        stats = self.cluster.stats
        stats.upstream_rq_pending_active -= 1
        stats.upstream_rq_cancelled += 1

    def release(self, conn: Any, reusable: bool) -> None:
        if type(conn) is H2Attempt:
            conn.finish()
        else:
            ClusterEndpoint.release(self, conn, reusable)

    def _new_connection_streams(self) -> int:
        """How many waiting streams a connection being opened will take."""
        settings = self.cluster.settings
        n = min(MAX_STREAMS, INITIAL_PEER_STREAMS)
        if settings.max_concurrent_streams:
            n = min(n, settings.max_concurrent_streams)
        if settings.max_requests_per_connection:
            n = min(n, settings.max_requests_per_connection)
        return max(n, 1)

    def _h2_maybe_connect(self) -> None:
        if len(self.h2_pending) <= self.h2_connecting * self._new_connection_streams():
            return
        cluster = self.cluster
        stats = cluster.stats
        if stats.upstream_cx_active >= cluster.settings.max_connections:
            stats.upstream_cx_overflow += 1
            # As for HTTP/1.1: one connection when this endpoint has none, so
            # waiting streams are never stranded.
            if self.h2_conns or self.h2_connecting:
                return
        self.h2_connecting += 1
        self.connections += 1
        stats.upstream_cx_active += 1
        stats.upstream_cx_total += 1
        stats.upstream_cx_http2_total += 1
        loop = cluster.loop
        if self.tls is None and isinstance(loop, asyncio.AbstractEventLoop):
            # A plaintext connect to an IP address starts in this call, as
            # the HTTP/1.1 pool's (dial.py).
            try:
                address = numeric_address(cluster.resolve(self.host), self.port)
            except OSError:
                address = None  # (_h2_connect reports it)
            if address is not None:
                conn = H2Connection(self)
                conn.created = loop.time()
                conn.on_made = self._h2_connect_done
                Dial(loop, conn, lambda reason: self._h2_dial_failed(conn, reason)).start(
                    address[0], address[1], cluster.settings.connect_timeout)
                return
        loop.create_task(self._h2_connect())

    def _h2_dial_failed(self, conn: H2Connection, reason: str) -> None:
        if conn.transport is not None:
            return  # connection_made ran: already handed over
        conn.on_made = None
        if reason == "connection timeout":
            self.cluster.stats.upstream_cx_connect_timeout += 1
        if log.isEnabledFor(logging.DEBUG):
            log.debug("connect to %s for %s failed: %s", self.address, self.cluster.name, reason)
        self._h2_connect_failed(conn, reason)

    async def _h2_connect(self) -> None:
        cluster = self.cluster
        conn = H2Connection(self)
        conn.created = cluster.loop.time()
        tls = self.tls
        if tls is None:
            # Plaintext: connection_made hands it over at once (a TLS
            # connection once its peer is verified, below).
            conn.on_made = self._h2_connect_done
        reason = "connection failure"
        try:
            host = cluster.resolve(self.host)
            if host.startswith("unix://"):
                coro = cluster.loop.create_unix_connection(lambda: conn, host[len("unix://"):])
            elif tls is not None:
                # ALPN offers h2 (ISTIO_MUTUAL: istio-h2, istio, h2; DestinationRule TLS: h2).
                coro = tls_connect(cluster.loop, lambda: conn, host, self.port, tls, cluster.certs,
                                   cluster.settings.connect_timeout, h2=True)
            else:
                coro = cluster.loop.create_connection(lambda: conn, host, self.port)
            async with asyncio.timeout(cluster.settings.connect_timeout):
                await coro
        except asyncio.CancelledError:
            if tls is None and conn.on_made is None:
                raise  # handed over already
            conn.on_made = None
            self._h2_connect_failed(conn, reason)
            raise
        except TimeoutError:
            if tls is None and conn.on_made is None:
                return
            conn.on_made = None
            cluster.stats.upstream_cx_connect_timeout += 1
            self._h2_connect_failed(conn, "connection timeout")
            return
        except (OSError, ValueError) as exc:
            conn.on_made = None
            if tls is not None:
                tls_failed(exc)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("connect to %s for %s failed: %s", self.address, cluster.name, exc)
            self._h2_connect_failed(conn, reason)
            return
        if tls is not None:
            if not tls_verified(conn.transport, self, cluster.name):
                self._h2_connect_failed(conn, reason)
                return
            self._h2_connect_done(conn)

    def _h2_connect_failed(self, conn: H2Connection, reason: str) -> None:
        self.h2_connecting -= 1
        cluster = self.cluster
        if conn.transport is not None:
            conn.abort()  # (on_h2_closed counts it down)
        else:
            conn.counted = False
            self.connections -= 1
            cluster.stats.upstream_cx_active -= 1
        cluster.stats.upstream_cx_connect_fail += 1
        # Like Envoy (and the HTTP/1.1 pool): a connect failure fails the
        # streams waiting on this endpoint, so each can be retried elsewhere.
        streams = list(self.h2_pending)
        self.h2_pending.clear()
        cluster.stats.upstream_rq_pending_active -= len(streams)
        for stream in streams:
            stream.on_upstream_connect_failed(self, reason)

    def _h2_connect_done(self, conn: H2Connection) -> None:
        self.h2_connecting -= 1
        self.h2_conns.append(conn)
        if self.cluster.draining and not self.h2_pending:
            conn.drain()
            return
        self.serve_pending(conn)
        if not conn.active and not conn.closed:
            conn._idle()

    def serve_pending(self, conn: H2Connection | None) -> None:
        """Room opened (a new connection, a stream ended, the peer's
        SETTINGS): hand it to the oldest waiting streams."""
        pending = self.h2_pending
        if not pending:
            return
        cluster = self.cluster
        stats = cluster.stats
        max_requests = cluster.settings.max_requests
        conns = (conn,) if conn is not None else tuple(self.h2_conns)
        for c in conns:
            while pending and c.has_room():
                stream = pending.popleft()
                stats.upstream_rq_pending_active -= 1
                if stats.upstream_rq_active >= max_requests and getattr(stream, "mirror", None) is None:
                    # Envoy checks max_requests again when it attaches a
                    # waiting stream (ConnPoolImplBase::attachStreamToClient):
                    # many streams wait for a new HTTP/2 connection at once.
                    stats.upstream_rq_active_overflow += 1
                    stream.on_upstream_connect_failed(self, "overflow")
                    continue
                stream.on_upstream_connected(c.new_attempt())
        if pending:
            self._h2_maybe_connect()

    def on_h2_closed(self, conn: H2Connection) -> None:
        if conn.counted:
            conn.counted = False
            self.connections -= 1
            stats = self.cluster.stats
            stats.upstream_cx_active -= 1
            stats.upstream_cx_destroy += 1
        try:
            self.h2_conns.remove(conn)
        except ValueError:
            pass
        if self.h2_pending:
            self._h2_maybe_connect()

    def close_idle(self, older_than: float | None = None) -> None:
        ClusterEndpoint.close_idle(self, older_than)
        if older_than is None:
            # The cluster drains (replaced by a reload): no new streams.
            for conn in list(self.h2_conns):
                conn.drain()


__all__ = ["MAX_STREAMS", "STREAM_WINDOW", "H2Attempt", "H2Connection", "H2Endpoint"]
