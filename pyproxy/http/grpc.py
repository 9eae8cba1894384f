"""What pyproxy tracks of one gRPC call for telemetry, as Istio's sidecar
reports it (the ``grpc_stats`` filter Istio puts in every HTTP connection
manager, and the ``istio_stats`` filter's labels):

- ``request_protocol="grpc"`` for a request whose ``content-type`` is
  ``application/grpc`` or ``application/grpc+<codec>`` (Envoy's
  ``Grpc::Common::isGrpcRequestHeaders``);
- ``grpc_response_status``: the ``grpc-status`` of the response trailers,
  else of the response headers (a trailers-only response, a local reply),
  else the HTTP status mapped to a gRPC code, else empty (no response at
  all); a value that is not a number up to 16 is ``-1`` (Envoy's
  ``Grpc::Common::getGrpcStatus``);
- the number of length-prefixed messages each way
  (``istio_request_messages_total``/``istio_response_messages_total``),
  counted from the 5-byte message prefixes while the bodies stream, as
  Envoy's ``Grpc::FrameInspector``: a message counts when its first byte
  goes by. A gRPC-Web trailers frame (flag 0x80) is not a message (Envoy's
  grpc_web filter has turned it into trailers before grpc_stats sees it).

gRPC-Web (``application/grpc-web``, ``-web+proto``, ``-web-text``) is passed
through untranslated (the upstream must speak gRPC-Web) and reported as the
gRPC call it is, as Istio reports it on a GRPC-Web port (where Envoy's
grpc_web filter has turned it into gRPC before the stats filter): the
``grpc-status`` of its trailers frame (flag 0x80, at the end of the response
body) counts as trailers. The base64 ``-text`` variants are not decoded:
their messages are not counted.

A ``GrpcCall`` exists only for gRPC and gRPC-Web requests (``Exchange.grpc``
is None otherwise), so other requests pay nothing for any of this.
"""

from __future__ import annotations

_GRPC = b"application/grpc"
_GRPC_WEB = b"application/grpc-web"

# Envoy's Grpc::Utility::httpToGrpcStatus, as label text.
HTTP_TO_GRPC = {400: "13", 401: "16", 403: "7", 404: "12", 429: "14", 502: "14", 503: "14", 504: "14"}
# grpc-status values Envoy accepts as they are (0 OK .. 16 UNAUTHENTICATED).
_KNOWN = {str(i).encode(): str(i) for i in range(17)}
# What is kept of a gRPC-Web trailers frame (it holds grpc-status and grpc-message).
_TRAILERS_KEPT = 4096


def call_for(content_type: bytes | None) -> GrpcCall | None:
    """A ``GrpcCall`` for a gRPC or gRPC-Web request, else None."""
    if content_type is None or content_type[:16] != _GRPC:
        return None
    if is_grpc(content_type):
        return GrpcCall()
    if is_grpc_web(content_type):
        return GrpcCall(text=content_type[20:25] == b"-text")
    return None


def is_grpc(content_type: bytes | None) -> bool:
    """Envoy's Grpc::Common::hasGrpcContentType: application/grpc or
    application/grpc+<codec> (not gRPC-Web)."""
    return content_type is not None and content_type[:16] == _GRPC and (
        len(content_type) == 16 or content_type[16:17] in (b"+", b";"))


def is_grpc_web(content_type: bytes | None) -> bool:
    """``application/grpc-web``, ``application/grpc-web+proto``,
    ``application/grpc-web-text`` (+proto): gRPC-Web (Envoy's
    Grpc::Common::isGrpcWebRequestHeaders)."""
    return content_type is not None and content_type[:20] == _GRPC_WEB and (
        len(content_type) == 20 or content_type[20:21] in (b"+", b"-", b";"))


def status_label(value: bytes) -> str:
    """A ``grpc-status`` field as Istio labels it: the number, or ``-1``
    (Envoy's InvalidCode) for anything else."""
    return _KNOWN.get(value.strip(), "-1")


class MessageCounter:
    """Counts gRPC length-prefixed messages in a byte stream fed in pieces:
    1 flag byte, 4 bytes of big-endian length, then the payload."""

    __slots__ = ("count", "skip", "head", "trailers", "in_trailers")

    def __init__(self) -> None:
        self.count = 0
        self.skip = 0  # payload bytes of the current message still to pass
        self.head = b""  # a prefix split across pieces (1 to 4 bytes of it)
        self.trailers = b""  # the payload of a gRPC-Web trailers frame (bounded)
        self.in_trailers = False  # the bytes being skipped belong to one

    def feed(self, data: bytes) -> None:
        n = len(data)
        i = 0
        head = self.head
        if head:
            need = 5 - len(head)
            head += data[:need]
            if len(head) < 5:
                self.head = head
                return
            self.head = b""
            self.skip = int.from_bytes(head[1:5], "big")
            self.in_trailers = bool(head[0] & 0x80)
            i = need
        skip = self.skip
        while True:
            if skip:
                if self.in_trailers and len(self.trailers) < _TRAILERS_KEPT:
                    self.trailers += data[i:i + skip]
                if i + skip > n:
                    self.skip = skip - (n - i)
                    return
                i += skip
                skip = 0
            if i >= n:
                self.skip = 0
                return
            flag = data[i]
            # A gRPC-Web trailers frame (flag 0x80) is no message.
            self.in_trailers = bool(flag & 0x80)
            if not self.in_trailers:
                self.count += 1
            if n - i < 5:
                self.head = bytes(data[i:])
                self.skip = 0
                return
            skip = int.from_bytes(data[i + 1:i + 5], "big")
            i += 5


class _Uncounted(MessageCounter):
    """gRPC-Web text bodies are base64: their messages are not counted."""

    __slots__ = ()

    def feed(self, data: bytes) -> None:
        pass


class GrpcCall:
    """One gRPC request's telemetry state (see the module docstring)."""

    __slots__ = ("requests", "responses", "header_status", "trailer_status", "text")

    def __init__(self, text: bool = False) -> None:
        self.text = text  # gRPC-Web text: base64 bodies, not counted
        self.requests = MessageCounter() if not text else _Uncounted()
        self.responses = MessageCounter() if not text else _Uncounted()
        self.header_status: bytes | None = None  # grpc-status in the response headers
        self.trailer_status: bytes | None = None  # grpc-status in the response trailers

    def on_response_headers(self, headers: list[tuple[bytes, bytes]] | tuple[tuple[bytes, bytes], ...]) -> None:
        for name, value in headers:
            if name == b"grpc-status":
                self.header_status = value
                return

    def on_trailers(self, trailers: list[tuple[bytes, bytes]]) -> None:
        for name, value in trailers:
            if name == b"grpc-status":
                self.trailer_status = value
                return

    def status(self, http_status: int) -> str:
        """The ``grpc_response_status`` label (Envoy's getGrpcStatus order:
        trailers, headers, the HTTP status mapped; none without a response)."""
        value = self.trailer_status
        if value is None and self.responses.trailers:
            value = _web_trailer_status(self.responses.trailers)
        if value is None:
            value = self.header_status
        if value is not None:
            return status_label(value)
        if not http_status:
            return ""
        return HTTP_TO_GRPC.get(http_status, "2")


def _web_trailer_status(payload: bytes) -> bytes | None:
    """``grpc-status`` in a gRPC-Web trailers frame (HTTP/1.1-style
    ``name:value`` lines)."""
    for line in payload.split(b"\r\n"):
        name, sep, value = line.partition(b":")
        if sep and name.strip().lower() == b"grpc-status":
            return value
    return None
