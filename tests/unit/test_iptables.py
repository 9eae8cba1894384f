"""Unit tests for ``pyproxy iptables`` rule generation (pyproxy.iptables).

The rules are checked as argument vectors; ``--apply`` is exercised with a
fake ``subprocess.run`` (the real thing runs in tests/integration/test_transparent.py).
"""

from __future__ import annotations

import argparse
import subprocess
from typing import Any

import pytest

from pyproxy import iptables


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    iptables.add_arguments(p)
    return p.parse_args(list(argv))


def rules(*argv: str, ipv6: bool = False) -> list[str]:
    return [" ".join(r) for r in iptables.rules(parse(*argv), ipv6=ipv6)]


def chain(rule_set: list[str], name: str) -> list[str]:
    """The rules appended to ``name``, without the ``-t nat -A NAME`` prefix."""
    prefix = f"-t nat -A {name} "
    return [r[len(prefix):] for r in rule_set if r.startswith(prefix)]


def test_default_rule_set() -> None:
    r = rules()
    assert r[:4] == [f"-t nat -N {c}" for c in iptables.CHAINS]
    assert chain(r, "PYPROXY_IN_REDIRECT") == ["-p tcp -j REDIRECT --to-ports 15006"]
    assert chain(r, "PYPROXY_REDIRECT") == ["-p tcp -j REDIRECT --to-ports 15001"]
    assert chain(r, "PREROUTING") == ["-p tcp -j PYPROXY_INBOUND"]
    assert chain(r, "OUTPUT") == ["-p tcp -j PYPROXY_OUTPUT"]
    assert chain(r, "PYPROXY_INBOUND") == [
        "-p tcp --dport 15000 -j RETURN",
        "-p tcp --dport 15090 -j RETURN",
        "-p tcp --dport 15021 -j RETURN",
        "-p tcp --dport 15020 -j RETURN",
        "-p tcp -j PYPROXY_IN_REDIRECT",
    ]
    assert chain(r, "PYPROXY_OUTPUT") == [
        # The proxy calling the pod's own address over lo: that is inbound traffic.
        "-o lo ! -d 127.0.0.1/32 -m owner --uid-owner 1337 -j PYPROXY_IN_REDIRECT",
        # Everything else on lo is local, never captured.
        "-o lo -m owner ! --uid-owner 1337 -j RETURN",
        # The proxy's own connections are never captured (no loop).
        "-m owner --uid-owner 1337 -j RETURN",
        "-m owner --gid-owner 1337 -j RETURN",
        "-d 127.0.0.1/32 -j RETURN",
        "-j PYPROXY_REDIRECT",
    ]


def test_the_listener_ports_themselves_are_captured_inbound() -> None:
    # As in Istio: a connection from outside to :15001 is sent to the inbound
    # listener, so an outbound listener bound to all addresses is no open proxy.
    inbound = chain(rules(), "PYPROXY_INBOUND")
    assert not any("--dport 15001" in r or "--dport 15006" in r for r in inbound)


def test_uid_gid_and_listener_ports() -> None:
    r = rules("--proxy-uid", "2000", "--proxy-gid", "3000", "--inbound-port", "16006", "--outbound-port", "16001")
    out = chain(r, "PYPROXY_OUTPUT")
    assert "-o lo ! -d 127.0.0.1/32 -m owner --uid-owner 2000 -j PYPROXY_IN_REDIRECT" in out
    assert "-m owner --uid-owner 2000 -j RETURN" in out
    assert "-m owner --gid-owner 3000 -j RETURN" in out
    assert not any("1337" in x for x in r)
    assert chain(r, "PYPROXY_IN_REDIRECT") == ["-p tcp -j REDIRECT --to-ports 16006"]
    assert chain(r, "PYPROXY_REDIRECT") == ["-p tcp -j REDIRECT --to-ports 16001"]


def test_inbound_exclusions_come_before_the_redirect() -> None:
    inbound = chain(rules("--exclude-inbound-ports", "22, 8443,22,15090"), "PYPROXY_INBOUND")
    assert inbound == [
        "-p tcp --dport 15000 -j RETURN",
        "-p tcp --dport 15090 -j RETURN",
        "-p tcp --dport 15021 -j RETURN",
        "-p tcp --dport 15020 -j RETURN",
        "-p tcp --dport 22 -j RETURN",
        "-p tcp --dport 8443 -j RETURN",
        "-p tcp -j PYPROXY_IN_REDIRECT",
    ]


def test_include_inbound_ports_captures_only_those() -> None:
    inbound = chain(rules("--include-inbound-ports", "9080,9443", "--exclude-inbound-ports", "9443"),
                    "PYPROXY_INBOUND")
    assert inbound[-3:] == [
        "-p tcp --dport 9443 -j RETURN",  # an exclusion still wins
        "-p tcp --dport 9080 -j PYPROXY_IN_REDIRECT",
        "-p tcp --dport 9443 -j PYPROXY_IN_REDIRECT",
    ]
    assert "-p tcp -j PYPROXY_IN_REDIRECT" not in inbound


def test_include_inbound_ports_empty_captures_nothing_inbound() -> None:
    inbound = chain(rules("--include-inbound-ports", ""), "PYPROXY_INBOUND")
    assert not any("PYPROXY_IN_REDIRECT" in r for r in inbound)


def test_outbound_port_and_cidr_exclusions() -> None:
    out = chain(rules("--exclude-outbound-ports", "3306,10000:10100",
                      "--exclude-outbound-cidrs", "10.0.0.0/8, 192.168.1.7,fd00::/8"), "PYPROXY_OUTPUT")
    assert out[-5:] == [
        "-p tcp --dport 3306 -j RETURN",
        "-p tcp --dport 10000:10100 -j RETURN",
        "-d 10.0.0.0/8 -j RETURN",
        "-d 192.168.1.7/32 -j RETURN",
        "-j PYPROXY_REDIRECT",  # the exclusions come before the catch-all redirect
    ]


def test_ipv6_rules_use_v6_loopback_and_only_v6_cidrs() -> None:
    r = rules("--exclude-outbound-cidrs", "10.0.0.0/8,fd00::/8", ipv6=True)
    out = chain(r, "PYPROXY_OUTPUT")
    assert out[0] == "-o lo ! -d ::1/128 -m owner --uid-owner 1337 -j PYPROXY_IN_REDIRECT"
    assert "-d ::1/128 -j RETURN" in out
    assert "-d fd00::/8 -j RETURN" in out
    assert not any("10.0.0.0" in x or "127.0.0.1" in x for x in r)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--exclude-outbound-ports", "http"), "--exclude-outbound-ports: 'http' is not a port"),
        (("--exclude-inbound-ports", "0"), "--exclude-inbound-ports: '0' is not a port"),
        (("--exclude-inbound-ports", "70000"), "--exclude-inbound-ports: '70000' is not a port"),
        (("--include-inbound-ports", "9000:8000"), "--include-inbound-ports: '9000:8000' is not a port"),
        (("--exclude-outbound-cidrs", "10.0.0.0/33"), "--exclude-outbound-cidrs: '10.0.0.0/33' is not an IP"),
        (("--exclude-outbound-cidrs", "example.com"), "--exclude-outbound-cidrs: 'example.com' is not an IP"),
    ],
)
def test_bad_lists_are_errors(argv: tuple[str, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        iptables.rules(parse(*argv))


@pytest.mark.parametrize("argv", [("--proxy-uid", "root"), ("--proxy-gid", "-1"), ("--inbound-port", "0"),
                                  ("--outbound-port", "65536"), ("--apply", "--cleanup")])
def test_bad_options_are_rejected_by_the_parser(argv: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse(*argv)
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_cleanup_flushes_every_chain_before_deleting_any() -> None:
    cleanup = [" ".join(r) for r in iptables.cleanup_rules()]
    assert cleanup[:2] == ["-t nat -D PREROUTING -p tcp -j PYPROXY_INBOUND", "-t nat -D OUTPUT -p tcp -j PYPROXY_OUTPUT"]
    flushes = [i for i, r in enumerate(cleanup) if " -F " in r]
    deletes = [i for i, r in enumerate(cleanup) if " -X " in r]
    assert len(flushes) == len(deletes) == 4 and max(flushes) < min(deletes)


# -- main() ---------------------------------------------------------------------------


def test_print_mode_prints_shell_commands(capsys: pytest.CaptureFixture[str]) -> None:
    assert iptables.main(parse("--ipv6")) == 0
    lines = capsys.readouterr().out.splitlines()
    v4 = [x for x in lines if x.startswith("iptables ")]
    v6 = [x for x in lines if x.startswith("ip6tables ")]
    assert len(v4) == len(v6) == len(lines) // 2
    assert "iptables -t nat -A PYPROXY_OUTPUT -o lo '!' -d 127.0.0.1/32 -m owner --uid-owner 1337 " \
           "-j PYPROXY_IN_REDIRECT" in v4


def test_print_mode_reports_bad_lists(capsys: pytest.CaptureFixture[str]) -> None:
    assert iptables.main(parse("--exclude-outbound-ports", "x")) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip() == "pyproxy iptables: --exclude-outbound-ports: 'x' is not a port (1..65535) " \
                                   "or a LOW:HIGH range"


class FakeIptables:
    """Records commands; the one equal to ``fail_on`` (without the binary) fails."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.calls: list[list[str]] = []
        self.fail_on = fail_on

    def __call__(self, argv: list[str], **kw: Any) -> subprocess.CompletedProcess:
        self.calls.append(argv)
        failed = self.fail_on is not None and " ".join(argv[1:]) == self.fail_on
        return subprocess.CompletedProcess(argv, 1 if failed else 0, "", "iptables: boom" if failed else "")


def test_apply_cleans_up_first_then_applies_everything(monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    fake = FakeIptables()
    monkeypatch.setattr(iptables.subprocess, "run", fake)
    monkeypatch.setattr(iptables.shutil, "which", lambda name: f"/sbin/{name}")
    assert iptables.main(parse("--apply")) == 0
    cleanup = iptables.cleanup_rules()
    applied = iptables.rules(parse())
    assert fake.calls == [["/sbin/iptables", *r] for r in cleanup + applied]
    assert len(capsys.readouterr().out.splitlines()) == len(applied)


def test_apply_failure_removes_everything_and_fails(monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    bad = "-t nat -A OUTPUT -p tcp -j PYPROXY_OUTPUT"
    fake = FakeIptables(fail_on=bad)
    monkeypatch.setattr(iptables.subprocess, "run", fake)
    monkeypatch.setattr(iptables.shutil, "which", lambda name: f"/sbin/{name}")
    assert iptables.main(parse("--apply", "--ipv6")) == 1
    cleanup = [["/sbin/iptables", *r] for r in iptables.cleanup_rules()]
    cleanup6 = [["/sbin/ip6tables", *r] for r in iptables.cleanup_rules()]
    # The failed rule is followed by a full cleanup of both families.
    i = next(i for i, c in enumerate(fake.calls) if " ".join(c[1:]) == bad)
    assert fake.calls[i + 1:] == cleanup + cleanup6
    assert "pyproxy iptables: iptables -t nat -A OUTPUT -p tcp -j PYPROXY_OUTPUT: iptables: boom" in \
        capsys.readouterr().err


def test_apply_without_the_binary_fails_cleanly(monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(iptables.shutil, "which", lambda name: None if name == "ip6tables" else f"/sbin/{name}")
    fake = FakeIptables()
    monkeypatch.setattr(iptables.subprocess, "run", fake)
    assert iptables.main(parse("--apply", "--ipv6")) == 1
    assert fake.calls == []  # nothing applied when one family cannot be
    assert "pyproxy iptables: ip6tables not found" in capsys.readouterr().err


def test_cleanup_ignores_missing_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeIptables(fail_on="-t nat -D PREROUTING -p tcp -j PYPROXY_INBOUND")
    monkeypatch.setattr(iptables.subprocess, "run", fake)
    monkeypatch.setattr(iptables.shutil, "which", lambda name: f"/sbin/{name}")
    assert iptables.main(parse("--cleanup")) == 0
    assert fake.calls == [["/sbin/iptables", *r] for r in iptables.cleanup_rules()]
