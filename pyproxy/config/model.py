"""Frozen, typed model of the Istio resources pyproxy reads.

Class names follow Istio's proto messages; field names are the snake_case of
Istio's camelCase YAML names. Everything here is immutable and hashable
(mappings are tuples of pairs), so a snapshot can be compared with the
previous one to find clusters whose configuration did not change.

Conventions:
- Durations are float seconds; ``None`` means "not set" (the snapshot builder
  applies Istio's defaults, so "unset" and "set to the default" stay distinct).
- Percentages are floats in [0, 100]; ``None`` means "not set".
- Mappings (labels, header operations) are ``tuple[tuple[str, str], ...]`` in
  the order written.
- Host names are stored as written; short names are expanded by the snapshot
  builder using the resource's namespace.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Pairs = tuple[tuple[str, str], ...]

MatchKind = Literal["exact", "prefix", "regex", "present"]


@dataclass(frozen=True, slots=True)
class Source:
    """Where a resource came from: file path and 0-based document index."""

    file: str
    doc: int

    def __str__(self) -> str:
        return f"{self.file}#{self.doc}"


@dataclass(frozen=True, slots=True)
class Meta:
    kind: str
    api_version: str
    name: str
    namespace: str
    source: Source
    labels: Pairs = ()
    # String-valued annotations (others are left out); pyproxy reads
    # ``istio.io/dry-run`` on AuthorizationPolicy.
    annotations: Pairs = ()

    @property
    def key(self) -> tuple[str, str, str]:
        """Kubernetes identity: kind/namespace/name."""
        return (self.kind, self.namespace, self.name)


# --------------------------------------------------------------------------
# VirtualService
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StringMatch:
    """Istio StringMatch. ``present`` is the empty matcher ``{}`` (header or
    query parameter must exist, any value)."""

    kind: MatchKind
    value: str = ""


@dataclass(frozen=True, slots=True)
class HTTPMatchRequest:
    name: str = ""
    uri: StringMatch | None = None
    scheme: StringMatch | None = None
    method: StringMatch | None = None
    authority: StringMatch | None = None
    headers: tuple[tuple[str, StringMatch], ...] = ()
    without_headers: tuple[tuple[str, StringMatch], ...] = ()
    query_params: tuple[tuple[str, StringMatch], ...] = ()
    port: int | None = None
    source_labels: Pairs = ()
    source_namespace: str = ""
    gateways: tuple[str, ...] = ()
    ignore_uri_case: bool = False
    # JWT claim matches (``@request.auth.claims.a.b`` / ``[a][b]`` header
    # names): the claim path and the match, from headers and withoutHeaders.
    claims: tuple[tuple[tuple[str, ...], StringMatch], ...] = ()
    without_claims: tuple[tuple[tuple[str, ...], StringMatch], ...] = ()


@dataclass(frozen=True, slots=True)
class Destination:
    host: str
    subset: str = ""
    port: int | None = None


@dataclass(frozen=True, slots=True)
class HeaderOperations:
    set: Pairs = ()
    add: Pairs = ()
    remove: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Headers:
    request: HeaderOperations | None = None
    response: HeaderOperations | None = None


@dataclass(frozen=True, slots=True)
class HTTPRouteDestination:
    destination: Destination
    weight: int = 0  # 0 = unset; a single destination takes 100% whatever its weight
    weight_set: bool = False
    headers: Headers | None = None


@dataclass(frozen=True, slots=True)
class RegexRewrite:
    match: str
    rewrite: str


@dataclass(frozen=True, slots=True)
class HTTPRewrite:
    uri: str | None = None
    authority: str | None = None
    uri_regex_rewrite: RegexRewrite | None = None


@dataclass(frozen=True, slots=True)
class HTTPRedirect:
    uri: str | None = None
    authority: str | None = None
    port: int | None = None
    derive_port: str | None = None  # FROM_PROTOCOL_DEFAULT | FROM_REQUEST_PORT
    scheme: str | None = None
    redirect_code: int = 301
    prefix_rewrite: str | None = None


@dataclass(frozen=True, slots=True)
class HTTPDirectResponse:
    status: int
    body: bytes | None = None


@dataclass(frozen=True, slots=True)
class FaultDelay:
    fixed_delay: float
    percentage: float = 0.0  # no percentage -> 0%, as Istio


@dataclass(frozen=True, slots=True)
class FaultAbort:
    http_status: int | None = None
    grpc_status: str | None = None
    percentage: float = 0.0


@dataclass(frozen=True, slots=True)
class HTTPFaultInjection:
    delay: FaultDelay | None = None
    abort: FaultAbort | None = None


@dataclass(frozen=True, slots=True)
class HTTPRetry:
    attempts: int = 0
    per_try_timeout: float | None = None
    retry_on: str | None = None
    retry_remote_localities: bool | None = None
    retry_ignore_previous_hosts: bool | None = None  # None: Istio's default (true, except consistent hash)
    backoff: float | None = None  # base interval; None: Envoy's 25 ms


@dataclass(frozen=True, slots=True)
class CorsPolicy:
    allow_origins: tuple[StringMatch, ...] = ()
    allow_methods: tuple[str, ...] = ()
    allow_headers: tuple[str, ...] = ()
    expose_headers: tuple[str, ...] = ()
    max_age: float | None = None
    allow_credentials: bool | None = None
    unmatched_preflights: str = "FORWARD"  # FORWARD | IGNORE


@dataclass(frozen=True, slots=True)
class HTTPMirrorPolicy:
    destination: Destination
    percentage: float | None = None  # None = 100%


@dataclass(frozen=True, slots=True)
class HTTPRoute:
    name: str = ""
    match: tuple[HTTPMatchRequest, ...] = ()
    route: tuple[HTTPRouteDestination, ...] = ()
    redirect: HTTPRedirect | None = None
    direct_response: HTTPDirectResponse | None = None
    rewrite: HTTPRewrite | None = None
    timeout: float | None = None
    retries: HTTPRetry | None = None
    fault: HTTPFaultInjection | None = None
    # ``mirror`` + ``mirror_percentage`` (and deprecated ``mirrorPercent``) are
    # normalised by the loader into ``mirrors`` so there is one shape to handle.
    mirrors: tuple[HTTPMirrorPolicy, ...] = ()
    cors_policy: CorsPolicy | None = None
    headers: Headers | None = None
    # Where this rule came from, for logs and warnings ("reviews.yaml#0 spec.http[1]").
    origin: str = ""


@dataclass(frozen=True, slots=True)
class VirtualService:
    meta: Meta
    hosts: tuple[str, ...] = ()
    gateways: tuple[str, ...] = ()
    http: tuple[HTTPRoute, ...] = ()
    export_to: tuple[str, ...] = ()


# --------------------------------------------------------------------------
# DestinationRule
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HTTPCookie:
    name: str
    path: str = ""
    ttl: float | None = None
    # Extra Set-Cookie attributes (name, value); value "" writes the bare name.
    attributes: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class ConsistentHashLB:
    http_header_name: str | None = None
    http_cookie: HTTPCookie | None = None
    use_source_ip: bool = False
    http_query_parameter_name: str | None = None
    minimum_ring_size: int | None = None  # ringHash.minimumRingSize or deprecated minimumRingSize
    maglev_table_size: int | None = None


@dataclass(frozen=True, slots=True)
class LoadBalancerSettings:
    # ROUND_ROBIN | LEAST_REQUEST | RANDOM | PASSTHROUGH | UNSPECIFIED; LEAST_CONN is
    # normalised to LEAST_REQUEST by the loader (Istio treats it as an alias).
    simple: str | None = None
    consistent_hash: ConsistentHashLB | None = None


@dataclass(frozen=True, slots=True)
class TCPSettings:
    max_connections: int | None = None
    connect_timeout: float | None = None
    max_connection_duration: float | None = None
    idle_timeout: float | None = None


@dataclass(frozen=True, slots=True)
class HTTPSettings:
    http1_max_pending_requests: int | None = None
    http2_max_requests: int | None = None
    max_requests_per_connection: int | None = None
    max_retries: int | None = None
    idle_timeout: float | None = None
    max_concurrent_streams: int | None = None
    h2_upgrade_policy: str = "DEFAULT"  # DEFAULT | DO_NOT_UPGRADE | UPGRADE
    use_client_protocol: bool = False


@dataclass(frozen=True, slots=True)
class ConnectionPoolSettings:
    tcp: TCPSettings | None = None
    http: HTTPSettings | None = None


@dataclass(frozen=True, slots=True)
class OutlierDetection:
    consecutive_5xx_errors: int | None = None  # deprecated consecutiveErrors: N sets this to 0 ...
    # ... and consecutive_gateway_errors to N (Istio counted only 502/503/504 for it)
    consecutive_gateway_errors: int | None = None
    consecutive_local_origin_failures: int | None = None
    split_external_local_origin_errors: bool = False
    interval: float | None = None
    base_ejection_time: float | None = None
    max_ejection_percent: int | None = None
    min_health_percent: int | None = None


@dataclass(frozen=True, slots=True)
class ClientTLSSettings:
    """DestinationRule ``trafficPolicy.tls`` (istio/api ClientTLSSettings)."""

    mode: str = "DISABLE"  # DISABLE | SIMPLE | MUTUAL | ISTIO_MUTUAL
    client_certificate: str = ""
    private_key: str = ""
    ca_certificates: str = ""
    credential_name: str = ""
    subject_alt_names: tuple[str, ...] = ()
    sni: str = ""
    insecure_skip_verify: bool = False
    ca_crl: str = ""


@dataclass(frozen=True, slots=True)
class PortTrafficPolicy:
    port: int
    load_balancer: LoadBalancerSettings | None = None
    connection_pool: ConnectionPoolSettings | None = None
    outlier_detection: OutlierDetection | None = None
    tls: ClientTLSSettings | None = None


@dataclass(frozen=True, slots=True)
class TrafficPolicy:
    load_balancer: LoadBalancerSettings | None = None
    connection_pool: ConnectionPoolSettings | None = None
    outlier_detection: OutlierDetection | None = None
    port_level_settings: tuple[PortTrafficPolicy, ...] = ()
    tls: ClientTLSSettings | None = None


@dataclass(frozen=True, slots=True)
class Subset:
    name: str
    labels: Pairs = ()
    traffic_policy: TrafficPolicy | None = None


@dataclass(frozen=True, slots=True)
class DestinationRule:
    meta: Meta
    host: str
    traffic_policy: TrafficPolicy | None = None
    subsets: tuple[Subset, ...] = ()
    workload_selector: Pairs | None = None
    export_to: tuple[str, ...] = ()


# --------------------------------------------------------------------------
# ServiceEntry / WorkloadEntry
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServicePort:
    number: int
    name: str = ""
    protocol: str = ""
    target_port: int | None = None


@dataclass(frozen=True, slots=True)
class WorkloadEntry:
    """Used both as a ServiceEntry endpoint (``meta`` None) and as the
    WorkloadEntry kind (``meta`` set)."""

    address: str = ""
    ports: tuple[tuple[str, int], ...] = ()
    labels: Pairs = ()
    network: str = ""
    locality: str = ""
    weight: int | None = None
    service_account: str = ""
    meta: Meta | None = None


@dataclass(frozen=True, slots=True)
class ServiceEntry:
    meta: Meta
    hosts: tuple[str, ...] = ()
    addresses: tuple[str, ...] = ()
    ports: tuple[ServicePort, ...] = ()
    location: str = "MESH_EXTERNAL"
    resolution: str = "NONE"  # NONE | STATIC | DNS | DNS_ROUND_ROBIN
    endpoints: tuple[WorkloadEntry, ...] = ()
    workload_selector: Pairs | None = None
    export_to: tuple[str, ...] = ()
    # The server identities ISTIO_MUTUAL accepts (with the endpoints' service accounts).
    subject_alt_names: tuple[str, ...] = ()


# --------------------------------------------------------------------------
# PeerAuthentication (security.istio.io)
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PeerAuthentication:
    meta: Meta
    # matchLabels of spec.selector; None = namespace (or mesh) wide.
    selector: Pairs | None = None
    mode: str = "UNSET"  # UNSET | DISABLE | PERMISSIVE | STRICT
    port_level: tuple[tuple[int, str], ...] = ()


# --------------------------------------------------------------------------
# Sidecar
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sidecar:
    meta: Meta
    workload_selector: Pairs | None = None
    outbound_traffic_policy_mode: str | None = None  # ALLOW_ANY | REGISTRY_ONLY; None = unset


# --------------------------------------------------------------------------
# Gateway
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GatewayServer:
    port_number: int
    port_name: str = ""
    protocol: str = "HTTP"
    # As written: "host", "*", "ns/host", "*/host", "./host".
    hosts: tuple[str, ...] = ()
    name: str = ""


@dataclass(frozen=True, slots=True)
class Gateway:
    """A gateway definition. A proxy started with ``--gateway NAME`` takes the
    VirtualServices bound to it; ``servers[].hosts`` narrow their hosts."""

    meta: Meta
    selector: Pairs = ()
    servers: tuple[GatewayServer, ...] = ()


# --------------------------------------------------------------------------
# AuthorizationPolicy (security.istio.io)
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AuthzSource:
    """Rule.From.source: fields ANDed, values of one field ORed, ``not_*``
    fields must match none of their values. Empty tuple = not set."""

    principals: tuple[str, ...] = ()
    not_principals: tuple[str, ...] = ()
    request_principals: tuple[str, ...] = ()
    not_request_principals: tuple[str, ...] = ()
    namespaces: tuple[str, ...] = ()
    not_namespaces: tuple[str, ...] = ()
    service_accounts: tuple[str, ...] = ()
    not_service_accounts: tuple[str, ...] = ()
    ip_blocks: tuple[str, ...] = ()
    not_ip_blocks: tuple[str, ...] = ()
    remote_ip_blocks: tuple[str, ...] = ()
    not_remote_ip_blocks: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class AuthzOperation:
    hosts: tuple[str, ...] = ()
    not_hosts: tuple[str, ...] = ()
    ports: tuple[str, ...] = ()
    not_ports: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()
    not_methods: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    not_paths: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class AuthzCondition:
    key: str
    values: tuple[str, ...] = ()
    not_values: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class AuthzRule:
    """Matches iff any source (or none given) AND any operation (or none
    given) AND every condition."""

    sources: tuple[AuthzSource, ...] = ()
    operations: tuple[AuthzOperation, ...] = ()
    conditions: tuple[AuthzCondition, ...] = ()


@dataclass(frozen=True, slots=True)
class AuthorizationPolicy:
    meta: Meta
    # matchLabels; None = every workload of the namespace (the mesh in the root namespace).
    selector: Pairs | None = None
    action: str = "ALLOW"  # ALLOW | DENY | AUDIT (CUSTOM is refused at load)
    rules: tuple[AuthzRule, ...] = ()
    dry_run: bool = False  # metadata.annotations["istio.io/dry-run"]
    targeted: bool = False  # attached with targetRef(s): applies to no pyproxy proxy


# --------------------------------------------------------------------------
# RequestAuthentication (security.istio.io)
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class JWTHeader:
    name: str
    prefix: str = ""


@dataclass(frozen=True, slots=True)
class ClaimToHeader:
    header: str
    claim: str


@dataclass(frozen=True, slots=True)
class JWTRule:
    issuer: str
    audiences: tuple[str, ...] = ()
    jwks_uri: str = ""
    jwks: str = ""  # inline JWKS JSON, as written
    from_headers: tuple[JWTHeader, ...] = ()
    from_params: tuple[str, ...] = ()
    from_cookies: tuple[str, ...] = ()
    output_payload_to_header: str = ""
    forward_original_token: bool = False
    output_claim_to_headers: tuple[ClaimToHeader, ...] = ()
    timeout: float | None = None  # jwksUri fetch timeout, seconds
    space_delimited_claims: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class RequestAuthentication:
    meta: Meta
    selector: Pairs | None = None
    jwt_rules: tuple[JWTRule, ...] = ()
    targeted: bool = False  # attached with targetRef(s): applies to no pyproxy proxy


# (Resource, the union of these kinds, is defined after EnvoyFilter at the end.)


# --------------------------------------------------------------------------
# Load results
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Diagnostic:
    """One error or warning, located precisely: ``FILE#N: spec.field.path: message``."""

    file: str
    doc: int | None
    path: str
    message: str

    def __str__(self) -> str:
        where = self.file if self.doc is None else f"{self.file}#{self.doc}"
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


@dataclass(frozen=True, slots=True)
class LoadedConfig:
    """Everything read from the --config paths. ``resources`` holds the
    effective set after later-path-wins de-duplication, in path order."""

    resources: tuple[Resource, ...] = ()
    errors: tuple[Diagnostic, ...] = ()
    warnings: tuple[Diagnostic, ...] = ()
    files: tuple[str, ...] = ()
    # Raw YAML documents kept only for /config_dump (never read on the request path).
    raw: tuple[tuple[Source, dict], ...] = field(default=(), compare=False)

    @property
    def ok(self) -> bool:
        return not self.errors


# --------------------------------------------------------------------------
# EnvoyFilter (only the rate-limit shapes: pyproxy/config/_envoy_filter.py)
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HeaderMatcherSpec:
    """Envoy ``config.route.v3.HeaderMatcher``; ``kind`` is exact, prefix,
    suffix, contains, regex or present."""

    name: str
    kind: str
    value: str = ""
    present: bool = True
    invert: bool = False
    ignore_case: bool = False
    missing_as_empty: bool = False


@dataclass(frozen=True, slots=True)
class RateLimitActionSpec:
    """One ``rate_limits[].actions[]`` entry (Envoy ``RateLimit.Action``)."""

    kind: str  # source_cluster destination_cluster request_headers remote_address generic_key header_value_match
    key: str = ""  # descriptor_key
    value: str = ""  # descriptor_value
    header_name: str = ""
    skip_if_absent: bool = False
    expect_match: bool = True
    headers: tuple[HeaderMatcherSpec, ...] = ()


@dataclass(frozen=True, slots=True)
class RateLimitSpec:
    """A route's or virtual host's ``rate_limits`` entry: one descriptor."""

    actions: tuple[RateLimitActionSpec, ...]
    stage: int = 0
    hits_addend: int | None = None


@dataclass(frozen=True, slots=True)
class TokenBucketSpec:
    max_tokens: int
    tokens_per_fill: int
    fill_interval: float


@dataclass(frozen=True, slots=True)
class HeaderValueSpec:
    """Envoy ``HeaderValueOption``: append (true) or overwrite."""

    key: str
    value: str
    append: bool = True


@dataclass(frozen=True, slots=True)
class LocalDescriptorSpec:
    entries: tuple[tuple[str, str], ...]
    token_bucket: TokenBucketSpec


@dataclass(frozen=True, slots=True)
class LocalRateLimitSpec:
    """``envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit``."""

    stat_prefix: str
    token_bucket: TokenBucketSpec | None = None
    filter_enabled: float = 0.0  # fraction 0..1; Envoy: unset = 0 %
    filter_enforced: float = 0.0
    status: int = 429
    response_headers_to_add: tuple[HeaderValueSpec, ...] = ()
    request_headers_to_add_when_not_enforced: tuple[HeaderValueSpec, ...] = ()
    descriptors: tuple[LocalDescriptorSpec, ...] = ()
    stage: int = 0
    x_ratelimit_headers: bool = False
    always_consume_default_token_bucket: bool = True
    rate_limited_as_resource_exhausted: bool = False
    vh_rate_limits: str = "OVERRIDE"  # OVERRIDE | INCLUDE | IGNORE
    origin: str = ""


@dataclass(frozen=True, slots=True)
class GlobalRateLimitSpec:
    """``envoy.extensions.filters.http.ratelimit.v3.RateLimit``."""

    domain: str
    stage: int = 0
    request_type: str = "both"  # both | internal | external
    timeout: float = 0.02
    failure_mode_deny: bool = False
    cluster_name: str = ""  # the rate-limit service's cluster (names the ratelimit.* stats)
    rate_limited_status: int = 429
    status_on_error: int = 500
    disable_x_envoy_ratelimited_header: bool = False
    x_ratelimit_headers: bool = False
    rate_limited_as_resource_exhausted: bool = False
    origin: str = ""


@dataclass(frozen=True, slots=True)
class EnvoyFilterPatch:
    """One rate-limit ``configPatches[]`` entry, reduced to what it does."""

    apply_to: str  # HTTP_FILTER | VIRTUAL_HOST | HTTP_ROUTE | CLUSTER
    context: str = "ANY"  # ANY | SIDECAR_INBOUND | SIDECAR_OUTBOUND | GATEWAY
    port_number: int | None = None
    vhost_name: str = ""  # "" = any virtual host
    route_name: str = ""  # "" = any route
    route_action: str = "ANY"  # ANY | ROUTE | REDIRECT | DIRECT_RESPONSE
    local: LocalRateLimitSpec | None = None  # the filter, or a route/vhost's per-filter config
    global_: GlobalRateLimitSpec | None = None
    rate_limits: tuple[RateLimitSpec, ...] = ()
    include_vh_rate_limits: bool | None = None
    global_vh_rate_limits: str = ""  # RateLimitPerRoute.vh_rate_limits; "" = unset
    origin: str = ""


@dataclass(frozen=True, slots=True)
class EnvoyFilter:
    meta: Meta
    workload_selector: Pairs | None = None
    patches: tuple[EnvoyFilterPatch, ...] = ()
    priority: int = 0


Resource = (VirtualService | DestinationRule | ServiceEntry | WorkloadEntry | Sidecar | Gateway
            | AuthorizationPolicy | RequestAuthentication | PeerAuthentication | EnvoyFilter)
