"""``pyproxy iptables``: the traffic-capture rules for a pod network namespace,
in the model of Istio's init container.

- Inbound: TCP arriving at the pod (nat PREROUTING) is redirected to the
  inbound listener (15006), except excluded ports: the stats/health ports
  (15090, 15020, 15021) and the admin port (15000) always are. As in Istio,
  15001 and 15006 themselves are captured, so a listener bound to all
  addresses is never reachable from outside as an open proxy.
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
import ipaddress
import shlex
import shutil
import subprocess
import sys

# Never captured inbound: admin, Istio's agent/health ports and the stats port.
PROXY_PORTS = (15000, 15090, 15021, 15020)
CHAINS = ("PYPROXY_INBOUND", "PYPROXY_IN_REDIRECT", "PYPROXY_OUTPUT", "PYPROXY_REDIRECT")


def add_arguments(p: argparse.ArgumentParser) -> None:
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--apply", action="store_true", help="apply the rules (needs root / NET_ADMIN)")
    mode.add_argument("--cleanup", action="store_true", help="remove previously applied rules")
    p.add_argument("--proxy-uid", type=_id, default=1337, help="the proxy's UID, never captured (default 1337)")
    p.add_argument("--proxy-gid", type=_id, default=1337, help="the proxy's GID, never captured (default 1337)")
    p.add_argument("--inbound-port", type=_port, default=15006, help="the inbound listener port (default 15006)")
    p.add_argument("--outbound-port", type=_port, default=15001, help="the outbound listener port (default 15001)")
    p.add_argument("--exclude-inbound-ports", default="", metavar="P,P", help="ports never captured inbound")
    p.add_argument("--exclude-outbound-ports", default="", metavar="P,P")
    p.add_argument("--exclude-outbound-cidrs", default="", metavar="CIDR,CIDR")
    p.add_argument("--include-inbound-ports", default="*", metavar="P,P|*",
                   help="capture only these inbound ports (* = all)")
    p.add_argument("--ipv6", action="store_true", help="also emit ip6tables rules")


def _id(value: str) -> int:
    if not value.strip().isdigit():
        raise argparse.ArgumentTypeError(f"{value!r} is not a numeric id")
    return int(value)


def _port(value: str) -> int:
    if not value.strip().isdigit() or not 1 <= int(value) <= 65535:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port (1..65535)")
    return int(value)


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _ports(option: str, value: str) -> list[str]:
    """A comma list of ports or ``LOW:HIGH`` ranges (iptables ``--dport`` syntax)."""
    out = []
    for item in _csv(value):
        parts = item.split(":")
        if len(parts) > 2 or not all(p.isdigit() and 1 <= int(p) <= 65535 for p in parts) \
                or (len(parts) == 2 and int(parts[0]) > int(parts[1])):
            raise ValueError(f"{option}: {item!r} is not a port (1..65535) or a LOW:HIGH range")
        out.append(item)
    return out


def _cidrs(option: str, value: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    out = []
    for item in _csv(value):
        try:
            out.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"{option}: {item!r} is not an IP address or CIDR block") from None
    return out


def rules(args: argparse.Namespace, ipv6: bool = False) -> list[list[str]]:
    """The rule set as argument vectors (without the iptables binary).
    Raises ValueError for a malformed port list or CIDR."""
    nat = ["-t", "nat"]
    loopback = "::1/128" if ipv6 else "127.0.0.1/32"
    exclude_in = _ports("--exclude-inbound-ports", args.exclude_inbound_ports)
    exclude_out = _ports("--exclude-outbound-ports", args.exclude_outbound_ports)
    include_all = args.include_inbound_ports.strip() == "*"
    include_in = [] if include_all else _ports("--include-inbound-ports", args.include_inbound_ports)
    cidrs = _cidrs("--exclude-outbound-cidrs", args.exclude_outbound_cidrs)
    out: list[list[str]] = []
    for chain in CHAINS:
        out.append([*nat, "-N", chain])
    out.append([*nat, "-A", "PYPROXY_IN_REDIRECT", "-p", "tcp", "-j", "REDIRECT", "--to-ports", str(args.inbound_port)])
    out.append([*nat, "-A", "PYPROXY_REDIRECT", "-p", "tcp", "-j", "REDIRECT", "--to-ports", str(args.outbound_port)])

    # Inbound
    out.append([*nat, "-A", "PREROUTING", "-p", "tcp", "-j", "PYPROXY_INBOUND"])
    excluded_in = [str(p) for p in PROXY_PORTS] + exclude_in
    for port in dict.fromkeys(excluded_in):
        out.append([*nat, "-A", "PYPROXY_INBOUND", "-p", "tcp", "--dport", port, "-j", "RETURN"])
    if include_all:
        out.append([*nat, "-A", "PYPROXY_INBOUND", "-p", "tcp", "-j", "PYPROXY_IN_REDIRECT"])
    else:
        for port in dict.fromkeys(include_in):
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
    for port in dict.fromkeys(exclude_out):
        out.append([*nat, "-A", "PYPROXY_OUTPUT", "-p", "tcp", "--dport", port, "-j", "RETURN"])
    for cidr in cidrs:
        if (cidr.version == 6) == ipv6:
            out.append([*nat, "-A", "PYPROXY_OUTPUT", "-d", cidr.with_prefixlen, "-j", "RETURN"])
    out.append([*nat, "-A", "PYPROXY_OUTPUT", "-j", "PYPROXY_REDIRECT"])
    return out


def cleanup_rules() -> list[list[str]]:
    nat = ["-t", "nat"]
    out = [
        [*nat, "-D", "PREROUTING", "-p", "tcp", "-j", "PYPROXY_INBOUND"],
        [*nat, "-D", "OUTPUT", "-p", "tcp", "-j", "PYPROXY_OUTPUT"],
    ]
    for chain in CHAINS:
        out.append([*nat, "-F", chain])
    for chain in CHAINS:
        # Deleted only after every chain is flushed: they jump to each other.
        out.append([*nat, "-X", chain])
    return out


def _binaries(ipv6: bool) -> list[str]:
    return ["iptables", "ip6tables"] if ipv6 else ["iptables"]


def main(args: argparse.Namespace) -> int:
    """Print the rules; with ``--apply`` apply them (replacing earlier ones,
    and removing everything again if one fails); with ``--cleanup`` remove them."""
    plans = []
    try:
        for binary in _binaries(args.ipv6):
            plans.append((binary, cleanup_rules() if args.cleanup else rules(args, ipv6=binary == "ip6tables")))
    except ValueError as exc:
        print(f"pyproxy iptables: {exc}", file=sys.stderr)
        return 2
    if not (args.apply or args.cleanup):
        for binary, rule_set in plans:
            for r in rule_set:
                print(shlex.join([binary, *r]))
        return 0
    exes = {}
    for binary, _ in plans:
        exe = shutil.which(binary)
        if exe is None:
            print(f"pyproxy iptables: {binary} not found", file=sys.stderr)
            return 1
        exes[binary] = exe
    for binary, rule_set in plans:
        exe = exes[binary]
        if args.apply:
            _quiet(exe, cleanup_rules())  # start from a clean slate: --apply is idempotent
        for r in rule_set:
            res = subprocess.run([exe, *r], capture_output=True, text=True, check=False)
            if res.returncode != 0 and args.apply:
                print(f"pyproxy iptables: {shlex.join([binary, *r])}: {res.stderr.strip()}", file=sys.stderr)
                # Never leave half a rule set behind (some traffic captured, some not).
                for b, _ in plans:
                    _quiet(exes[b], cleanup_rules())
                return 1
            if res.returncode == 0:
                print(shlex.join([binary, *r]))
    return 0


def _quiet(exe: str, rule_set: list[list[str]]) -> None:
    """Run rules whose failure is expected (removing what may not exist)."""
    for r in rule_set:
        subprocess.run([exe, *r], capture_output=True, check=False)
