"""``pyproxy validate PATH...``: load configuration and report every problem.

Like ``istioctl analyze``, it reports more than what makes a file invalid:
it builds the configuration as the running proxies would (a sidecar, and a
gateway for every Gateway the config defines or a VirtualService names) and
reports what they would warn about: a route to a subset no DestinationRule
defines, rules after a match-all that can never match, a VirtualService
bound to no proxy or for no service in the registry, a DestinationRule for
a host not in the registry. Each finding is reported once, however many
proxies or hosts it affects.
"""

from __future__ import annotations

import asyncio
import random
import sys

from .loader import load_paths
from .model import Gateway, LoadedConfig, VirtualService


def main(paths: list[str]) -> int:
    """Load ``paths`` and report; returns 0 if there are no errors, else 1.

    Each warning is printed to stderr as ``warning: FILE#N: path: message``
    and each error as ``FILE#N: path: message`` (``str(Diagnostic)``). The
    summary line (``N files, M resources: OK`` or ``K errors``) goes to stdout.
    """
    config = load_paths(paths)
    for warning in config.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    for error in config.errors:
        print(error, file=sys.stderr)
    if config.errors:
        count = len(config.errors)
        print(f"{count} error{'' if count == 1 else 's'}")
        return 1
    for finding in analyze(config):
        print(f"warning: {finding}", file=sys.stderr)
    print(f"{len(config.files)} files, {len(config.resources)} resources: OK")
    return 0


def analyze(config: LoadedConfig) -> list[str]:
    """The warnings the proxies running this (valid) config would log, once each."""
    from ..snapshot import GATEWAY_ONLY, BuildContext, ProxyIdentity, build_snapshot

    gateways: list[str] = []
    for r in config.resources:
        names: list[str] = []
        if isinstance(r, Gateway):
            names = [f"{r.meta.namespace}/{r.meta.name}"]
        elif isinstance(r, VirtualService):
            names = [g if "/" in g else f"{r.meta.namespace}/{g}" for g in r.gateways if g != "mesh"]
        gateways.extend(n for n in names if n not in gateways)
    identities = [ProxyIdentity(), *(ProxyIdentity(gateway=g) for g in gateways)]
    findings: dict[str, None] = {}
    # Clusters are built on a loop that never runs: nothing is connected or resolved.
    loop = asyncio.new_event_loop()
    try:
        for identity in identities:
            snap = build_snapshot(config, identity, BuildContext(loop, random.Random(0)))
            # A Gateway named by a VirtualService but not defined is reported
            # once, for the VirtualService; not again as the gateway proxy's.
            # A sidecar's note that a gateway's VirtualService is not its own is
            # no finding here, where the gateway is analyzed as well.
            missing = f"Gateway {identity.gateway} (--gateway) is not in the config"
            findings.update(dict.fromkeys(
                w for w in snap.warnings
                if not w.startswith(missing) and (identity.gateway or f": {GATEWAY_ONLY} " not in w)))
    finally:
        loop.close()
    return list(findings)
