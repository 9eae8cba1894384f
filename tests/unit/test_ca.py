"""pyproxy ca init / issue: files, certificate shape (parsed with cryptography),
and that Python's ssl accepts the result for mutual TLS."""

from __future__ import annotations

import datetime
import socket
import ssl
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pyproxy.cli import main
from pyproxy.security.ca import CAError, issue_to_dir, load_ca, parse_ttl


def _certs(path: Path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(path.read_bytes())


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    d = tmp_path / "ca"
    assert main(["ca", "init", str(d)]) == 0
    return d


def test_init_writes_istio_plugin_layout(ca_dir: Path) -> None:
    assert sorted(p.name for p in ca_dir.iterdir()) == ["ca-cert.pem", "ca-key.pem", "cert-chain.pem",
                                                         "root-cert.pem"]
    (root,) = _certs(ca_dir / "root-cert.pem")
    (ca,) = _certs(ca_dir / "ca-cert.pem")
    chain = _certs(ca_dir / "cert-chain.pem")
    assert [c.subject for c in chain] == [ca.subject, root.subject]
    assert root.subject == root.issuer
    assert root.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "Root CA"
    assert ca.issuer == root.subject
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    assert root.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    ca.verify_directly_issued_by(root)
    assert isinstance(root.public_key(), ec.EllipticCurvePublicKey)
    assert (ca_dir / "ca-key.pem").stat().st_mode & 0o077 == 0


def test_init_refuses_to_overwrite(ca_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = (ca_dir / "ca-key.pem").read_bytes()
    assert main(["ca", "init", str(ca_dir)]) == 1
    assert "refusing to overwrite" in capsys.readouterr().err
    assert (ca_dir / "ca-key.pem").read_bytes() == before


def test_init_rsa(tmp_path: Path) -> None:
    assert main(["ca", "init", str(tmp_path / "ca"), "--key", "rsa"]) == 0
    (root,) = _certs(tmp_path / "ca" / "root-cert.pem")
    assert isinstance(root.public_key(), rsa.RSAPublicKey)


def test_issue_writes_workload_cert_of_istio_shape(ca_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "creds"
    before = datetime.datetime.now(datetime.UTC)
    assert main(["ca", "issue", "--ca", str(ca_dir), "--namespace", "default",
                 "--service-account", "bookinfo-reviews", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["cert-chain.pem", "key.pem", "root-cert.pem"]
    leaf, ca, root = _certs(out / "cert-chain.pem")
    assert (out / "root-cert.pem").read_bytes() == (ca_dir / "root-cert.pem").read_bytes()
    assert ca.subject == _certs(ca_dir / "ca-cert.pem")[0].subject and root.subject == root.issuer
    leaf.verify_directly_issued_by(ca)
    assert leaf.subject == x509.Name([])
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://cluster.local/ns/default/sa/bookinfo-reviews"]
    assert san.value.get_values_for_type(x509.DNSName) == []
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and ku.key_encipherment and not ku.key_cert_sign
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    skew = before - leaf.not_valid_before_utc
    assert datetime.timedelta(minutes=1, seconds=55) <= skew <= datetime.timedelta(minutes=2, seconds=5)
    life = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert datetime.timedelta(hours=24, minutes=1) <= life <= datetime.timedelta(hours=24, minutes=3)
    assert (out / "key.pem").stat().st_mode & 0o077 == 0


def test_issue_ttl_trust_domain_and_clamp(ca_dir: Path, tmp_path: Path) -> None:
    cert = issue_to_dir(ca_dir, tmp_path / "a", "ns1", "sa1", "example.org", parse_ttl("90m"))
    life = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert life == datetime.timedelta(minutes=92)
    uri = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert uri.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://example.org/ns/ns1/sa/sa1"]
    # NotAfter never exceeds the signing certificate's.
    ca = load_ca(ca_dir)
    late = ca.cert.not_valid_after_utc - datetime.timedelta(hours=1)
    cert = issue_to_dir(ca_dir, tmp_path / "b", "ns1", "sa1", now=late)
    assert cert.not_valid_after_utc == ca.cert.not_valid_after_utc


@pytest.mark.parametrize("argv,message", [
    (["--namespace", "Bad_NS", "--service-account", "sa"], "invalid namespace"),
    (["--namespace", "ns", "--service-account", "sa", "--ttl", "forever"], "invalid --ttl"),
    (["--namespace", "ns", "--service-account", "sa", "--ttl", "91d"], "exceeds the maximum"),
    (["--namespace", "ns", "--service-account", "sa", "--trust-domain", "Bad/TD"], "invalid trust domain"),
])
def test_issue_rejects_bad_input(ca_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                 argv: list[str], message: str) -> None:
    assert main(["ca", "issue", "--ca", str(ca_dir), "--out", str(tmp_path / "o"), *argv]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_issue_from_missing_ca(tmp_path: Path) -> None:
    with pytest.raises(CAError, match="not a CA directory"):
        issue_to_dir(tmp_path / "nope", tmp_path / "o", "ns", "sa")


def test_python_ssl_does_mutual_tls_with_issued_certs(ca_dir: Path, tmp_path: Path) -> None:
    """Real TLS (no mocks): server and client each present an issued cert; each
    sees the other's SPIFFE URI SAN (spec 1.2: empty subject + critical SAN is
    accepted by OpenSSL)."""
    for sa in ("server", "client"):
        issue_to_dir(ca_dir, tmp_path / sa, "default", sa, key_type="rsa" if sa == "server" else "ec")

    def ctx(purpose: int, sa: str) -> ssl.SSLContext:
        c = ssl.SSLContext(purpose)
        c.load_cert_chain(tmp_path / sa / "cert-chain.pem", tmp_path / sa / "key.pem")
        c.load_verify_locations(tmp_path / sa / "root-cert.pem")
        c.verify_mode = ssl.CERT_REQUIRED
        return c

    server_ctx = ctx(ssl.PROTOCOL_TLS_SERVER, "server")
    client_ctx = ctx(ssl.PROTOCOL_TLS_CLIENT, "client")
    client_ctx.check_hostname = False
    listener = socket.create_server(("127.0.0.1", 0))
    seen: dict[str, object] = {}

    def serve() -> None:
        conn, _ = listener.accept()
        with server_ctx.wrap_socket(conn, server_side=True) as tls:
            seen["client"] = tls.getpeercert()
            tls.sendall(b"ok")

    t = threading.Thread(target=serve)
    t.start()
    with socket.create_connection(listener.getsockname()) as raw:
        with client_ctx.wrap_socket(raw) as tls:
            server_cert = tls.getpeercert()
            assert tls.recv(2) == b"ok"
    t.join(5)
    listener.close()
    assert server_cert is not None and server_cert["subject"] == ()
    assert server_cert["subjectAltName"] == (("URI", "spiffe://cluster.local/ns/default/sa/server"),)
    assert seen["client"]["subjectAltName"] == (  # type: ignore[index]
        ("URI", "spiffe://cluster.local/ns/default/sa/client"),)
