"""``pyproxy iptables``: the traffic-capture rules for a pod network namespace,
in the model of Istio's init container.

- Inbound: TCP arriving at the pod (nat PREROUTING) is redirected to the
  inbound listener (15006), except excluded ports (the proxy's own ports are
  always excluded).
- Outbound: TCP the application sends (nat OUTPUT) is redirected to the
  outbound listener (15001), except traffic from the proxy's own UID/GID
  (1337 by default, so the proxy's upstream connections are not captured
  again), traffic to localhost, and excluded ports/CIDRs.
- A proxy-owned connection to the pod's own non-loopback address over ``lo``
  (an app calling itself through its service) goes to the inbound listener,
  as in Istio.

The rules live in dedicated chains (``PYPROXY_*``) so ``--cleanup`` can
remove exactly what ``--apply`` added.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys

PROXY_PORTS = (15000, 15001, 15006, 15090, 15021, 15020)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--apply", action="store_true", help="apply the rules (needs root / NET_ADMIN)")
    p.add_argument("--cleanup", action="store_true", help="remove previously applied rules")
    p.add_argument("--proxy-uid", type=int, default=1337)
    p.add_argument("--proxy-gid", type=int, default=1337)
    p.add_argument("--inbound-port", type=int, default=15006)
    p.add_argument("--outbound-port", type=int, default=15001)
    p.add_argument("--exclude-inbound-ports", default="", metavar="P,P", help="ports never captured inbound")
    p.add_argument("--exclude-outbound-ports", default="", metavar="P,P")
    p.add_argument("--exclude-outbound-cidrs", default="", metavar="CIDR,CIDR")
    p.add_argument("--include-inbound-ports", default="*", metavar="P,P|*",
                   help="capture only these inbound ports (* = all)")
    p.add_argument("--ipv6", action="store_true", help="also emit ip6tables rules")


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def rules(args: argparse.Namespace, ipv6: bool = False) -> list[list[str]]:
    """The rule set as argument vectors (without the iptables binary)."""
    nat = ["-t", "nat"]
    loopback = "::1/128" if ipv6 else "127.0.0.1/32"
    out: list[list[str]] = []
    for chain in ("PYPROXY_INBOUND", "PYPROXY_IN_REDIRECT", "PYPROXY_OUTPUT", "PYPROXY_REDIRECT"):
        out.append([*nat, "-N", chain])
    out.append([*nat, "-A", "PYPROXY_IN_REDIRECT", "-p", "tcp", "-j", "REDIRECT", "--to-ports", str(args.inbound_port)])
    out.append([*nat, "-A", "PYPROXY_REDIRECT", "-p", "tcp", "-j", "REDIRECT", "--to-ports", str(args.outbound_port)])

    # Inbound
    out.append([*nat, "-A", "PREROUTING", "-p", "tcp", "-j", "PYPROXY_INBOUND"])
    excluded_in = [str(p) for p in PROXY_PORTS] + _csv(args.exclude_inbound_ports)
    for port in dict.fromkeys(excluded_in):
        out.append([*nat, "-A", "PYPROXY_INBOUND", "-p", "tcp", "--dport", port, "-j", "RETURN"])
    if args.include_inbound_ports.strip() == "*":
        out.append([*nat, "-A", "PYPROXY_INBOUND", "-p", "tcp", "-j", "PYPROXY_IN_REDIRECT"])
    else:
        for port in _csv(args.include_inbound_ports):
            out.append([*nat, "-A", "PYPROXY_INBOUND", "-p", "tcp", "--dport", port, "-j", "PYPROXY_IN_REDIRECT"])

    # Outbound
    out.append([*nat, "-A", "OUTPUT", "-p", "tcp", "-j", "PYPROXY_OUTPUT"])
    uid, gid = str(args.proxy_uid), str(args.proxy_gid)
    # Proxy calling the pod's own address over lo: treat as inbound.
    out.append([*nat, "-A", "PYPROXY_OUTPUT", "-o", "lo", "!", "-d", loopback, "-m", "owner",
                "--uid-owner", uid, "-j", "PYPROXY_IN_REDIRECT"])
    # Anything else the app sends over lo is local traffic, not captured.
    out.append([*nat, "-A", "PYPROXY_OUTPUT", "-o", "lo", "-m", "owner", "!", "--uid-owner", uid, "-j", "RETURN"])
    out.append([*nat, "-A", "PYPROXY_OUTPUT", "-m", "owner", "--uid-owner", uid, "-j", "RETURN"])
    out.append([*nat, "-A", "PYPROXY_OUTPUT", "-m", "owner", "--gid-owner", gid, "-j", "RETURN"])
    out.append([*nat, "-A", "PYPROXY_OUTPUT", "-d", loopback, "-j", "RETURN"])
    for port in _csv(args.exclude_outbound_ports):
        out.append([*nat, "-A", "PYPROXY_OUTPUT", "-p", "tcp", "--dport", port, "-j", "RETURN"])
    for cidr in _csv(args.exclude_outbound_cidrs):
        if (":" in cidr) == ipv6:
            out.append([*nat, "-A", "PYPROXY_OUTPUT", "-d", cidr, "-j", "RETURN"])
    out.append([*nat, "-A", "PYPROXY_OUTPUT", "-j", "PYPROXY_REDIRECT"])
    return out


def cleanup_rules() -> list[list[str]]:
    nat = ["-t", "nat"]
    out = [
        [*nat, "-D", "PREROUTING", "-p", "tcp", "-j", "PYPROXY_INBOUND"],
        [*nat, "-D", "OUTPUT", "-p", "tcp", "-j", "PYPROXY_OUTPUT"],
    ]
    for chain in ("PYPROXY_INBOUND", "PYPROXY_IN_REDIRECT", "PYPROXY_OUTPUT", "PYPROXY_REDIRECT"):
        out.append([*nat, "-F", chain])
        out.append([*nat, "-X", chain])
    return out


def _binaries(ipv6: bool) -> list[str]:
    return ["iptables", "ip6tables"] if ipv6 else ["iptables"]


def main(args: argparse.Namespace) -> int:
    for binary in _binaries(args.ipv6):
        v6 = binary == "ip6tables"
        rule_set = cleanup_rules() if args.cleanup else rules(args, ipv6=v6)
        if not (args.apply or args.cleanup):
            for r in rule_set:
                print(shlex.join([binary, *r]))
            continue
        exe = shutil.which(binary)
        if exe is None:
            print(f"pyproxy iptables: {binary} not found", file=sys.stderr)
            return 1
        if args.apply:
            # Start from a clean slate so --apply is idempotent.
            for r in cleanup_rules():
                subprocess.run([exe, *r], capture_output=True)
        for r in rule_set:
            res = subprocess.run([exe, *r], capture_output=True, text=True)
            if res.returncode != 0 and not args.cleanup:
                print(f"pyproxy iptables: {shlex.join([binary, *r])}: {res.stderr.strip()}", file=sys.stderr)
                return 1
            print(shlex.join([binary, *r]))
    return 0
