"""The hooks the request path calls for telemetry.

``Exchange`` calls exactly these methods, and only when ``worker.observer``
is not None:

- ``on_request_start``: headers parsed, before routing (trace context and
  the caller's peer identity are read here);
- ``attempt_headers``: extra header lines for one upstream attempt (trace
  context with the attempt's span id; this sidecar's peer metadata);
- ``on_attempt_end``: an upstream attempt ended, for whatever reason
  (``ex.endpoint`` is still set; ``ex.attempt_status`` is its response
  status or 0), when its spans are recorded (``ex.obs.record``);
- ``on_upstream_response``: upstream response headers before they go
  downstream (peer metadata is read and stripped, or added);
- ``on_request_done``: the exchange finished (metrics, spans, access log).

``TelemetryObserver`` is the real implementation; its parts are optional
(``tracer`` None with ``--tracing off``, ``access_log`` None with
``--access-log off``), tested with ``is not None`` once per hook rather than
dispatched through a list, to keep the per-request cost to a few attribute
loads.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .peer import (
    ISTIO_PEER_METADATA,
    ISTIO_PEER_METADATA_ID,
    PEER_HEADERS,
    PEER_METADATA,
    PEER_METADATA_ID,
    PeerCache,
    peer_header_lines,
)

if TYPE_CHECKING:
    from .accesslog import AccessLog
    from .metrics import IstioMetrics
    from .peer import PeerInfo
    from .tracing import Tracer
    from .view import ExchangeView

log = logging.getLogger("pyproxy.observability")


class Observer:
    def on_request_start(self, ex: ExchangeView) -> None:
        """Headers parsed, before routing (extract trace context, peer identity)."""

    def attempt_headers(self, ex: ExchangeView) -> bytes:
        """Extra header lines (``name: value\\r\\n``...) for one upstream attempt."""
        return b""

    def on_attempt_end(self, ex: ExchangeView) -> None:
        """One upstream attempt ended (``ex.endpoint`` still set). Called
        only while the request's trace state records spans (``ex.obs.record``):
        nothing else needs it, so the exchange skips the call otherwise."""

    def on_upstream_response(
        self, ex: ExchangeView, headers: list[tuple[bytes, bytes]], hd: dict[bytes, bytes] | None = None
    ) -> list[tuple[bytes, bytes]]:
        """Upstream response headers before they go downstream (may strip
        some); ``hd``: the same fields as a dict, when the exchange has one."""
        return headers

    def on_request_done(self, ex: ExchangeView) -> None:
        """The exchange finished: record metrics, finish spans, write the log line."""

    def on_request_refused(self, ex: ExchangeView) -> None:
        """A request refused before its head was complete (malformed, or over
        a header limit): ``ex`` holds what was parsed, status and flag DPE."""

    def close(self) -> None:
        """Worker shutdown: flush what is buffered."""


class TelemetryObserver(Observer):
    """Istio metrics (always), tracing and access log (each optional)."""

    def __init__(
        self,
        metrics: IstioMetrics,
        me: PeerInfo,
        tracer: Tracer | None = None,
        access_log: AccessLog | None = None,
    ) -> None:
        self.metrics = metrics
        self.tracer = tracer
        self.access_log = access_log
        self.peers = PeerCache()
        self.peer_lines = peer_header_lines(me)
        _, _, rest = self.peer_lines.partition(b": ")
        value, _, rest = rest.partition(b"\r\n")
        ident = rest.partition(b": ")[2].rstrip(b"\r\n")
        self.peer_pairs = [(PEER_METADATA, value), (PEER_METADATA_ID, ident)]

    def on_request_start(self, ex: ExchangeView) -> None:
        if ex.direction:  # inbound: who is calling?
            raw = ex.hdict.get(PEER_METADATA)
            conn = ex.conn
            tls_peer = conn.tls_peer
            if tls_peer is not None:
                # mTLS: the certificate says who (principal, namespace).
                ex.peer = self.peers.authenticated(raw, tls_peer.uri, tls_peer.namespace)
            elif raw is not None and conn.worker.certs is None:
                # Plaintext metadata is believed only while mTLS is off.
                ex.peer = self.peers.get(raw)
        tracer = self.tracer
        if tracer is not None:
            tracer.start(ex)

    def attempt_headers(self, ex: ExchangeView) -> bytes:
        tracer = self.tracer
        cluster = ex.cluster
        if not ex.direction and cluster is not None and cluster.kind == "outbound":
            # Tell the destination sidecar who is calling (never to
            # destinations outside the registry: passthrough traffic).
            if tracer is None:
                return self.peer_lines
            return self.peer_lines + tracer.attempt_headers(ex)
        if tracer is None:
            return b""
        return tracer.attempt_headers(ex)

    def on_attempt_end(self, ex: ExchangeView) -> None:
        st = ex.obs
        if st is not None and st.record:  # spans are recorded (sampled, exporter set)
            self.tracer.attempt_end(ex)  # type: ignore[union-attr]  # ex.obs is set only by a tracer

    def on_upstream_response(
        self, ex: ExchangeView, headers: list[tuple[bytes, bytes]], hd: dict[bytes, bytes] | None = None
    ) -> list[tuple[bytes, bytes]]:
        if ex.direction:
            if ex.peer is None:
                # The caller is not a sidecar: our identity is none of its business
                # (Istio answers metadata only to a peer that sent its own).
                return headers
            # Tell the calling sidecar who answered; the application's own
            # copy (if any) is never passed on.
            if _has_peer_headers(headers, hd):
                headers = [h for h in headers if h[0] not in PEER_HEADERS]
            return headers + self.peer_pairs
        if hd is not None:
            # (four dict lookups: much cheaper than a pass over the fields)
            if (PEER_METADATA not in hd and PEER_METADATA_ID not in hd and ISTIO_PEER_METADATA not in hd
                    and ISTIO_PEER_METADATA_ID not in hd):
                return headers  # the destination has no sidecar (or is not pyproxy)
        elif not _has_peer_headers(headers, None):
            return headers
        for name, value in headers:
            if name == PEER_METADATA:
                ep = ex.endpoint  # the attempt in progress
                principal = ep.tls_principal if ep is not None else ""
                # Over ISTIO_MUTUAL the server's certificate names the principal.
                ex.peer = self.peers.authenticated(value, principal, "") if principal else self.peers.get(value)
                break
        return [h for h in headers if h[0] not in PEER_HEADERS]

    def on_request_done(self, ex: ExchangeView) -> None:
        self.metrics.record(ex)
        st = ex.obs
        if st is not None and st.record:
            self.tracer.finish(ex)  # type: ignore[union-attr]  # ex.obs is set only by a tracer
        access_log = self.access_log
        if access_log is not None:
            access_log.log(ex)

    def on_request_refused(self, ex: ExchangeView) -> None:
        # As Envoy: an access log line (flag DPE) for a request its codec
        # refused. No span and no istio_requests_total sample: it never
        # became a routed request (it is in the listener's rejection counters).
        access_log = self.access_log
        if access_log is not None:
            access_log.log(ex)

    def close(self) -> None:
        if self.tracer is not None:
            self.tracer.shutdown()
        if self.access_log is not None:
            self.access_log.close()


def _has_peer_headers(headers: list[tuple[bytes, bytes]], hd: dict[bytes, bytes] | None) -> bool:
    """Does the response carry a peer metadata field (any of PEER_HEADERS)?"""
    if hd is not None:
        return (PEER_METADATA in hd or PEER_METADATA_ID in hd or ISTIO_PEER_METADATA in hd
                or ISTIO_PEER_METADATA_ID in hd)
    return any(name in PEER_HEADERS for name, _ in headers)
