"""TLS to upstream endpoints: ISTIO_MUTUAL (workload certificate, mesh root,
exact SPIFFE SAN list, Istio's SNI and ALPN), SIMPLE and MUTUAL origination.

An endpoint carries an ``UpstreamTLS`` (decided when the snapshot is built:
DestinationRule TLS or auto mTLS) or None for plaintext. The TLS contexts
for ISTIO_MUTUAL come from the CertStore at connect time (one reference, so
rotation takes effect for the next connection); SIMPLE/MUTUAL contexts are
built once per distinct setting and kept.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .certs import CertStore


@dataclass(frozen=True, slots=True)
class UpstreamTLS:
    mode: str  # SIMPLE | MUTUAL | ISTIO_MUTUAL
    sni: str = ""
    # Exact SAN matches (URI or DNS); empty = no SAN check (ISTIO_MUTUAL), or
    # the hostname check against the SNI (SIMPLE/MUTUAL, Istio's auto SAN).
    sans: tuple[str, ...] = ()
    ca_certificates: str = ""
    client_certificate: str = ""
    private_key: str = ""
    insecure_skip_verify: bool = False
    auto: bool = False  # chosen by auto mTLS (no DestinationRule TLS)


class TLSSetupError(OSError):
    """The TLS context cannot be built (no workload certificate, bad file)."""


log = logging.getLogger("pyproxy.security")

_contexts: dict[tuple, ssl.SSLContext] = {}


def _origination_context(tls: UpstreamTLS, h2: bool = False) -> ssl.SSLContext:
    key = (tls.mode, tls.ca_certificates, tls.client_certificate, tls.private_key, tls.insecure_skip_verify,
           bool(tls.sans), h2)
    ctx = _contexts.get(key)
    if ctx is not None:
        return ctx
    try:
        if tls.ca_certificates:
            ctx = ssl.create_default_context(cafile=tls.ca_certificates)
        else:
            ctx = ssl.create_default_context()  # the system roots (Istio: "system")
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if tls.insecure_skip_verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        elif tls.sans:
            # subjectAltNames given: those exact names are checked instead of the SNI host.
            ctx.check_hostname = False
        if tls.mode == "MUTUAL":
            ctx.load_cert_chain(tls.client_certificate, tls.private_key)
        if h2:
            # Istio's ALPN for an HTTP/2 cluster with DestinationRule TLS
            # (cluster_tls.go: util.ALPNH2Only).
            ctx.set_alpn_protocols(["h2"])
    except (OSError, ssl.SSLError) as exc:
        raise TLSSetupError(f"DestinationRule tls {tls.mode}: {exc}") from None
    _contexts[key] = ctx
    return ctx


def connect(loop: asyncio.AbstractEventLoop, factory: Callable[[], Any], host: str, port: int,
            tls: UpstreamTLS, certs: CertStore | None, timeout: float, h2: bool = False) -> Any:
    """The ``create_connection`` coroutine for a TLS endpoint; ``h2``: the
    connection will speak HTTP/2 (its ALPN offers it)."""
    if tls.mode == "ISTIO_MUTUAL":
        creds = certs.current if certs is not None else None
        if creds is None:
            raise TLSSetupError("ISTIO_MUTUAL needs a workload certificate (pyproxy run --certs DIR)")
        ctx = creds.client_context_h2 if h2 else creds.client_context
    else:
        ctx = _origination_context(tls, h2)
    return loop.create_connection(factory, host, port, ssl=ctx, server_hostname=tls.sni or host,
                                  ssl_handshake_timeout=timeout)


def peer_sans(transport: Any) -> list[str]:
    cert = transport.get_extra_info("peercert") or {}
    return [v for k, v in cert.get("subjectAltName", ()) if k in ("URI", "DNS")]


def check_peer(transport: Any, tls: UpstreamTLS) -> str:
    """After the handshake: "" if the server is acceptable, else why not
    (Envoy's match_subject_alt_names: any SAN equal to any listed name)."""
    if not tls.sans or tls.insecure_skip_verify:
        return ""
    sans = peer_sans(transport)
    if any(s in tls.sans for s in sans):
        return ""
    return f"SAN matcher: certificate SANs are {sans}, expected one of {list(tls.sans)}"


def tls_failed(exc: BaseException) -> None:
    from .certs import TLS_STATS

    if isinstance(exc, ssl.SSLCertVerificationError):
        TLS_STATS["ssl.fail_verify_error"] += 1
    TLS_STATS["ssl.connection_error"] += 1


def tls_verified(transport: Any, ep: Any, cluster: str) -> bool:
    """Count the handshake; check the SANs (False: refuse the connection).
    Records the server's URI SAN on the endpoint (``tls_principal``)."""
    from .certs import TLS_STATS

    tls = ep.tls
    why = check_peer(transport, tls)
    if why:
        TLS_STATS["ssl.fail_verify_san"] += 1
        TLS_STATS["ssl.connection_error"] += 1
        log.info("TLS to %s for %s refused: %s", ep.address, cluster, why)
        return False
    TLS_STATS["ssl.handshake"] += 1
    if tls.mode == "ISTIO_MUTUAL":
        cert = transport.get_extra_info("peercert") or {}
        uris = [v for k, v in cert.get("subjectAltName", ()) if k == "URI"]
        ep.tls_principal = uris[0] if uris else ""
    return True
