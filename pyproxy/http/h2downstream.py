"""HTTP/2 on a downstream connection (h2c prior knowledge), on the ``h2``
library's sans-IO state machine.

A plaintext connection whose first bytes are the HTTP/2 preface is handed
over here by ``DownstreamConnection`` (llhttp stops on ``PRI * HTTP/2.0``,
so the HTTP/1.1 path pays nothing for the check). One ``H2Downstream``
protocol owns one ``h2.connection.H2Connection``; every client stream gets
an ``H2Stream``, which is the ``conn`` of an ordinary ``Exchange``: routing,
filters, retries, timeouts, faults, telemetry and the HTTP/1.1 upstream are
the same code as for an HTTP/1.1 request. No task per stream.

The codec seam is the byte stream: an ``Exchange`` writes its response as
HTTP/1.1 (head, then body, chunked or not). ``H2Stream`` parses those bytes
back with httptools' response parser (about a microsecond, against ~100 µs
that ``h2`` spends per request) and sends HEADERS and DATA frames instead.
That keeps the HTTP/1.1 fast path untouched.

Translation h2 -> h1 (spec §1.5, as Envoy's codecs): ``:authority`` becomes
``Host``, cookies are joined with "; ", a request body without
content-length goes upstream chunked. A request that is valid HTTP/2 but
cannot be represented in HTTP/1.1 (connection-specific fields, ``te`` other
than ``trailers``, upper-case or invalid names, CR/LF/NUL in values,
missing pseudo-headers) is refused with RST_STREAM(PROTOCOL_ERROR), as
Envoy's codec does, never forwarded. Response fields that are
connection-specific in HTTP/1.1 are dropped.

Bounds (docs/http2.md has the table): 100 concurrent streams, 1 MiB stream
windows and a connection window of 100 of them (DATA is acknowledged only
while the upstream accepts it: a stream whose upstream is slow holds at
most its own window), header lists up to ``--max-header-bytes`` (60 KiB),
HPACK bombs and CONTINUATION floods stopped by the library, a budget for
client resets of live streams (Rapid Reset), for control frames (SETTINGS,
PING, PRIORITY), for WINDOW_UPDATE relative to the DATA sent (Envoy's rule)
and for empty DATA frames, and a bound on
what the peer leaves unread (PING/SETTINGS acknowledgements it does not
read). A connection over a budget gets GOAWAY(ENHANCE_YOUR_CALM) and closes;
other connections are not affected.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import httptools
from h2.errors import ErrorCodes

from .. import errors
from .grpc import call_for
from .hpack_static import StaticEncoder

log = logging.getLogger("pyproxy.h2")

PREFACE_HEAD = b"PRI * HTTP/2.0\r\n\r\n"
_PREFACE_TAIL = b"SM\r\n\r\n"

# Bounded defaults (Envoy's are effectively unbounded: 2^31-1 streams,
# 256 MiB windows; see docs/http2.md).
MAX_CONCURRENT_STREAMS = 100
INITIAL_WINDOW = 1 << 20
# Request body a stream whose upstream does not read stays unacknowledged
# (up to its stream window), and so holds as much of the connection window:
# with one stream window for the connection, one or two stalled uploads
# stopped every other stream of the connection. A window per stream (as the
# upstream side, upstream/h2pool.py) keeps them independent; what the proxy
# holds is still bounded by the stream windows (docs/http2.md).
CONNECTION_WINDOW = MAX_CONCURRENT_STREAMS * INITIAL_WINDOW
# What one stream may hold of response body the client's window does not
# admit yet before its upstream stops being read.
STREAM_BUFFER = 64 << 10
# Rapid Reset (CVE-2023-44487): client resets of streams still in progress.
# A token bucket: RESET_BURST at once, refilled at RESET_RATE per second.
RESET_BURST = 200
RESET_RATE = 50.0
# SETTINGS, PING, PRIORITY and WINDOW_UPDATE frames: budget per second.
CONTROL_BURST = 1000
CONTROL_RATE = 500.0
# Empty DATA frames without END_STREAM in a row (Envoy's
# max_consecutive_inbound_frames_with_empty_payload is 1).
MAX_EMPTY_DATA = 10
# WINDOW_UPDATE frames are answers to our DATA: a client downloading with
# small windows sends one per few frames, which a per-second budget would
# cut (a 50 MiB response through 64 KiB windows: ~1600 in a second or two).
# Envoy's rule instead (source/common/http/http2/protocol_constraints.cc):
# more than 5 + 2 * (streams opened + 10 * DATA frames sent) is a flood.
WINDOW_UPDATES_PER_DATA_FRAME = 10
# Output the client does not read (acknowledgements of its own frames
# included): beyond this the connection is cut (Envoy's max_outbound_frames).
MAX_UNREAD_OUTPUT = 8 << 20
# A streams' HPACK-decoded header list over this is a DoS attempt, not a
# big request: connection error (the library's HPACK bomb guard). Lists
# between --max-header-bytes and this get a 431 on their stream.
HPACK_BOMB_FACTOR = 4
# After a GOAWAY with an error: how long and how much input is read and
# discarded before the connection is reset (DownstreamConnection's numbers).
LINGER_SECONDS = 1.0
LINGER_BYTES = 8 << 20

# RFC 9113 8.2.2: connection-specific fields are malformed in HTTP/2.
_CONNECTION_SPECIFIC = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding",
                                  b"upgrade"})
_PSEUDO = frozenset({b":method", b":scheme", b":authority", b":path"})
_BAD_NAME = re.compile(rb"[^a-z0-9!#$%&'*+\-.^_`|~]").search
_BAD_VALUE = re.compile(rb"[\x00\r\n]").search
# Response fields that mean nothing (or something wrong) in HTTP/2.
_RESPONSE_DROP = _CONNECTION_SPECIFIC


def preface_rest(data: bytes) -> bytes | None:
    """llhttp stopped on the HTTP/2 preface's first 18 bytes,
    ``PRI * HTTP/2.0\\r\\n\\r\\n``, the last of which came in ``data``: the
    bytes of ``data`` after them, or None if ``data`` does not fit.

    The earlier reads of the connection carried the start of those 18
    bytes, so ``data`` begins with a suffix of them; the preface's own
    remainder ("SM...") starts with a byte that is not in them, which makes
    the split point unique."""
    for j in range(min(len(data), len(PREFACE_HEAD)), 0, -1):
        if data[:j] == PREFACE_HEAD[-j:]:
            rest = data[j:]
            if rest[:len(_PREFACE_TAIL)] == _PREFACE_TAIL[:len(rest)]:
                return rest
    return None


class _ServerState(h2.connection.H2Connection):
    """The h2 library's state machine, but a graceful GOAWAY (NO_ERROR),
    sent or received, does not close it: the library moves to CLOSED on any
    GOAWAY and then refuses every later frame, so the streams a drain (or a
    client's own GOAWAY) leaves in flight could not be answered (the
    library raised on their HEADERS and the connection ended with
    GOAWAY(PROTOCOL_ERROR)). No stream is accepted after it
    (H2Downstream.draining). The upstream side does the same
    (upstream/h2pool.py ``_ClientState``)."""

    def _receive_goaway_frame(self, frame: Any) -> Any:
        result = super()._receive_goaway_frame(frame)
        if frame.error_code == 0:
            self.state_machine.state = h2.connection.ConnectionState.SERVER_OPEN
        return result

    def close_gracefully(self, last_stream_id: int) -> None:
        self.close_connection(ErrorCodes.NO_ERROR, last_stream_id=last_stream_id)
        self.state_machine.state = h2.connection.ConnectionState.SERVER_OPEN


class _Refused(Exception):
    """A request that is malformed in HTTP/2 or not representable in HTTP/1.1."""


def translate_request(raw: list[tuple[bytes, bytes]], max_bytes: int, max_headers: int
                      ) -> tuple[bytes, bytes, list[tuple[bytes, bytes]], int]:
    """An HTTP/2 request's decoded header list -> (method, target, HTTP/1.1
    headers, size in bytes). Raises ``_Refused`` for what Envoy's codec
    refuses (RST_STREAM PROTOCOL_ERROR)."""
    method = path = authority = scheme = None
    headers: list[tuple[bytes, bytes]] = []
    cookies: list[bytes] = []
    size = 0
    regular = False
    for name, value in raw:
        size += len(name) + len(value) + 4
        if name[:1] == b":":
            if regular or name not in _PSEUDO:
                raise _Refused("unexpected pseudo-header")
            if name == b":method":
                if method is not None:
                    raise _Refused("duplicate :method")
                method = value
            elif name == b":path":
                if path is not None:
                    raise _Refused("duplicate :path")
                path = value
            elif name == b":authority":
                if authority is not None:
                    raise _Refused("duplicate :authority")
                authority = value
            else:
                if scheme is not None:
                    raise _Refused("duplicate :scheme")
                scheme = value
            continue
        regular = True
        if not name or _BAD_NAME(name) is not None:
            raise _Refused("invalid header name")
        if _BAD_VALUE(value) is not None or value[:1] in (b" ", b"\t") or value[-1:] in (b" ", b"\t"):
            raise _Refused("invalid header value")
        if name in _CONNECTION_SPECIFIC:
            raise _Refused("connection-specific header")
        if name == b"te" and value.lower() != b"trailers":
            raise _Refused("te other than trailers")
        if name == b"cookie":
            cookies.append(value)
            continue
        if name == b"host":
            if authority is None:
                authority = value
            continue  # :authority wins (RFC 9113 8.3.1); one Host goes upstream
        headers.append((name, value))
    if method is None:
        raise _Refused("missing :method")
    if method == b"CONNECT":
        raise _Refused("CONNECT is not supported")
    if path is None or scheme is None or not path:
        raise _Refused("missing :path or :scheme")
    if len(headers) + len(cookies) >= max_headers or size > max_bytes:
        raise OverflowError
    if cookies:
        headers.append((b"cookie", b"; ".join(cookies)))
    if authority is not None:
        headers.insert(0, (b"host", authority))
    return method, path, headers, size


class H2Stream:
    """One client stream: the ``conn`` its ``Exchange`` writes to and asks
    about the connection (the attributes ``Exchange`` and the filters read
    of a ``DownstreamConnection``)."""

    __slots__ = (
        "h2c", "sid", "ex", "current", "parser", "status", "out", "out_bytes", "end_pending",
        "response_ended", "request_ended", "reset", "paused", "unacked", "upstream_paused",
        "content_length", "received", "head_only", "informational",
        "resp_headers", "stopped", "request_trailers", "trailers", "in_body",
    )

    def __init__(self, h2c: H2Downstream, sid: int, head_only: bool) -> None:
        self.h2c = h2c
        self.sid = sid
        self.ex: Any = None
        self.current: Any = None
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.resp_headers: list[tuple[bytes, bytes]] = []
        self.out: list[bytes] = []  # response body the client's window does not admit yet
        self.out_bytes = 0
        self.end_pending = False
        self.response_ended = False
        self.request_ended = False
        self.reset = False
        self.paused = False  # the exchange asked to stop reading request body
        self.unacked = 0  # request body received while paused: acknowledged on resume
        self.upstream_paused = False
        self.content_length = -1
        self.received = 0
        self.head_only = head_only
        self.informational = False
        self.stopped = False  # set by Exchange.reject (the stream is reset anyway)
        self.request_trailers: list[tuple[bytes, bytes]] | None = None
        # Response trailers (an HTTP/2 upstream's, as the last chunk's
        # trailer fields): sent as a trailers HEADERS frame.
        self.trailers: list[tuple[bytes, bytes]] | None = None
        self.in_body = False

    # -- what an Exchange reads of its connection --------------------------

    @property
    def worker(self) -> Any:
        return self.h2c.worker

    @property
    def direction(self) -> int:
        return self.h2c.direction

    @property
    def listen_port(self) -> int:
        return self.h2c.listen_port

    @property
    def original_dst(self) -> tuple[str, int] | None:
        return self.h2c.original_dst

    @property
    def transport(self) -> Any:
        return self.h2c.transport

    @property
    def limits(self) -> Any:
        return self.h2c.limits

    @property
    def write_paused(self) -> bool:
        """The connection's transport is above its write high-water mark
        (an attempt starting then begins with its upstream paused)."""
        return self.h2c.write_paused

    @property
    def peer_ip(self) -> str:
        return self.h2c.peer_ip

    @property
    def peer_ip_bytes(self) -> bytes:
        return self.h2c.peer_ip_bytes

    @property
    def tls_peer(self) -> Any:
        return self.h2c.tls_peer

    @property
    def peer_principal(self) -> str:
        peer = self.h2c.tls_peer
        return peer.uri if peer is not None else ""

    @property
    def draining(self) -> bool:
        return False  # a drain is a GOAWAY on the connection, not Connection: close per stream

    @property
    def closed(self) -> bool:
        return self.h2c.closed or self.reset

    @property
    def pending_error(self) -> None:
        return None

    def _protocol_error(self) -> None:  # (only for queued HTTP/1.1 pipelines)
        pass

    # -- what an Exchange calls --------------------------------------------

    def write(self, data: bytes) -> None:
        if self.reset or self.response_ended:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            log.exception("unparsable response bytes on an HTTP/2 stream")
            self._reset(ErrorCodes.INTERNAL_ERROR)
            return
        self.h2c.flush()

    def cork(self) -> bool:
        return self.h2c.cork()

    def uncork(self) -> None:
        self.h2c.uncork()

    def pause_reading_for(self, ex: Any) -> None:
        self.paused = True

    def resume_reading_for(self, ex: Any) -> None:
        if self.paused:
            self.paused = False
            if self.unacked:
                n = self.unacked
                self.unacked = 0
                self.h2c.ack(self.sid, n)
                self.h2c.flush()

    def exchange_done(self, ex: Any) -> None:
        h2c = self.h2c
        self.current = None
        if not self.response_ended and not self.reset:
            # The response did not complete (upstream reset, timeout after
            # the head, client gone): the stream's honest end is a reset.
            self._reset(ErrorCodes.INTERNAL_ERROR if not h2c.closed else ErrorCodes.CANCEL)
        elif not self.request_ended and not self.reset:
            # Answered before the request body ended (an early reply): the
            # client may stop sending (RFC 9113 8.1).
            self._reset(ErrorCodes.NO_ERROR)
        h2c.stream_done(self)

    def become_tunnel(self, upconn: Any, ex: Any) -> None:
        # An Exchange only tunnels after an Upgrade request, which HTTP/2
        # refuses (connection-specific field); never reached.
        upconn.close()
        self._reset(ErrorCodes.INTERNAL_ERROR)

    def close(self, linger: bool = False) -> None:
        self._reset(ErrorCodes.CANCEL)

    # -- httptools response-parser callbacks (the Exchange's HTTP/1.1 bytes) -

    def on_message_begin(self) -> None:
        self.resp_headers = []

    def on_status(self, status: bytes) -> None:
        pass

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if self.in_body:
            # Chunked trailer fields: the upstream's HTTP/2 trailers.
            if name not in _RESPONSE_DROP:
                if self.trailers is None:
                    self.trailers = []
                self.trailers.append((name, value))
        elif name not in _RESPONSE_DROP:
            self.resp_headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        headers = [(b":status", str(status).encode()), *self.resp_headers]
        h2c = self.h2c
        if status < 200:
            self.informational = True
            h2c.send_headers(self, headers, False)
            return
        self.status = status
        self.in_body = True
        # An empty body ends with the headers: a gRPC trailers-only response
        # must be one HEADERS frame with END_STREAM.
        end = self.head_only or status in (204, 304) or (b"content-length", b"0") in self.resp_headers
        h2c.send_headers(self, headers, end)
        if end:
            self.response_ended = True

    def on_body(self, body: bytes) -> None:
        if self.response_ended:
            return
        self.h2c.send_data(self, body)

    def on_message_complete(self) -> None:
        if self.informational:
            self.informational = False
            return
        if self.response_ended:
            return
        self.response_ended = True
        if self.out:
            self.end_pending = True
        else:
            self.h2c.end_stream(self)

    # -- internals ------------------------------------------------------------

    def _reset(self, code: int) -> None:
        if self.reset:
            return
        self.reset = True
        self.h2c.reset_stream(self, code)


class H2Downstream:
    """asyncio.Protocol for one HTTP/2 client connection (after the
    preface); duck-types what the worker's sweep and drain read of a
    ``DownstreamConnection``."""

    __slots__ = (
        "listener", "worker", "direction", "listen_port", "transport", "conn", "streams",
        "peer_ip", "peer_ip_bytes", "original_dst", "tls_peer", "closed", "draining", "last_activity",
        "write_paused", "corked", "flush_pending", "discarded", "reset_tokens", "reset_stamp", "control_tokens", "control_stamp",
        "window_updates", "data_frames",
        "empty_data", "limits", "pipeline", "tunnel", "headers_started", "requests",
    )

    def __init__(self, old: Any) -> None:
        # ``old``: the DownstreamConnection that read the preface (not
        # imported: downstream.py imports this module).
        self.listener = old.listener
        self.worker = old.worker
        self.direction: int = old.direction
        self.listen_port: int = old.listen_port
        self.transport = old.transport
        self.peer_ip: str = old.peer_ip
        self.peer_ip_bytes: bytes = old.peer_ip_bytes
        self.original_dst: tuple[str, int] | None = old.original_dst
        self.tls_peer = old.tls_peer
        self.limits = old.limits
        self.closed = False
        self.draining = False
        self.last_activity = self.worker.loop.time()
        self.write_paused = False
        self.corked = False
        self.flush_pending = False
        self.discarded = 0
        self.streams: dict[int, H2Stream] = {}
        now = self.last_activity
        self.reset_tokens = float(RESET_BURST)
        self.reset_stamp = now
        self.control_tokens = float(CONTROL_BURST)
        self.control_stamp = now
        self.empty_data = 0
        self.requests = 0
        self.window_updates = 0
        self.data_frames = 0  # DATA frames sent
        # What the worker's drain and sweep look at on HTTP/1.1 connections.
        self.pipeline: tuple[()] = ()
        self.tunnel = None
        self.headers_started = 0.0
        max_bytes = self.limits.max_header_bytes
        config = h2.config.H2Configuration(
            client_side=False, header_encoding=None,
            # translate_request validates (and refuses per stream, as Envoy);
            # the library's own checks would end the whole connection.
            validate_inbound_headers=False, normalize_inbound_headers=False,
            validate_outbound_headers=False, normalize_outbound_headers=False,
        )
        conn = _ServerState(config)
        conn.local_settings = h2.settings.Settings(client=False, initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: INITIAL_WINDOW,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: max_bytes,
            h2.settings.SettingCodes.ENABLE_PUSH: 0,
        })
        conn.decoder.max_header_list_size = max_bytes * HPACK_BOMB_FACTOR
        # Response headers without HPACK's dynamic table, each field's bytes
        # cached (http/hpack_static.py): ~20 % less codec CPU per response.
        conn.encoder = StaticEncoder()  # type: ignore[assignment]
        self.conn = conn

    # -- duck-typed DownstreamConnection ---------------------------------------

    @property
    def current(self) -> H2Stream | None:
        """Some stream in flight (the drain waits while there is one)."""
        for s in self.streams.values():
            return s
        return None

    def start(self, first: bytes) -> None:
        conn = self.conn
        conn.initiate_connection()
        conn.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self.data_received(first)

    def start_drain(self, close_idle: bool = True) -> None:
        if self.closed:
            return
        if not self.draining:
            self.draining = True
            # Streams already opened are served; no new ones (GOAWAY).
            self.conn.close_gracefully(self.conn.highest_inbound_stream_id)
            self.flush()
        if close_idle and not self.streams:
            self._close()

    def on_tick(self, now: float, stream_idle: float) -> None:
        """The worker's once-a-second housekeeping (worker.py ``sweep``):
        each stream's exchange checks its own idle timeout; the connection's
        idle timeout."""
        if self.streams:
            if stream_idle:
                for s in list(self.streams.values()):
                    ex = s.ex
                    if ex is not None:
                        ex.on_tick(now, stream_idle)
            return
        if now - self.last_activity > self.limits.idle_timeout:
            self.worker.stats.downstream_cx_idle_timeout += 1
            self.start_drain()

    # -- asyncio.Protocol -----------------------------------------------------

    def connection_made(self, transport: Any) -> None:  # (set_protocol: not called)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.closed:
            # Lingering after a GOAWAY: input is read and discarded (bounded).
            self.discarded += len(data)
            if self.discarded > LINGER_BYTES and self.transport is not None:
                self.transport.abort()
            return
        self.last_activity = self.worker.loop.time()
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            if log.isEnabledFor(logging.DEBUG):
                log.debug("HTTP/2 protocol error from %s: %s", self.peer_ip, exc)
            self.worker.stats.reject(400)
            self._close(linger=True)  # after the library's GOAWAY
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

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.listener.on_connection_lost(self)
        self._end_streams()

    def pause_writing(self) -> None:
        self.write_paused = True
        for s in self.streams.values():
            if s.ex is not None and not s.upstream_paused:
                s.ex.on_downstream_write_paused()

    def resume_writing(self) -> None:
        self.write_paused = False
        for s in list(self.streams.values()):
            if s.ex is not None and not s.upstream_paused:
                s.ex.on_downstream_write_resumed()

    # -- events -------------------------------------------------------------------

    def _on_event(self, ev: Any) -> None:
        t = type(ev)
        if t is h2.events.RequestReceived:
            self._on_request(ev.stream_id, ev.headers, ev.stream_ended is not None)
        elif t is h2.events.DataReceived:
            self._on_data(ev.stream_id, ev.data, ev.flow_controlled_length)
        elif t is h2.events.StreamEnded:
            s = self.streams.get(ev.stream_id)
            if s is not None:
                self._on_request_end(s)
        elif t is h2.events.StreamReset:
            self._on_client_reset(ev.stream_id)
        elif t is h2.events.WindowUpdated:
            self.window_updates += 1
            if self.window_updates > 5 + 2 * (self.requests + WINDOW_UPDATES_PER_DATA_FRAME * self.data_frames):
                self._calm("WINDOW_UPDATE flood")
                return
            self._on_window(ev.stream_id)
        elif t is h2.events.TrailersReceived:
            # Kept for an HTTP/2 upstream (Exchange._last_request_chunk); an
            # HTTP/1.1 upstream gets none (Envoy drops them there too). The
            # stream's end follows as StreamEnded.
            s = self.streams.get(ev.stream_id)
            if s is not None:
                s.request_trailers = [(n, v) for n, v in ev.headers
                                      if n[:1] != b":" and n not in _CONNECTION_SPECIFIC
                                      and _BAD_NAME(n) is None and _BAD_VALUE(v) is None]
        elif t is h2.events.ConnectionTerminated:
            self.draining = True
            if not self.streams:
                self._close()
        elif t in (h2.events.PingReceived, h2.events.RemoteSettingsChanged, h2.events.PriorityUpdated,
                   h2.events.SettingsAcknowledged, h2.events.UnknownFrameReceived, h2.events.PingAckReceived):
            self._control()

    def _on_request(self, sid: int, raw: list[tuple[bytes, bytes]], ended: bool) -> None:
        if self.draining:
            self.conn.reset_stream(sid, ErrorCodes.REFUSED_STREAM)
            return
        limits = self.limits
        stats = self.worker.stats
        try:
            method, target, headers, _ = translate_request(raw, limits.max_header_bytes, limits.max_headers)
        except _Refused as exc:
            if log.isEnabledFor(logging.DEBUG):
                log.debug("HTTP/2 request refused from %s: %s", self.peer_ip, exc)
            stats.reject(400)
            self.conn.reset_stream(sid, ErrorCodes.PROTOCOL_ERROR)
            return
        except OverflowError:
            method, target, headers = b"GET", b"/", []
            big = True
        else:
            big = False
        s = H2Stream(self, sid, method == b"HEAD")
        self.streams[sid] = s
        self.requests += 1
        cl = None
        for name, value in headers:
            if name == b"content-length":
                cl = value
        if cl is not None:
            s.content_length = int(cl) if cl.isdigit() else -2
        elif not ended:
            # A body of unknown length goes to an HTTP/1.1 upstream chunked
            # (Envoy's codec does the same).
            headers.append((b"transfer-encoding", b"chunked"))
        ex = self.listener.new_stream(s, method, target, headers, "2", True, False)
        if ended and ex.grpc is None:
            ex.grpc = call_for(ex.hdict.get(b"content-type"))  # no DATA at all (Exchange checks bodies only)
        s.ex = ex
        s.current = ex
        if big:
            ex.reject(431, b"Request Header Fields Too Large")
            return
        if s.content_length == -2:
            ex.reject(400, b"invalid content-length")
            return
        if ended:
            s.request_ended = True
            if s.content_length > 0:
                ex.reject(400, b"content-length mismatch")
                return
            ex.on_request_complete()
        elif ex.has_body:
            ex.start()

    def _on_data(self, sid: int, data: bytes, flow_len: int) -> None:
        s = self.streams.get(sid)
        if not data:
            self.empty_data += 1
            if self.empty_data > MAX_EMPTY_DATA:
                self._calm("empty DATA flood")
                return
        else:
            self.empty_data = 0
        if s is None or s.reset or s.ex is None or s.ex.finished:
            self.ack(sid, flow_len)  # nobody reads it: hand the window back
            return
        s.received += len(data)
        if s.content_length >= 0 and s.received > s.content_length:
            self._refuse_body(s)
            return
        if data:
            s.ex.on_request_body(data)
        if s.paused:
            s.unacked += flow_len
        else:
            self.ack(sid, flow_len)

    def _on_request_end(self, s: H2Stream) -> None:
        s.request_ended = True
        ex = s.ex
        if ex is None or ex.finished:
            return
        if s.content_length >= 0 and s.received != s.content_length:
            self._refuse_body(s)
            return
        ex.on_request_complete()

    def _refuse_body(self, s: H2Stream) -> None:
        """DATA that disagrees with content-length (RFC 9113 8.1.1): malformed;
        never forwarded (an HTTP/1.1 upstream would read it as framing)."""
        self.worker.stats.reject(400)
        s._reset(ErrorCodes.PROTOCOL_ERROR)
        ex = s.ex
        if ex is not None and not ex.finished:
            ex.flags.append(errors.DOWNSTREAM_PROTOCOL_ERROR)
            ex.on_downstream_closed()

    def _on_client_reset(self, sid: int) -> None:
        s = self.streams.get(sid)
        if s is None:
            return
        s.reset = True
        ex = s.ex
        if ex is not None and not ex.finished:
            # A client cancelling a stream in progress: Rapid Reset's budget.
            now = self.worker.loop.time()
            self.reset_tokens = min(RESET_BURST, self.reset_tokens + (now - self.reset_stamp) * RESET_RATE) - 1
            self.reset_stamp = now
            ex.on_downstream_closed()
            if self.reset_tokens < 0:
                self._calm("stream reset rate")
                return
        self.stream_done(s)

    def _control(self) -> None:
        now = self.worker.loop.time()
        self.control_tokens = min(CONTROL_BURST,
                                  self.control_tokens + (now - self.control_stamp) * CONTROL_RATE) - 1
        self.control_stamp = now
        if self.control_tokens < 0:
            self._calm("control frame flood")

    def _calm(self, why: str) -> None:
        log.warning("HTTP/2 connection from %s closed: %s", self.peer_ip, why)
        self.worker.stats.downstream_cx_h2_flood += 1
        self.conn.close_connection(ErrorCodes.ENHANCE_YOUR_CALM)
        self._close(linger=True)

    def _on_window(self, sid: int) -> None:
        if sid:
            s = self.streams.get(sid)
            if s is not None and s.out:
                self._drain_out(s)
            return
        for s in list(self.streams.values()):
            if s.out:
                self._drain_out(s)

    # -- used by the streams ------------------------------------------------------

    def ack(self, sid: int, n: int) -> None:
        if n and not self.closed:
            try:
                self.conn.acknowledge_received_data(n, sid)
            except h2.exceptions.StreamClosedError:
                pass

    def send_headers(self, s: H2Stream, headers: list[tuple[bytes, bytes]], end: bool) -> None:
        if self.closed or s.reset:
            return
        try:
            self.conn.send_headers(s.sid, headers, end_stream=end)
        except h2.exceptions.StreamClosedError:
            s.reset = True

    def send_data(self, s: H2Stream, data: bytes) -> None:
        if self.closed or s.reset:
            return
        if s.out:
            s.out.append(data)
            s.out_bytes += len(data)
        else:
            rest = self._send_window(s, data)
            if rest:
                s.out.append(rest)
                s.out_bytes += len(rest)
        if s.out_bytes > STREAM_BUFFER and not s.upstream_paused and s.ex is not None:
            # The client's window is shut: stop reading this stream's
            # upstream (the other streams go on).
            s.upstream_paused = True
            s.ex.on_downstream_write_paused()
        if self.transport.get_write_buffer_size() > MAX_UNREAD_OUTPUT:
            self._calm("client does not read")

    def _send_window(self, s: H2Stream, data: bytes) -> bytes:
        """Send what the flow-control windows admit; the rest is returned."""
        conn = self.conn
        try:
            window = conn.local_flow_control_window(s.sid)
        except h2.exceptions.StreamClosedError:
            s.reset = True
            return b""
        frame = conn.max_outbound_frame_size
        mv = memoryview(data)
        sent = 0
        n = len(data)
        while sent < n and window > 0:
            size = min(frame, window, n - sent)
            conn.send_data(s.sid, mv[sent:sent + size].tobytes())
            self.data_frames += 1
            sent += size
            window -= size
        return data[sent:] if sent < n else b""

    def _drain_out(self, s: H2Stream) -> None:
        data = b"".join(s.out)
        s.out.clear()
        rest = self._send_window(s, data)
        s.out_bytes = len(rest)
        if rest:
            s.out.append(rest)
        elif s.end_pending:
            s.end_pending = False
            self.end_stream(s)
        if s.upstream_paused and s.out_bytes <= STREAM_BUFFER // 2:
            s.upstream_paused = False
            if s.ex is not None and not self.write_paused:
                s.ex.on_downstream_write_resumed()
        self.flush()

    def end_stream(self, s: H2Stream) -> None:
        if self.closed or s.reset:
            return
        try:
            if s.trailers:
                self.conn.send_headers(s.sid, s.trailers, end_stream=True)
            else:
                self.conn.end_stream(s.sid)
        except h2.exceptions.StreamClosedError:
            s.reset = True
            return
        if s.ex is None or s.ex.finished:
            self.stream_done(s)

    def reset_stream(self, s: H2Stream, code: int) -> None:
        if not self.closed:
            try:
                self.conn.reset_stream(s.sid, code)
            except h2.exceptions.StreamClosedError:
                pass
            self.flush()

    def stream_done(self, s: H2Stream) -> None:
        """Forget a stream whose exchange is over and whose response is out
        (or reset)."""
        if s.ex is not None and not s.ex.finished:
            return
        if s.out and not s.reset:
            return  # still sending its body; _drain_out ends it
        if self.streams.get(s.sid) is s:
            del self.streams[s.sid]
        self.last_activity = self.worker.loop.time()
        if self.draining and not self.streams:
            self._close()

    def cork(self) -> bool:
        if self.corked:
            return False
        self.corked = True
        return True

    def uncork(self) -> None:
        self.corked = False
        self.flush()

    def flush(self) -> None:
        """Send the frames the library has queued, once per event-loop turn:
        the HEADERS and DATA of every stream answered in this turn (several
        upstream reads, several Exchange writes each) go out in one socket
        write instead of one per frame."""
        if self.corked or self.transport is None or self.flush_pending or self.closed:
            return
        self.flush_pending = True
        self.worker.loop.call_soon(self._write_out)

    def _write_out(self) -> None:
        self.flush_pending = False
        if self.closed or self.transport is None:
            return
        data = self.conn.data_to_send()
        if data:
            self.transport.write(data)

    def _close(self, linger: bool = False) -> None:
        """Close after the queued frames. ``linger`` (a GOAWAY with an error,
        the client probably still sending): half-close and keep reading and
        discarding for up to LINGER_SECONDS or LINGER_BYTES, as Envoy's
        delayed close. Closing a socket with unread input makes the kernel
        send a reset at once, and a reset can destroy the GOAWAY before the
        client reads it (RFC 9112 9.6 explains the same for HTTP/1.1)."""
        if self.closed:
            return
        t = self.transport
        if t is not None:
            data = self.conn.data_to_send()  # (at once: the transport closes next)
            if data:
                t.write(data)
        self.closed = True
        if t is None:
            return
        if linger:
            self._end_streams()
            try:
                t.write_eof()
            except (OSError, RuntimeError, NotImplementedError):  # (TLS transports cannot half-close)
                t.close()
                return
            self.worker.loop.call_later(LINGER_SECONDS, self._linger_over)
            return
        t.close()

    def _linger_over(self) -> None:
        t = self.transport
        if t is not None and not t.is_closing():
            t.abort()

    def _end_streams(self) -> None:
        """The connection is done: every stream's exchange stops now."""
        streams = list(self.streams.values())
        self.streams.clear()
        for s in streams:
            s.reset = True
            if s.ex is not None:
                s.ex.on_downstream_closed()
