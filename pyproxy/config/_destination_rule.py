"""DestinationRule parsing and validation (internal to the loader).

Field lists follow istio/api networking/v1/destination_rule.proto; the checks
follow Istio's validation webhook.
"""

from __future__ import annotations

from . import _common as c
from ._reader import UINT32_MAX, UINT64_MAX, Node, is_dns1123_label, message
from .model import (
    ClientTLSSettings,
    ConnectionPoolSettings,
    ConsistentHashLB,
    DestinationRule,
    HTTPCookie,
    HTTPSettings,
    LoadBalancerSettings,
    Meta,
    OutlierDetection,
    PortTrafficPolicy,
    Subset,
    TCPSettings,
    TrafficPolicy,
)

DESTINATION_RULE = message("DestinationRule", "host trafficPolicy subsets exportTo workloadSelector")
CLIENT_TLS = message(
    "ClientTLSSettings",
    "mode clientCertificate privateKey caCertificates credentialName subjectAltNames sni insecureSkipVerify caCrl",
)
TLS_MODES = ("DISABLE", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL")
# Messages pyproxy does not implement: not read, but checked for unknown fields.
TUNNEL = message("TrafficPolicy.TunnelSettings", "", "protocol targetHost targetPort")
PROXY_PROTOCOL = message("TrafficPolicy.ProxyProtocol", "", "version")
RETRY_BUDGET = message("TrafficPolicy.RetryBudget", "", "percent minRetryConcurrency budgetInterval")
LOCALITY_DISTRIBUTE = message("LocalityLoadBalancerSetting.Distribute", "", "from to")
LOCALITY_FAILOVER = message("LocalityLoadBalancerSetting.Failover", "", "from to")
LOCALITY_LB = message(
    "LocalityLoadBalancerSetting",
    "",
    "distribute failover failoverPriority enabled",
    distribute=LOCALITY_DISTRIBUTE,
    failover=LOCALITY_FAILOVER,
)
WARMUP = message("WarmupConfiguration", "", "duration minimumPercent aggression")
TCP_KEEPALIVE = message("ConnectionPoolSettings.TCPSettings.TcpKeepalive", "", "probes time interval")

RING_HASH = message("ConsistentHashLB.RingHash", "minimumRingSize")
MAGLEV = message("ConsistentHashLB.MagLev", "tableSize")
COOKIE_ATTRIBUTE = message("HTTPCookie.Attribute", "name value")
HTTP_COOKIE = message("ConsistentHashLB.HTTPCookie", "name path ttl attributes", attributes=COOKIE_ATTRIBUTE)
CONSISTENT_HASH = message(
    "LoadBalancerSettings.ConsistentHashLB",
    "httpHeaderName httpCookie useSourceIp httpQueryParameterName ringHash maglev minimumRingSize",
    ignored="httpHeaderRegexRewrite",
    httpHeaderRegexRewrite=c.REGEX_REWRITE,
    httpCookie=HTTP_COOKIE,
    ringHash=RING_HASH,
    maglev=MAGLEV,
)
LOAD_BALANCER = message(
    "LoadBalancerSettings",
    "simple consistentHash",
    ignored="localityLbSetting warmupDurationSecs warmup",
    consistentHash=CONSISTENT_HASH,
    localityLbSetting=LOCALITY_LB,
    warmup=WARMUP,
)
TCP_SETTINGS = message(
    "ConnectionPoolSettings.TCPSettings",
    "maxConnections connectTimeout maxConnectionDuration idleTimeout",
    ignored="tcpKeepalive",
    tcpKeepalive=TCP_KEEPALIVE,
)
HTTP_SETTINGS = message(
    "ConnectionPoolSettings.HTTPSettings",
    "http1MaxPendingRequests http2MaxRequests maxRequestsPerConnection maxRetries idleTimeout "
    "maxConcurrentStreams h2UpgradePolicy useClientProtocol",
)
# Also the shape of Sidecar's inboundConnectionPool and ingress[].connectionPool.
CONNECTION_POOL = message("ConnectionPoolSettings", "tcp http", tcp=TCP_SETTINGS, http=HTTP_SETTINGS)
OUTLIER_DETECTION = message(
    "OutlierDetection",
    "consecutiveErrors consecutive5xxErrors consecutiveGatewayErrors consecutiveLocalOriginFailures "
    "splitExternalLocalOriginErrors interval baseEjectionTime maxEjectionPercent minHealthPercent",
)
PORT_TRAFFIC_POLICY = message(
    "TrafficPolicy.PortTrafficPolicy",
    "port loadBalancer connectionPool outlierDetection tls",
    tls=CLIENT_TLS,
)
# retryBudget: Istio 1.27.
TRAFFIC_POLICY = message(
    "TrafficPolicy",
    "loadBalancer connectionPool outlierDetection portLevelSettings tls",
    ignored="tunnel proxyProtocol retryBudget",
    tls=CLIENT_TLS,
    tunnel=TUNNEL,
    proxyProtocol=PROXY_PROTOCOL,
    retryBudget=RETRY_BUDGET,
)
SUBSET = message("Subset", "name labels trafficPolicy")

H2_UPGRADE_POLICIES = ("DEFAULT", "DO_NOT_UPGRADE", "UPGRADE")
SIMPLE_LB = ("UNSPECIFIED", "LEAST_CONN", "RANDOM", "PASSTHROUGH", "ROUND_ROBIN", "LEAST_REQUEST")
MAGLEV_MAX_TABLE = 5000011  # Envoy's limit (exclusive)


def parse_destination_rule(meta: Meta, spec: Node) -> DestinationRule:
    host = spec.string("host", required=True, nonempty=True) or ""
    selector = c.selector_labels(spec, "workloadSelector", match_labels=True)
    if selector is not None:
        spec.warn(
            "workloadSelector",
            "parsed, but workload selection is not implemented by pyproxy: the rule applies to every workload",
        )
    return DestinationRule(
        meta=meta,
        host=host,
        traffic_policy=_traffic_policy(spec, "trafficPolicy"),
        subsets=_subsets(spec),
        workload_selector=selector,
        export_to=c.export_to(spec),
    )


def _subsets(spec: Node) -> tuple[Subset, ...]:
    result = []
    seen: set[str] = set()
    for node in spec.children("subsets", SUBSET):
        name = node.string("name", required=True, nonempty=True)
        if name is not None and not is_dns1123_label(name):
            node.error("name", f"{name!r} is not a valid subset name (must be a DNS-1123 label)")
        if name is not None and name in seen:
            node.error("name", f"duplicate subset name {name!r}")
        if name is not None:
            seen.add(name)
        result.append(
            Subset(
                name=name or "",
                labels=node.string_map("labels"),
                traffic_policy=_traffic_policy(node, "trafficPolicy"),
            )
        )
    return tuple(result)


def _nonempty(node: Node, fields: tuple[str, ...], what: str) -> bool:
    # Istio refuses policies with nothing in them ("must have at least one field").
    if any(node.has(k) for k in fields):
        return True
    node.rep.error(node.path, f"{what} must set at least one of {', '.join(fields)}")
    return False


def _traffic_policy(parent: Node, key: str) -> TrafficPolicy | None:
    node = parent.child(key, TRAFFIC_POLICY)
    if node is None:
        return None
    _nonempty(node, tuple(sorted(TRAFFIC_POLICY.parsed | TRAFFIC_POLICY.ignored)), "trafficPolicy")
    return TrafficPolicy(
        load_balancer=_load_balancer(node),
        connection_pool=_connection_pool(node),
        outlier_detection=_outlier_detection(node),
        port_level_settings=_port_level_settings(node),
        tls=_tls(node),
    )


def _port_level_settings(parent: Node) -> tuple[PortTrafficPolicy, ...]:
    result = []
    for node in parent.children("portLevelSettings", PORT_TRAFFIC_POLICY):
        port = c.port_selector(node, "port")
        if not node.has("port"):
            node.error("port", "is required")
        _nonempty(node, ("loadBalancer", "connectionPool", "outlierDetection", "tls"), "port traffic policy")
        result.append(
            PortTrafficPolicy(
                port=port or 0,
                load_balancer=_load_balancer(node),
                connection_pool=_connection_pool(node),
                outlier_detection=_outlier_detection(node),
                tls=_tls(node),
            )
        )
    return tuple(result)


def _tls(parent: Node) -> ClientTLSSettings | None:
    """ClientTLSSettings, with the checks of Istio's validation webhook
    (validateTLS): MUTUAL needs clientCertificate and privateKey unless
    credentialName is set; credentialName excludes the file fields;
    insecureSkipVerify cannot go with DISABLE or ISTIO_MUTUAL."""
    node = parent.child("tls", CLIENT_TLS)
    if node is None:
        return None
    mode = node.enum("mode", TLS_MODES) or "DISABLE"
    tls = ClientTLSSettings(
        mode=mode,
        client_certificate=node.string("clientCertificate") or "",
        private_key=node.string("privateKey") or "",
        ca_certificates=node.string("caCertificates") or "",
        credential_name=node.string("credentialName") or "",
        subject_alt_names=node.strings("subjectAltNames"),
        sni=node.string("sni") or "",
        insecure_skip_verify=node.boolean("insecureSkipVerify") or False,
        ca_crl=node.string("caCrl") or "",
    )
    if tls.insecure_skip_verify and mode in ("DISABLE", "ISTIO_MUTUAL"):
        node.error("insecureSkipVerify", f"cannot be true when mode is {mode}")
    if mode in ("SIMPLE", "MUTUAL") and tls.credential_name:
        if tls.client_certificate or tls.private_key or tls.ca_certificates or tls.ca_crl:
            node.error("credentialName", "cannot be set together with clientCertificate, privateKey, "
                                         "caCertificates or caCrl")
        # Kubernetes Secrets do not exist here: the files must be named.
        node.error("credentialName", "Kubernetes secrets are not available to pyproxy: give the files with "
                                     "clientCertificate, privateKey and caCertificates instead")
    elif mode == "MUTUAL":
        if not tls.client_certificate:
            node.error("clientCertificate", "is required for MUTUAL mode")
        if not tls.private_key:
            node.error("privateKey", "is required for MUTUAL mode")
    if mode == "ISTIO_MUTUAL":
        for key in ("clientCertificate", "privateKey", "caCertificates", "credentialName", "caCrl"):
            if node.has(key):
                # Istio ignores them; say so rather than pretend to use them.
                node.warn(key, "ignored in ISTIO_MUTUAL mode (the workload certificate and mesh root are used)")
    if tls.ca_crl:
        node.warn("caCrl", "certificate revocation lists are not implemented by pyproxy: not checked")
    return tls


# -- load balancer ------------------------------------------------------------


def _load_balancer(parent: Node) -> LoadBalancerSettings | None:
    node = parent.child("loadBalancer", LOAD_BALANCER)
    if node is None:
        return None
    simple = node.enum("simple", SIMPLE_LB)
    if simple == "LEAST_CONN":
        node.warn("simple", "LEAST_CONN is deprecated: use LEAST_REQUEST (treated as LEAST_REQUEST)")
        simple = "LEAST_REQUEST"
    if node.has("simple") and node.has("consistentHash"):
        node.rep.error(node.path, "only one of simple or consistentHash may be set")
    return LoadBalancerSettings(simple=simple, consistent_hash=_consistent_hash(node))


def _consistent_hash(parent: Node) -> ConsistentHashLB | None:
    node = parent.child("consistentHash", CONSISTENT_HASH)
    if node is None:
        return None
    keys = [
        k for k in ("httpHeaderName", "httpCookie", "useSourceIp", "httpQueryParameterName") if node.get(k)
    ]
    if len(keys) > 1:
        node.rep.error(node.path, f"only one hash key may be set, got {', '.join(keys)}")
    elif not keys:
        node.rep.warn(
            node.path,
            "no hash key (httpHeaderName, httpCookie, useSourceIp or httpQueryParameterName): "
            "requests will not have session affinity",
        )
    algorithms = [k for k in ("ringHash", "maglev") if node.has(k)]
    if len(algorithms) > 1:
        node.rep.error(node.path, "only one of ringHash or maglev may be set")
    ring_size = _ring_size(node, bool(algorithms))
    return ConsistentHashLB(
        http_header_name=node.string("httpHeaderName", nonempty=True),
        http_cookie=_http_cookie(node),
        use_source_ip=node.boolean("useSourceIp") or False,
        http_query_parameter_name=node.string("httpQueryParameterName", nonempty=True),
        minimum_ring_size=ring_size,
        maglev_table_size=_maglev(node),
    )


def _ring_size(node: Node, algorithm_set: bool) -> int | None:
    ring = node.child("ringHash", RING_HASH)
    size = ring.integer("minimumRingSize", lo=0, hi=UINT64_MAX) if ring is not None else None
    if node.has("minimumRingSize"):
        node.warn("minimumRingSize", "deprecated: use ringHash.minimumRingSize")
        if algorithm_set:
            node.error("minimumRingSize", "cannot be set together with ringHash or maglev")
            return size
        return node.integer("minimumRingSize", lo=0, hi=UINT64_MAX)
    return size


def _maglev(parent: Node) -> int | None:
    node = parent.child("maglev", MAGLEV)
    if node is None:
        return None
    size = node.integer("tableSize", lo=1, hi=UINT64_MAX, required=True)
    if size is None:
        return None
    if size >= MAGLEV_MAX_TABLE:
        node.error("tableSize", f"must be less than {MAGLEV_MAX_TABLE}")
        return None
    if not _is_prime(size):
        node.error("tableSize", "must be a prime number")
        return None
    return size


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n < 4:
        return True
    if n % 2 == 0:
        return False
    factor = 3
    while factor * factor <= n:
        if n % factor == 0:
            return False
        factor += 2
    return True


def _http_cookie(parent: Node) -> HTTPCookie | None:
    node = parent.child("httpCookie", HTTP_COOKIE)
    if node is None:
        return None
    name = node.string("name", required=True, nonempty=True)
    # A zero TTL is meaningful here (a session cookie), so no 1ms minimum.
    ttl = node.duration("ttl", istio_min=False)
    attributes = []
    for attr in node.children("attributes", COOKIE_ATTRIBUTE):
        attr_name = attr.string("name", required=True, nonempty=True)
        value = attr.string("value") or ""
        if attr_name and any(ch in attr_name + value for ch in ';\r\n'):
            attr.rep.error(attr.path, "cookie attributes must not contain ';' or line breaks")
        elif attr_name:
            attributes.append((attr_name, value))
    return HTTPCookie(name=name or "", path=node.string("path") or "", ttl=ttl, attributes=tuple(attributes))


# -- connection pool, outlier detection ---------------------------------------


def _connection_pool(parent: Node) -> ConnectionPoolSettings | None:
    node = parent.child("connectionPool", CONNECTION_POOL)
    if node is None:
        return None
    _nonempty(node, ("tcp", "http"), "connectionPool")
    return ConnectionPoolSettings(tcp=_tcp_settings(node), http=_http_settings(node))


def _tcp_settings(parent: Node) -> TCPSettings | None:
    node = parent.child("tcp", TCP_SETTINGS)
    if node is None:
        return None
    return TCPSettings(
        max_connections=node.integer("maxConnections", lo=0),
        connect_timeout=node.duration("connectTimeout"),
        max_connection_duration=node.duration("maxConnectionDuration"),
        idle_timeout=node.duration("idleTimeout"),
    )


def _http_settings(parent: Node) -> HTTPSettings | None:
    node = parent.child("http", HTTP_SETTINGS)
    if node is None:
        return None
    return HTTPSettings(
        http1_max_pending_requests=node.integer("http1MaxPendingRequests", lo=0),
        http2_max_requests=node.integer("http2MaxRequests", lo=0),
        max_requests_per_connection=node.integer("maxRequestsPerConnection", lo=0),
        max_retries=node.integer("maxRetries", lo=0),
        idle_timeout=node.duration("idleTimeout"),
        max_concurrent_streams=node.integer("maxConcurrentStreams", lo=0),
        h2_upgrade_policy=node.enum("h2UpgradePolicy", H2_UPGRADE_POLICIES) or "DEFAULT",
        use_client_protocol=bool(node.boolean("useClientProtocol")),
    )


def _outlier_detection(parent: Node) -> OutlierDetection | None:
    node = parent.child("outlierDetection", OUTLIER_DETECTION)
    if node is None:
        return None
    split = node.boolean("splitExternalLocalOriginErrors") or False
    local_failures = node.integer("consecutiveLocalOriginFailures", lo=0, hi=UINT32_MAX)
    if local_failures and not split:
        node.error(
            "consecutiveLocalOriginFailures", "has no effect unless splitExternalLocalOriginErrors is true"
        )
    consecutive_5xx, consecutive_gateway = _consecutive_errors(node)
    return OutlierDetection(
        consecutive_5xx_errors=consecutive_5xx,
        consecutive_gateway_errors=consecutive_gateway,
        consecutive_local_origin_failures=local_failures,
        split_external_local_origin_errors=split,
        interval=node.duration("interval"),
        base_ejection_time=node.duration("baseEjectionTime"),
        max_ejection_percent=node.integer("maxEjectionPercent", lo=0, hi=100),
        min_health_percent=node.integer("minHealthPercent", lo=0, hi=100),
    )


def _consecutive_errors(node: Node) -> tuple[int | None, int | None]:
    """(consecutive_5xx_errors, consecutive_gateway_errors).

    The deprecated ``consecutiveErrors`` is read and ignored, with a
    warning: istiod stopped translating it in Istio 1.7 (before, it became
    Envoy's consecutive_gateway_failure with 5xx ejection off, istio/api#617;
    pilot/pkg/networking/core/cluster_traffic_policy.go applyOutlierDetection
    now reads only consecutive5xxErrors and consecutiveGatewayErrors). An
    outlierDetection block without consecutive5xxErrors therefore gets
    Envoy's default: ejection after 5 consecutive 5xx.
    """
    five = node.integer("consecutive5xxErrors", lo=0, hi=UINT32_MAX)
    gateway = node.integer("consecutiveGatewayErrors", lo=0, hi=UINT32_MAX)
    if node.has("consecutiveErrors"):
        node.integer("consecutiveErrors", lo=0)  # int32 in the proto: still type-checked
        node.warn(
            "consecutiveErrors",
            "deprecated and ignored (istiod ignores it since Istio 1.7): use consecutive5xxErrors or "
            "consecutiveGatewayErrors; without them Envoy's default applies (eject after 5 consecutive 5xx)",
        )
    return five, gateway
