"""Build an immutable runtime snapshot from loaded config.

A snapshot is everything the request path reads: the host index with its
compiled routes, the clusters those routes point at (direct references, no
lookups per request), the inbound and passthrough clusters, and the outbound
traffic policy. A reload builds a new snapshot on the side and the worker
swaps one reference; each request pins the snapshot it started with.

Clusters whose configuration (settings and endpoints) did not change are
carried over from the previous snapshot as the same objects, so their pools,
breaker counters and outlier state survive the reload.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import defaultdict
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

from .authz.guard import SecurityFilters, security_filters
from .authz.jwt import JWKS, Authenticator
from .authz.policy import Engine, applies
from .config.model import (
    AuthorizationPolicy,
    ClientTLSSettings,
    DestinationRule,
    EnvoyFilter,
    Gateway,
    HTTPMatchRequest,
    HTTPRoute,
    LoadedConfig,
    PeerAuthentication,
    RequestAuthentication,
    ServiceEntry,
    ServicePort,
    Sidecar,
    Subset,
    VirtualService,
    WorkloadEntry,
)
from .filters.chain import RouteFilter
from .filters.cors import CorsFilter, compile_cors
from .filters.fault import FaultFilter, compile_fault
from .filters.mirror import MirrorPolicy
from .routing.actions import DirectResponse, Redirect, Rewrite
from .routing.matchers import compile_match
from .routing.table import (
    DIRECT_RESPONSE,
    REDIRECT,
    ROUTE,
    CompiledRoute,
    HeaderOps,
    HostIndex,
    RouteTarget,
    VirtualHost,
)
from .security.authn import PeerAuthIndex, PeerPolicy, auto_mtls, client_tls_for, endpoint_tls_mode, istio_sni
from .security.upstream import UpstreamTLS
from .upstream.cluster import Cluster, ClusterEndpoint, PassthroughCluster
from .upstream.h2pool import H2Endpoint
from .upstream.lb import make_balancer
from .upstream.outlier import NULL_OUTLIER, OutlierDetector, can_ever_eject
from .upstream.registry import (
    Service,
    ServiceEndpoint,
    address_host,
    build_registry,
    canonical_host,
    host_aliases,
    is_ip,
    labels_match,
)
from .upstream.retry import INBOUND_DEFAULT, compile_retry
from .upstream.settings import DOWNSTREAM, HTTP1, ClusterSettings, cluster_settings, inbound_protocol

log = logging.getLogger("pyproxy.config")

# Istio's config root namespace: a Sidecar there without a workloadSelector is
# the mesh-wide default.
ROOT_NAMESPACE = "istio-system"


@dataclass(frozen=True, slots=True)
class ProxyIdentity:
    workload: str = "unknown"
    namespace: str = "default"
    labels: tuple[tuple[str, str], ...] = ()
    app_host: str = "127.0.0.1"
    app_port: int = 9080
    outbound_port: int = 15001
    inbound_port: int = 15006
    # "namespace/name" when this proxy runs as a gateway (--gateway), else "".
    gateway: str = ""
    # Istio's config root namespace (--root-namespace): mesh-wide policies live there.
    root_namespace: str = ROOT_NAMESPACE

    @property
    def label_dict(self) -> dict[str, str]:
        return dict(self.labels)

    @property
    def app(self) -> str:
        d = self.label_dict
        return d.get("app") or d.get("app.kubernetes.io/name") or self.workload

    @property
    def version(self) -> str:
        d = self.label_dict
        return d.get("version") or d.get("app.kubernetes.io/version") or "unknown"


@dataclass(slots=True)
class BuildContext:
    """What a snapshot build needs from its worker (all injectable)."""

    loop: asyncio.AbstractEventLoop
    rng: random.Random
    resolver: Callable[[str], str] | None = None
    clock: Callable[[], float] | None = None
    # Called for every newly created cluster (metrics binding, admin views).
    on_cluster_created: Callable[[Cluster], None] | None = None
    # The worker's CertStore (security/certs.py); None = no workload certificate.
    certs: Any = None
    # The worker's rate-limit state (ratelimit/filter.py RateLimitRuntime),
    # or a function making it on first use; None: EnvoyFilter rate limits are
    # not applied.
    ratelimit: Any = None


# A sidecar's note on a VirtualService meant for gateways (validate, which
# analyzes the gateways too, leaves it out).
GATEWAY_ONLY = "bound only to gateways"

# What a resolved destination came to: (canonical host, cluster, clusters by
# port, warning or "").
Resolution = tuple[str, "Cluster | None", tuple[tuple[int, Cluster], ...], str]


@dataclass(slots=True)
class CompiledHostRoutes:
    """The compiled routes of one host's VirtualServices, kept so the next
    build can reuse them: valid while the VirtualServices are the same
    objects (the loader's parse cache keeps unchanged documents as the same
    objects) and every destination resolves to the same clusters."""

    vss: tuple[VirtualService, ...]
    routes: tuple[CompiledRoute, ...]
    # Every destination lookup the compilation made: (host, subset, port,
    # namespace, origin) and what it resolved to.
    lookups: tuple[tuple[tuple[str, str, int | None, str, str], Resolution], ...]
    warnings: tuple[str, ...]


@dataclass(slots=True)
class Snapshot:
    version: int
    loaded: LoadedConfig
    identity: ProxyIdentity
    registry: dict[str, Service]
    clusters: dict[str, Cluster]
    hosts: HostIndex
    inbound_cluster: Cluster
    inbound_route: CompiledRoute
    passthrough: PassthroughCluster
    registry_only: bool
    # This workload's inbound PeerAuthentication mode (security/authn.py).
    peer_policy: PeerPolicy = field(default_factory=PeerPolicy)
    warnings: list[str] = field(default_factory=list)
    created: float = field(default_factory=time.time)
    dns_names: frozenset[str] = frozenset()
    # Clusters carried over from the previous snapshot whose Service object
    # is new (same endpoints and settings): the new Service is set on them by
    # ``commit`` at the swap, not while the previous snapshot still serves.
    pending_services: list[tuple[Cluster, Service | None]] = field(default_factory=list)
    # Compiled routes by the ids of the VirtualServices they came from (the
    # entries hold those objects, so the ids stay theirs); the next build
    # reuses what did not change.
    route_cache: dict[tuple[int, ...], CompiledHostRoutes] = field(default_factory=dict)
    # Build statistics: VirtualService route sets compiled vs. reused.
    routes_compiled: int = 0
    routes_reused: int = 0
    # AuthorizationPolicies and RequestAuthentications that apply to this
    # proxy (None when none does: nothing runs per request then).
    authz: Engine | None = None
    authn: Authenticator | None = None
    # Their filters (authz/guard.py), run before the route lookup, by
    # direction (OUTBOUND, INBOUND); () where nothing applies.
    security_filters: tuple[SecurityFilters, SecurityFilters] = ((), ())
    # EnvoyFilter rate limiting (ratelimit/filter.py RateLimitTable); None
    # when no rate-limit filter selects this proxy: nothing runs per request.
    ratelimit: Any = None
    # The EnvoyFilters it was built with (a change recompiles every route's chain).
    envoy_filters: tuple[EnvoyFilter, ...] = ()

    def all_clusters(self) -> list[Cluster]:
        return [*self.clusters.values(), self.inbound_cluster, self.passthrough]

    def commit(self) -> None:
        """Finish a build at the moment the snapshot goes into service."""
        for cluster, service in self.pending_services:
            cluster.service = service
        self.pending_services = []
        JWKS.want(self.authn.uris() if self.authn is not None else {})


def binds_to(gateways: tuple[str, ...], namespace: str, gateway: str) -> bool:
    """Whether a VirtualService's (or match entry's) ``gateways`` list selects
    this proxy. ``gateway`` is "" for a sidecar (the reserved name ``mesh``,
    also what an empty list means) or "ns/name" for a gateway proxy; a
    reference without a namespace names a gateway in the VirtualService's
    own namespace, as in Istio."""
    if not gateway:
        return not gateways or "mesh" in gateways
    for ref in gateways:
        if ref == "mesh":
            continue
        if ("/" in ref and ref == gateway) or f"{namespace}/{ref}" == gateway:
            return True
    return False


def _host_pattern_match(pattern: str, host: str) -> bool:
    """``pattern`` (exact, ``*.suffix`` or ``*``) covers every name ``host`` covers."""
    if pattern == "*":
        return True
    if pattern.startswith("*"):
        return host.endswith(pattern[1:])
    return pattern == host


def intersect_hosts(vs_host: str, gw_host: str) -> str | None:
    """The narrower of two host patterns when one covers the other (Istio
    serves a VirtualService host on a gateway only where they overlap)."""
    if _host_pattern_match(gw_host, vs_host):
        return vs_host
    if _host_pattern_match(vs_host, gw_host):
        return gw_host
    return None


def route_filters(route: CompiledRoute, proxy_filters: tuple[RouteFilter, ...] = ()) -> tuple[RouteFilter, ...]:
    """The filter chain of one compiled route (filters/chain.py), in phase
    order; ``()`` when no filter has anything to do for it. A new filter is
    compiled here from the route's config. ``proxy_filters`` apply to every
    route of this proxy (EnvoyFilter rate limits: their policy per route,
    virtual host and port is looked up by the filter)."""
    filters: list[RouteFilter] = list(proxy_filters)
    # Fault applies to routes that forward (redirect and direct-response
    # routes never injected faults here).
    if route.fault is not None and route.kind == ROUTE:
        filters.append(FaultFilter(route.fault))
    if route.cors is not None:
        filters.append(CorsFilter(route.cors))
    filters.sort(key=lambda f: f.phase)
    return tuple(filters)


class _Builder:
    def __init__(self, loaded: LoadedConfig, identity: ProxyIdentity, ctx: BuildContext,
                 previous: Snapshot | None) -> None:
        self.loaded = loaded
        self.identity = identity
        self.ctx = ctx
        self.previous = previous
        self.warnings: list[str] = []
        self.clusters: dict[str, Cluster] = {}
        # Carry-over candidates by name (one dict lookup per cluster, not a
        # scan of every previous cluster: that was quadratic in the config).
        self.previous_clusters: dict[str, Cluster] = (
            {c.name: c for c in previous.all_clusters()} if previous is not None else {})
        self.pending_services: list[tuple[Cluster, Service | None]] = []
        # Compiled routes of the previous snapshot, reusable when built for
        # the same proxy identity.
        # A changed set of EnvoyFilters changes every route's filter chain.
        self.previous_routes: dict[tuple[int, ...], CompiledHostRoutes] = (
            previous.route_cache if previous is not None and previous.identity == identity
            and _same_objects(previous.envoy_filters, [r for r in loaded.resources if isinstance(r, EnvoyFilter)])
            else {})
        self.route_cache: dict[tuple[int, ...], CompiledHostRoutes] = {}
        self.routes_compiled = 0
        self.routes_reused = 0
        # Set while compiling one host's routes: the lookups it makes.
        self._lookups: list[tuple[tuple[str, str, int | None, str, str], Resolution]] | None = None
        self.dns_names: set[str] = set()
        self.ses: list[ServiceEntry] = []
        self.wes: list[WorkloadEntry] = []
        self.drs: list[DestinationRule] = []
        self.vss: list[VirtualService] = []
        self.sidecars: list[Sidecar] = []
        self.gateways: list[Gateway] = []
        self.authz_policies: list[AuthorizationPolicy] = []
        self.request_auths: list[RequestAuthentication] = []
        self.peer_auths: list[PeerAuthentication] = []
        self.envoy_filters: list[EnvoyFilter] = []
        for r in loaded.resources:
            if isinstance(r, ServiceEntry):
                self.ses.append(r)
            elif isinstance(r, WorkloadEntry):
                self.wes.append(r)
            elif isinstance(r, DestinationRule):
                self.drs.append(r)
            elif isinstance(r, VirtualService):
                self.vss.append(r)
            elif isinstance(r, Sidecar):
                self.sidecars.append(r)
            elif isinstance(r, Gateway):
                self.gateways.append(r)
            elif isinstance(r, AuthorizationPolicy):
                self.authz_policies.append(r)
            elif isinstance(r, RequestAuthentication):
                self.request_auths.append(r)
            elif isinstance(r, PeerAuthentication):
                self.peer_auths.append(r)
            elif isinstance(r, EnvoyFilter):
                self.envoy_filters.append(r)
        self.peer_auth = PeerAuthIndex(self.peer_auths, warn=self.warn)
        creds = ctx.certs.current if ctx.certs is not None else None
        self.trust_domain = creds.identity.trust_domain if creds is not None else "cluster.local"

    def warn(self, msg: str) -> None:
        self.warnings.append(msg)

    # -- destination rules ---------------------------------------------------

    def index_destination_rules(self) -> None:
        self.dr_exact: dict[str, DestinationRule] = {}
        self.dr_wild: list[tuple[str, DestinationRule]] = []
        for dr in self.drs:
            host = canonical_host(dr.host, dr.meta.namespace)
            if host.startswith("*"):
                self.dr_wild.append((host[1:], dr))
                continue
            prev = self.dr_exact.get(host)
            if prev is not None:
                # Istio prefers the rule in the client's namespace, then the service's.
                keep = dr if dr.meta.namespace == self.identity.namespace else prev
                self.warn(
                    f"{dr.meta.source}: DestinationRule {dr.meta.namespace}/{dr.meta.name} and "
                    f"{prev.meta.namespace}/{prev.meta.name} both configure host {host}; "
                    f"using {keep.meta.namespace}/{keep.meta.name}"
                )
                dr = keep
            self.dr_exact[host] = dr
        self.dr_wild.sort(key=lambda e: -len(e[0]))

    def dr_for(self, host: str) -> DestinationRule | None:
        dr = self.dr_exact.get(host)
        if dr is not None:
            return dr
        for suffix, wdr in self.dr_wild:
            if host.endswith(suffix) or suffix == "":
                return wdr
        return None

    # -- clusters --------------------------------------------------------------

    def make_cluster(self, name: str, settings: ClusterSettings, endpoints: list[tuple], *,
                     kind: str = "outbound", service: Service | None = None, port: int = 0,
                     subset: str = "", cls: type[Cluster] = Cluster) -> Cluster:
        fingerprint = (cls.__name__, settings, tuple(endpoints))
        # Collected before the carry-over check: a cluster kept from the
        # previous snapshot still needs its names re-resolved in the background.
        for spec in endpoints:
            if not is_ip(spec[0]) and not spec[0].startswith("unix://"):
                self.dns_names.add(spec[0])
        old = self.previous_clusters.get(name)
        if old is not None and old.fingerprint == fingerprint:
            if old.service is not service:
                self.pending_services.append((old, service))
            return old
        ctx = self.ctx
        cluster = cls(name, settings, fingerprint, ctx.loop, ctx.rng, ctx.resolver,
                      kind=kind, service=service, service_port=port, subset=subset)
        cluster.certs = ctx.certs
        # HTTP/2 (or the client's protocol): the multiplexed pool (upstream/h2pool.py).
        ep_cls = ClusterEndpoint if settings.upstream_protocol == HTTP1 else H2Endpoint
        eps = [ep_cls(cluster, *spec) for spec in endpoints]
        if isinstance(cluster, PassthroughCluster):
            cluster.endpoint_class = ep_cls
        cluster.lb = make_balancer(settings, [], ctx.rng)
        cluster.set_endpoints(eps)
        if settings.outlier is not None:
            clock = ctx.clock or ctx.loop.time
            cluster.outlier = OutlierDetector(cluster, settings.outlier, clock, ctx.loop.call_soon,
                                              ctx.loop.call_later)
            if eps and not can_ever_eject(settings.outlier, len(eps)):
                self.warn(
                    f"cluster {name}: maxEjectionPercent {settings.outlier.max_ejection_percent}% of "
                    f"{len(eps)} endpoint(s) can never eject anyone"
                )
        else:
            cluster.outlier = NULL_OUTLIER  # type: ignore[assignment]
        if ctx.on_cluster_created is not None:
            ctx.on_cluster_created(cluster)
        return cluster

    def build_service_clusters(self) -> Generator[None, None, None]:
        # Wildcard ServiceEntry hosts (``*.example.com``) get clusters too:
        # with resolution NONE they pass requests through to the original
        # destination, so REGISTRY_ONLY admits the hosts they declare.
        for svc in self.registry.values():
            dr = self.dr_for(svc.hostname)
            top = dr.traffic_policy if dr else None
            subsets: list[Subset | None] = [None, *(dr.subsets if dr else ())]
            for port in svc.ports:
                for subset in subsets:
                    sname = subset.name if subset else ""
                    name = f"outbound|{port.number}|{sname}|{svc.hostname}"
                    settings = cluster_settings(top, subset.traffic_policy if subset else None, port.number,
                                                port.protocol, sidecar=not self.identity.gateway)
                    dr_tls = client_tls_for(top, subset.traffic_policy if subset else None, port.number)
                    if svc.resolution == "NONE" and not svc.endpoints:
                        cluster = self.make_cluster(name, settings, [], service=svc, port=port.number,
                                                    subset=sname, cls=PassthroughCluster)
                    else:
                        selected = [
                            (ep.address, ep.port_for(port), ep.labels, ep.weight, ep.workload, ep.namespace,
                             self.endpoint_tls(svc, port.number, sname, dr_tls, ep))
                            for ep in svc.endpoints
                            if subset is None or labels_match(subset.labels, ep.labels)
                        ]
                        if subset is not None and not selected:
                            self.warn(f"cluster {name}: subset {sname} selects no endpoint (requests get 503 UH)")
                        cluster = self.make_cluster(name, settings, selected, service=svc,
                                                    port=port.number, subset=sname)
                    self.clusters[name] = cluster
            yield  # a point where a cooperative build lets the event loop run

    def app_port_protocols(self) -> list[str]:
        """The protocols of the ServiceEntry ports whose endpoints are this
        workload's application port (an endpoint whose labels this proxy's
        labels include, or its workload name): Istio builds the inbound
        cluster from them."""
        ident = self.identity
        mine = ident.label_dict
        found = []
        for svc in self.registry.values():
            for ep in svc.endpoints:
                ours = (ep.workload == ident.workload != "unknown" and ep.namespace == ident.namespace) or (
                    ep.labels and all(mine.get(k) == v for k, v in ep.labels))
                if not ours:
                    continue
                for port in svc.ports:
                    if ep.port_for(port) == ident.app_port:
                        found.append(port.protocol)
        return found

    def endpoint_tls(self, svc: Service, port: int, subset: str, dr_tls: ClientTLSSettings | None,
                     ep: ServiceEndpoint) -> UpstreamTLS | None:
        """How this proxy connects to one endpoint (spec 2.1): the
        DestinationRule's tls when it has one, else auto mTLS."""
        if dr_tls is not None:
            mode = dr_tls.mode
            if mode == "DISABLE":
                return None
            if mode == "ISTIO_MUTUAL":
                return UpstreamTLS("ISTIO_MUTUAL", dr_tls.sni or istio_sni(port, subset, svc.hostname),
                                   dr_tls.subject_alt_names or self.service_sans(svc))
            # SIMPLE / MUTUAL: no sni → the destination host (Istio's auto SNI
            # takes the request's Host, which for a per-host cluster is this name).
            return UpstreamTLS(mode, dr_tls.sni or svc.hostname.lstrip("*."), dr_tls.subject_alt_names,
                               dr_tls.ca_certificates, dr_tls.client_certificate, dr_tls.private_key,
                               dr_tls.insecure_skip_verify)
        certs = self.ctx.certs
        if certs is None or svc.location != "MESH_INTERNAL":
            return None
        peer = self.peer_auth
        ep_labels = dict(ep.labels)
        ep_policy = peer.effective(ep.namespace, ep_labels)
        if not auto_mtls(svc.location, peer.namespace_mode(svc.namespace),
                         endpoint_tls_mode(ep_labels, ep.service_account),
                         ep_policy.for_port(ep.port_for(svc.port(port) or ServicePort(port))), True):
            return None
        return UpstreamTLS("ISTIO_MUTUAL", istio_sni(port, subset, svc.hostname), self.service_sans(svc),
                           auto=True)

    def service_sans(self, svc: Service) -> tuple[str, ...]:
        """ServiceEntry subjectAltNames + the SPIFFE IDs of its endpoints'
        service accounts (Istio's service accounts of a destination)."""
        sans = list(svc.subject_alt_names)
        for ep in svc.endpoints:
            if ep.service_account:
                uri = f"spiffe://{self.trust_domain}/ns/{ep.namespace}/sa/{ep.service_account}"
                if uri not in sans:
                    sans.append(uri)
        return tuple(sans)

    # -- routes -------------------------------------------------------------------

    def resolve_target(self, target: RouteTarget, namespace: str, origin: str) -> None:
        key = (target.host, target.subset, target.port, namespace, origin)
        res = self.resolve(*key)
        if self._lookups is not None:
            self._lookups.append((key, res))
        host, cluster, by_port, warning = res
        target.host = host
        target.cluster = cluster
        if by_port:
            target.by_port = dict(by_port)
        if warning:
            self.warn(warning)

    def resolve(self, host: str, subset: str, port: int | None, namespace: str, origin: str) -> Resolution:
        """Where a destination goes in this build (no side effects)."""
        host = canonical_host(host, namespace)
        svc = self.registry.get(host)
        if svc is None:
            return host, None, (), f"{origin}: destination host {host} is not in the service registry (503 NC)"
        if subset:
            dr = self.dr_for(host)
            if dr is None or all(s.name != subset for s in dr.subsets):
                return host, None, (), (f"{origin}: subset {subset!r} of {host} is not defined by any "
                                        f"DestinationRule (503 NC)")
        ports = [p.number for p in svc.ports]
        if port is not None:
            if port not in ports:
                return host, None, (), f"{origin}: {host} has no port {port} (503 NC)"
            return host, self.clusters.get(f"outbound|{port}|{subset}|{host}"), (), ""
        if not ports:
            return host, None, (), f"{origin}: {host} declares no ports (503 NC)"
        cluster = self.clusters.get(f"outbound|{ports[0]}|{subset}|{host}")
        by_port: tuple[tuple[int, Cluster], ...] = ()
        if len(ports) > 1:
            by_port = tuple(
                (p, c) for p in ports
                if (c := self.clusters.get(f"outbound|{p}|{subset}|{host}")) is not None
            )
        return host, cluster, by_port, ""

    def match_applies(self, m: HTTPMatchRequest, namespace: str) -> bool:
        if m.gateways:
            return binds_to(m.gateways, namespace, self.identity.gateway)
        if m.source_labels and not labels_match(m.source_labels, self.identity.labels):
            return False
        return not m.source_namespace or m.source_namespace == self.identity.namespace

    def compile_rule(self, rule: HTTPRoute, vs: VirtualService) -> CompiledRoute | None:
        route = CompiledRoute()
        route.name = rule.name
        route.origin = rule.origin or f"{vs.meta.source}"
        route.virtual_host = vs.meta.name
        # Keep only the match entries that apply to this proxy: sourceLabels,
        # sourceNamespace and per-match gateways are fixed for a process, so
        # they are decided here, not per request (Istio's sourceMatchHTTP: an
        # entry naming gateways applies iff they select this proxy, and then
        # its sourceLabels/sourceNamespace are not consulted).
        kept = [m for m in rule.match if self.match_applies(m, vs.meta.namespace)]
        if rule.match and not kept:
            return None  # every entry excludes this proxy: the rule does not exist here
        matches = tuple(kept)
        jwt_routing = bool(self.identity.gateway)
        if not jwt_routing and any(m.claims or m.without_claims for m in matches):
            self.warn(f"{route.origin}: JWT claim matches (@request.auth.claims) only work at a gateway: on a "
                      f"sidecar the route is chosen before any token is verified, so a headers claim match "
                      f"never matches and a withoutHeaders one always does (as in Istio)")
        route.conditions = tuple(compile_match(m, jwt_routing=jwt_routing) for m in matches)
        route.names = tuple(f"{rule.name}.{m.name}" if m.name else rule.name for m in matches) or (rule.name,)
        route.catch_all = not matches or any(_catches_all(m) for m in matches)
        if rule.redirect is not None:
            route.kind = REDIRECT
            route.redirect = Redirect(rule.redirect, matches)
            if route.redirect.code not in (301, 302, 303, 307, 308):
                self.warn(f"{route.origin}: redirectCode {route.redirect.code} is not one Envoy supports "
                          f"(301, 302, 303, 307, 308); Istio would drop this rule, pyproxy sends it as is")
        elif rule.direct_response is not None:
            route.kind = DIRECT_RESPONSE
            route.direct = DirectResponse(rule.direct_response)
        else:
            route.kind = ROUTE
            targets = []
            for rd in rule.route:
                d = rd.destination
                req_ops = resp_ops = None
                if rd.headers is not None:
                    req_ops = _ops(rd.headers.request)
                    resp_ops = _ops(rd.headers.response)
                t = RouteTarget(d.host, d.subset, d.port, rd.weight if rd.weight_set else 0, req_ops, resp_ops)
                self.resolve_target(t, vs.meta.namespace, route.origin)
                targets.append(t)
            if len(targets) > 1 and all(t.weight == 0 for t in targets):
                self.warn(f"{route.origin}: every destination has weight 0; using the first")
            route.set_targets(targets)
        route.timeout = rule.timeout if rule.timeout else None
        route.retry = compile_retry(rule.retries, route.timeout, _hashes(route))
        route.fault = compile_fault(rule.fault)
        if rule.headers is not None:
            route.request_ops = _ops(rule.headers.request)
            route.response_ops = _ops(rule.headers.response)
        if rule.rewrite is not None:
            route.rewrite = Rewrite(rule.rewrite, matches)
        # Route-level authority: rewrite.authority, else a host/:authority set
        # in the rule's request headers; it wins over a destination's.
        authority = route.rewrite.authority if route.rewrite is not None else None
        if authority is None and route.request_ops is not None:
            authority = route.request_ops.authority
        for t in route.targets:
            t.finalize_ops(route.request_ops, route.response_ops, authority, single=len(rule.route) == 1)
        route.mirrors = self.compile_mirrors(rule, vs)
        route.cors = compile_cors(rule.cors_policy)
        route.filters = route_filters(route, self.proxy_filters)
        return route

    def compile_mirrors(self, rule: HTTPRoute, vs: VirtualService) -> tuple[MirrorPolicy, ...]:
        out = []
        for mp in rule.mirrors:
            d = mp.destination
            fraction = 1.0 if mp.percentage is None else mp.percentage / 100.0
            if fraction <= 0:
                continue  # Istio: an explicit 0% does not mirror at all
            t = RouteTarget(d.host, d.subset, d.port, 0, None, None)
            self.resolve_target(t, vs.meta.namespace, (rule.origin or str(vs.meta.source)) + " mirror")
            out.append(MirrorPolicy(t, min(fraction, 1.0)))
        return tuple(out)

    def compile_routes(self, vss: list[VirtualService]) -> tuple[CompiledRoute, ...]:
        """The routes of one host's VirtualServices: reused from the previous
        snapshot when the VirtualServices are the same objects and every
        destination still resolves to the same clusters (and the same
        warnings, which are reported again), else compiled."""
        key = tuple(map(id, vss))
        old = self.previous_routes.get(key)
        if old is not None and self._still_valid(old, vss):
            self.routes_reused += 1
            self.route_cache[key] = old
            self.warnings.extend(old.warnings)
            return old.routes
        self.routes_compiled += 1
        first_warning = len(self.warnings)
        self._lookups = []
        try:
            routes = self._compile_routes(vss)
            lookups = tuple(self._lookups)
        finally:
            self._lookups = None
        self.route_cache[key] = CompiledHostRoutes(tuple(vss), routes, lookups,
                                                   tuple(self.warnings[first_warning:]))
        return routes

    def _still_valid(self, old: CompiledHostRoutes, vss: list[VirtualService]) -> bool:
        if len(old.vss) != len(vss) or any(a is not b for a, b in zip(old.vss, vss)):
            return False
        for key, (host, cluster, by_port, warning) in old.lookups:
            n_host, n_cluster, n_by_port, n_warning = self.resolve(*key)
            if (n_cluster is not cluster or n_warning != warning or n_host != host
                    or len(n_by_port) != len(by_port)
                    or any(a[0] != b[0] or a[1] is not b[1] for a, b in zip(n_by_port, by_port))):
                return False
        return True

    def _compile_routes(self, vss: list[VirtualService]) -> tuple[CompiledRoute, ...]:
        routes: list[CompiledRoute] = []
        for vs in vss:
            for rule in vs.http:
                compiled = self.compile_rule(rule, vs)
                if compiled is not None:
                    routes.append(compiled)
        for i, r in enumerate(routes[:-1]):
            if r.catch_all:
                # A rule without match conditions followed by rules of its own
                # VirtualService: the loader reported it already (for every proxy).
                if r.conditions or routes[i + 1].virtual_host != r.virtual_host:
                    self.warn(f"{routes[i + 1].origin}: unreachable, {r.origin} catches every request")
                break
        return tuple(routes)

    def default_route(self, svc: Service) -> CompiledRoute:
        route = CompiledRoute()
        route.origin = f"default route for {svc.hostname}"
        t = RouteTarget(svc.hostname, "", None, 0, None, None)
        self.resolve_target(t, svc.namespace, route.origin)
        route.set_targets([t])
        route.retry = compile_retry(None, None, _hashes(route))
        route.filters = route_filters(route, self.proxy_filters)
        return route

    def gateway_hosts(self) -> list[tuple[str, str]] | None:
        """(namespace filter, host) pairs of this gateway's HTTP servers, or
        None when the Gateway resource is not in the config (then the hosts
        of the bound VirtualServices are used as written, with a warning)."""
        ns, _, name = self.identity.gateway.partition("/")
        gw = next((g for g in self.gateways if g.meta.namespace == ns and g.meta.name == name), None)
        if gw is None:
            self.warn(f"Gateway {ns}/{name} (--gateway) is not in the config: the VirtualServices "
                      f"bound to it are served with their own hosts")
            return None
        out = []
        for server in gw.servers:
            for h in server.hosts:
                vs_ns, sep, host = h.rpartition("/")
                out.append((vs_ns if sep else "*", host))
        if not out:
            self.warn(f"Gateway {ns}/{name} has no HTTP server: nothing is routed")
        return out

    def gateway_ports(self) -> tuple[int, ...]:
        """The server ports of this gateway's Gateway resource (Istio names
        a gateway's virtual hosts ``host:port`` after them)."""
        if not self.identity.gateway:
            return ()
        ns, _, name = self.identity.gateway.partition("/")
        gw = next((g for g in self.gateways if g.meta.namespace == ns and g.meta.name == name), None)
        return tuple(sorted({s.port_number for s in gw.servers})) if gw is not None else ()

    def bound_hosts(self, vs: VirtualService, gw_hosts: list[tuple[str, str]] | None) -> list[str]:
        hosts = [canonical_host(h, vs.meta.namespace) for h in vs.hosts]
        if gw_hosts is None:
            return hosts
        gw_ns = self.identity.gateway.partition("/")[0]
        out = []
        for h in hosts:
            for ns_filter, gh in gw_hosts:
                if ns_filter not in ("*", vs.meta.namespace) and not (ns_filter == "." and vs.meta.namespace == gw_ns):
                    continue
                narrowed = intersect_hosts(h, canonical_host(gh, vs.meta.namespace))
                if narrowed is not None and narrowed not in out:
                    out.append(narrowed)
        if not out:
            self.warn(f"{vs.meta.source}: VirtualService {vs.meta.namespace}/{vs.meta.name}: none of its hosts "
                      f"is served by Gateway {self.identity.gateway}")
        return out

    def build_hosts(self) -> Generator[None, None, HostIndex]:
        by_host: dict[str, list[VirtualService]] = defaultdict(list)
        gateway = self.identity.gateway
        gw_hosts = self.gateway_hosts() if gateway else None
        for vs in self.vss:
            if not binds_to(vs.gateways, vs.meta.namespace, gateway):
                continue
            for h in (self.bound_hosts(vs, gw_hosts) if gateway else vs.hosts):
                by_host[canonical_host(h, vs.meta.namespace)].append(vs)
        for host, vss in by_host.items():
            if len(vss) > 1:
                names = ", ".join(f"{v.meta.namespace}/{v.meta.name} ({v.meta.source})" for v in vss)
                self.warn(f"host {host}: rules of VirtualServices {names} are concatenated in that order")
        wild_vs = sorted(((h, v) for h, v in by_host.items() if h.startswith("*")), key=lambda e: -len(e[0]))

        exact: dict[bytes, VirtualHost] = {}
        wildcards: list[tuple[bytes, VirtualHost]] = []
        catch_all: VirtualHost | None = None
        ns = self.identity.namespace
        # Names written in config (service FQDNs, VirtualService hosts) beat
        # the short aliases generated for another service.
        written: set[bytes] = set()
        service_hosts: list[VirtualHost] = []

        for svc in self.registry.values():
            svc_vss = by_host.get(svc.hostname)
            if svc_vss is None:
                for pattern, wvss in wild_vs:
                    if pattern == "*" or svc.hostname.endswith(pattern[1:]):
                        svc_vss = wvss
                        break
            if not svc_vss and gateway:
                continue  # a gateway routes only the hosts bound to it
            routes = self.compile_routes(svc_vss) if svc_vss else (self.default_route(svc),)
            vh = VirtualHost(svc.hostname, routes, svc, has_vs=bool(svc_vss))
            if svc.is_wildcard:
                wildcards.append((svc.hostname[1:].encode(), vh))
            else:
                service_hosts.append(vh)
            yield
        for vh in service_hosts:
            written.add(vh.name.encode())
            exact[vh.name.encode()] = vh
        for vh in service_hosts:
            for alias in host_aliases(vh.name, ns):
                key = alias.encode()
                if key not in written:
                    exact[key] = vh
            # Istio adds a service's single-IP addresses as virtual-host
            # domains, so a request whose Host is the VIP selects the service.
            for address in vh.service.addresses:
                name = address_host(address)
                if name is not None:
                    exact.setdefault(name.encode(), vh)
        for host, vss in by_host.items():
            if host in self.registry:
                continue
            if not gateway and host.startswith("*") and any(
                    host == "*" or s.hostname.endswith(host[1:]) for s in self.registry.values()):
                # istiod (separateVSHostsAndServices) gives a wildcard
                # VirtualService host to the services it matches and makes no
                # virtual host of its own when it matches any: a host outside
                # the registry goes to passthrough, as from a real sidecar.
                continue
            vh = VirtualHost(host, self.compile_routes(vss), None, has_vs=True)
            yield
            if host == "*":
                catch_all = vh
            elif host.startswith("*"):
                wildcards.append((host[1:].encode(), vh))
            else:
                for alias in host_aliases(host, ns):
                    key = alias.encode()
                    if alias == host and key not in written:
                        exact[key] = vh
                        written.add(key)
                    else:
                        exact.setdefault(key, vh)
        wildcards.sort(key=lambda e: -len(e[0]))
        if gateway and catch_all is None:
            # Envoy's gateway: a host no VirtualService serves gets 404 NR,
            # never the sidecar's passthrough to the original destination.
            catch_all = VirtualHost("*", (), None, has_vs=False)
        return HostIndex(exact, wildcards, catch_all)

    # -- sidecar ------------------------------------------------------------------

    def sidecar(self) -> Sidecar | None:
        """The Sidecar resource that applies to this proxy, by Istio's
        precedence: one in the proxy's namespace whose workloadSelector
        matches its labels, else the namespace's one without a selector, else
        the root namespace's (``istio-system``) one without a selector, the
        mesh-wide default. Within a level the first in load order wins (Istio
        takes the oldest), with a warning."""
        ns = self.identity.namespace
        levels: tuple[list[Sidecar], list[Sidecar], list[Sidecar]] = ([], [], [])
        for sc in self.sidecars:
            scope = sc.meta.namespace
            if scope == ns:
                if sc.workload_selector is None:
                    levels[1].append(sc)
                elif labels_match(sc.workload_selector, self.identity.labels):
                    levels[0].append(sc)
            elif scope == self.identity.root_namespace and sc.workload_selector is None:
                levels[2].append(sc)
        for candidates in levels:
            if candidates:
                chosen = candidates[0]
                if len(candidates) > 1:
                    others = ", ".join(f"{c.meta.namespace}/{c.meta.name} ({c.meta.source})" for c in candidates[1:])
                    self.warn(f"{chosen.meta.source}: several Sidecars apply to this proxy; using "
                              f"{chosen.meta.namespace}/{chosen.meta.name}, ignoring {others}")
                return chosen
        return None

    # -- references (istioctl analyze's kind of findings; the same for every proxy) --

    def check_references(self) -> None:
        """Rules that can have no effect: a DestinationRule for a host not in
        the registry, a VirtualService bound to a Gateway the config does
        not define, a mesh VirtualService none of whose hosts is a service."""
        wild_services = [h for h in self.registry if h.startswith("*")]

        def covered(host: str) -> bool:  # exact lookups; scans only for (rare) wildcards
            if host in self.registry:
                return True
            if host.startswith("*"):
                return any(_host_pattern_match(host, h) for h in self.registry)
            return any(_host_pattern_match(w, host) for w in wild_services)

        for dr in self.drs:
            host = canonical_host(dr.host, dr.meta.namespace)
            if not covered(host):
                self.warn(f"{dr.meta.source}: DestinationRule {dr.meta.namespace}/{dr.meta.name}: host {host} is "
                          f"not in the service registry: the rule has no effect")
        defined = {f"{g.meta.namespace}/{g.meta.name}" for g in self.gateways}
        for vs in self.vss:
            where = f"{vs.meta.source}: VirtualService {vs.meta.namespace}/{vs.meta.name}"
            refs = [r if "/" in r else f"{vs.meta.namespace}/{r}" for r in vs.gateways if r != "mesh"]
            missing = [r for r in refs if r not in defined]
            if missing:
                self.warn(f"{where}: gateway {', '.join(missing)} is not defined in the config (a proxy run "
                          f"with --gateway {missing[0]} serves the VirtualService's own hosts)")
            mesh = not vs.gateways or "mesh" in vs.gateways
            if not mesh and not self.identity.gateway:
                self.warn(f"{where}: {GATEWAY_ONLY} {', '.join(vs.gateways)}: sidecars ignore it, "
                          f"only a proxy run with --gateway applies it (add 'mesh' to apply it to sidecars)")
            hosts = [canonical_host(h, vs.meta.namespace) for h in vs.hosts]
            if mesh and hosts and not any(covered(h) for h in hosts):
                self.warn(f"{where}: none of its hosts ({', '.join(hosts)}) is a service in the registry: "
                          f"sidecars apply it only to requests addressed to those names")

    def registry_only(self) -> bool:
        best = self.sidecar()
        return best is not None and best.outbound_traffic_policy_mode == "REGISTRY_ONLY"

    # -- security -----------------------------------------------------------------

    def security(self) -> tuple[Engine | None, Authenticator | None]:
        """The AuthorizationPolicies and RequestAuthentications that select
        this proxy (its namespace or the root namespace, selector against its
        labels), compiled; None for a kind with nothing that applies."""
        ident = self.identity
        labels = ident.label_dict

        def mine(selector: tuple[tuple[str, str], ...] | None, namespace: str) -> bool:
            return applies(selector, namespace, ident.namespace, labels, ident.root_namespace)

        policies = [p for p in self.authz_policies if not p.targeted and mine(p.selector, p.meta.namespace)]
        auths = [a for a in self.request_auths if not a.targeted and mine(a.selector, a.meta.namespace)]
        engine = Engine(policies) if policies else None
        rules = [r for a in auths for r in a.jwt_rules]
        seen: dict[str, RequestAuthentication] = {}
        for a in auths:
            for r in a.jwt_rules:
                other = seen.setdefault(r.issuer, a)
                if other is not a:
                    self.warn(f"{a.meta.source}: issuer {r.issuer!r} is also configured by "
                              f"{other.meta.namespace}/{other.meta.name}; both rules are kept")
        return engine, (Authenticator(rules) if rules else None)

    def build(self, version: int) -> Generator[None, None, Snapshot]:
        """The build as steps: each ``yield`` is a point where a cooperative
        caller may let the event loop run (no shared state is half-updated
        there: everything built so far is private to this builder)."""
        self.registry = build_registry(self.ses, self.wes, self.warn)
        yield
        # EnvoyFilter rate limits: the table first, every route's chain then
        # gets the rate-limit filter (nothing when none selects this proxy).
        self.ratelimit = None
        self.proxy_filters: tuple[RouteFilter, ...] = ()  # outbound (or gateway) routes
        self.inbound_proxy_filters: tuple[RouteFilter, ...] = ()
        if self.envoy_filters:
            from .ratelimit.filter import RATE_LIMIT_FILTER, compile_table

            runtime = self.ctx.ratelimit
            self.ratelimit = compile_table(self.envoy_filters, self.identity, runtime, self.gateway_ports(),
                                           self.warnings)
            if self.ratelimit is not None:
                # Only the listeners a rate-limit filter patch can reach: the
                # others' routes keep no filter (and run no chain).
                outbound = "GATEWAY" if self.identity.gateway else "SIDECAR_OUTBOUND"
                if self.ratelimit.may_apply(outbound):
                    self.proxy_filters = (RATE_LIMIT_FILTER,)
                if self.ratelimit.may_apply("SIDECAR_INBOUND"):
                    self.inbound_proxy_filters = (RATE_LIMIT_FILTER,)
        self.index_destination_rules()
        self.check_references()
        yield from self.build_service_clusters()
        hosts = yield from self.build_hosts()
        ident = self.identity
        inbound = self.make_cluster(
            f"inbound|{ident.app_port}||",
            ClusterSettings(upstream_protocol=inbound_protocol(self.app_port_protocols())),
            [(ident.app_host, ident.app_port, ident.labels, 1, ident.workload, ident.namespace)],
            kind="inbound", port=ident.app_port,
        )
        inbound_route = CompiledRoute()
        inbound_route.origin = "inbound"
        t = RouteTarget(ident.app_host, "", ident.app_port, 0, None, None)
        t.cluster = inbound
        inbound_route.set_targets([t])
        # Istio >= 1.24: retry a request that never reached the app (reset-before-request, 2 retries).
        inbound_route.retry = INBOUND_DEFAULT
        inbound_route.filters = route_filters(inbound_route, self.inbound_proxy_filters)
        # Istio's PassthroughCluster speaks the client's protocol
        # (cluster_builder.go passthroughHttpProtocolOptions: use_downstream_protocol).
        passthrough = self.make_cluster("PassthroughCluster", ClusterSettings(upstream_protocol=DOWNSTREAM), [],
                                        kind="passthrough", cls=PassthroughCluster)
        assert isinstance(passthrough, PassthroughCluster)
        authz, authn = self.security()
        return Snapshot(
            version=version,
            loaded=self.loaded,
            identity=ident,
            registry=self.registry,
            clusters=self.clusters,
            hosts=hosts,
            inbound_cluster=inbound,
            inbound_route=inbound_route,
            passthrough=passthrough,
            registry_only=self.registry_only(),
            peer_policy=self.peer_auth.effective(ident.namespace, ident.label_dict),
            # One line per finding: a rule compiled for several hosts (a
            # service's aliases, a gateway's hosts) finds the same problem each time.
            warnings=list(dict.fromkeys(self.warnings)),
            dns_names=frozenset(self.dns_names),
            pending_services=self.pending_services,
            route_cache=self.route_cache,
            routes_compiled=self.routes_compiled,
            routes_reused=self.routes_reused,
            authz=authz,
            authn=authn,
            security_filters=security_filters(authz, authn, gateway=bool(ident.gateway)),
            ratelimit=self.ratelimit,
            envoy_filters=tuple(self.envoy_filters),
        )


def _same_objects(a: tuple | list, b: tuple | list) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))


def _hashes(route: CompiledRoute) -> bool:
    """Does a destination of this route balance by consistent hash? (Istio
    then leaves the previous-hosts retry predicate off.)"""
    for t in route.targets or ():
        for c in (t.cluster, *t.by_port.values()):
            if c is not None and c.settings.lb_policy == "CONSISTENT_HASH":
                return True
    return False


def _catches_all(m: Any) -> bool:
    """Istio's IsCatchAllRoute for one match entry: URI prefix "/" (or none)
    or regex ".*", and no other request condition."""
    uri = m.uri
    if uri is not None and not ((uri.kind == "prefix" and uri.value in ("", "/"))
                                or (uri.kind == "regex" and uri.value == ".*")):
        return False
    return not (m.headers or m.without_headers or m.query_params or m.method or m.authority or m.scheme
                or m.port or m.claims or m.without_claims)


def _ops(ops: Any) -> HeaderOps | None:
    if ops is None:
        return None
    compiled = HeaderOps(ops.remove, ops.set, ops.add)
    return compiled if compiled or compiled.authority else None


def build_snapshot(loaded: LoadedConfig, identity: ProxyIdentity, ctx: BuildContext,
                   previous: Snapshot | None = None, version: int = 1) -> Snapshot:
    """Raises nothing for valid config: problems a valid file can still have
    (unknown subsets, unreachable rules) become warnings on the snapshot.

    The snapshot is committed (ready to serve) when returned."""
    steps = _Builder(loaded, identity, ctx, previous).build(version)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            snap: Snapshot = done.value
            snap.commit()
            return snap


# How long a cooperative build runs before it lets the event loop serve
# requests again. The longest step (one service's routes) is ~1 ms.
BUILD_SLICE_S = 0.005


async def build_snapshot_async(loaded: LoadedConfig, identity: ProxyIdentity, ctx: BuildContext,
                               previous: Snapshot | None = None, version: int = 1,
                               slice_s: float = BUILD_SLICE_S) -> Snapshot:
    """:func:`build_snapshot` on the event loop without stalling it: the
    build yields to the loop every ``slice_s`` seconds. The snapshot is not
    committed: call ``commit()`` at the swap (``previous`` keeps serving
    unchanged until then)."""
    steps = _Builder(loaded, identity, ctx, previous).build(version)
    clock = time.perf_counter
    deadline = clock() + slice_s
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        if clock() >= deadline:
            await asyncio.sleep(0)
            deadline = clock() + slice_s


def retire(old: Snapshot, new: Snapshot) -> list[Cluster]:
    """After a swap: drain the old snapshot's clusters that the new one did
    not carry over. Returns them (for logging and tests)."""
    keep = {id(c) for c in new.all_clusters()}
    retired = [c for c in old.all_clusters() if id(c) not in keep]
    for c in retired:
        c.drain()
    return retired
