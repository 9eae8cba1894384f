"""Workload credentials: loading, identity, the one-reference swap on
rotation, keeping the previous set when the files are bad, expiry warning."""

from __future__ import annotations

import datetime
import logging
import os
import shutil
import ssl
from pathlib import Path

import pytest

from pyproxy.cli import build_parser, parse_run_options
from pyproxy.security.ca import init_ca, issue_to_dir, parse_ttl
from pyproxy.security.certs import (
    CertStore,
    CredentialError,
    load_credentials,
    parse_spiffe,
    resolve_identity,
)


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("ca")
    init_ca(d)
    return d


def test_parse_spiffe() -> None:
    ident = parse_spiffe("spiffe://cluster.local/ns/default/sa/bookinfo-reviews")
    assert ident is not None
    assert (ident.trust_domain, ident.namespace, ident.service_account) == (
        "cluster.local", "default", "bookinfo-reviews")
    assert ident.uri == "spiffe://cluster.local/ns/default/sa/bookinfo-reviews"
    for bad in ("https://x/ns/a/sa/b", "spiffe://td/ns/a", "spiffe://td/ns//sa/b", "spiffe://td/x/a/sa/b"):
        assert parse_spiffe(bad) is None


def test_load_credentials(ca: Path, tmp_path: Path) -> None:
    cert = issue_to_dir(ca, tmp_path, "prod", "reviews", "example.org")
    creds = load_credentials(str(tmp_path))
    assert creds.uri == "spiffe://example.org/ns/prod/sa/reviews"
    assert creds.not_after == cert.not_valid_after_utc.timestamp()
    assert 0.99 < creds.life_left() <= 1.0
    assert creds.client_context.check_hostname is False
    assert len(creds.leaf_sha256) == 64
    for ctx in (creds.server_context, creds.client_context):
        assert ctx.options & ssl.OP_NO_RENEGOTIATION  # no TLS 1.2 renegotiation either way
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2 and ctx.maximum_version == ssl.TLSVersion.TLSv1_3
    assert creds.server_context.verify_mode == ssl.CERT_REQUIRED


def test_identity_must_agree(ca: Path, tmp_path: Path) -> None:
    issue_to_dir(ca, tmp_path, "prod", "reviews")
    creds = load_credentials(str(tmp_path))
    resolve_identity(creds, "reviews", "cluster.local", "prod")
    resolve_identity(creds, "", "", "")
    with pytest.raises(CredentialError, match=r"spiffe://cluster.local/ns/prod/sa/reviews.*--service-account other"):
        resolve_identity(creds, "other", "", "")
    with pytest.raises(CredentialError, match="--trust-domain example.org"):
        resolve_identity(creds, "", "example.org", "")
    with pytest.raises(CredentialError, match="--namespace default"):
        resolve_identity(creds, "", "", "default")


@pytest.mark.parametrize("breakage,message", [
    (lambda d: os.remove(d / "key.pem"), "key.pem"),
    (lambda d: (d / "cert-chain.pem").write_text("garbage"), "not a PEM certificate chain"),
    (lambda d: (d / "key.pem").write_text("garbage"), "not a PEM private key"),
])
def test_bad_files_are_named(ca: Path, tmp_path: Path, breakage, message: str) -> None:
    issue_to_dir(ca, tmp_path, "default", "a")
    breakage(tmp_path)
    with pytest.raises(CredentialError, match=message):
        load_credentials(str(tmp_path))


def test_key_must_match_cert(ca: Path, tmp_path: Path) -> None:
    issue_to_dir(ca, tmp_path / "a", "default", "a")
    issue_to_dir(ca, tmp_path / "b", "default", "a")
    shutil.copy(tmp_path / "b" / "key.pem", tmp_path / "a" / "key.pem")
    with pytest.raises(CredentialError, match="does not match"):
        load_credentials(str(tmp_path / "a"))


def test_cert_without_spiffe_uri_is_refused(ca: Path, tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    from pyproxy.security.ca import cert_pem, key_pem, load_ca, new_key

    loaded = load_ca(ca)
    key = new_key("ec")
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(loaded.cert.subject)
            .public_key(key.public_key()).serial_number(1).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("example.com")]), critical=True)
            .sign(loaded.key, hashes.SHA256()))
    (tmp_path / "cert-chain.pem").write_bytes(cert_pem(cert) + loaded.chain_pem)
    (tmp_path / "key.pem").write_bytes(key_pem(key))
    (tmp_path / "root-cert.pem").write_bytes(loaded.root_pem)
    with pytest.raises(CredentialError, match="no URI SAN of the form spiffe://"):
        load_credentials(str(tmp_path))


def test_rotation_swaps_one_reference_and_bad_files_keep_the_previous(
        ca: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    issue_to_dir(ca, tmp_path, "default", "a")
    store = CertStore(str(tmp_path))
    first = store.load()
    first_server_ctx = first.server_context
    assert store.maybe_reload() is False  # unchanged files: nothing rebuilt
    assert store.current is first
    issue_to_dir(ca, tmp_path, "default", "a")
    assert store.maybe_reload() is True
    second = store.current
    assert second is not None and second is not first
    assert second.leaf_sha256 != first.leaf_sha256
    assert first.server_context is first_server_ctx  # the old set is untouched (live connections)
    # A half-finished rotation (key missing) keeps the previous set and says why.
    os.remove(tmp_path / "key.pem")
    with caplog.at_level(logging.ERROR, logger="pyproxy.security"):
        assert store.maybe_reload() is False
        assert store.maybe_reload() is False  # said once per distinct error
    assert store.current is second
    assert store.reload_failures == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "previous certificate stays in use" in errors[0] and "key.pem" in errors[0]
    # A certificate for another identity is refused at reload too.
    issue_to_dir(ca, tmp_path, "default", "somebody-else")
    assert store.maybe_reload() is False
    assert store.current is second
    assert "not spiffe://cluster.local/ns/default/sa/a" in store.last_error
    issue_to_dir(ca, tmp_path, "default", "a")
    assert store.maybe_reload() is True and store.last_error == ""


def test_expiry_warning_under_ten_percent(ca: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cert = issue_to_dir(ca, tmp_path, "default", "a", ttl=parse_ttl("1h"))
    life = cert.not_valid_after_utc.timestamp() - cert.not_valid_before_utc.timestamp()
    now = [cert.not_valid_before_utc.timestamp() + life * 0.5]
    store = CertStore(str(tmp_path), clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="pyproxy.security"):
        store.load()
        assert not caplog.records
        now[0] = cert.not_valid_before_utc.timestamp() + life * 0.95
        store.check_expiry()
        store.check_expiry()  # once, not on every poll
        now[0] = cert.not_valid_after_utc.timestamp() + 1
        store.check_expiry()
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert "5.0% of its life left" in messages[0]
    assert "EXPIRED" in messages[1]


def test_run_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    parser, _ = build_parser()
    monkeypatch.chdir(tmp_path)
    opts = parse_run_options(parser.parse_args(["run", "--config", "x"]), {})
    assert opts.certs == "" and not opts.namespace_set and opts.namespace == "default"
    # istio-agent's default path is used when it exists.
    (tmp_path / "var/run/secrets/workload-spiffe-credentials").mkdir(parents=True)
    opts = parse_run_options(parser.parse_args(["run", "--config", "x"]), {})
    assert opts.certs == "./var/run/secrets/workload-spiffe-credentials"
    opts = parse_run_options(parser.parse_args(["run", "--config", "x", "--certs", "off"]), {})
    assert opts.certs == ""
    opts = parse_run_options(parser.parse_args(["run", "--config", "x"]), {
        "PYPROXY_CERTS": "/c", "PYPROXY_SERVICE_ACCOUNT": "sa", "PYPROXY_TRUST_DOMAIN": "td",
        "PYPROXY_NAMESPACE": "ns"})
    assert (opts.certs, opts.service_account, opts.trust_domain, opts.namespace, opts.namespace_set) == (
        "/c", "sa", "td", "ns", True)
