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

from ..http.headers import RESPONSE_DROP
from .matchers import Check

if TYPE_CHECKING:
    from ..filters.chain import RouteFilter
    from ..filters.fault import FaultPolicy
    from ..http.request import RequestView
    from ..upstream.cluster import Cluster
    from ..upstream.retry import RetryPolicy

ROUTE = 0
REDIRECT = 1
DIRECT_RESPONSE = 2


_AUTHORITY_NAMES = (b"host", b":authority")


class HeaderOps:
    """Compiled ``headers.request|response`` operations.

    Envoy evaluates one header parser as: every ``remove`` first, then the
    ``set`` (OVERWRITE_IF_EXISTS_OR_ADD) and ``add`` (APPEND_IF_EXISTS_OR_ADD)
    entries in order (Istio emits ``set`` before ``add``). Because every
    operation is static, any chain of parsers reduces at build time to two
    things: the header names dropped from the incoming list and the entries
    appended after it. Applying it is one list comprehension.

    ``set`` of ``host``/``:authority`` is not a header operation: Istio turns
    it into the route's host rewrite (``authority``).
    """

    __slots__ = ("added", "added_lines", "authority", "drop", "fused_drop", "ops", "removes")

    def __init__(self, remove: tuple[str, ...] = (), set_: tuple[tuple[str, str], ...] = (),
                 add: tuple[tuple[str, str], ...] = ()) -> None:
        authority = None
        for n, v in add:
            if n.lower() in ("host", ":authority"):
                authority = v.encode("utf-8")
        for n, v in set_:
            if n.lower() in ("host", ":authority"):
                authority = v.encode("utf-8")  # Istio: set wins over add
        self.authority = authority
        self.removes = frozenset(n.lower().encode("latin-1") for n in remove) - set(_AUTHORITY_NAMES)
        ops: list[tuple[bytes, bytes, bool]] = []
        for pairs, overwrite in ((set_, True), (add, False)):
            for n, v in pairs:
                name = n.lower().encode("latin-1")
                if name not in _AUTHORITY_NAMES:
                    ops.append((name, v.encode("utf-8"), overwrite))
        self.ops = tuple(ops)
        self.drop, self.added = _reduce(self.removes, self.ops)
        self._fuse()

    def _fuse(self) -> None:
        """Response side: when the operations touch no framing or hop-by-hop
        field, the exchange drops ``fused_drop`` (its own drop set plus
        ``RESPONSE_DROP``) in the same pass that serialises the head and
        appends ``added_lines``, instead of copying the header list first.
        ``fused_drop`` is None when that would change what the head says."""
        if self.drop & RESPONSE_DROP or any(n in RESPONSE_DROP for n, _ in self.added):
            self.fused_drop = None
        else:
            self.fused_drop = RESPONSE_DROP | self.drop
        self.added_lines = b"".join(n + b": " + v + b"\r\n" for n, v in self.added)

    @classmethod
    def _of(cls, removes: frozenset[bytes], ops: tuple[tuple[bytes, bytes, bool], ...],
            drop: frozenset[bytes], added: tuple[tuple[bytes, bytes], ...], authority: bytes | None) -> HeaderOps:
        self = cls.__new__(cls)
        self.removes, self.ops, self.drop, self.added, self.authority = removes, ops, drop, added, authority
        self._fuse()
        return self

    def merged(self, later: HeaderOps | None) -> HeaderOps:
        """One Envoy header parser holding this parser's entries followed by
        ``later``'s (Istio's single-destination route: route-level operations,
        then the destination's, in one list). Removes of both run first."""
        if later is None:
            return self
        removes = self.removes | later.removes
        ops = self.ops + later.ops
        drop, added = _reduce(removes, ops)
        return HeaderOps._of(removes, ops, drop, added, self.authority or later.authority)

    def then(self, later: HeaderOps | None) -> HeaderOps:
        """This parser evaluated first, then ``later`` on its result (Envoy's
        weighted cluster headers, then the route's)."""
        if later is None:
            return self
        drop = self.drop | later.drop
        added = tuple(h for h in self.added if h[0] not in later.drop) + later.added
        return HeaderOps._of(self.removes | later.removes, self.ops + later.ops, drop, added,
                             later.authority or self.authority)

    def __bool__(self) -> bool:
        return bool(self.drop or self.added)

    def apply(self, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        drop = self.drop
        out = [h for h in headers if h[0] not in drop] if drop else list(headers)
        if self.added:
            out.extend(self.added)
        return out


def _reduce(removes: frozenset[bytes], ops: tuple[tuple[bytes, bytes, bool], ...]
            ) -> tuple[frozenset[bytes], tuple[tuple[bytes, bytes], ...]]:
    """(names dropped from the incoming headers, entries appended) for one parser."""
    drop = set(removes)
    added: list[tuple[bytes, bytes]] = []
    for name, value, overwrite in ops:
        if overwrite:
            drop.add(name)
            added = [h for h in added if h[0] != name]
        added.append((name, value))
    return frozenset(drop), tuple(added)


class RouteTarget:
    """One weighted destination of a route: a cluster (or None when the
    subset or host is unknown: 503 NC at request time)."""

    __slots__ = (
        "authority",
        "by_port",
        "cluster",
        "host",
        "port",
        "request_ops",
        "response_ops",
        "subset",
        "weight",
    )

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
        # Until ``finalize_ops``: this destination's own operations; after it,
        # everything applied to a request sent to this destination (the
        # route's operations included) and the authority to send.
        self.request_ops = request_ops
        self.response_ops = response_ops
        self.authority: bytes | None = None

    def finalize_ops(self, route_req: HeaderOps | None, route_resp: HeaderOps | None,
                     route_authority: bytes | None, single: bool) -> None:
        """Combine the route's and this destination's operations the way
        Istio programs Envoy: a rule with one destination puts both in the
        route's header lists (route entries first, so the destination's
        ``set`` wins); with several destinations the destination's go on the
        weighted cluster, which Envoy evaluates before the route's (so the
        route's ``set``/``remove`` win). A route-level authority (rewrite or
        ``set: {host: ...}``) always wins over the destination's."""
        own_req, own_resp = self.request_ops, self.response_ops
        own_authority = own_req.authority if own_req is not None else None
        self.request_ops = _combine(route_req, own_req, single)
        self.response_ops = _combine(route_resp, own_resp, single)
        self.authority = route_authority or own_authority

    def cluster_for(self, port: int) -> Cluster | None:
        if self.by_port:
            return self.by_port.get(port, self.cluster)
        return self.cluster


def _combine(route: HeaderOps | None, dest: HeaderOps | None, single: bool) -> HeaderOps | None:
    if route is None:
        ops = dest
    elif dest is None:
        ops = route
    else:
        ops = route.merged(dest) if single else dest.then(route)
    return ops if ops else None


class CompiledRoute:
    __slots__ = (
        "catch_all",
        "conditions",
        "cors",
        "cumulative",
        "direct",
        "fault",
        "filters",
        "kind",
        "mirrors",
        "name",
        "names",
        "origin",
        "redirect",
        "request_ops",
        "response_ops",
        "retry",
        "rewrite",
        "targets",
        "timeout",
        "total",
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
        # The filter chain (filters/chain.py): () when no filter has work here.
        self.filters: tuple[RouteFilter, ...] = ()
        self.request_ops: HeaderOps | None = None
        self.response_ops: HeaderOps | None = None
        self.rewrite: Any = None
        self.redirect: Any = None
        self.direct: Any = None
        self.virtual_host = ""
        # Envoy route name per match entry: "<rule name>.<match name>" as
        # Istio builds it (one Envoy route per entry).
        self.names: tuple[str, ...] = ("",)
        self.catch_all = False  # some match entry accepts every request (later rules unreachable)

    def name_for(self, match_index: int) -> str:
        names = self.names
        return names[match_index] if 0 <= match_index < len(names) else self.name

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
    __slots__ = ("default_port", "has_vs", "name", "ports", "routes", "service")

    def __init__(self, name: str, routes: tuple[CompiledRoute, ...], service: Any,
                 has_vs: bool) -> None:
        self.name = name
        self.routes = routes
        self.service = service
        self.has_vs = has_vs
        self.ports: frozenset[int] = frozenset(p.number for p in service.ports) if service else frozenset()
        self.default_port = service.ports[0].number if service and service.ports else 80

    def match(self, ex: RequestView) -> CompiledRoute | None:
        """First matching route; records the index of its first matching
        ``match[]`` entry on ``ex`` (0 for a rule without match entries).
        The one implementation of the rule: the request path and the tests
        call it."""
        for route in self.routes:
            conditions = route.conditions
            if not conditions:
                ex.match_index = 0
                return route
            for i, checks in enumerate(conditions):
                for check in checks:
                    if not check(ex):
                        break
                else:
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
        if host[-1:] == b"." and len(host) > 1:
            # An absolute name ("reviews.default.svc.cluster.local."): istiod
            # adds each host's FQDN with the trailing dot to its virtual host's
            # domains (PILOT_ENABLE_ABSOLUTE_FQDN_VHOST_DOMAIN, on by default
            # since Istio 1.27); short aliases get no dotted form.
            name = host[:-1]
            vh = self.exact.get(name)
            if vh is not None and vh.name.encode() == name:
                return vh
            host = name
            for suffix, vh in self.wildcards:
                if host.endswith(suffix):
                    return vh
            return self.catch_all
        for suffix, vh in self.wildcards:
            if host.endswith(suffix):
                return vh
        return self.catch_all
