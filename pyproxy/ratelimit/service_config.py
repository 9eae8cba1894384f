"""The envoyproxy/ratelimit service's own configuration, and its decision.

pyproxy reads the same YAML as the service's ``ratelimit-config`` ConfigMap
(``domain`` + nested ``descriptors`` with ``rate_limit: {unit,
requests_per_unit}``), matches request descriptors against it exactly as the
service does (rls: src/config/config_impl.go ``GetLimit``), and counts in
Redis with the service's fixed-window algorithm and key scheme (rls:
src/limiter/cache_key.go, src/redis/fixed_cache_impl.go,
src/limiter/base_limiter.go), so pyproxy sidecars and an Envoy + ratelimit
deployment sharing the Redis enforce one limit together.

Matching, level by level: a request descriptor with N entries is matched
against N levels of config; at each level ``key_value`` is tried first, then
wildcard values of that level (``*`` matches any run of characters), then
``key`` alone. A limit applies only when it sits at the request descriptor's
last entry. A matched entry with neither ``rate_limit`` nor children is
whitelisted (no limit). No match: no limit.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import yaml

from ..config.model import Diagnostic

UNITS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400, "week": 604800, "month": 2592000,
         "year": 31536000}
RATE_LIMIT_FIELDS = frozenset({"unit", "requests_per_unit", "unlimited", "name", "replaces"})
DESCRIPTOR_FIELDS = frozenset({"key", "value", "rate_limit", "descriptors", "shadow_mode", "detailed_metric",
                               "value_to_metric", "share_threshold"})
MAX_FILE_BYTES = 16 * 1024 * 1024

Descriptor = tuple[tuple[bytes, bytes], ...]


@dataclass(frozen=True, slots=True)
class Limit:
    requests_per_unit: int
    unit: str
    divider: int  # seconds in the unit
    unlimited: bool = False
    shadow_mode: bool = False
    name: str = ""
    replaces: tuple[str, ...] = ()
    # "key_value" path in the config, for logs and /config_dump.
    full_key: str = ""


@dataclass(slots=True)
class Level:
    """The descriptors of one level: by "key_value", by "key", and the
    wildcard ones in file order."""

    exact: dict[bytes, Node] = field(default_factory=dict)
    wildcards: list[tuple[re.Pattern[bytes], Node]] = field(default_factory=list)


@dataclass(slots=True)
class Node:
    limit: Limit | None
    children: Level | None
    # share_threshold: every value a wildcard matches counts in one key
    # (the wildcard as written stands for the value in the cache key).
    shared_value: bytes | None = None


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    """Every domain's descriptor tree, plus where it was read from."""

    domains: dict[str, Level]
    files: tuple[str, ...] = ()

    def limit_for(self, domain: str, descriptor: Descriptor) -> tuple[Limit | None, Descriptor]:
        """The limit for one request descriptor and the descriptor as it is
        keyed (values a ``share_threshold`` wildcard matched are replaced)."""
        level = self.domains.get(domain)
        if level is None:
            return None, descriptor
        found: Limit | None = None
        keyed = list(descriptor)
        last = len(descriptor) - 1
        for i, (key, value) in enumerate(descriptor):
            node = level.exact.get(key + b"_" + value)
            if node is None and level.wildcards:
                composite = key + b"_" + value
                for pattern, candidate in level.wildcards:
                    if pattern.fullmatch(composite):
                        node = candidate
                        if candidate.shared_value is not None:
                            keyed[i] = (key, candidate.shared_value)
                        break
            if node is None:
                node = level.exact.get(key)
            if node is not None and node.limit is not None and i == last:
                found = node.limit
            if node is None or node.children is None:
                break
            level = node.children
        return found, tuple(keyed)


# -- loading ----------------------------------------------------------------------


def expand(paths: Sequence[str]) -> list[str]:
    """The files of ``--ratelimit-config``: files as given, a directory's
    ``*.yaml``/``*.yml`` files sorted by name (hidden ones skipped, as the
    mesh config and ConfigMap mounts)."""
    files: list[str] = []
    for path in paths:
        if os.path.isdir(path):
            for name in sorted(os.listdir(path)):
                full = os.path.join(path, name)
                if not name.startswith(".") and name.endswith((".yaml", ".yml")) and os.path.isfile(full):
                    files.append(full)
        else:
            files.append(path)
    return files


def load_service_config(paths: Sequence[str]) -> tuple[ServiceConfig | None, list[Diagnostic]]:
    """Load the service's YAML files; (config, errors). Any error rejects the
    whole set (the previous configuration stays in force)."""
    errors: list[Diagnostic] = []
    domains: dict[str, Level] = {}
    where: dict[str, str] = {}
    files = expand(paths)
    if not files:
        errors.append(Diagnostic(",".join(paths), None, "", "no rate-limit configuration file found"))
    for file in files:
        try:
            with open(file, "rb") as fh:
                data = fh.read(MAX_FILE_BYTES + 1)
        except OSError as exc:
            errors.append(Diagnostic(file, None, "", f"cannot read file: {exc.strerror or exc}"))
            continue
        if len(data) > MAX_FILE_BYTES:
            errors.append(Diagnostic(file, None, "", "file is too large"))
            continue
        errors.extend(load_text(data.decode("utf-8", "replace"), file, domains, where))
    if errors:
        return None, errors
    return ServiceConfig(domains, tuple(files)), []


def load_text(text: str, file: str, domains: dict[str, Level] | None = None,
              where: dict[str, str] | None = None) -> list[Diagnostic]:
    """Parse one file's documents into ``domains``; the errors."""
    domains = {} if domains is None else domains
    where = {} if where is None else where
    errors: list[Diagnostic] = []
    try:
        docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f"line {mark.line + 1}: " if mark is not None else ""
        return [Diagnostic(file, None, "", f"{at}invalid YAML: {getattr(exc, 'problem', None) or exc}")]
    for index, doc in enumerate(docs):
        if doc is None:
            continue
        p = _Parser(file, index, errors)
        if not isinstance(doc, dict):
            p.error("", "a rate-limit configuration must be a mapping with domain and descriptors")
            continue
        for key in doc:
            if key not in ("domain", "descriptors"):
                p.error(str(key), "unknown field (the ratelimit service rejects it)")
        domain = doc.get("domain")
        if not isinstance(domain, str) or not domain:
            p.error("domain", "is required (a non-empty string)")
            continue
        if domain in domains:
            p.error("domain", f"domain {domain!r} is already defined in {where[domain]}")
            continue
        level = p.level(doc.get("descriptors"), "descriptors", domain)
        if level is not None:
            domains[domain] = level
            where[domain] = f"{file}#{index}"
    return errors


class _Parser:
    def __init__(self, file: str, doc: int, errors: list[Diagnostic]) -> None:
        self.file = file
        self.doc = doc
        self.errors = errors

    def error(self, path: str, message: str) -> None:
        self.errors.append(Diagnostic(self.file, self.doc, path, message))

    def level(self, items: object, path: str, parent_key: str) -> Level | None:
        if items is None:
            return Level()
        if not isinstance(items, list):
            self.error(path, "must be a list")
            return None
        level = Level()
        seen: set[bytes] = set()
        for i, item in enumerate(items):
            at = f"{path}[{i}]"
            if not isinstance(item, dict):
                self.error(at, "must be a mapping")
                continue
            for k in item:
                if k not in DESCRIPTOR_FIELDS:
                    self.error(f"{at}.{k}", "unknown field (the ratelimit service rejects it)")
            key = item.get("key")
            if not isinstance(key, str) or not key:
                self.error(f"{at}.key", "is required (a non-empty string)")
                continue
            value = item.get("value", "")
            if value is None:
                value = ""
            if not isinstance(value, str):
                # YAML turns unquoted numbers into ints; the service reads strings.
                value = str(value).lower() if isinstance(value, bool) else str(value)
            composite = f"{key}_{value}" if value else key
            shadow = self.flag(item, "shadow_mode", at)
            share = self.flag(item, "share_threshold", at)
            self.flag(item, "detailed_metric", at)
            self.flag(item, "value_to_metric", at)
            limit = self.rate_limit(item.get("rate_limit"), f"{at}.rate_limit", f"{parent_key}.{composite}", shadow)
            children = None
            if item.get("descriptors") is not None:
                children = self.level(item["descriptors"], f"{at}.descriptors", f"{parent_key}.{composite}")
            node = Node(limit, children)
            encoded = composite.encode()
            if encoded in seen:
                self.error(at, f"duplicate descriptor composite key {composite!r}")
                continue
            seen.add(encoded)
            if "*" in value:
                if share:
                    node.shared_value = value.encode()
                pattern = re.compile(b".*".join(re.escape(part.encode()) for part in composite.split("*")),
                                     re.DOTALL)
                level.wildcards.append((pattern, node))
            else:
                if share:
                    self.error(f"{at}.share_threshold", "applies only to a value with a wildcard (*)")
                level.exact[encoded] = node
        return level

    def flag(self, item: dict, name: str, at: str) -> bool:
        value = item.get(name, False)
        if not isinstance(value, bool):
            self.error(f"{at}.{name}", "must be true or false")
            return False
        return value

    def rate_limit(self, data: object, at: str, full_key: str, shadow: bool) -> Limit | None:
        if data is None:
            return None
        if not isinstance(data, dict):
            self.error(at, "must be a mapping")
            return None
        for k in data:
            if k not in RATE_LIMIT_FIELDS:
                self.error(f"{at}.{k}", "unknown field (the ratelimit service rejects it)")
        unlimited = data.get("unlimited", False)
        if not isinstance(unlimited, bool):
            self.error(f"{at}.unlimited", "must be true or false")
            return None
        name = data.get("name", "") or ""
        replaces = []
        for j, r in enumerate(data.get("replaces") or ()):
            if not isinstance(r, dict) or not isinstance(r.get("name"), str) or not r["name"]:
                self.error(f"{at}.replaces[{j}]", "must be a mapping with a non-empty name")
            else:
                replaces.append(r["name"])
        unit = data.get("unit")
        if unlimited:
            if unit is not None:
                self.error(f"{at}.unit", "must not be set with unlimited: true")
                return None
            return Limit(0, "", 1, unlimited=True, shadow_mode=shadow, name=str(name),
                         replaces=tuple(replaces), full_key=full_key)
        if not isinstance(unit, str) or unit.lower() not in UNITS:
            self.error(f"{at}.unit", f"must be one of {', '.join(UNITS)}, got {unit!r}")
            return None
        rpu = data.get("requests_per_unit", 0)
        if isinstance(rpu, bool) or not isinstance(rpu, int) or not 0 <= rpu <= 2**32 - 1:
            self.error(f"{at}.requests_per_unit", "must be an integer >= 0")
            return None
        return Limit(rpu, unit.lower(), UNITS[unit.lower()], shadow_mode=shadow, name=str(name),
                     replaces=tuple(replaces), full_key=full_key)


# -- the decision ---------------------------------------------------------------------

OK = 1
OVER_LIMIT = 2


@dataclass(frozen=True, slots=True)
class Check:
    """What one request asks Redis: for each descriptor with a limit to
    count, (index, cache key, expiry, limit)."""

    domain: str
    limits: tuple[Limit | None, ...]
    keys: tuple[tuple[int, bytes, int, Limit], ...]


def window_start(now: int, divider: int) -> int:
    """The service's fixed window: aligned to the epoch."""
    return (now // divider) * divider


def cache_key(prefix: bytes, domain: bytes, descriptor: Descriptor, divider: int, now: int) -> bytes:
    """rls cache_key.go: ``<prefix><domain>_<k1>_<v1>_..._<kN>_<vN>_<window start>``."""
    parts = [prefix, domain, b"_"]
    for key, value in descriptor:
        parts += (key, b"_", value, b"_")
    parts.append(str(window_start(now, divider)).encode())
    return b"".join(parts)


def plan(config: ServiceConfig, domain: str, descriptors: Iterable[Descriptor], now: int,
         prefix: bytes = b"", jitter: Iterable[int] | None = None) -> Check:
    """The limits of a request's descriptors and the keys to increment.

    ``replaces``: a limit named by another matched limit's ``replaces`` is
    dropped (service/ratelimit.go). Unlimited limits and descriptors with no
    limit cost no Redis call."""
    found = [config.limit_for(domain, d) for d in descriptors]
    limits: list[Limit | None] = [limit for limit, _ in found]
    replaced = {name for limit in limits if limit is not None for name in limit.replaces}
    if replaced:
        limits = [None if limit is not None and limit.name and limit.name in replaced else limit
                  for limit in limits]
    keys = []
    dom = domain.encode()
    extra = iter(jitter) if jitter is not None else None
    for i, limit in enumerate(limits):
        if limit is None or limit.unlimited:
            continue
        expiry = limit.divider + (next(extra) if extra is not None else 0)
        keys.append((i, cache_key(prefix, dom, found[i][1], limit.divider, now), expiry, limit))
    return Check(domain, tuple(limits), tuple(keys))


@dataclass(frozen=True, slots=True)
class Status:
    code: int
    limit: Limit | None
    remaining: int
    reset: int  # seconds until the window ends


def decide(check: Check, counts: Sequence[int], now: int) -> tuple[int, list[Status]]:
    """The overall code and per-descriptor statuses from the counts after
    the increments (base_limiter.go): over limit iff the count exceeds
    ``requests_per_unit``; shadow-mode limits count but answer OK."""
    statuses = [Status(OK, limit, 2**32 - 1 if limit is not None and limit.unlimited else 0, 0)
                for limit in check.limits]
    overall = OK
    for (i, _key, _expiry, limit), count in zip(check.keys, counts, strict=True):
        reset = limit.divider - now % limit.divider
        if count > limit.requests_per_unit:
            code = OK if limit.shadow_mode else OVER_LIMIT
            statuses[i] = Status(code, limit, 0, reset)
            if code == OVER_LIMIT:
                overall = OVER_LIMIT
        else:
            statuses[i] = Status(OK, limit, limit.requests_per_unit - count, reset)
    return overall, statuses
