"""The downstream (client-facing) HTTP/1.1 connection.

An ``asyncio.Protocol`` fed by the httptools (llhttp) parser. Per-connection
state lives here; per-request state lives in a stream (``Exchange``), which the
listener's ``new_stream`` factory creates and this module drives only through
the ``DownstreamStream`` Protocol below: the codec imports nothing above it.

Pipelining: requests are answered strictly in order. While one exchange is in
flight, later requests are parsed into queued exchanges and reading pauses;
once ``PIPELINE_DEPTH`` are queued (or what one small read held) input
stays unparsed (``held``: at most one read) until the queue drains.

Backpressure (issue 21): while the client's transport is above its write
high-water mark, no further request is parsed or started and the current
exchange's upstream is not read; all resume below the low-water mark. So a
client that does not read its responses holds at most: the queue, one
unparsed read, the transport's write buffer (high-water mark plus what one
upstream read or one local reply adds), and the current exchange's request
body buffers (README "Security": docs/security.md).

Flow control: reading pauses for any of several reasons (a bitmask), and
resumes only when none is left: pipelined requests waiting, input held
unparsed, or the upstream side of the current exchange cannot take more
request body.

Strictness (README "Security"): llhttp rejects most malformed input in C
(request line, header syntax, CR/LF/NUL/control characters, obs-fold,
Content-Length + Transfer-Encoding, bad chunk sizes and extensions); the
limits and the RFC 9112 checks it leaves open are applied here and in
``Exchange._validate``. A request is started (routed, forwarded) only after
the read that carried its head has been parsed to the end, so a malformed
body or pipelined request in the same packet is refused before anything
reaches an upstream.
"""

from __future__ import annotations

import logging
import socket
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import httptools

from .. import errors
from .h2downstream import PREFACE_HEAD, H2Downstream, preface_rest
from .response import refusal

if TYPE_CHECKING:
    from ..upstream.connection import UpstreamConnection

log = logging.getLogger("pyproxy.downstream")

BLOCK_PIPELINE = 1
BLOCK_BODY = 2
BLOCK_HELD = 4

# Parsed pipelined requests queued behind the one in flight; more input is
# held unparsed (Envoy parses the next request only when the previous one
# is done; a short queue costs nothing in order and spares a re-parse per
# request).
PIPELINE_DEPTH = 4
# A read this small is parsed whole (the common case: one request, and no
# search for where its head ends); the requests it can hold (about 60 of
# the smallest) are the queue's worst case. Larger reads are cut after each
# head end.
WHOLE_READ = 2048
_HEAD_END = b"\r\n\r\n"

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h; IP6T_SO_ORIGINAL_DST has the same value


# How long a connection closed after a refused request keeps reading (and
# discarding) what the client still sends, so the error reply is not lost to
# a TCP reset (Envoy's delayed_close_timeout).
LINGER_SECONDS = 1.0
LINGER_BYTES = 8 << 20


class DownstreamStream(Protocol):
    """One request/response on a connection, as the connection (and the
    worker's idle sweep) drives it; ``http/exchange.py``'s ``Exchange`` is the
    implementation."""

    has_body: bool
    started: bool
    finished: bool
    request_complete: bool
    response_complete: bool
    close_after: bool
    status: int
    flags: list[str]
    request_bytes: int
    response_bytes: int
    start_time: float
    end_time: float

    def start(self) -> None: ...
    def on_request_body(self, data: bytes) -> None: ...
    def on_request_complete(self) -> None: ...
    def on_downstream_write_paused(self) -> None: ...
    def on_downstream_write_resumed(self) -> None: ...
    def on_downstream_closed(self) -> None: ...
    def on_tick(self, now: float, stream_idle: float) -> None: ...  # the stream idle timeout
    def reject(self, status: int, body: bytes, counted: bool = False) -> None: ...
    def _finish(self, force: bool = False) -> None: ...  # idempotent teardown (after a 101)


# (connection, method, target, headers, HTTP version, keep-alive, upgrade) -> stream
StreamFactory = Callable[
    ["DownstreamConnection", bytes, bytes, list[tuple[bytes, bytes]], str, bool, bool], DownstreamStream]


class _ParseLimit(Exception):
    """Raised inside a parser callback to stop parsing on a limit."""


class _Stopped(Exception):
    """Raised inside a parser callback: the connection stopped taking
    requests (one was refused, or it is closing), so the bytes that follow
    are never parsed."""


# What feed_data() stops on (``_parse_failed`` tells them apart; a callback's
# exception arrives as HttpParserCallbackError, an HttpParserError).
_PARSE_STOPS = (httptools.HttpParserError, httptools.HttpParserUpgrade, _ParseLimit)


class _Discard:
    """Stands in for a tunnel while a closing connection drains the client's
    unread bytes: ``data_received`` hands them here, at no cost to the
    normal path (which already checks for a tunnel)."""

    __slots__ = ("conn", "budget")

    def __init__(self, conn: DownstreamConnection) -> None:
        self.conn = conn
        self.budget = LINGER_BYTES

    def write(self, data: bytes) -> None:
        self.budget -= len(data)
        if self.budget < 0:
            self.close()

    def close(self) -> None:
        conn = self.conn
        if not conn.closed and conn.transport is not None:
            conn.close_transport()

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    @property
    def tunnel(self) -> None:
        return None

    @tunnel.setter
    def tunnel(self, value: Any) -> None:
        pass


def original_dst(sock: Any) -> tuple[str, int] | None:
    """The pre-DNAT destination of an iptables-redirected connection, or None
    when the connection was not redirected.

    An IPv4 connection accepted on a dual-stack IPv6 socket (``[::]``) has an
    IPv4 conntrack entry, so it is asked with the IPv4 option; the answer is
    a plain IPv4 address either way."""
    try:
        family = sock.family
        local = sock.getsockname()
        local_ip = unmap_ipv4(local[0])
        if family == socket.AF_INET6 and local_ip is not local[0]:
            family = socket.AF_INET
        if family == socket.AF_INET:
            raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
            addr = (socket.inet_ntop(socket.AF_INET, raw[4:8]), int.from_bytes(raw[2:4], "big"))
        elif family == socket.AF_INET6:
            raw = sock.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
            addr = (socket.inet_ntop(socket.AF_INET6, raw[8:24]), int.from_bytes(raw[2:4], "big"))
        else:
            return None
    except (OSError, ValueError, AttributeError, IndexError):
        return None
    if addr[0] == local_ip and addr[1] == local[1]:
        return None
    return addr


def unmap_ipv4(ip: str) -> str:
    """``::ffff:10.0.0.1`` (an IPv4 peer of a dual-stack socket) → ``10.0.0.1``;
    any other address is returned as the same object."""
    if ip.startswith("::ffff:") and "." in ip:
        return ip[7:]
    return ip


def strip_h2c_upgrade(headers: list[tuple[bytes, bytes]]) -> bool:
    """``Upgrade: h2c`` (RFC 7540's upgrade, deprecated by RFC 9113): as
    Envoy's HTTP/1.1 codec (envoyproxy/envoy#7161), the request stays a
    plain HTTP/1.1 request: Upgrade, HTTP2-Settings and those Connection
    tokens are removed, in place. True if it was one."""
    if not any(n == b"upgrade" and v.strip().lower() == b"h2c" for n, v in headers):
        return False
    kept = []
    for name, value in headers:
        if name == b"upgrade" or name == b"http2-settings":
            continue
        if name == b"connection":
            tokens = [t.strip() for t in value.split(b",")
                      if t.strip() and t.strip().lower() not in (b"upgrade", b"http2-settings")]
            if not tokens:
                continue
            value = b", ".join(tokens)
        kept.append((name, value))
    headers[:] = kept
    return True


class DownstreamConnection:
    """asyncio.Protocol for one client connection (duck-typed; no base class
    needed by uvloop, which keeps attribute access on the fast path)."""

    __slots__ = (
        "listener", "worker", "direction", "listen_port", "transport", "parser",
        "url", "url_len", "headers", "header_bytes", "current", "parsing", "pipeline",
        "read_block", "reading_paused", "write_paused", "closed", "draining", "peer_ip",
        "peer_ip_bytes", "original_dst", "tunnel", "tunnel_bytes", "tunnel_mark", "tunnel_since",
        "pending_error", "advancing",
        "last_activity", "headers_started", "requests", "sock", "upgrade_buffer",
        "limits", "head_bytes", "deferred", "feeding", "chunk_open", "chunk_mark",
        "corked", "wbuf", "tls_peer", "stopped", "held",
    )

    def __init__(self, listener: Any) -> None:
        self.listener = listener
        self.worker = listener.worker
        self.direction = listener.direction
        self.listen_port = listener.port
        self.transport: Any = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.url_len = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.header_bytes = 0
        self.current: DownstreamStream | None = None
        self.parsing: DownstreamStream | None = None
        self.pipeline: deque[DownstreamStream] = deque()
        self.read_block = 0
        self.reading_paused = False
        self.write_paused = False
        self.closed = False
        self.draining = False
        self.peer_ip = ""
        self.peer_ip_bytes = b""
        self.original_dst: tuple[str, int] | None = None
        # Raw bytes go here: the upstream after a 101, or a sink while a
        # refused connection lingers before it closes.
        self.tunnel: UpstreamConnection | _Discard | None = None
        # An upgraded tunnel's bytes moved (both ways), and the worker sweep's
        # last look at them: Envoy's stream idle timeout for upgraded streams.
        self.tunnel_bytes = 0
        self.tunnel_mark = -1
        self.tunnel_since = 0.0
        self.pending_error: tuple[int, bytes] | None = None
        self.advancing = False
        self.last_activity = 0.0
        self.headers_started = 0.0
        self.requests = 0
        self.sock: Any = None
        self.upgrade_buffer = b""
        self.limits = self.worker.limits
        self.head_bytes = 0  # bytes of a request head received after the read that began it
        self.deferred: DownstreamStream | None = None  # headers parsed, start after this read
        self.feeding = False  # inside parser.feed_data()
        # A chunk-size line was parsed and its chunk is not complete; the
        # request's body byte count at that moment. A read that delivers no
        # body while a chunk is open went into trailer fields (bounded).
        self.chunk_open = False
        self.chunk_mark = 0
        # While an upstream read is being handled, writes are collected and
        # sent as one (cork/uncork): a response's head, body and last chunk
        # arriving in one read cost one send() instead of two or three.
        self.corked = False
        self.wbuf: list[bytes] = []
        # The authenticated client of an inbound mTLS connection
        # (security/inbound.py TLSPeer); None on plaintext.
        self.tls_peer: Any = None
        # Set once a request was refused or the connection began closing:
        # from then on nothing on this connection is parsed, routed or
        # forwarded, queued pipelined requests included (issue 12: the
        # bytes after a refused request are often its own body, which must
        # never become a request of its own).
        self.stopped = False
        # Received but not parsed: the pipeline queue is full, or the client
        # is not reading its responses (see ``_input_blocked``).
        self.held: bytes | None = None

    @property
    def peer_principal(self) -> str:
        """The client certificate's SPIFFE URI on an inbound mTLS connection,
        "" on plaintext (what AuthorizationPolicy principals match)."""
        peer = self.tls_peer
        return peer.uri if peer is not None else ""

    @property
    def sni(self) -> str:
        """The server name an inbound mTLS client asked for ("" on plaintext)."""
        peer = self.tls_peer
        return peer.sni if peer is not None else ""

    # -- asyncio.Protocol --------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.last_activity = self.worker.loop.time()
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.peer_ip = unmap_ipv4(peer[0])
        self.peer_ip_bytes = self.peer_ip.encode()
        sock = transport.get_extra_info("socket")
        self.sock = sock
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
            if self.listener.transparent:
                self.original_dst = original_dst(sock)
        self.listener.on_connection_made(self)

    def data_received(self, data: bytes) -> None:
        tunnel = self.tunnel
        if tunnel is not None:
            self.tunnel_bytes += len(data)
            tunnel.write(data)
            return
        self.last_activity = self.worker.loop.time()
        held = self.held
        if held is not None:
            # Reading pauses while input is held; a read already under way
            # joins it (bounded: one more read at most).
            self.held = held + data
            return
        if (self.write_paused or self.pipeline) and self._input_blocked():
            # A new request in a read of its own while the client is not
            # reading (or the queue is full): it waits, unparsed.
            self.held = data
            self._block(BLOCK_HELD)
            return
        if self.headers_started:
            # httptools hands over a header only once it is complete, so a
            # head is bounded here, by bytes received, not in on_header.
            self.head_bytes += len(data)
            if self.head_bytes > self.limits.max_header_bytes + self.limits.max_url + 4096:
                self.pending_error = (431, b"Request Header Fields Too Large")
                self._protocol_error()
                return
        watch_trailers = self.chunk_open
        n = len(data)
        if n <= WHOLE_READ or (end := data.find(_HEAD_END) + 4) == 3 or end == n:
            # A small read, or no head ends in it, or it ends with the
            # only one: parsed whole (``_feed``, inlined: one call less per request).
            self.feeding = True
            try:
                self.parser.feed_data(data)
            except _PARSE_STOPS as exc:
                try:
                    self._parse_failed(exc, data, data, 0)
                finally:
                    self.feeding = False
                return
            self.feeding = False
        elif not self._feed_pieces(data, end):
            return
        if watch_trailers:
            # httptools buffers a trailer field until it is complete, like a
            # header: bound the reads that go into trailers.
            ex = self.parsing
            if self.chunk_open and ex is not None and ex.request_bytes == self.chunk_mark:
                self.head_bytes += len(data)
                if self.head_bytes > self.limits.max_header_bytes:
                    self.pending_error = (431, b"Request Header Fields Too Large")
                    self._protocol_error()
                    return
            else:
                self.head_bytes = 0
        ex = self.deferred
        if ex is not None:
            # The whole read parsed cleanly: now the request may go upstream.
            self.deferred = None
            if ex is self.current and not ex.started and not ex.finished and not self.stopped:
                ex.start()

    def _to_http2(self, data: bytes) -> bool:
        """llhttp stops on ``PRI * HTTP/2.0`` (its "Pause on PRI/Upgrade"
        error): on a connection's first request that is the HTTP/2 preface,
        h2c with prior knowledge, as Envoy's codec AUTO accepts it. The
        connection is handed to an ``H2Downstream`` protocol. Checked only
        here, on the parse error, so HTTP/1.1 pays nothing for it."""
        rest = preface_rest(data)
        if rest is None or self.closed or self.pending_error is not None:
            return False
        self._become_h2(PREFACE_HEAD + rest)
        return True

    def _become_h2(self, first: bytes) -> None:
        """Hand the connection to an ``H2Downstream`` (h2c prior knowledge,
        or ALPN ``h2`` over TLS), ``first`` being the bytes read so far."""
        h2c = H2Downstream(self)
        listener = self.listener
        listener.connections.discard(self)
        listener.connections.add(h2c)
        self.worker.stats.downstream_cx_http2_total += 1
        self.closed = True  # this object is done; the transport is h2c's now
        self.headers_started = 0.0
        self.transport.set_protocol(h2c)
        h2c.start(first)

    def _feed_pieces(self, data: bytes, end: int) -> bool:
        """Parse a read that may hold several requests, cut after each head
        end, so the queue is looked at between two requests; what does not
        fit is held unparsed. (llhttp cannot be paused at a message end.)
        Each piece ends after at most one head: a body with CRLFCRLF in it
        only makes the pieces smaller. False when parsing stopped."""
        view = memoryview(data)
        n = len(data)
        start = 0
        while True:
            if not self._feed(view[start:end], data, start):
                return False
            start = end
            if start >= n or self.tunnel is not None:
                return True
            if self._input_blocked():
                self.held = data[start:]
                self._block(BLOCK_HELD)
                return True
            end = data.find(_HEAD_END, start) + 4
            if end == 3:
                end = n

    def _feed(self, piece: Any, data: bytes, start: int = 0) -> bool:
        """Feed one piece of ``data`` (at ``start``) to the parser; False if
        parsing stopped (refused, upgraded, closing)."""
        self.feeding = True
        try:
            self.parser.feed_data(piece)
        except _PARSE_STOPS as exc:
            try:
                self._parse_failed(exc, piece, data, start)
            finally:
                self.feeding = False
            return False
        self.feeding = False
        return True

    def _parse_failed(self, exc: Exception, piece: Any, data: bytes, start: int) -> None:
        """``feed_data`` stopped on ``exc`` (while still ``feeding``): an
        upgrade, a limit, a refusal, or malformed input."""
        if isinstance(exc, httptools.HttpParserUpgrade):
            offset = exc.args[0] if exc.args else len(piece)
            self._on_upgrade_data(data[start + offset:])
        elif isinstance(exc, _ParseLimit):
            self._protocol_error()
        elif isinstance(exc, httptools.HttpParserCallbackError):
            if isinstance(exc.__context__, _Stopped):
                return  # the refusal was already answered (or is queued)
            if not (isinstance(exc.__context__, _ParseLimit) or self.pending_error is not None):
                log.exception("internal error while handling a request")
                self.pending_error = (500, b"internal error")
            self._protocol_error()
        elif isinstance(exc, httptools.HttpParserError):
            if not self.requests and self.url == b"*" and self._to_http2(data):
                return
            if self.pending_error is None:
                self.pending_error = (400, b"Bad Request")
            if log.isEnabledFor(logging.DEBUG):
                log.debug("malformed request from %s: %s", self.peer_ip, exc)
            self._protocol_error()

    def _input_blocked(self) -> bool:
        """No further request may be parsed now: the queue is full, or the
        client is not reading (write buffer above its high-water mark) and
        what follows can only be a new request."""
        if len(self.pipeline) >= PIPELINE_DEPTH:
            return True
        if self.write_paused:
            cur = self.current
            return cur is None or cur.request_complete or bool(self.pipeline)
        return False

    def _resume_input(self) -> None:
        """Parse held input once the queue drained or the client read."""
        held = self.held
        if held is None or self.feeding or self.stopped or self._input_blocked():
            return
        self.held = None
        self.data_received(held)  # (counted as received now)
        if self.held is None:
            self._unblock(BLOCK_HELD)

    def eof_received(self) -> bool:
        # The client shut down its side: as Envoy's HTTP connection manager
        # (no half-close), that is the client going away. Closing cancels an
        # in-flight request (flag DC) instead of waiting on an upstream for
        # a client that may be gone.
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.stopped = True
        self.listener.on_connection_lost(self)
        if self.tunnel is not None:
            t = self.tunnel
            self.tunnel = None
            t.tunnel = None
            t.close()
        current = self.current
        self.current = None
        self.pipeline.clear()
        if current is not None:
            current.on_downstream_closed()

    def pause_writing(self) -> None:
        # (no new request is parsed or started meanwhile: _input_blocked,
        # _advance)
        self.write_paused = True
        if self.tunnel is not None:
            self.tunnel.pause_reading()
        elif self.current is not None:
            self.current.on_downstream_write_paused()

    def resume_writing(self) -> None:
        self.write_paused = False
        self.last_activity = self.worker.loop.time()  # the client reads: progress
        if self.tunnel is not None:
            self.tunnel.resume_reading()
            return
        if self.current is not None:
            self.current.on_downstream_write_resumed()
        if self.pipeline or self.held is not None:
            self._advance()

    # -- httptools callbacks --------------------------------------------

    def on_message_begin(self) -> None:
        if self.stopped:
            raise _Stopped()
        self.url = b""
        self.url_len = 0
        self.headers = []
        self.header_bytes = 0
        self.head_bytes = 0
        # (the loop time data_received took for this read: every parse runs inside it)
        self.headers_started = self.last_activity

    def on_url(self, url: bytes) -> None:
        self.url_len += len(url)
        if self.url_len > self.limits.max_url:
            self.pending_error = (414, b"URI Too Long")
            raise _ParseLimit()
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        headers = self.headers
        self.header_bytes += len(name) + len(value) + 4
        limits = self.limits
        if self.header_bytes > limits.max_header_bytes or len(headers) >= limits.max_headers:
            self.pending_error = (431, b"Request Header Fields Too Large")
            raise _ParseLimit()
        # llhttp drops the whitespace before a value, not after it: neither is
        # part of the value (RFC 9110 5.5 OWS), as in Envoy's codec.
        headers.append((name.lower(), value.rstrip(b" \t")))

    def on_headers_complete(self) -> None:
        self.headers_started = 0.0
        if self.stopped or self.pending_error is not None or self.tunnel is not None:
            raise _Stopped()  # closing: nothing after a refused request runs
        parser = self.parser
        keep_alive = parser.should_keep_alive()
        upgrade = parser.should_upgrade()
        if upgrade and strip_h2c_upgrade(self.headers):
            # A plain request now; llhttp is in upgrade mode after it and
            # parses no further one: the connection closes after the response.
            upgrade = keep_alive = False
        ex = self.listener.new_stream(self, parser.get_method(), self.url, self.headers,
                                      parser.get_http_version(), keep_alive, upgrade)
        # Trailer fields of a chunked body also come through on_header: they
        # go to a list nobody reads (still counted against the limits), never
        # into the request's headers (RFC 9110 6.5.1; Envoy drops them too).
        self.headers = []
        self.requests += 1
        self.parsing = ex
        if self.current is None:
            self.current = ex
            if ex.has_body:
                # Stream the body as it arrives, but only once this read
                # parsed cleanly (data_received starts it).
                self.deferred = ex
        else:
            self.pipeline.append(ex)
            self._block(BLOCK_PIPELINE)

    def on_body(self, body: bytes) -> None:
        ex = self.parsing
        if ex is not None and not ex.finished:
            ex.on_request_body(body)

    def on_chunk_header(self) -> None:
        ex = self.parsing
        self.chunk_open = True
        self.chunk_mark = ex.request_bytes if ex is not None else 0

    def on_chunk_complete(self) -> None:
        self.chunk_open = False

    def on_message_complete(self) -> None:
        ex = self.parsing
        self.parsing = None
        if ex is None:
            return
        if ex is self.current:
            ex.on_request_complete()
        else:
            ex.request_complete = True

    # -- used by the stream -------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.corked:
            self.wbuf.append(data)
        elif not self.closed:
            self.transport.write(data)

    def cork(self) -> bool:
        """Collect writes until ``uncork``; False if already corked (the
        outer caller uncorks)."""
        if self.corked:
            return False
        self.corked = True
        return True

    def uncork(self) -> None:
        self.corked = False
        buf = self.wbuf
        if buf:
            data = buf[0] if len(buf) == 1 else b"".join(buf)
            buf.clear()
            if not self.closed:
                self.transport.write(data)

    def pause_reading_for(self, ex: DownstreamStream) -> None:
        if ex is self.current:
            self._block(BLOCK_BODY)

    def resume_reading_for(self, ex: DownstreamStream) -> None:
        if ex is self.current:
            self._unblock(BLOCK_BODY)

    def exchange_done(self, ex: DownstreamStream) -> None:
        if ex is not self.current:
            return
        self.current = None
        if self.read_block & BLOCK_BODY:
            self._unblock(BLOCK_BODY)
        now = self.worker.loop.time()
        self.last_activity = now
        if self.headers_started:
            # The next request's head was arriving meanwhile: its header
            # timeout counts from now (the sweep skips busy connections).
            self.headers_started = now
        if ex.close_after or self.closed:
            # Unread request bytes may still arrive (after a refusal, often
            # a smuggling attempt): drain them briefly, unparsed, so the
            # reply is not destroyed by a reset.
            self.close(linger=not ex.request_complete or self.pending_error is not None or self.stopped)
            return
        if self.pending_error is not None and not self.pipeline:
            self._send_error()
            return
        if self.pipeline or self.held is not None or self.read_block & BLOCK_PIPELINE:
            self._advance()
        if self.current is None and self.draining and not self.pipeline:
            self.close()

    def become_tunnel(self, upconn: UpstreamConnection, ex: DownstreamStream) -> None:
        """After a 101: bytes flow raw in both directions until either side closes."""
        self.tunnel = upconn
        upconn.tunnel = self.transport
        upconn.stream = None
        if self.upgrade_buffer:
            upconn.write(self.upgrade_buffer)
            self.upgrade_buffer = b""
        self.current = None
        self.read_block = 0
        self._update_reading()
        ex.response_complete = True
        ex.request_complete = True
        ex._finish()

    # -- internals -----------------------------------------------------------

    def _advance(self) -> None:
        """Start queued pipelined exchanges, in order. Re-entrant calls (an
        exchange finishing synchronously inside start()) return at once and
        the outer loop carries on, so deep pipelines do not recurse."""
        if self.advancing:
            return
        self.advancing = True
        try:
            # Not while the client is not reading: each start adds a response
            # to the write buffer (resume_writing comes back here).
            while self.current is None and self.pipeline and not self.closed and not self.write_paused:
                nxt = self.pipeline.popleft()
                self.current = nxt
                if nxt.request_complete:
                    nxt.request_complete = False
                    nxt.on_request_complete()  # starts it
                elif nxt.has_body:
                    if self.feeding:
                        self.deferred = nxt  # its body may still turn out malformed in this read
                    else:
                        nxt.start()
            if not self.pipeline:
                self._unblock(BLOCK_PIPELINE)
        finally:
            self.advancing = False
        if self.held is not None:
            self._resume_input()

    def _on_upgrade_data(self, rest: bytes) -> None:
        # The upgrade request went to its exchange at message complete; bytes
        # after it belong to the tunnel, which opens only after the upstream's
        # 101. Hold them (at most one read) and stop reading until then. The
        # parser is now in upgrade mode and cannot parse HTTP again, so if the
        # upstream refuses the upgrade the connection closes after its answer.
        self.upgrade_buffer += rest
        self._block(BLOCK_PIPELINE)

    def _block(self, reason: int) -> None:
        self.read_block |= reason
        self._update_reading()

    def _unblock(self, reason: int) -> None:
        if self.read_block & reason:
            self.read_block &= ~reason
            self._update_reading()

    def _update_reading(self) -> None:
        t = self.transport
        if t is None or self.closed:
            return
        if self.read_block and not self.reading_paused:
            self.reading_paused = True
            t.pause_reading()
        elif not self.read_block and self.reading_paused:
            self.reading_paused = False
            t.resume_reading()

    def _protocol_error(self) -> None:
        """A request is malformed or over a limit (``pending_error``, else
        400): count it, then reply (after any in-flight response) and close."""
        if self.closed or isinstance(self.tunnel, _Discard) or self.transport.is_closing():
            return
        status, body = self.pending_error or (400, b"Bad Request")
        self.pending_error = (status, body)
        self.stopped = True
        self.headers_started = 0.0
        self.deferred = None
        self.worker.stats.reject(status)
        bad = self.parsing  # an exchange whose body was being received, if any
        self.parsing = None
        if bad is not None and bad is self.current:
            self.pipeline.clear()
            bad.reject(status, body, counted=True)  # its exchange_done() closes
            return
        if bad is not None:
            # A queued pipelined request: it never started, drop it.
            try:
                self.pipeline.remove(bad)
            except ValueError:
                pass
        if self.current is not None:
            self._block(BLOCK_PIPELINE)
            return  # exchange_done() calls _send_error()
        self._send_error()

    def _send_error(self) -> None:
        status, body = self.pending_error or (400, b"Bad Request")
        self.pipeline.clear()
        self.write(refusal(status, body))
        obs = self.worker.observer
        if obs is not None:
            self._report_refused(obs, status, len(body))
        self.close(linger=True)

    def _report_refused(self, obs: Any, status: int, body_len: int) -> None:
        """The observer's view of a request refused before it had an
        exchange: what was parsed of it (method, target, headers so far)."""
        try:
            # The method is known once the target began (before that llhttp's
            # method field still holds its zero value, which reads "DELETE").
            method = self.parser.get_method() if self.url else b"-"
            ex = self.listener.new_stream(self, method or b"-", self.url or b"-", self.headers, "1.1", False,
                                          False)
            ex.status = status
            ex.flags.append(errors.DOWNSTREAM_PROTOCOL_ERROR)
            ex.response_bytes = body_len
            ex.started = ex.finished = True
            ex.end_time = ex.start_time
            obs.on_request_refused(ex)
        except Exception:  # telemetry must never break the refusal itself
            log.exception("observer failed on a refused request")

    def close(self, linger: bool = False) -> None:
        """Close the connection. ``linger``: unread request bytes may follow
        (a refused or partly read request): stop writing now, but keep
        reading and discarding for up to a second (or 8 MiB) so the client
        reads the reply instead of a reset."""
        self.stopped = True
        self.pipeline.clear()
        self.deferred = None
        self.held = None
        if self.closed or self.transport is None:
            return
        if self.corked:
            # What was written so far goes out before the close.
            self.uncork()
            self.corked = True  # the caller's uncork() finds nothing left
        t = self.transport
        if not linger or self.tunnel is not None:
            self.close_transport()
            return
        discard = _Discard(self)
        self.tunnel = discard
        self.current = None
        self.pipeline.clear()
        self.read_block = 0
        self._update_reading()
        try:
            t.write_eof()
        except (OSError, RuntimeError, NotImplementedError):
            self.close_transport()
            return
        self.worker.loop.call_later(LINGER_SECONDS, discard.close)

    def close_transport(self) -> None:
        """Close after what is buffered is sent; if the client does not read
        it within LINGER_SECONDS, reset (Envoy's delayed close timeout), so a
        client that stopped reading cannot keep a closed connection and its
        buffer forever."""
        t = self.transport
        t.close()
        if t.get_write_buffer_size():
            self.worker.loop.call_later(LINGER_SECONDS, self._abort_if_open)

    def _abort_if_open(self) -> None:
        if not self.closed and self.transport is not None:
            self.transport.abort()

    def on_tick(self, now: float, stream_idle: float) -> None:
        """The worker's once-a-second housekeeping (worker.py ``sweep``): the
        request in progress checks its own stream idle timeout; an upgraded
        tunnel's bytes must move within ``stream_idle`` (Envoy's stream idle
        timeout still applies to it); otherwise the header timeout of a
        request being received and the connection's idle timeout."""
        ex = self.current
        if ex is not None:
            if stream_idle:
                ex.on_tick(now, stream_idle)
            return
        tunnel = self.tunnel
        if tunnel is not None and stream_idle and not isinstance(tunnel, _Discard):
            # An upgraded (WebSocket) tunnel: bytes either way count as progress.
            if self.tunnel_bytes != self.tunnel_mark:
                self.tunnel_mark = self.tunnel_bytes
                self.tunnel_since = now
            elif now - self.tunnel_since >= stream_idle:
                self.worker.stats.downstream_rq_idle_timeout += 1
                self.close()
            return
        limits = self.limits
        if self.headers_started and now - self.headers_started > limits.header_timeout:
            self.worker.stats.downstream_cx_header_timeout += 1
            self.pending_error = (408, b"Request Timeout")
            self._protocol_error()
        elif tunnel is None and not self.stopped and now - self.last_activity > limits.idle_timeout:
            # (current is None here: idle, or requests queued behind a
            # client that has not read its responses for that long)
            self.worker.stats.downstream_cx_idle_timeout += 1
            self.close()

    def start_drain(self, close_idle: bool = True) -> None:
        """Graceful drain: the next response carries Connection: close and
        the connection closes after it; an idle keep-alive connection is
        closed now when ``close_idle``."""
        self.draining = True
        if close_idle and self.current is None and not self.pipeline and self.tunnel is None and self.held is None:
            self.close()


class MTLSDownstreamConnection(DownstreamConnection):
    """An inbound mutual-TLS connection: ``verify(transport)`` (the client
    certificate's trust domain, security/inbound.py) runs before the
    connection is served at all; None refuses it."""

    __slots__ = ("verify",)

    def __init__(self, listener: Any, verify: Any) -> None:
        super().__init__(listener)
        self.verify = verify

    def connection_made(self, transport: Any) -> None:
        peer = self.verify(transport)
        if peer is None:
            self.transport = transport
            self.closed = True
            transport.abort()
            return
        self.tls_peer = peer
        super().connection_made(transport)
        if self.closed:
            return  # over --max-connections
        sslobj = transport.get_extra_info("ssl_object")
        if sslobj is not None and sslobj.selected_alpn_protocol() == "h2":
            # ALPN h2 (the client sidecar offered istio-h2, istio, h2): HTTP/2
            # from the first byte, as Envoy's codec AUTO decides on ALPN.
            self._become_h2(b"")
