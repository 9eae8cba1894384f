"""The sidecar's workload credentials: istio-agent's file-mounted layout
(``cert-chain.pem``, ``key.pem``, ``root-cert.pem``), loaded into TLS contexts
and watched.

``CertStore.current`` is the one reference the data plane reads when it
opens or accepts a TLS connection. A change to any of the three files builds
a complete new ``Credentials`` (both contexts) on the side and swaps that
reference: new handshakes use the new certificate, live connections keep the
one they were made with. A missing, unreadable or inconsistent set at reload
keeps the previous credentials in force and logs why (the rule config
reloads follow).
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("pyproxy.security")

FILES = ("cert-chain.pem", "key.pem", "root-cert.pem")

# Istio's inbound ALPN chain match values (spec 2.2/2.3): offered by a client
# sidecar, used only to pick the filter chain, never negotiated.
ISTIO_ALPNS = frozenset({"istio", "istio-peer-exchange", "istio-http/1.0", "istio-http/1.1", "istio-h2"})
# Istio's outbound ALPN for HTTP/1.1 (pilot/pkg/xds/filters/filters.go mtlsHTTP11ALPN).
ISTIO_CLIENT_ALPN = ["istio-http/1.1", "istio", "http/1.1"]
# ... and for HTTP/2 (mtlsHTTP2ALPN): a cluster whose upstream speaks h2.
ISTIO_CLIENT_ALPN_H2 = ["istio-h2", "istio", "h2"]
# What the inbound listener negotiates (Istio's inbound common_tls_context alpn_protocols).
SERVER_ALPN = ["h2", "http/1.1"]
# Istio's TLS 1.2 cipher list for inbound mTLS (TLS 1.3 suites are not configurable).
ISTIO_TLS12_CIPHERS = ("ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
                       "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
                       "AES256-GCM-SHA384:AES128-GCM-SHA256")
# Warn when less than this fraction of the certificate's life is left.
EXPIRY_WARNING_FRACTION = 0.10


# TLS handshake counters of this worker process, both directions (Envoy's
# listener/cluster ssl.* stats): plain ints, read at scrape time.
TLS_STATS: dict[str, int] = {"ssl.handshake": 0, "ssl.connection_error": 0, "ssl.fail_verify_san": 0,
                             "ssl.fail_verify_no_cert": 0, "ssl.fail_verify_error": 0}


class CredentialError(Exception):
    """Why a credential set cannot be used (file, reason)."""


@dataclass(frozen=True, slots=True)
class SpiffeId:
    trust_domain: str
    namespace: str
    service_account: str

    @property
    def uri(self) -> str:
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"


def parse_spiffe(uri: str) -> SpiffeId | None:
    """``spiffe://TD/ns/NS/sa/SA`` → its parts; anything else → None."""
    if not uri.startswith("spiffe://"):
        return None
    parts = uri[len("spiffe://"):].split("/")
    if len(parts) != 5 or parts[1] != "ns" or parts[3] != "sa" or not all(parts[i] for i in (0, 2, 4)):
        return None
    return SpiffeId(parts[0], parts[2], parts[4])


def uri_sans(peercert: dict | None) -> list[str]:
    """URI SANs of a verified peer certificate (``SSLObject.getpeercert()``)."""
    if not peercert:
        return []
    return [v for k, v in peercert.get("subjectAltName", ()) if k == "URI"]


@dataclass(frozen=True)
class Credentials:
    directory: str
    identity: SpiffeId
    not_before: float
    not_after: float
    server_context: ssl.SSLContext = field(repr=False)  # inbound mTLS (client cert required)
    client_context: ssl.SSLContext = field(repr=False)  # outbound ISTIO_MUTUAL
    # outbound ISTIO_MUTUAL to an HTTP/2 cluster (ALPN istio-h2, istio, h2)
    client_context_h2: ssl.SSLContext = field(repr=False)
    root_pem: bytes = field(repr=False)
    # sha256 of the leaf's DER, lower-case hex (XFCC's Hash is the peer's).
    leaf_sha256: str = ""
    signature: tuple = ()
    loaded_at: float = 0.0

    @property
    def uri(self) -> str:
        return self.identity.uri

    def life_left(self, now: float | None = None) -> float:
        """Fraction of the validity period still ahead (0 when expired)."""
        now = time.time() if now is None else now
        total = self.not_after - self.not_before
        if total <= 0:
            return 0.0
        return max(0.0, min(1.0, (self.not_after - now) / total))


def files_signature(directory: str) -> tuple:
    """What changes when any of the three files is replaced, rewritten or
    re-pointed (a Kubernetes Secret mount swaps a ``..data`` symlink: stat
    follows it, so the inode changes)."""
    sig: list[object] = []
    for name in FILES:
        try:
            st = os.stat(os.path.join(directory, name))
            sig.append((st.st_ino, st.st_size, st.st_mtime_ns))
        except OSError as exc:
            sig.append(exc.errno)
    return tuple(sig)


def server_context(chain: str, key: str, root: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # No TLS 1.2 renegotiation (a client could re-handshake at will; Envoy's
    # BoringSSL refuses it too). TLS 1.3 has none.
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_ciphers(ISTIO_TLS12_CIPHERS)
    ctx.load_cert_chain(chain, key)
    ctx.load_verify_locations(root)
    ctx.verify_mode = ssl.CERT_REQUIRED
    # As Istio's inbound DownstreamTlsContext: h2 and http/1.1 are negotiated
    # (the server's order wins); the istio* values only select the chain.
    ctx.set_alpn_protocols(SERVER_ALPN)
    return ctx


def client_context(chain: str, key: str, root: str, alpn: list[str] = ISTIO_CLIENT_ALPN) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(chain, key)
    ctx.load_verify_locations(root)
    # SPIFFE certs carry a URI SAN and no DNS name: no hostname check; the
    # exact URI SAN list is checked after the handshake (Envoy's
    # match_subject_alt_names).
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.set_alpn_protocols(alpn)
    return ctx


def load_credentials(directory: str) -> Credentials:
    """Read and check the three files; raise CredentialError naming the
    file and the reason."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    signature = files_signature(directory)
    paths = {name: os.path.join(directory, name) for name in FILES}
    data: dict[str, bytes] = {}
    for name, path in paths.items():
        try:
            data[name] = Path(path).read_bytes()
        except OSError as exc:
            raise CredentialError(f"{path}: {exc.strerror or exc}") from None
    try:
        chain = x509.load_pem_x509_certificates(data["cert-chain.pem"])
    except ValueError as exc:
        raise CredentialError(f"{paths['cert-chain.pem']}: not a PEM certificate chain ({exc})") from None
    try:
        roots = x509.load_pem_x509_certificates(data["root-cert.pem"])
    except ValueError as exc:
        raise CredentialError(f"{paths['root-cert.pem']}: not PEM certificates ({exc})") from None
    try:
        key = serialization.load_pem_private_key(data["key.pem"], password=None)
    except (ValueError, TypeError) as exc:
        raise CredentialError(f"{paths['key.pem']}: not a PEM private key ({exc})") from None
    leaf = chain[0]
    if key.public_key() != leaf.public_key():
        raise CredentialError(f"{paths['key.pem']}: does not match the certificate in {paths['cert-chain.pem']} "
                              f"(a rotation caught half-way?)")
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    ids = [i for i in (parse_spiffe(u) for u in uris) if i is not None]
    if not ids:
        raise CredentialError(f"{paths['cert-chain.pem']}: the certificate has no URI SAN of the form "
                              f"spiffe://TRUST_DOMAIN/ns/NAMESPACE/sa/SERVICE_ACCOUNT (found {uris or 'none'})")
    try:
        server = server_context(paths["cert-chain.pem"], paths["key.pem"], paths["root-cert.pem"])
        client = client_context(paths["cert-chain.pem"], paths["key.pem"], paths["root-cert.pem"])
        client_h2 = client_context(paths["cert-chain.pem"], paths["key.pem"], paths["root-cert.pem"],
                                   ISTIO_CLIENT_ALPN_H2)
    except (ssl.SSLError, OSError) as exc:
        raise CredentialError(f"{directory}: TLS cannot use these files: {exc}") from None
    from cryptography.hazmat.primitives import hashes

    return Credentials(
        directory=directory,
        identity=ids[0],
        not_before=leaf.not_valid_before_utc.timestamp(),
        not_after=leaf.not_valid_after_utc.timestamp(),
        server_context=server,
        client_context=client,
        client_context_h2=client_h2,
        root_pem=b"".join(r.public_bytes(serialization.Encoding.PEM) for r in roots),
        leaf_sha256=leaf.fingerprint(hashes.SHA256()).hex(),
        signature=signature,
        loaded_at=time.time(),
    )


class CertStore:
    """The current credentials and their reload (one reference swap)."""

    def __init__(self, directory: str, clock: Callable[[], float] = time.time) -> None:
        self.directory = directory
        self.clock = clock
        self.current: Credentials | None = None
        self.reloads = 0
        self.reload_failures = 0
        self.last_error = ""
        self._warned_expiry_for: tuple = ()
        self.stats = TLS_STATS

    def load(self) -> Credentials:
        """The initial load: errors propagate (the sidecar refuses to start)."""
        creds = load_credentials(self.directory)
        self.current = creds
        self.check_expiry()
        return creds

    def maybe_reload(self) -> bool:
        """Swap in new credentials if the files changed; True if swapped."""
        current = self.current
        sig = files_signature(self.directory)
        if current is not None and sig == current.signature:
            return False
        try:
            creds = load_credentials(self.directory)
        except CredentialError as exc:
            msg = str(exc)
            if msg != self.last_error:
                self.reload_failures += 1
                self.last_error = msg
                log.error("workload certificate reload failed, the previous certificate stays in use: %s", msg)
            return False
        if current is not None and creds.identity != current.identity:
            msg = (f"{self.directory}: the new certificate is for {creds.uri}, not {current.uri}; "
                   f"the previous certificate stays in use")
            if msg != self.last_error:
                self.reload_failures += 1
                self.last_error = msg
                log.error("workload certificate reload refused: %s", msg)
            return False
        self.current = creds  # the swap
        self.last_error = ""
        self.reloads += 1
        log.info("workload certificate reloaded: %s valid until %s", creds.uri,
                 time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(creds.not_after)))
        self.check_expiry()
        return True

    def check_expiry(self) -> None:
        creds = self.current
        if creds is None:
            return
        left = creds.life_left(self.clock())
        key = (creds.signature, left <= 0)
        if left < EXPIRY_WARNING_FRACTION and key != self._warned_expiry_for:
            self._warned_expiry_for = key
            if left <= 0:
                log.warning("workload certificate %s has EXPIRED (%s); peers will refuse it",
                            creds.uri, time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(creds.not_after)))
            else:
                log.warning("workload certificate %s has %.1f%% of its life left (expires %s); "
                            "rotate it", creds.uri, left * 100,
                            time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(creds.not_after)))

    async def watch(self, interval: float) -> None:
        """Poll the three files (like the config watcher) and re-check expiry."""
        while True:
            await asyncio.sleep(interval)
            try:
                if not self.maybe_reload():
                    self.check_expiry()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("certificate watch failed")


def resolve_identity(creds: Credentials, service_account: str, trust_domain: str, namespace: str) -> None:
    """``--service-account``/``--trust-domain``/``--namespace`` must agree with
    the certificate (they default to it); raise CredentialError otherwise."""
    ident = creds.identity
    problems = []
    if service_account and service_account != ident.service_account:
        problems.append(f"--service-account {service_account}")
    if trust_domain and trust_domain != ident.trust_domain:
        problems.append(f"--trust-domain {trust_domain}")
    if namespace and namespace != ident.namespace:
        problems.append(f"--namespace {namespace}")
    if problems:
        raise CredentialError(f"{creds.directory}/cert-chain.pem is for {ident.uri}, which disagrees with "
                              f"{' and '.join(problems)}")
