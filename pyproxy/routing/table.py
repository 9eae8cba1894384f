"""Compiled route tables.

A ``VirtualHost`` holds the ordered routes for one destination host (all
VirtualService rules for it, concatenated in load order). The ``HostIndex``
finds the virtual host for a request's authority in O(1) for exact names and
in O(#wildcards) otherwise, so the cost of matching does not grow with the
number of VirtualServices for other hosts.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .matchers import Check

if TYPE_CHECKING:
    from ..filters.fault import FaultPolicy
    from ..upstream.cluster import Cluster
    from ..upstream.retry import RetryPolicy

ROUTE = 0
REDIRECT = 1
DIRECT_RESPONSE = 2


class HeaderOps:
    """Compiled ``headers.request|response`` operations (Envoy order:
    remove first, then set, then add)."""

    __slots__ = ("remove", "set", "add", "set_names", "authority")

    def __init__(self, remove: tuple[str, ...] = (), set_: tuple[tuple[str, str], ...] = (),
                 add: tuple[tuple[str, str], ...] = ()) -> None:
        self.remove = frozenset(n.lower().encode("latin-1") for n in remove)
        self.set = tuple((n.lower().encode("latin-1"), v.encode("utf-8")) for n, v in set_)
        self.add = tuple((n.lower().encode("latin-1"), v.encode("utf-8")) for n, v in add)
        self.set_names = frozenset(n for n, _ in self.set)
        # ``set`` of host/:authority rewrites the authority (Envoy treats
        # :authority and Host as the same header on HTTP/1.1).
        authority = None
        for n, v in self.set:
            if n in (b"host", b":authority"):
                authority = v
        self.authority = authority

    def __bool__(self) -> bool:
        return bool(self.remove or self.set or self.add)

    def apply(self, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        drop = self.remove | self.set_names
        out = [h for h in headers if h[0] not in drop] if drop else list(headers)
        for n, v in self.set:
            if n not in (b"host", b":authority"):
                out.append((n, v))
        out.extend(h for h in self.add if h[0] not in (b"host", b":authority"))
        return out


class RouteTarget:
    """One weighted destination of a route: a cluster (or None when the
    subset or host is unknown: 503 NC at request time)."""

    __slots__ = ("host", "subset", "port", "cluster", "by_port", "request_ops", "response_ops", "weight")

    def __init__(self, host: str, subset: str, port: int | None, weight: int,
                 request_ops: HeaderOps | None, response_ops: HeaderOps | None) -> None:
        self.host = host
        self.subset = subset
        self.port = port
        self.weight = weight
        self.cluster: Cluster | None = None
        # When the destination has no port and its service has several, the
        # cluster follows the port the request addressed.
        self.by_port: dict[int, Cluster] = {}
        self.request_ops = request_ops
        self.response_ops = response_ops

    def cluster_for(self, port: int) -> Cluster | None:
        if self.by_port:
            return self.by_port.get(port, self.cluster)
        return self.cluster


class CompiledRoute:
    __slots__ = (
        "name",
        "origin",
        "conditions",
        "kind",
        "targets",
        "cumulative",
        "total",
        "timeout",
        "retry",
        "fault",
        "mirrors",
        "cors",
        "request_ops",
        "response_ops",
        "rewrite",
        "redirect",
        "direct",
        "virtual_host",
    )

    def __init__(self) -> None:
        self.name = ""
        self.origin = ""
        self.conditions: tuple[tuple[Check, ...], ...] = ()  # OR of ANDs; () = match all
        self.kind = ROUTE
        self.targets: tuple[RouteTarget, ...] = ()
        self.cumulative: list[int] = []
        self.total = 0
        self.timeout: float | None = None
        self.retry: RetryPolicy = None  # type: ignore[assignment]
        self.fault: FaultPolicy | None = None
        self.mirrors: tuple[Any, ...] = ()
        self.cors: Any = None
        self.request_ops: HeaderOps | None = None
        self.response_ops: HeaderOps | None = None
        self.rewrite: Any = None
        self.redirect: Any = None
        self.direct: Any = None
        self.virtual_host = ""

    def match_index(self, ex: Any) -> int:
        """Index of the first ``match[]`` entry the request satisfies (0 for a
        rule without match), or -1."""
        conditions = self.conditions
        if not conditions:
            return 0
        i = 0
        for checks in conditions:
            for check in checks:
                if not check(ex):
                    break
            else:
                return i
            i += 1
        return -1

    def set_targets(self, targets: list[RouteTarget]) -> None:
        """Weights are relative; weight-0 destinations are dropped; a single
        destination takes 100% whatever its weight."""
        if len(targets) > 1:
            targets = [t for t in targets if t.weight > 0] or targets[:1]
        self.targets = tuple(targets)
        acc = 0
        cumulative = []
        for t in self.targets:
            acc += max(t.weight, 0) if len(self.targets) > 1 else 1
            cumulative.append(acc)
        self.cumulative = cumulative
        self.total = acc

    def pick(self, rng: Any) -> RouteTarget:
        targets = self.targets
        if len(targets) == 1:
            return targets[0]
        return targets[bisect.bisect_right(self.cumulative, rng.random() * self.total)]


class VirtualHost:
    __slots__ = ("name", "routes", "service", "default_port", "ports", "has_vs")

    def __init__(self, name: str, routes: tuple[CompiledRoute, ...], service: Any,
                 has_vs: bool) -> None:
        self.name = name
        self.routes = routes
        self.service = service
        self.has_vs = has_vs
        self.ports: frozenset[int] = frozenset(p.number for p in service.ports) if service else frozenset()
        self.default_port = service.ports[0].number if service and service.ports else 80

    def effective_port(self, port: int | None) -> int:
        """The service port a request addressed: its own port when the service
        has it, else the service's first port (a request sent to the sidecar's
        own listener port, or with no port, names the service, not a port)."""
        if port is not None and (port in self.ports or not self.ports):
            return port
        return self.default_port

    def match(self, ex: Any) -> CompiledRoute | None:
        """First matching route; records the matching entry's index on ``ex``."""
        for route in self.routes:
            i = route.match_index(ex)
            if i >= 0:
                ex.match_index = i
                return route
        return None


@dataclass(slots=True)
class HostIndex:
    exact: dict[bytes, VirtualHost]
    # (suffix, vhost) for ``*.example.com`` hosts, longest suffix first
    wildcards: list[tuple[bytes, VirtualHost]]
    catch_all: VirtualHost | None

    def lookup(self, host: bytes) -> VirtualHost | None:
        vh = self.exact.get(host)
        if vh is not None:
            return vh
        for suffix, vh in self.wildcards:
            if host.endswith(suffix):
                return vh
        return self.catch_all
