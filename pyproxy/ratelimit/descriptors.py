"""Rate-limit descriptors from a route's or virtual host's ``rate_limits``
actions, as Envoy builds them (``source/common/router/router_ratelimit.cc``).

One ``rate_limits`` entry gives at most one descriptor: its actions' entries
in order. An action that cannot produce its entry (a missing header, a
header_value_match that does not match) drops the whole descriptor;
``request_headers`` with ``skip_if_absent`` adds nothing and keeps it. A
descriptor with no entry is not sent. ``:path`` is the whole request target,
query string included (verified on Envoy 1.40).

The request is read through a small set of attributes (``hdict``,
``headers``, ``target``, ``path``, ``query``, ``authority``, ``method``,
``scheme``, ``conn.peer_ip_bytes``, ``target_choice``, ``port``), which the
Exchange has and unit tests fake.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import re2

from ..config.model import HeaderMatcherSpec, RateLimitActionSpec, RateLimitSpec

Descriptor = tuple[tuple[bytes, bytes], ...]
# An action: the entry it adds, SKIP (nothing, descriptor kept) or None (descriptor dropped).
Action = Callable[[Any], "tuple[bytes, bytes] | bytes | None"]
SKIP = b""


def request_header(ex: Any, name: bytes) -> bytes | None:
    """A request header as Envoy's actions see it; pseudo-headers from the request line."""
    if name[:1] == b":":
        if name == b":path":
            target = ex.target
            if target[:1] == b"/":
                return target  # path and query as sent
            return ex.path + (b"?" + ex.query if ex.query else b"")
        if name == b":authority":
            return ex.authority
        if name == b":method":
            return ex.method
        if name == b":scheme":
            return ex.scheme
        return None
    if name == b"host":
        return ex.authority
    return ex.hdict.get(name)


def _first_value(ex: Any, name: bytes) -> bytes | None:
    """Envoy's request_headers action takes the first value of a repeated header."""
    value = request_header(ex, name)
    if value is not None and name[:1] != b":" and len(ex.hdict) != len(ex.headers):
        for n, v in ex.headers:
            if n == name:
                return v  # type: ignore[no-any-return]
    return value


class HeaderMatcher:
    """Envoy's HeaderMatcher on the request headers (repeated headers joined with ",")."""

    __slots__ = ("check", "ignore_case", "invert", "kind", "missing_as_empty", "name", "present", "value")

    def __init__(self, spec: HeaderMatcherSpec) -> None:
        self.name = spec.name.encode("latin-1")
        self.kind = spec.kind
        self.invert = spec.invert
        self.present = spec.present
        self.ignore_case = spec.ignore_case
        self.missing_as_empty = spec.missing_as_empty
        value = spec.value.encode()
        if spec.ignore_case:
            value = value.lower()
        self.value = value
        self.check: Callable[[bytes], bool]
        if spec.kind == "exact":
            self.check = value.__eq__
        elif spec.kind == "prefix":
            self.check = lambda v: v.startswith(value)
        elif spec.kind == "suffix":
            self.check = lambda v: v.endswith(value)
        elif spec.kind == "contains":
            self.check = lambda v: value in v
        elif spec.kind == "regex":
            pattern = re2.compile(spec.value.encode())
            self.check = lambda v: pattern.fullmatch(v) is not None
        else:
            self.check = lambda v: True

    def matches(self, ex: Any) -> bool:
        value = request_header(ex, self.name)
        if self.kind == "present":
            return ((value is not None) == self.present) != self.invert
        if value is None:
            if not self.missing_as_empty:
                return False
            value = b""
        if self.ignore_case:
            value = value.lower()
        return self.check(value) != self.invert


def _remote_from_xff(ex: Any) -> tuple[bytes, bytes] | None:
    """A sidecar (Envoy's use_remote_address: false, as istiod sets it):
    the rightmost x-forwarded-for address, else the peer."""
    xff = ex.hdict.get(b"x-forwarded-for")
    if xff:
        last = xff.rpartition(b",")[2].strip()
        if last:
            return (b"remote_address", last)
    peer = ex.conn.peer_ip_bytes
    return (b"remote_address", peer) if peer else None


def compile_action(spec: RateLimitActionSpec, source_cluster: bytes, gateway: bool = False) -> Action:
    """``gateway``: the proxy is an ingress (use_remote_address: true, the
    TCP peer is the remote address); a sidecar takes it from x-forwarded-for."""
    kind = spec.kind
    key = spec.key.encode()
    value = spec.value.encode()
    if kind == "generic_key":
        entry = (key, value)
        return lambda ex: entry
    if kind == "source_cluster":
        entry = (b"source_cluster", source_cluster)
        return lambda ex: entry
    if kind == "destination_cluster":
        return _destination_cluster
    if kind == "remote_address":
        if not gateway:
            return _remote_from_xff
        return lambda ex: (b"remote_address", ex.conn.peer_ip_bytes) if ex.conn.peer_ip_bytes else None
    if kind == "request_headers":
        name = spec.header_name.encode("latin-1")
        skip = spec.skip_if_absent

        def request_headers(ex: Any) -> tuple[bytes, bytes] | bytes | None:
            found = _first_value(ex, name)
            if found is None:
                return SKIP if skip else None
            return (key, found)

        return request_headers
    if kind == "header_value_match":
        matchers = tuple(HeaderMatcher(h) for h in spec.headers)
        expect = spec.expect_match
        entry = (key, value)

        def header_value_match(ex: Any) -> tuple[bytes, bytes] | None:
            matched = all(m.matches(ex) for m in matchers)
            return entry if matched == expect else None

        return header_value_match
    raise ValueError(f"unsupported rate-limit action {kind!r}")  # the loader refused it already


def _destination_cluster(ex: Any) -> tuple[bytes, bytes] | None:
    target = ex.target_choice
    if target is None:
        return None
    cluster = target.cluster_for(ex.port)
    return (b"destination_cluster", cluster.name.encode()) if cluster is not None else None


class CompiledRateLimit:
    """One ``rate_limits`` entry."""

    __slots__ = ("actions", "hits_addend", "needs_destination", "stage")

    def __init__(self, spec: RateLimitSpec, source_cluster: bytes, gateway: bool = False) -> None:
        self.stage = spec.stage
        self.hits_addend = spec.hits_addend
        self.actions = tuple(compile_action(a, source_cluster, gateway) for a in spec.actions)
        self.needs_destination = any(a.kind == "destination_cluster" for a in spec.actions)

    def descriptor(self, ex: Any) -> Descriptor | None:
        entries = []
        for action in self.actions:
            entry = action(ex)
            if entry is None:
                return None
            if entry:
                entries.append(entry)
        return tuple(entries) if entries else None  # type: ignore[arg-type]


def build(limits: tuple[CompiledRateLimit, ...], stage: int, ex: Any) -> list[tuple[Descriptor, int | None]]:
    """The descriptors (with their hits_addend) of the entries of ``stage``."""
    out = []
    for limit in limits:
        if limit.stage != stage:
            continue
        d = limit.descriptor(ex)
        if d is not None:
            out.append((d, limit.hits_addend))
    return out
