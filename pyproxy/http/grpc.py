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

A ``GrpcCall`` exists only for gRPC requests (``Exchange.grpc`` is None
otherwise), so other requests pay nothing for any of this.
"""

from __future__ import annotations

_GRPC = b"application/grpc"
_GRPC_WEB = b"application/grpc-web"

# Envoy's Grpc::Utility::httpToGrpcStatus, as label text.
HTTP_TO_GRPC = {400: "13", 401: "16", 403: "7", 404: "12", 429: "14", 502: "14", 503: "14", 504: "14"}
# grpc-status values Envoy accepts as they are (0 OK .. 16 UNAUTHENTICATED).
_KNOWN = {str(i).encode(): str(i) for i in range(17)}


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

    __slots__ = ("count", "skip", "head")

    def __init__(self) -> None:
        self.count = 0
        self.skip = 0  # payload bytes of the current message still to pass
        self.head = b""  # a prefix split across pieces (1 to 4 bytes of it)

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
            i = need
        skip = self.skip
        while True:
            if skip:
                if i + skip > n:
                    self.skip = skip - (n - i)
                    return
                i += skip
                skip = 0
            if i >= n:
                self.skip = 0
                return
            if not data[i] & 0x80:  # a gRPC-Web trailers frame is no message
                self.count += 1
            if n - i < 5:
                self.head = bytes(data[i:])
                self.skip = 0
                return
            skip = int.from_bytes(data[i + 1:i + 5], "big")
            i += 5


class GrpcCall:
    """One gRPC request's telemetry state (see the module docstring)."""

    __slots__ = ("requests", "responses", "header_status", "trailer_status")

    def __init__(self) -> None:
        self.requests = MessageCounter()
        self.responses = MessageCounter()
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
        value = self.trailer_status if self.trailer_status is not None else self.header_status
        if value is not None:
            return status_label(value)
        if not http_status:
            return ""
        return HTTP_TO_GRPC.get(http_status, "2")
