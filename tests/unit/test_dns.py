"""Unit tests for the DNS cache the connection path reads (pyproxy.upstream.dns.Resolver)."""

from __future__ import annotations

import pytest

from pyproxy.upstream.dns import Resolver


def test_ip_addresses_and_unknown_names_pass_through() -> None:
    r = Resolver(loop=None)  # type: ignore[arg-type]  # the cache path never touches the loop
    assert r("10.0.0.1") == "10.0.0.1"
    assert r("unix:///run/app.sock") == "unix:///run/app.sock"


def test_resolved_names_rotate_over_their_addresses() -> None:
    r = Resolver(loop=None)  # type: ignore[arg-type]
    r.resolved("api.internal", ["10.0.0.1", "10.0.0.2"])
    assert [r("api.internal") for _ in range(4)] == ["10.0.0.1", "10.0.0.2", "10.0.0.1", "10.0.0.2"]
    r.resolved("one.internal", ["10.0.0.9"])
    assert r("one.internal") == "10.0.0.9"


def test_a_name_that_never_resolved_fails_instead_of_resolving_on_the_request_path() -> None:
    r = Resolver(loop=None)  # type: ignore[arg-type]
    r.failed("db.internal", OSError("Name or service not known"))
    assert r.failures == 1
    with pytest.raises(OSError, match="DNS name 'db.internal' has not resolved yet"):
        r("db.internal")
    r.resolved("db.internal", ["10.0.0.3"])  # a later background lookup succeeds
    assert r("db.internal") == "10.0.0.3"


def test_a_failed_refresh_keeps_the_last_good_addresses() -> None:
    r = Resolver(loop=None)  # type: ignore[arg-type]
    r.resolved("api.internal", ["10.0.0.1"])
    r.failed("api.internal", TimeoutError())
    assert r("api.internal") == "10.0.0.1"
    assert "api.internal" not in r.unresolved
