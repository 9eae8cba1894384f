"""One HTTP/1.1 connection to an upstream endpoint.

The connection parses responses with httptools and hands every event to the
stream currently attached to it (an object with the ``on_upstream_*``
methods, see ``UpstreamStream``). A connection serves one request at a time
(no upstream pipelining, like Envoy) and goes back to its endpoint's pool only
when a response was read completely and both sides agreed to keep it alive.

Responses get the same strictness as requests (README "Security"): llhttp
refuses malformed syntax and ambiguous framing; on top of that a response
with an HTTP version other than 1.0/1.1, a status outside 100-599, a
Transfer-Encoding other than a single ``chunked``, more than 100 headers or
a header section over 60 KiB (Envoy's defaults) is a protocol error: the
stream is reset with ``protocol_error`` (502 UPE, or a closed client
connection if the response had started) and the connection discarded.
"""

from __future__ import annotations

import asyncio
import select
import socket
from typing import TYPE_CHECKING, Any, Protocol

import httptools

if TYPE_CHECKING:
    from .cluster import ClusterEndpoint

# Readiness of an idle pooled connection: data, the peer's FIN, an error.
CLOSED_EVENTS = select.POLLRDHUP | select.POLLHUP | select.POLLERR
_STALE_EVENTS = select.POLLIN | CLOSED_EVENTS

# Envoy's max_response_headers_count / max_response_headers_kb defaults.
MAX_RESPONSE_HEADERS = 100
MAX_RESPONSE_HEADER_BYTES = 60 << 10


class InvalidResponse(Exception):
    """Raised inside a parser callback: the response is refused."""


class UpstreamStream(Protocol):
    """What a connection calls back into (an Exchange or a mirror request)."""

    def on_upstream_headers(self, conn: UpstreamConnection, status: int, headers: list[tuple[bytes, bytes]], keep_alive: bool) -> None: ...
    def on_upstream_body(self, data: bytes) -> None: ...
    def on_upstream_complete(self, conn: UpstreamConnection) -> None: ...
    def on_upstream_reset(self, conn: UpstreamConnection, reason: str) -> None: ...
    def on_upstream_upgrade(self, conn: UpstreamConnection, rest: bytes) -> None: ...
    def on_upstream_write_paused(self) -> None: ...
    def on_upstream_write_resumed(self) -> None: ...


class UpstreamConnection(asyncio.Protocol):
    __slots__ = (
        "endpoint",
        "transport",
        "parser",
        "stream",
        "headers",
        "idle_since",
        "requests",
        "closed",
        "reusable",
        "skip_informational",
        "tunnel",
        "bytes_received",
        "counted",
        "created",
        "head_request",
        "close_delimited",
        "in_head",
        "head_bytes",
        "chunk_open",
        "chunk_data",
        "sink",
        "on_made",
        "read_paused",
        "completed",
        "poller",
        "header_map",
    )

    def __init__(self, endpoint: ClusterEndpoint) -> None:
        self.endpoint = endpoint
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.stream: UpstreamStream | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.idle_since = 0.0
        self.requests = 0
        self.closed = False
        self.reusable = True
        self.skip_informational = False
        self.tunnel: asyncio.Transport | None = None  # set once upgraded to a raw tunnel
        self.bytes_received = 0  # for this response; 0 means "reset before any byte"
        self.counted = True  # counted in the cluster's active-connection gauge
        self.created = 0.0
        self.head_request = False
        # The current response has neither Content-Length nor chunked framing:
        # its body ends when the upstream closes the connection.
        self.close_delimited = False
        self.in_head = False  # a response head is being received
        self.head_bytes = 0  # its bytes after the read that began it (bounded)
        # A chunk is open (size line parsed, not complete) / body arrived
        # since: a read that adds no body to an open chunk went into trailer
        # fields, which httptools buffers like headers (bounded too).
        self.chunk_open = False
        self.chunk_data = False
        # The downstream connection the attached stream answers on (None for
        # mirror requests): corked while a read is handled (see data_received).
        self.sink: Any = None
        # Called once from connection_made (the endpoint's hand-over of a new
        # plaintext connection): a queued request goes out in the loop
        # iteration the connect completed in, not after the connecting task
        # has been resumed.
        self.on_made: Any = None
        # Paused by its stream (the client is slow): a connection going back
        # to the pool must read again, or it never sees its next response.
        self.read_paused = False
        # The stream whose response ended in the read being parsed: it is
        # told only once the whole read was parsed, so a byte after its
        # response (the start of a second, unrequested one) is seen before
        # the connection can go back to the pool.
        self.completed: UpstreamStream | None = None
        # Polls the socket, without reading, before the pool reuses it
        # (``stale``); None when the transport has no socket to poll.
        self.poller: Any = None
        # The current response's fields as a dict (last value wins), built for
        # the framing check and read by the stream (Exchange.on_upstream_headers).
        self.header_map: dict[bytes, bytes] | None = None

    # -- asyncio.Protocol -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's TCPTransport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        if sock is not None:
            try:
                poller = select.poll()
                poller.register(sock.fileno(), _STALE_EVENTS)
                self.poller = poller
            except (OSError, ValueError, TypeError, AttributeError):
                pass
        on_made = self.on_made
        if on_made is not None:
            self.on_made = None
            on_made(self)

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            if self.sink is not None:
                self.sink.tunnel_bytes += len(data)  # (the downstream end's idle watch)
            self.tunnel.write(data)
            return
        stream = self.stream
        if stream is None:
            # Bytes from an idle connection cannot belong to any request: the
            # connection is out of sync, so it must never be reused.
            if not self.closed:
                self.endpoint.cluster.stats.upstream_cx_protocol_error += 1
            self.close()
            return
        sink = self.sink
        if sink is not None and sink.cork():
            # Everything this read makes the stream write downstream (head,
            # body, last chunk) leaves in one send().
            try:
                self._feed(stream, data)
            finally:
                sink.uncork()
        else:
            self._feed(stream, data)

    def _feed(self, stream: UpstreamStream, data: bytes) -> None:
        if not self.bytes_received and data[:7] != b"HTTP/1." and data != b"HTTP/1."[:len(data)]:
            # The first bytes of a response: HTTP/1.0 or 1.1 only (llhttp
            # also takes "HTTP/2.0" and "HTTP/0.9" status lines). Checked
            # here, once per response, as get_http_version() is costly.
            self._protocol_error(stream)
            return
        self.bytes_received += len(data)
        if self.in_head:
            # httptools buffers a header until it is complete: bound the
            # head by bytes received.
            self.head_bytes += len(data)
            if self.head_bytes > MAX_RESPONSE_HEADER_BYTES:
                self._protocol_error(stream)
                return
        watch_trailers = self.chunk_open
        self.chunk_data = False
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            offset = exc.args[0] if exc.args else len(data)
            rest = data[offset:]
            if self.stream is not None:
                self.stream.on_upstream_upgrade(self, rest)
            return
        except httptools.HttpParserError:
            done = self.completed
            if done is None:
                self._protocol_error(stream)
                return
            # Bytes after the complete response (on_message_begin refused
            # them): that response stands, the connection is out of sync.
            self.completed = None
            self.endpoint.cluster.stats.upstream_cx_protocol_error += 1
            self.reusable = False
            done.on_upstream_complete(self)
            self.close()
            return
        done = self.completed
        if done is not None:
            self.completed = None
            done.on_upstream_complete(self)
            return
        if watch_trailers:
            if self.chunk_open and not self.chunk_data:
                self.head_bytes += len(data)
                if self.head_bytes > MAX_RESPONSE_HEADER_BYTES:
                    self._protocol_error(stream)
            else:
                self.head_bytes = 0

    def _protocol_error(self, fed: UpstreamStream) -> None:
        """The bytes from the upstream are not a valid response: reset the
        stream and discard the connection. ``fed`` is the stream attached
        when the read began: if the pool handed the connection to another
        request meanwhile (junk after a complete response), that request
        never got a byte back and sees a plain connection reset."""
        self.reusable = False
        if not self.closed:
            self.endpoint.cluster.stats.upstream_cx_protocol_error += 1
        s = self.stream
        if s is not None:
            self.stream = None
            if s is fed:
                s.on_upstream_reset(self, "protocol_error")
            else:
                self.bytes_received = 0
                s.on_upstream_reset(self, "connection_termination")
        self.close()

    def eof_received(self) -> bool | None:
        # httptools has no "finish" call: a close-delimited body ends at EOF,
        # which only this protocol can see. Any other EOF with a stream
        # attached is a reset, reported by connection_lost.
        stream = self.stream
        if stream is not None and self.tunnel is None and self.close_delimited:
            self.stream = None
            self.reusable = False
            stream.on_upstream_complete(self)
        return None  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self.endpoint.cluster.stats.upstream_cx_destroy_remote += 1
        self.closed = True
        self.reusable = False
        self.endpoint.on_connection_closed(self)
        if self.tunnel is not None:
            self.tunnel.close()
            self.tunnel = None
        stream = self.stream
        if stream is not None:
            self.stream = None
            stream.on_upstream_reset(self, "connection_termination")

    def pause_writing(self) -> None:
        if self.stream is not None:
            self.stream.on_upstream_write_paused()

    def resume_writing(self) -> None:
        if self.stream is not None:
            self.stream.on_upstream_write_resumed()

    # -- httptools callbacks --------------------------------------------

    def on_message_begin(self) -> None:
        if self.completed is not None:
            # A second response in the read that completed the first: no
            # request is waiting for it (no upstream pipelining).
            raise InvalidResponse("bytes after the response")
        self.headers = []
        self.in_head = True
        self.head_bytes = 0
        self.chunk_open = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.in_head = False
        headers = self.headers
        if len(headers) > MAX_RESPONSE_HEADERS or (
                self.bytes_received > MAX_RESPONSE_HEADER_BYTES
                and sum(len(n) + len(v) + 4 for n, v in headers) > MAX_RESPONSE_HEADER_BYTES):
            # (A head read in one piece is bounded by the read size; a
            # longer one is cut off by data_received as it arrives.)
            raise InvalidResponse("header section too large")
        status = self.parser.get_status_code()
        if not 100 <= status <= 599:
            raise InvalidResponse("status")
        if 100 <= status < 200 and status != 101:
            # 100 Continue / 103 Early Hints: the proxy answers Expect itself
            # and does not forward interim responses (Envoy's default).
            self.skip_informational = True
            return
        keep_alive = self.parser.should_keep_alive()
        if not keep_alive:
            self.reusable = False
        self.close_delimited = False
        framed = 0  # 1: content-length seen, 2: chunked
        # One C-level dict() of the fields: the framing is read from it here
        # and the stream reuses it (a loop here plus a dict there cost more).
        hd = self.header_map = dict(headers)
        if len(hd) == len(headers):
            te = hd.get(b"transfer-encoding")
            if te is not None:
                # Only a single "chunked" can be passed on (pyproxy re-frames
                # bodies); anything else would change the body's meaning.
                if te.strip().lower() != b"chunked":
                    raise InvalidResponse("transfer-encoding")
                framed = 2
            elif b"content-length" in hd:
                framed = 1
        else:  # a repeated name: each field counts
            for name, value in headers:
                if name == b"content-length":
                    framed = 1
                elif name == b"transfer-encoding":
                    if framed == 2 or value.strip().lower() != b"chunked":
                        raise InvalidResponse("transfer-encoding")
                    framed = 2
        if not framed and status != 204 and status != 304 and not self.head_request:
            self.close_delimited = True
            self.reusable = False
        stream = self.stream
        if stream is not None:
            stream.on_upstream_headers(self, status, self.headers, keep_alive)
            if self.head_request and self.stream is stream:
                # A response to HEAD has no body whatever its Content-Length says,
                # but httptools cannot be told the request method, so the
                # message ends here and the connection is not reused.
                self.reusable = False
                self.stream = None
                stream.on_upstream_complete(self)

    def on_body(self, body: bytes) -> None:
        self.chunk_data = True
        if body and self.stream is not None:
            self.stream.on_upstream_body(body)

    def on_chunk_header(self) -> None:
        self.chunk_open = True

    def on_chunk_complete(self) -> None:
        self.chunk_open = False

    def on_message_complete(self) -> None:
        if self.skip_informational:
            self.skip_informational = False
            return
        stream = self.stream
        if stream is not None:
            self.stream = None
            self.completed = stream  # told at the end of the read (_feed)

    # -- used by the pool and the stream -------------------------------

    def attach(self, stream: UpstreamStream, head_request: bool = False, sink: Any = None) -> None:
        self.stream = stream
        self.sink = sink
        self.requests += 1
        self.bytes_received = 0
        self.head_request = head_request

    def stale(self) -> bool:
        """Before reuse from the pool: did the upstream send a byte, close
        or reset while the connection was idle, and the event loop has not
        delivered it yet? Such a connection is out of sync or dead: it is
        closed (and counted) instead of being written to, so a request is
        never sent on a connection that was already closed before the
        write. One poll(0) system call; nothing is read.

        Over TLS, readable only (no close) is not enough to judge: the
        bytes may be TLS records without application data (a TLS 1.3
        server sends its session tickets after the handshake, so a fresh
        connection parked idle usually has them unread). The endpoint holds
        such a connection until the loop has read them (``settle``); True
        is returned all the same: it cannot be used now."""
        poller = self.poller
        if poller is None:
            return False
        events = poller.poll(0)
        if not events:
            return False
        revents = events[0][1]
        if not revents & CLOSED_EVENTS and self.endpoint.tls is not None:
            self.endpoint.settle(self)
            return True
        self.discard_stale(revents)
        return True

    def discard_stale(self, revents: int) -> None:
        """Close an idle connection that ``poll`` found readable (``revents``)."""
        stats = self.endpoint.cluster.stats
        if revents & CLOSED_EVENTS:
            stats.upstream_cx_destroy_remote += 1
        else:
            stats.upstream_cx_protocol_error += 1  # unsolicited bytes
        self.close()

    def write(self, data: bytes) -> None:
        t = self.transport
        if t is not None and not self.closed:
            t.write(data)

    def pause_reading(self) -> None:
        self.read_paused = True
        if self.transport is not None and not self.closed:
            try:
                self.transport.pause_reading()
            except (RuntimeError, AttributeError):
                pass

    def resume_reading(self) -> None:
        self.read_paused = False
        if self.transport is not None and not self.closed:
            try:
                self.transport.resume_reading()
            except (RuntimeError, AttributeError):
                pass

    def detach(self) -> None:
        """Forget the stream without telling it (it is the one leaving)."""
        self.stream = None

    def close(self) -> None:
        """Close without reuse. The stream, if any, is not called back."""
        self.stream = None
        self.reusable = False
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.endpoint.on_connection_closed(self)
                self.transport.close()

    def abort(self) -> None:
        self.stream = None
        self.reusable = False
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.endpoint.on_connection_closed(self)
                self.transport.abort()
