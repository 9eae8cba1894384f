"""Load balancers: pick one endpoint of a cluster for one attempt.

Each balancer sees only the cluster's healthy (non-ejected) endpoints; the
outlier detector's timer recomputes that list, never the request path.
``exclude`` holds endpoints already tried by this request: a retry prefers
another endpoint (Istio's previous_hosts predicate), but falls back to a
tried one rather than failing when nothing else is left.
"""

from __future__ import annotations

import bisect
import hashlib
import random
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..http.request import HashContext
    from .cluster import ClusterEndpoint
    from .settings import ClusterSettings

# Envoy's host_selection_retry_max_attempts as Istio sets it.
# A consistent-hash key: the request's bytes to hash, or None (no key: any host).
KeyFn = Callable[["HashContext"], "bytes | None"]

HOST_SELECTION_ATTEMPTS = 5


class LoadBalancer:
    __slots__ = ("hosts", "rng")

    def __init__(self, hosts: list[ClusterEndpoint], rng: random.Random) -> None:
        self.rng = rng
        self.hosts: list[ClusterEndpoint] = []
        self.on_hosts_changed(hosts)

    def on_hosts_changed(self, hosts: list[ClusterEndpoint]) -> None:
        self.hosts = hosts

    def choose(self, ex: HashContext | None) -> ClusterEndpoint | None:
        raise NotImplementedError

    def pick(self, ex: HashContext | None, exclude: Collection[ClusterEndpoint] | None = None) -> ClusterEndpoint | None:
        if not self.hosts:
            return None
        ep = self.choose(ex)
        if exclude and ep in exclude:
            for _ in range(HOST_SELECTION_ATTEMPTS):
                candidate = self.choose(ex)
                if candidate not in exclude:
                    return candidate
            for candidate in self.hosts:
                if candidate not in exclude:
                    return candidate
        return ep


class RoundRobin(LoadBalancer):
    __slots__ = ("index", "table")

    def on_hosts_changed(self, hosts: list[ClusterEndpoint]) -> None:
        self.hosts = hosts
        # Endpoint weights are honoured by repeating each endpoint in the
        # cycle, interleaved (reduced by the gcd so equal weights cost nothing).
        weights = [max(1, h.weight) for h in hosts]
        table: list[ClusterEndpoint] = []
        if weights and len(set(weights)) > 1:
            from functools import reduce
            from math import gcd

            g = reduce(gcd, weights)
            counts = [w // g for w in weights]
            for round_ in range(max(counts)):
                table.extend(h for h, c in zip(hosts, counts) if c > round_)
        else:
            table = list(hosts)
        self.table = table
        # Start at a random offset so a fleet of proxies doesn't move in lockstep.
        self.index = self.rng.randrange(len(table)) if table else 0

    def choose(self, ex: HashContext | None) -> ClusterEndpoint | None:
        table = self.table
        self.index = i = (self.index + 1) % len(table)
        return table[i]


class Random(LoadBalancer):
    __slots__ = ("cumulative", "total")

    def on_hosts_changed(self, hosts: list[ClusterEndpoint]) -> None:
        self.hosts = hosts
        acc = 0
        cumulative = []
        for h in hosts:
            acc += max(1, h.weight)
            cumulative.append(acc)
        self.cumulative = cumulative
        self.total = acc

    def choose(self, ex: HashContext | None) -> ClusterEndpoint | None:
        hosts = self.hosts
        if len(hosts) == 1:
            return hosts[0]
        return hosts[bisect.bisect_right(self.cumulative, self.rng.random() * self.total)]


class LeastRequest(LoadBalancer):
    """Envoy's LEAST_REQUEST. Equal endpoint weights: power of two random
    choices, the one with fewer active requests wins (ties go to the first
    draw), exactly Envoy's unweighted pick. Unequal weights: Envoy schedules
    by weight / (active + 1) (active_request_bias 1.0) with an EDF scheduler;
    here the same effective weights drive a weighted random draw."""

    __slots__ = ("weighted",)

    def on_hosts_changed(self, hosts: list[ClusterEndpoint]) -> None:
        self.hosts = hosts
        self.weighted = len({h.weight for h in hosts}) > 1

    def choose(self, ex: HashContext | None) -> ClusterEndpoint | None:
        hosts = self.hosts
        n = len(hosts)
        if n == 1:
            return hosts[0]
        rnd = self.rng.random
        if self.weighted:
            return self._weighted(hosts, rnd)
        a = hosts[int(rnd() * n)]
        b = hosts[int(rnd() * n)]
        return b if b.active_requests < a.active_requests else a

    @staticmethod
    def _weighted(hosts: list[ClusterEndpoint], rnd: Callable[[], float]) -> ClusterEndpoint:
        effective = [max(1, h.weight) / (h.active_requests + 1) for h in hosts]
        point = rnd() * sum(effective)
        for h, w in zip(hosts, effective):
            point -= w
            if point < 0:
                return h
        return hosts[-1]


def _hash64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


# Envoy's default minimum ring size; its maximum (8M entries) is far more than
# a Python process should build, so rings are capped lower (same stickiness,
# coarser balance only for huge requested sizes).
DEFAULT_RING_SIZE = 1024
MAX_RING_SIZE = 65536


class RingHash(LoadBalancer):
    """Consistent hashing on a ring (Envoy's RING_HASH; also used for
    MAGLEV, which gives the same stickiness guarantees for our purposes).

    The hash key comes from the request (header, cookie, query parameter or
    source IP) via ``key_fn``; a request without a key gets a random endpoint,
    as in Envoy. Ring positions depend only on endpoint addresses and weights,
    so the same key maps to the same endpoint across reloads that keep the
    endpoints.
    """

    __slots__ = ("key_fn", "min_ring_size", "points", "ring")

    def __init__(self, hosts: list[ClusterEndpoint], rng: random.Random, key_fn: KeyFn,
                 min_ring_size: int = DEFAULT_RING_SIZE) -> None:
        self.key_fn = key_fn
        self.min_ring_size = min(max(1, min_ring_size), MAX_RING_SIZE)
        self.ring: list[int] = []
        self.points: list[ClusterEndpoint] = []
        super().__init__(hosts, rng)

    def on_hosts_changed(self, hosts: list[ClusterEndpoint]) -> None:
        self.hosts = hosts
        if not hosts:
            self.ring, self.points = [], []
            return
        total_weight = sum(max(1, h.weight) for h in hosts)
        per_unit = max(1, min(-(-self.min_ring_size // total_weight), MAX_RING_SIZE // total_weight))
        entries: list[tuple[int, ClusterEndpoint]] = []
        for h in hosts:
            addr = h.address.encode()
            for i in range(per_unit * max(1, h.weight)):
                entries.append((_hash64(addr + b"_" + str(i).encode()), h))
        entries.sort(key=lambda e: e[0])
        self.ring = [e[0] for e in entries]
        self.points = [e[1] for e in entries]

    def choose(self, ex: HashContext | None) -> ClusterEndpoint | None:
        key = self.key_fn(ex) if ex is not None else None
        if key is None:
            return self.hosts[int(self.rng.random() * len(self.hosts))]
        return self.points[self._index(_hash64(key))]

    def _index(self, h: int) -> int:
        i = bisect.bisect_left(self.ring, h)
        return 0 if i == len(self.ring) else i

    def pick(self, ex: HashContext | None, exclude: Collection[ClusterEndpoint] | None = None) -> ClusterEndpoint | None:
        if not self.hosts:
            return None
        key = self.key_fn(ex) if ex is not None else None
        if key is None:
            return LoadBalancer.pick(self, None, exclude)
        i = self._index(_hash64(key))
        points = self.points
        ep = points[i]
        if exclude and ep in exclude:
            # A retry walks the ring to the next endpoint not tried yet, so
            # the fallback is as deterministic as the first choice.
            n = len(points)
            for step in range(1, n):
                candidate = points[(i + step) % n]
                if candidate not in exclude:
                    return candidate
        return ep


def _header_key(name: str) -> KeyFn:
    key = name.lower().encode("latin-1")

    def key_fn(ex: HashContext) -> bytes | None:
        return ex.hdict.get(key)

    return key_fn


def _query_key(name: str) -> KeyFn:
    def key_fn(ex: HashContext) -> bytes | None:
        value = ex.query_params().get(name)
        return None if value is None else value.encode()

    return key_fn


def _source_ip_key(ex: HashContext) -> bytes | None:
    return ex.conn.peer_ip.encode()


def _cookie_key(name: str, generate: bool) -> KeyFn:
    def key_fn(ex: HashContext) -> bytes | None:
        value = ex.cookie(name)
        if not value and generate:
            # Envoy generates the cookie only when the policy has a ttl; the
            # exchange sends it back with Set-Cookie.
            value = ex.new_hash_cookie(name)
        return value.encode("latin-1") if value else None

    return key_fn


def make_balancer(settings: ClusterSettings, hosts: list[ClusterEndpoint], rng: random.Random) -> LoadBalancer:
    policy = settings.lb_policy
    if policy == "CONSISTENT_HASH" and settings.consistent_hash is not None:
        ch = settings.consistent_hash
        if ch.http_header_name:
            key_fn = _header_key(ch.http_header_name)
        elif ch.http_cookie is not None:
            key_fn = _cookie_key(ch.http_cookie.name, ch.http_cookie.ttl is not None)
        elif ch.http_query_parameter_name:
            key_fn = _query_key(ch.http_query_parameter_name)
        elif ch.use_source_ip:
            key_fn = _source_ip_key
        else:
            key_fn = lambda ex: None
        return RingHash(hosts, rng, key_fn, ch.minimum_ring_size or DEFAULT_RING_SIZE)
    if policy == "ROUND_ROBIN":
        return RoundRobin(hosts, rng)
    if policy == "RANDOM":
        return Random(hosts, rng)
    # LEAST_REQUEST, LEAST_CONN (alias), UNSPECIFIED, PASSTHROUGH: Istio's default.
    return LeastRequest(hosts, rng)
