"""Workload identity for telemetry, and the peer-metadata headers sidecars
exchange so each side can label metrics with the other side's identity.

Modelled on Istio's metadata exchange (``x-envoy-peer-metadata`` and
``x-envoy-peer-metadata-id``), with pyproxy's own header names and a
readable encoding:

``x-pyproxy-peer-metadata``
    base64 (standard alphabet, padded) of a compact UTF-8 JSON object::

        {"workload": "reviews-v1", "namespace": "default", "app": "reviews",
         "version": "v1", "canonical_service": "reviews",
         "canonical_revision": "v1", "cluster": "unknown",
         "labels": {"app": "reviews", "version": "v1"}}

    Every field is optional; a missing or non-string field reads as
    ``"unknown"`` (``canonical_revision``: ``"latest"``).
``x-pyproxy-peer-metadata-id``
    ``sidecar~<workload>.<namespace>``: informational (logs), never parsed.

A client sidecar adds both to every request it sends to a mesh service; the
server sidecar reads and strips them before the application sees the
request, and (only then: to a caller that is a sidecar) adds its own to the
response, which the client sidecar reads and strips before its application
sees the response. Istio's own headers
(``x-envoy-peer-metadata``/``-id``) are stripped too, never interpreted.

Without mTLS nothing authenticates these headers, exactly as with Istio's
plaintext metadata exchange: a caller can claim any identity in metrics.
To keep a hostile caller from exploding label cardinality, at most
``MAX_PEERS`` distinct header values are decoded per process; later unseen
values count as an unknown peer.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
from dataclasses import dataclass
from typing import Any

PEER_METADATA = b"x-pyproxy-peer-metadata"
PEER_METADATA_ID = b"x-pyproxy-peer-metadata-id"
ISTIO_PEER_METADATA = b"x-envoy-peer-metadata"
ISTIO_PEER_METADATA_ID = b"x-envoy-peer-metadata-id"
PEER_HEADERS = frozenset({PEER_METADATA, PEER_METADATA_ID, ISTIO_PEER_METADATA, ISTIO_PEER_METADATA_ID})

MAX_HEADER_BYTES = 8192
MAX_PEERS = 1024
MAX_LABELS = 64

UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True, eq=False)
class PeerInfo:
    """One side's identity, as Istio's metric labels name it.

    Compared and hashed by identity (``eq=False``): instances are interned
    by ``PeerCache``, and metric caches key on them per request, where
    hashing nine strings each time would cost more than the lookup."""

    workload: str = UNKNOWN
    namespace: str = UNKNOWN
    app: str = UNKNOWN
    version: str = UNKNOWN
    canonical_service: str = UNKNOWN
    canonical_revision: str = "latest"
    principal: str = UNKNOWN
    cluster: str = UNKNOWN
    labels: tuple[tuple[str, str], ...] = ()


# What Istio reports for a peer it knows nothing about (canonical revision "latest").
UNKNOWN_PEER = PeerInfo()


def peer_from_labels(workload: str, namespace: str, labels: tuple[tuple[str, str], ...] | dict) -> PeerInfo:
    """Identity from a workload name and its labels, with Istio's fallbacks:
    app ← ``app`` | ``app.kubernetes.io/name``; version ← ``version`` |
    ``app.kubernetes.io/version``; canonical service ← the
    ``service.istio.io/canonical-name`` label | app | workload; canonical
    revision ← ``service.istio.io/canonical-revision`` | version | ``latest``."""
    d = dict(labels)
    app = d.get("app") or d.get("app.kubernetes.io/name") or UNKNOWN
    version = d.get("version") or d.get("app.kubernetes.io/version") or UNKNOWN
    canonical = (
        d.get("service.istio.io/canonical-name")
        or d.get("app.kubernetes.io/name")
        or d.get("app")
        or workload
        or UNKNOWN
    )
    revision = (
        d.get("service.istio.io/canonical-revision")
        or d.get("app.kubernetes.io/version")
        or d.get("version")
        or "latest"
    )
    return PeerInfo(
        workload=workload or UNKNOWN,
        namespace=namespace or UNKNOWN,
        app=app,
        version=version,
        canonical_service=canonical,
        canonical_revision=revision,
        labels=tuple(sorted(d.items())),
    )


def encode_peer(peer: PeerInfo) -> bytes:
    doc = {
        "workload": peer.workload,
        "namespace": peer.namespace,
        "app": peer.app,
        "version": peer.version,
        "canonical_service": peer.canonical_service,
        "canonical_revision": peer.canonical_revision,
        "cluster": peer.cluster,
        "labels": dict(peer.labels),
    }
    return base64.b64encode(json.dumps(doc, separators=(",", ":"), sort_keys=True).encode("utf-8"))


def peer_header_lines(peer: PeerInfo) -> bytes:
    """Both headers as ready-to-send header lines (computed once per process)."""
    ident = f"sidecar~{peer.workload}.{peer.namespace}".encode("utf-8", "replace")
    return PEER_METADATA + b": " + encode_peer(peer) + b"\r\n" + PEER_METADATA_ID + b": " + ident + b"\r\n"


def _text(doc: dict, key: str, default: str = UNKNOWN) -> str:
    v = doc.get(key)
    if isinstance(v, str) and v and len(v) <= 253:
        return v
    return default


def decode_peer(value: bytes) -> PeerInfo | None:
    """The identity in a peer-metadata header value, or None if malformed."""
    if len(value) > MAX_HEADER_BYTES:
        return None
    try:
        doc: Any = json.loads(base64.b64decode(value, validate=True))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(doc, dict):
        return None
    labels_raw = doc.get("labels")
    labels: tuple[tuple[str, str], ...] = ()
    if isinstance(labels_raw, dict):
        labels = tuple(
            sorted(
                (k, v)
                for k, v in list(labels_raw.items())[:MAX_LABELS]
                if isinstance(k, str) and isinstance(v, str)
            )
        )
    return PeerInfo(
        workload=_text(doc, "workload"),
        namespace=_text(doc, "namespace"),
        app=_text(doc, "app"),
        version=_text(doc, "version"),
        canonical_service=_text(doc, "canonical_service"),
        canonical_revision=_text(doc, "canonical_revision", "latest"),
        cluster=_text(doc, "cluster"),
        labels=labels,
    )


class PeerCache:
    """Header value → PeerInfo, decoded once per distinct value (bounded)."""

    __slots__ = ("known", "limit", "rejected", "mtls")

    def __init__(self, limit: int = MAX_PEERS) -> None:
        self.known: dict[bytes, PeerInfo] = {}
        self.limit = limit
        self.rejected = 0
        # (metadata, principal) → PeerInfo for mTLS callers (bounded the same way).
        self.mtls: dict[tuple[bytes | None, str], PeerInfo] = {}

    def authenticated(self, value: bytes | None, principal: str, namespace: str) -> PeerInfo:
        """The caller of an mTLS connection: its metadata (if any) with the
        certificate's principal and namespace, which win (Istio's stats
        filter takes both from the peer certificate)."""
        key = (value, principal)
        peer = self.mtls.get(key)
        if peer is not None:
            return peer
        base = self.get(value) if value is not None else UNKNOWN_PEER
        if len(self.mtls) >= self.limit:
            self.mtls.clear()
        peer = self.mtls[key] = dataclasses.replace(base, principal=principal,
                                                    namespace=namespace or base.namespace)
        return peer

    def get(self, value: bytes) -> PeerInfo:
        peer = self.known.get(value)
        if peer is not None:
            return peer
        if len(self.known) >= self.limit:
            self.rejected += 1
            return UNKNOWN_PEER
        peer = decode_peer(value) or UNKNOWN_PEER
        self.known[value] = peer
        return peer
