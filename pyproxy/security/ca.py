"""A mesh CA without Kubernetes: ``pyproxy ca init`` and ``pyproxy ca issue``.

``init`` writes Istio's plug-in CA layout (the ``cacerts`` Secret istiod reads,
https://istio.io/latest/docs/tasks/security/cert-management/plugin-ca-cert/):
``root-cert.pem``, ``ca-cert.pem`` (the signing intermediate), ``ca-key.pem``
and ``cert-chain.pem`` (intermediate up to and including the root).

``issue`` writes istio-agent's file-mounted layout
(``./var/run/secrets/workload-spiffe-credentials``): ``cert-chain.pem`` (leaf
then the CA chain), ``key.pem`` and ``root-cert.pem``, so the same directory
works for pyproxy and for a real Envoy/istio-agent peer.

The workload certificate has the shape istiod issues
(``security/pkg/pki/util/generate_cert.go``): empty subject, a critical URI SAN
``spiffe://TD/ns/NS/sa/SA``, digitalSignature+keyEncipherment,
serverAuth+clientAuth, CA:false, NotBefore two minutes in the past (clock
skew grace), NotAfter clamped to the signing certificate's.
"""

from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# Istio's ClockSkewGracePeriod.
CLOCK_SKEW = datetime.timedelta(minutes=2)
ROOT_TTL = datetime.timedelta(days=3650)  # CITADEL_SELF_SIGNED_CA_CERT_TTL
DEFAULT_TTL = datetime.timedelta(hours=24)  # SECRET_TTL / DEFAULT_WORKLOAD_CERT_TTL
MAX_TTL = datetime.timedelta(days=90)  # MAX_WORKLOAD_CERT_TTL

PLUGIN_FILES = ("root-cert.pem", "ca-cert.pem", "ca-key.pem", "cert-chain.pem")

_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_TRUST_DOMAIN = re.compile(r"^[a-z0-9._-]+$")


class CAError(Exception):
    """A clear, user-facing reason the CA command cannot proceed."""


PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def spiffe_id(trust_domain: str, namespace: str, service_account: str) -> str:
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"


def check_trust_domain(td: str) -> str:
    # SPIFFE: lowercase letters, digits, dots, dashes and underscores.
    if not td or not _TRUST_DOMAIN.match(td):
        raise CAError(f"invalid trust domain {td!r}: use lowercase letters, digits, '.', '-' and '_'")
    return td


def parse_ttl(value: str) -> datetime.timedelta:
    """``24h``, ``90m``, ``30s``, ``7d`` or a plain number of seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", value)
    if not m:
        raise CAError(f"invalid --ttl {value!r}: expected a number with s, m, h or d (e.g. 24h)")
    number = float(m.group(1))
    seconds = number * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    if seconds <= 0:
        raise CAError(f"invalid --ttl {value!r}: must be positive")
    ttl = datetime.timedelta(seconds=seconds)
    if ttl > MAX_TTL:
        # istiod refuses TTLs over MAX_WORKLOAD_CERT_TTL.
        raise CAError(f"--ttl {value} exceeds the maximum workload certificate TTL of 90 days")
    return ttl


def new_key(kind: str) -> PrivateKey:
    if kind == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise CAError(f"invalid key type {kind!r}: expected ec or rsa")


def _sig_hash(key: PrivateKey) -> hashes.SHA256:
    return hashes.SHA256()


def key_pem(key: PrivateKey) -> bytes:
    # PKCS#8: both OpenSSL (Envoy) and Python's ssl read it for RSA and EC.
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _ski(key: PrivateKey) -> x509.SubjectKeyIdentifier:
    return x509.SubjectKeyIdentifier.from_public_key(key.public_key())


def _ca_cert(subject: x509.Name, issuer: x509.Name, key: PrivateKey, signer: PrivateKey,
             signer_cert: x509.Certificate | None, not_before: datetime.datetime,
             not_after: datetime.datetime, path_length: int | None) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, content_commitment=True, key_encipherment=True,
                          data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                          encipher_only=False, decipher_only=False),
            critical=True)
        .add_extension(_ski(key), critical=False)
    )
    authority = signer_cert.public_key() if signer_cert is not None else key.public_key()
    builder = builder.add_extension(
        x509.AuthorityKeyIdentifier.from_issuer_public_key(authority), critical=False)  # type: ignore[arg-type]
    return builder.sign(signer, _sig_hash(signer))


def _write(directory: Path, files: dict[str, bytes]) -> None:
    """Each file written to a temporary name and renamed into place, so a
    sidecar watching the directory never reads half a file."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        target = directory / name
        tmp = directory / f".{name}.tmp"
        secret = name.endswith("key.pem")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if secret else 0o644)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, target)


def init_ca(directory: str | os.PathLike[str], trust_domain: str = "cluster.local", key_type: str = "ec",
            now: datetime.datetime | None = None, force: bool = False) -> None:
    """Self-signed root + an intermediate that signs workload certificates
    (the shape of Istio's tools/certs Makefile: root ``O=Istio, CN=Root CA``,
    intermediate ``CA:true, pathlen:0``)."""
    check_trust_domain(trust_domain)
    d = Path(directory)
    existing = [n for n in PLUGIN_FILES if (d / n).exists()]
    if existing and not force:
        raise CAError(f"{d}: already holds {', '.join(existing)}; refusing to overwrite a CA")
    now = now or datetime.datetime.now(datetime.UTC)
    root_key = new_key(key_type)
    root_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Istio"),
                           x509.NameAttribute(NameOID.COMMON_NAME, "Root CA")])
    root = _ca_cert(root_name, root_name, root_key, root_key, None, now - CLOCK_SKEW, now + ROOT_TTL, None)
    ca_key = new_key(key_type)
    ca_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Istio"),
                         x509.NameAttribute(NameOID.COMMON_NAME, "Intermediate CA"),
                         x509.NameAttribute(NameOID.LOCALITY_NAME, trust_domain)])
    ca = _ca_cert(ca_name, root_name, ca_key, root_key, root, now - CLOCK_SKEW, now + ROOT_TTL, 0)
    _write(d, {
        "root-cert.pem": cert_pem(root),
        "ca-cert.pem": cert_pem(ca),
        "ca-key.pem": key_pem(ca_key),
        "cert-chain.pem": cert_pem(ca) + cert_pem(root),
    })


@dataclass(frozen=True)
class LoadedCA:
    cert: x509.Certificate
    key: PrivateKey
    chain_pem: bytes  # ca-cert.pem up to the root (cert-chain.pem)
    root_pem: bytes


def load_ca(directory: str | os.PathLike[str]) -> LoadedCA:
    d = Path(directory)
    missing = [n for n in ("ca-cert.pem", "ca-key.pem", "root-cert.pem") if not (d / n).is_file()]
    if missing:
        raise CAError(f"{d}: not a CA directory (missing {', '.join(missing)}); create one with `pyproxy ca init`")
    try:
        cert = x509.load_pem_x509_certificate((d / "ca-cert.pem").read_bytes())
        key = serialization.load_pem_private_key((d / "ca-key.pem").read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise CAError(f"{d}: cannot read the CA certificate or key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise CAError(f"{d}/ca-key.pem: unsupported key type {type(key).__name__} (expected EC or RSA)")
    if key.public_key().public_numbers() != cert.public_key().public_numbers():  # type: ignore[union-attr]
        raise CAError(f"{d}: ca-key.pem does not belong to ca-cert.pem")
    root_pem = (d / "root-cert.pem").read_bytes()
    chain_path = d / "cert-chain.pem"
    # Istio's plug-in layout: cert-chain.pem is ca-cert.pem up to the root; a
    # self-signed ca-cert.pem (root == signing cert) may leave it out.
    chain_pem = chain_path.read_bytes() if chain_path.is_file() else cert_pem(cert)
    return LoadedCA(cert, key, chain_pem, root_pem)


def issue_workload_cert(ca: LoadedCA, namespace: str, service_account: str,
                        trust_domain: str = "cluster.local", ttl: datetime.timedelta = DEFAULT_TTL,
                        key_type: str = "ec",
                        now: datetime.datetime | None = None) -> tuple[PrivateKey, x509.Certificate]:
    check_trust_domain(trust_domain)
    if not _DNS1123_LABEL.match(namespace):
        raise CAError(f"invalid namespace {namespace!r}: must be a DNS-1123 label")
    if not _DNS1123_SUBDOMAIN.match(service_account):
        raise CAError(f"invalid service account {service_account!r}: must be a DNS-1123 subdomain")
    now = now or datetime.datetime.now(datetime.UTC)
    not_after = min(now + ttl, ca.cert.not_valid_after_utc)
    key = new_key(key_type)
    uri = spiffe_id(trust_domain, namespace, service_account)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(not_after)
        # Empty subject: the SAN extension must be critical (RFC 5280 4.2.1.6).
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=True,
                          data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                          encipher_only=False, decipher_only=False),
            critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),  # type: ignore[arg-type]
                       critical=False)
        .sign(ca.key, _sig_hash(ca.key))
    )
    return key, cert


def issue_to_dir(ca_dir: str | os.PathLike[str], out: str | os.PathLike[str], namespace: str,
                 service_account: str, trust_domain: str = "cluster.local",
                 ttl: datetime.timedelta = DEFAULT_TTL, key_type: str = "ec",
                 now: datetime.datetime | None = None) -> x509.Certificate:
    ca = load_ca(ca_dir)
    key, cert = issue_workload_cert(ca, namespace, service_account, trust_domain, ttl, key_type, now)
    # Key first: a watcher that sees the new chain reads a matching key.
    _write(Path(out), {"key.pem": key_pem(key), "root-cert.pem": ca.root_pem})
    _write(Path(out), {"cert-chain.pem": cert_pem(cert) + ca.chain_pem})
    return cert
