"""The hooks the request path calls for telemetry.

``Exchange`` calls exactly these four methods. ``NullObserver`` is the
do-nothing stand-in used when telemetry is off, so the request path never
tests a flag; the real implementation composes metrics, tracing and the
access log.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..http.exchange import Exchange


class Observer:
    def on_request_start(self, ex: Exchange) -> None:
        """Headers parsed, before routing (extract trace context, peer identity)."""

    def attempt_headers(self, ex: Exchange) -> bytes:
        """Extra header lines (``name: value\\r\\n``...) for one upstream attempt."""
        return b""

    def on_upstream_response(self, ex: Exchange, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """Upstream response headers before they go downstream (may strip some)."""
        return headers

    def on_request_done(self, ex: Exchange) -> None:
        """The exchange finished: record metrics, finish spans, write the log line."""


class NullObserver(Observer):
    pass


class CompositeObserver(Observer):
    """Several observers in order (e.g. metrics, tracing, access log)."""

    def __init__(self, parts: list[Any]) -> None:
        self.parts = parts

    def on_request_start(self, ex: Exchange) -> None:
        for p in self.parts:
            p.on_request_start(ex)

    def attempt_headers(self, ex: Exchange) -> bytes:
        return b"".join(p.attempt_headers(ex) for p in self.parts)

    def on_upstream_response(self, ex: Exchange, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        for p in self.parts:
            headers = p.on_upstream_response(ex, headers)
        return headers

    def on_request_done(self, ex: Exchange) -> None:
        for p in self.parts:
            p.on_request_done(ex)
