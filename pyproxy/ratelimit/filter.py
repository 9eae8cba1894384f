"""Envoy's local (``envoy.filters.http.local_ratelimit``) and global
(``envoy.filters.http.ratelimit``) rate-limit filters on pyproxy's request path.

Built once per snapshot (:func:`compile_table`) from the EnvoyFilters that
select this proxy; nothing exists, and nothing runs per request, when none
does. A request asks the table for the policy of its virtual host, route,
match entry and port (memoised: the EnvoyFilter match is evaluated once per
combination) and runs it:

1. each local filter (synchronous): the route's (or virtual host's, or the
   listener's) token bucket, descriptors, ``filter_enabled``/``filter_enforced``,
   429 ``local_rate_limited`` with flag RL;
2. each global filter: descriptors from the route's ``rate_limits`` (the
   virtual host's when the route has none), then one asynchronous decision
   (Redis, or the ratelimit service over HTTP) bounded by the filter's
   ``timeout``; the request resumes when it comes (or fails open / 500 RLSE).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from typing import Any

from .. import errors
from ..config.model import EnvoyFilter, EnvoyFilterPatch, GlobalRateLimitSpec, LocalRateLimitSpec
from ..filters.chain import RATE_LIMIT
from ..routing.table import DIRECT_RESPONSE, REDIRECT
from .bucket import SharedBuckets, TokenBucket
from .descriptors import CompiledRateLimit, Descriptor, build
from .service_config import OVER_LIMIT, Status

log = logging.getLogger("pyproxy.ratelimit")

ROOT_NAMESPACE = "istio-system"
LOCAL_BODY = b"local_rate_limited"
GRPC_UNAVAILABLE = b"14"
GRPC_RESOURCE_EXHAUSTED = b"8"
MEMO_LIMIT = 65536


class LocalStats:
    """``<stat_prefix>.http_local_rate_limit.*`` (Envoy's names)."""

    __slots__ = ("enabled", "enforced", "ok", "rate_limited")

    def __init__(self) -> None:
        self.enabled = self.enforced = self.ok = self.rate_limited = 0


class GlobalStats:
    """``cluster.<rate-limit cluster>.ratelimit.*`` (Envoy's names)."""

    __slots__ = ("error", "failure_mode_allowed", "ok", "over_limit")

    def __init__(self) -> None:
        self.ok = self.over_limit = self.error = self.failure_mode_allowed = 0


class RateLimitRuntime:
    """What outlives one snapshot in a worker: buckets (a reload keeps a
    bucket whose definition did not change), counters, the decision backend."""

    def __init__(self, rng: random.Random, shared: SharedBuckets | None = None,
                 clock: Callable[[], float] | None = None) -> None:
        self.rng = rng
        self.shared = shared
        self.clock = clock
        self.buckets: dict[str, Any] = {}
        self.local_stats: dict[str, LocalStats] = {}
        self.global_stats: dict[str, GlobalStats] = {}
        self.decider: Any = None  # set by the worker: RedisDecider / ServiceDecider / None
        self._last_error_log = -1e9

    def bucket(self, key: str, spec: Any) -> Any:
        bucket = self.buckets.get(key)
        if bucket is None:
            if self.shared is not None:
                bucket = self.shared.bucket(key, spec.max_tokens, spec.tokens_per_fill, spec.fill_interval)
            elif self.clock is not None:
                bucket = TokenBucket(spec.max_tokens, spec.tokens_per_fill, spec.fill_interval, self.clock)
            else:
                bucket = TokenBucket(spec.max_tokens, spec.tokens_per_fill, spec.fill_interval)
            self.buckets[key] = bucket
        return bucket

    def log_error(self, spec: GlobalRateLimitSpec, exc: BaseException) -> None:
        """At most one line per 10 s: a Redis outage must not flood the log."""
        now = time.monotonic()
        if now - self._last_error_log >= 10.0:
            self._last_error_log = now
            mode = "denied (failure_mode_deny)" if spec.failure_mode_deny else "allowed (fail open)"
            log.warning("rate limit: no decision for domain %s: %s: %s; requests are %s",
                        spec.domain, type(exc).__name__, exc, mode)

    def counters(self) -> dict[str, int]:
        """Flat Envoy stat names and values (for /stats and Prometheus)."""
        out: dict[str, int] = {}
        for prefix, s in self.local_stats.items():
            for name in LocalStats.__slots__:
                out[f"{prefix}.http_local_rate_limit.{name}"] = getattr(s, name)
        for cluster, g in self.global_stats.items():
            for name in GlobalStats.__slots__:
                out[f"cluster.{cluster}.ratelimit.{name}"] = getattr(g, name)
        return out


# -- compiled filters ----------------------------------------------------------------


class LocalLimiter:
    """One local rate-limit configuration (listener-level or per route)."""

    __slots__ = ("always_default", "bucket", "descriptors", "enabled", "enforced", "limited_headers",
                 "not_enforced_headers", "rng", "spec", "stage", "stats", "status", "vh_option",
                 "x_headers")

    def __init__(self, spec: LocalRateLimitSpec, runtime: RateLimitRuntime, bucket_key: str) -> None:
        self.spec = spec
        self.rng = runtime.rng
        self.enabled = spec.filter_enabled
        self.enforced = spec.filter_enforced
        self.stats = runtime.local_stats.setdefault(spec.stat_prefix, LocalStats())
        self.status = spec.status if spec.status >= 400 else 429  # Envoy: < 400 means 429
        self.bucket = runtime.bucket(f"{bucket_key}|{spec.token_bucket}", spec.token_bucket) \
            if spec.token_bucket is not None else None
        # Envoy sorts matched descriptors by fill rate (the strictest first).
        self.descriptors = {
            tuple((k.encode(), v.encode()) for k, v in d.entries):
                runtime.bucket(f"{bucket_key}|{d.entries}|{d.token_bucket}", d.token_bucket)
            for d in spec.descriptors
        }
        self.always_default = spec.always_consume_default_token_bucket
        self.stage = spec.stage
        self.vh_option = spec.vh_rate_limits
        self.x_headers = spec.x_ratelimit_headers
        self.limited_headers = tuple((h.key.encode(), h.value.encode()) for h in spec.response_headers_to_add)
        self.not_enforced_headers = tuple((h.key.encode(), h.value.encode(), h.append)
                                          for h in spec.request_headers_to_add_when_not_enforced)

    @property
    def active(self) -> bool:
        return self.bucket is not None or bool(self.descriptors)

    def _draw(self, fraction: float) -> bool:
        return fraction >= 1.0 or (fraction > 0.0 and self.rng.random() < fraction)

    def check(self, descriptors: list[tuple[Descriptor, int | None]]) -> tuple[bool, Any]:
        """(allowed, the bucket that decided or None)."""
        matched = []
        if self.descriptors:
            for d, _hits in descriptors:
                bucket = self.descriptors.get(d)
                if bucket is not None:
                    matched.append(bucket)
            if len(matched) > 1:
                matched.sort(key=lambda b: b.rate)
        for bucket in matched:
            if bucket.consume() < 0:
                return False, bucket
        if matched and not self.always_default:
            return True, matched[0]
        bucket = self.bucket
        if bucket is None:
            return True, matched[0] if matched else None
        return bucket.consume() >= 0, bucket


class GlobalLimiter:
    __slots__ = ("spec", "stats", "timeout")

    def __init__(self, spec: GlobalRateLimitSpec, runtime: RateLimitRuntime) -> None:
        self.spec = spec
        self.stats = runtime.global_stats.setdefault(spec.cluster_name or "rate_limit_cluster", GlobalStats())
        self.timeout = spec.timeout


class Policy:
    """Everything rate limiting does for one (virtual host, route, port)."""

    __slots__ = ("fast", "globals", "include_vh", "inline", "locals", "needs_destination", "route_limits",
                 "vh_limits", "vh_option_global")

    def __init__(self) -> None:
        # The common case, one always-enforced local bucket and nothing else:
        # (bucket, stats), checked inline by the filter; ``inline``: the bucket
        # is this process's own TokenBucket (its consume() inlined too).
        self.fast: tuple[Any, LocalStats] | None = None
        self.inline = False
        self.locals: tuple[LocalLimiter, ...] = ()
        self.globals: tuple[GlobalLimiter, ...] = ()
        self.route_limits: tuple[CompiledRateLimit, ...] = ()
        self.vh_limits: tuple[CompiledRateLimit, ...] = ()
        self.include_vh = False
        self.vh_option_global = ""
        self.needs_destination = False

    def descriptors(self, ex: Any, stage: int, vh_option: str) -> list[tuple[Descriptor, int | None]]:
        """Envoy: the route's entries, plus the virtual host's per the option
        (OVERRIDE: only when the route has no rate_limits at all)."""
        out = build(self.route_limits, stage, ex) if self.route_limits else []
        if self.vh_limits and (vh_option == "INCLUDE" or (vh_option == "OVERRIDE" and not self.route_limits)):
            out += build(self.vh_limits, stage, ex)
        return out


# -- matching EnvoyFilter patches to this proxy -------------------------------------------


def applies_to_proxy(ef: EnvoyFilter, namespace: str, labels: tuple[tuple[str, str], ...]) -> bool:
    """Istio: an EnvoyFilter in the root namespace applies mesh-wide, else
    only in its own namespace; its workloadSelector must match the labels."""
    if ef.meta.namespace not in (ROOT_NAMESPACE, namespace):
        return False
    if ef.workload_selector is None:
        return True
    have = dict(labels)
    return all(have.get(k) == v for k, v in ef.workload_selector)


class _Site:
    """Where a request is, in Istio's terms: the patch context, the Envoy
    virtual host names it is under, route name, action, ports."""

    __slots__ = ("action", "context", "listener_ports", "route_name", "route_ports", "vhost_names")

    def __init__(self, context: str, vhost_names: tuple[str, ...], route_name: str, action: str,
                 listener_ports: tuple[int, ...], route_ports: tuple[int, ...]) -> None:
        self.context = context
        self.vhost_names = vhost_names
        self.route_name = route_name
        self.action = action
        self.listener_ports = listener_ports
        self.route_ports = route_ports

    def context_ok(self, patch: EnvoyFilterPatch) -> bool:
        return patch.context in ("ANY", self.context)

    def listener_ok(self, patch: EnvoyFilterPatch) -> bool:
        return self.context_ok(patch) and (patch.port_number is None or patch.port_number in self.listener_ports)

    def vhost_ok(self, patch: EnvoyFilterPatch) -> bool:
        if not self.context_ok(patch):
            return False
        if patch.port_number is not None and patch.port_number not in self.route_ports:
            return False
        return not patch.vhost_name or patch.vhost_name in self.vhost_names

    def route_ok(self, patch: EnvoyFilterPatch) -> bool:
        if not self.vhost_ok(patch):
            return False
        if patch.route_name and patch.route_name != self.route_name:
            return False
        return patch.route_action in ("ANY", self.action)


class RateLimitTable:
    """The rate-limit policies of one snapshot."""

    def __init__(self, patches: list[EnvoyFilterPatch], runtime: RateLimitRuntime, identity: Any,
                 gateway_ports: tuple[int, ...], warnings: list[str]) -> None:
        self.patches = patches
        self.runtime = runtime
        self.identity = identity
        self.gateway_ports = gateway_ports
        self.source_cluster = f"{identity.app}.{identity.namespace}".encode()
        self.memo: dict[tuple[Any, Any, int, int], Policy | None] = {}
        self.compiled_limits: dict[int, CompiledRateLimit] = {}
        self.warnings = warnings
        self.has_global = any(p.global_ is not None for p in patches)

    def may_apply(self, context: str) -> bool:
        """Can a request on a listener of this patch context (SIDECAR_OUTBOUND,
        SIDECAR_INBOUND, GATEWAY) meet a rate-limit filter at all? Every
        policy there is None when not (``_compile`` keeps only the filters
        whose patch matches the context), so its routes go without one."""
        return any(p.apply_to == "HTTP_FILTER" and (p.local is not None or p.global_ is not None)
                   and p.context in ("ANY", context) for p in self.patches)

    # -- the request path ----------------------------------------------------------

    def policy(self, vh: Any, route: Any, match_index: int, port: int) -> Policy | None:
        # Keyed by the objects themselves (identity hash; the snapshot holds them anyway).
        key = (vh, route, match_index, port)
        memo = self.memo
        try:
            return memo[key]
        except KeyError:
            pass
        if len(memo) >= MEMO_LIMIT:
            memo.clear()
        policy = memo[key] = self._compile(vh, route, match_index, port)
        return policy

    # -- compilation -----------------------------------------------------------------

    def _site(self, vh: Any, route: Any, match_index: int, port: int) -> _Site:
        ident = self.identity
        kind = route.kind
        action = "REDIRECT" if kind == REDIRECT else "DIRECT_RESPONSE" if kind == DIRECT_RESPONSE else "ROUTE"
        name = route.name_for(match_index) or "default"
        if vh is None:  # the inbound listener
            return _Site("SIDECAR_INBOUND", (f"inbound|http|{ident.app_port}",), "default", "ROUTE",
                         (ident.app_port,), (ident.app_port,))
        if ident.gateway:
            ports = self.gateway_ports or (ident.outbound_port,)
            return _Site("GATEWAY", tuple(f"{vh.name}:{p}" for p in ports), name, action, ports, ports)
        return _Site("SIDECAR_OUTBOUND", (f"{vh.name}:{port}",), name, action, (port,), (port,))

    def _limits(self, patch: EnvoyFilterPatch) -> tuple[CompiledRateLimit, ...]:
        gateway = bool(self.identity.gateway)
        return tuple(CompiledRateLimit(spec, self.source_cluster, gateway) for spec in patch.rate_limits)

    def _compile(self, vh: Any, route: Any, match_index: int, port: int) -> Policy | None:
        site = self._site(vh, route, match_index, port)
        runtime = self.runtime
        policy = Policy()
        vh_key = f"{site.context}|{'/'.join(site.vhost_names)}"
        route_key = f"{vh_key}|{site.route_name}|{route.origin}|{match_index}"
        # Per-filter configuration: the route's wins over the virtual host's.
        vh_local: LocalRateLimitSpec | None = None
        route_local: LocalRateLimitSpec | None = None
        for patch in self.patches:
            if patch.apply_to == "VIRTUAL_HOST" and site.vhost_ok(patch):
                policy.vh_limits += self._limits(patch)
                if patch.local is not None:
                    vh_local = patch.local
                if patch.global_vh_rate_limits:
                    policy.vh_option_global = patch.global_vh_rate_limits
            elif patch.apply_to == "HTTP_ROUTE" and site.route_ok(patch):
                policy.route_limits += self._limits(patch)
                if patch.include_vh_rate_limits is not None:
                    policy.include_vh = patch.include_vh_rate_limits
                if patch.local is not None:
                    route_local = patch.local
                if patch.global_vh_rate_limits:
                    policy.vh_option_global = patch.global_vh_rate_limits
        locals_: list[LocalLimiter] = []
        globals_: list[GlobalLimiter] = []
        for patch in self.patches:
            if patch.apply_to != "HTTP_FILTER" or not site.listener_ok(patch):
                continue
            if patch.local is not None:
                if route_local is not None:
                    limiter = LocalLimiter(route_local, runtime, f"route|{route_key}|{route_local.origin}")
                elif vh_local is not None:
                    limiter = LocalLimiter(vh_local, runtime, f"vhost|{vh_key}|{vh_local.origin}")
                else:
                    # The listener's bucket: one per filter, shared by every route.
                    limiter = LocalLimiter(patch.local, runtime, f"listener|{site.context}|{patch.local.origin}")
                if limiter.active and limiter.enabled > 0:
                    locals_.append(limiter)
            elif patch.global_ is not None:
                globals_.append(GlobalLimiter(patch.global_, runtime))
        policy.locals = tuple(locals_)
        policy.globals = tuple(globals_)
        if not policy.locals and not policy.globals:
            return None
        policy.needs_destination = any(limit.needs_destination
                                       for limit in (*policy.route_limits, *policy.vh_limits))
        if len(policy.locals) == 1 and not policy.globals:
            only = policy.locals[0]
            if (only.enabled >= 1.0 and only.enforced >= 1.0 and not only.descriptors and not only.x_headers
                    and only.bucket is not None):
                policy.fast = (only.bucket, only.stats)
                policy.inline = type(only.bucket) is TokenBucket
        return policy


def compile_table(envoy_filters: list[EnvoyFilter], identity: Any, runtime: Any,
                  gateway_ports: tuple[int, ...], warnings: list[str]) -> RateLimitTable | None:
    """The snapshot's rate-limit table, or None when no EnvoyFilter with a
    rate-limit filter selects this proxy (then nothing runs per request)."""
    selected = [ef for ef in envoy_filters
                if ef.patches and applies_to_proxy(ef, identity.namespace, identity.labels)]
    if not selected:
        return None
    # Istio applies root-namespace EnvoyFilters first, then by priority, then in creation (here: load) order.
    order = {id(ef): i for i, ef in enumerate(selected)}
    selected.sort(key=lambda ef: (ef.meta.namespace != ROOT_NAMESPACE, ef.priority, order[id(ef)]))
    patches = [p for ef in selected for p in ef.patches]
    if not any(p.apply_to == "HTTP_FILTER" for p in patches):
        for ef in selected:
            warnings.append(f"{ef.meta.source}: EnvoyFilter {ef.meta.namespace}/{ef.meta.name}: rate-limit "
                            "actions without a rate-limit filter on this proxy have no effect")
        return None
    if runtime is None:
        return None  # a build that serves no request (pyproxy validate)
    if callable(runtime):  # the worker's: made now, on first use
        runtime = runtime()
    return RateLimitTable(patches, runtime, identity, gateway_ports, warnings)


# -- the request path -------------------------------------------------------------------------


class RateLimitFilter:
    """The chain's rate-limit phase (filters/chain.py) on every route of a
    proxy that an EnvoyFilter rate limit selects. Stateless: the policy for
    the request's virtual host, route, match entry and port comes from the
    snapshot's table (memoised), the per-request headers from ``ex.rl_headers``."""

    phase = RATE_LIMIT
    __slots__ = ()

    def on_request(self, ex: Any) -> bool:
        snap = ex.snapshot
        table = snap.ratelimit
        if table is None:
            return False
        vh = ex.vhost  # (found by the route lookup)
        route = ex.route
        # RateLimitTable.policy, its memo lookup inlined (this runs per request).
        policy = table.memo.get((vh, route, ex.match_index, ex.port), _MISSING)
        if policy is _MISSING:
            policy = table.policy(vh, route, ex.match_index, ex.port)
        if policy is None:
            return False
        fast = policy.fast
        if fast is not None:
            bucket, stats = fast
            stats.enabled += 1
            if policy.inline:
                # TokenBucket.consume, inlined (this runs per request): take
                # a token if there is one; none: run() answers 429.
                now = bucket.clock()
                tokens = (now - bucket.empty_at) * bucket.rate
                if tokens > bucket.max_tokens:  # noqa: PLR1730 - cheaper than min() per request
                    tokens = bucket.max_tokens
                if tokens >= 1.0:
                    bucket.empty_at = now - (tokens - 1.0) / bucket.rate
                    stats.ok += 1
                    return False
            elif bucket.consume() >= 0:
                stats.ok += 1
                return False
        return run(ex, policy, ex.resume_chain)

    def on_response_headers(self, ex: Any, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """x-ratelimit-* (DRAFT_VERSION_03) on whatever response the request gets."""
        return [*headers, *ex.rl_headers]


RATE_LIMIT_FILTER = RateLimitFilter()
_MISSING = object()


def _add_headers(ex: Any, headers: list[tuple[bytes, bytes]]) -> None:
    try:
        ex.rl_headers = (*ex.rl_headers, *headers)
    except AttributeError:  # the first filter to add some (the slot is set only here)
        ex.rl_headers = tuple(headers)
        ex.add_encoder(RATE_LIMIT_FILTER)


def run(ex: Any, policy: Policy, resume: Callable[[], None]) -> bool:
    """Run the policy's filters; True when the request was answered or is
    waiting for a decision (``resume`` is called to go on), False to go on now."""
    if policy.fast is not None:
        # The filter's inline check found the bucket empty (and counted 'enabled').
        return _limited(ex, policy.locals[0])
    for local in policy.locals:
        if _local(ex, policy, local):
            return True
    if policy.globals:
        return _start_global(ex, policy, 0, resume)
    return False


def _local(ex: Any, policy: Policy, local: LocalLimiter) -> bool:
    if local.enabled < 1.0 and not local._draw(local.enabled):
        return False
    stats = local.stats
    stats.enabled += 1
    descriptors = policy.descriptors(ex, local.stage, local.vh_option) if local.descriptors else []
    allowed, bucket = local.check(descriptors)
    extra: list[tuple[bytes, bytes]] = []
    if local.x_headers and bucket is not None:
        remaining = bucket.remaining()
        extra = [(b"x-ratelimit-limit", b"%d" % int(bucket.max_tokens)),
                 (b"x-ratelimit-remaining", b"%d" % max(0, math.floor(remaining))),
                 (b"x-ratelimit-reset", b"%d" % bucket.reset_seconds)]
    if allowed:
        stats.ok += 1
        if extra:
            _add_headers(ex, extra)
        return False
    return _limited(ex, local, extra)


def _limited(ex: Any, local: LocalLimiter, extra: list[tuple[bytes, bytes]] | None = None) -> bool:
    """Over the local limit: counted, then enforced (429) or let through."""
    stats = local.stats
    extra = extra or []
    stats.rate_limited += 1
    if not local._draw(local.enforced):
        for name, value, append in local.not_enforced_headers:
            if not append:
                ex.headers[:] = [h for h in ex.headers if h[0] != name]
            ex.headers.append((name, value))
        if extra:
            _add_headers(ex, extra)
        return False
    stats.enforced += 1
    if extra:
        _add_headers(ex, extra)  # (the encoder puts them on the 429 too)
    extra = list(local.limited_headers)
    ctype = ex.hdict.get(b"content-type", b"")
    if ctype.startswith(b"application/grpc"):
        code = GRPC_RESOURCE_EXHAUSTED if local.spec.rate_limited_as_resource_exhausted else GRPC_UNAVAILABLE
        extra += [(b"grpc-status", code), (b"grpc-message", LOCAL_BODY)]
        ex.send_local_reply(200, b"", extra=tuple(extra), flag=errors.RATE_LIMITED, content_type=ctype)
    else:
        ex.send_local_reply(local.status, LOCAL_BODY, extra=tuple(extra), flag=errors.RATE_LIMITED)
    return True


def _request_type_ok(ex: Any, spec: GlobalRateLimitSpec) -> bool:
    if spec.request_type == "both":
        return True
    internal = ex.hdict.get(b"x-envoy-internal") == b"true"
    return internal == (spec.request_type == "internal")


def _start_global(ex: Any, policy: Policy, index: int, resume: Callable[[], None]) -> bool:
    """Run global filters from ``index``: True when answered or waiting."""
    globals_ = policy.globals
    while index < len(globals_):
        limiter = globals_[index]
        index += 1
        spec = limiter.spec
        if not _request_type_ok(ex, spec):
            continue
        vh_option = policy.vh_option_global or ("INCLUDE" if policy.include_vh else "OVERRIDE")
        if policy.needs_destination and ex.target_choice is None and ex.route is not None and ex.route.targets:
            ex.target_choice = ex.route.pick(ex.worker.rng)
        descriptors = policy.descriptors(ex, spec.stage, vh_option)
        if not descriptors:
            continue  # Envoy: nothing to ask, no call
        decider = ex.worker.ratelimit.decider
        waiter = _Waiter(ex, policy, limiter, index, resume)
        try:
            if decider is None:
                raise RuntimeError("no --ratelimit-redis or --ratelimit-service configured")
            decider.check(spec.domain, descriptors, waiter.on_decision, spec.x_ratelimit_headers)
        except Exception as exc:  # noqa: BLE001 - Redis down: the failure mode decides
            waiter.on_decision(exc)
        waiter.sync = False
        if waiter.state == _Waiter.WAITING:
            waiter.timer = ex.loop.call_later(limiter.timeout, waiter.on_timeout)
            return True
        if waiter.state == _Waiter.STOPPED:
            return True
        # decided synchronously and allowed: the next filter
    return False


class _Waiter:
    """One request's pending global decision."""

    WAITING = 0
    CONTINUE = 1
    STOPPED = 2
    __slots__ = ("ex", "index", "limiter", "policy", "resume", "state", "sync", "timer")

    def __init__(self, ex: Any, policy: Policy, limiter: GlobalLimiter, index: int,
                 resume: Callable[[], None]) -> None:
        self.ex = ex
        self.policy = policy
        self.limiter = limiter
        self.index = index
        self.resume = resume
        self.state = _Waiter.WAITING
        self.sync = True
        self.timer: Any = None

    def on_timeout(self) -> None:
        self.timer = None
        if self.state == _Waiter.WAITING:
            self.on_decision(TimeoutError(f"no rate-limit decision within {self.limiter.timeout:g}s"))

    def on_decision(self, result: Any) -> None:
        if self.state != _Waiter.WAITING:
            return  # a late answer after the timeout decided
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        ex = self.ex
        limiter = self.limiter
        stats = limiter.stats
        spec = limiter.spec
        if ex.finished:
            self.state = _Waiter.STOPPED
            return
        if isinstance(result, BaseException):
            stats.error += 1
            ex.worker.ratelimit.log_error(spec, result)
            if spec.failure_mode_deny:
                self.state = _Waiter.STOPPED
                ex.send_local_reply(spec.status_on_error, b"", flag=errors.RATE_LIMIT_SERVICE_ERROR)
                return
            stats.failure_mode_allowed += 1
            self._go_on()
            return
        code, statuses = result
        if spec.x_ratelimit_headers:
            limits = _x_ratelimit_headers(statuses)
            if limits:
                _add_headers(ex, limits)
        extra: list[tuple[bytes, bytes]] = []
        if code == OVER_LIMIT:
            stats.over_limit += 1
            self.state = _Waiter.STOPPED
            if not spec.disable_x_envoy_ratelimited_header:
                extra.append((b"x-envoy-ratelimited", b"true"))
            ctype = ex.hdict.get(b"content-type", b"")
            if ctype.startswith(b"application/grpc"):
                code_ = GRPC_RESOURCE_EXHAUSTED if spec.rate_limited_as_resource_exhausted else GRPC_UNAVAILABLE
                extra += [(b"grpc-status", code_)]
                ex.send_local_reply(200, b"", extra=tuple(extra), flag=errors.RATE_LIMITED, content_type=ctype)
            else:
                ex.send_local_reply(spec.rate_limited_status, b"", extra=tuple(extra), flag=errors.RATE_LIMITED)
            return
        stats.ok += 1
        self._go_on()

    def _go_on(self) -> None:
        self.state = _Waiter.CONTINUE
        if self.sync:
            return  # decided before check() returned: _start_global goes on by itself
        if _start_global(self.ex, self.policy, self.index, self.resume):
            return
        self.resume()


def _x_ratelimit_headers(statuses: list[Status]) -> list[tuple[bytes, bytes]]:
    """Envoy's DRAFT_VERSION_03 headers from the most restrictive status."""
    limited = [s for s in statuses if s.limit is not None and not s.limit.unlimited]
    if not limited:
        return []
    s = min(limited, key=lambda st: st.remaining)
    assert s.limit is not None
    rpu = s.limit.requests_per_unit
    return [(b"x-ratelimit-limit", b"%d, %d;w=%d" % (rpu, rpu, s.limit.divider)),
            (b"x-ratelimit-remaining", b"%d" % s.remaining),
            (b"x-ratelimit-reset", b"%d" % s.reset)]
