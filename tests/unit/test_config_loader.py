"""Unit tests for the Istio YAML loader (pyproxy.config.loader)."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from pyproxy.config import validate
from pyproxy.config.loader import expand_paths, load_paths, load_text, parse_duration
from pyproxy.config.model import (
    ConsistentHashLB,
    CorsPolicy,
    Destination,
    DestinationRule,
    FaultAbort,
    FaultDelay,
    HeaderOperations,
    Headers,
    HTTPCookie,
    HTTPFaultInjection,
    HTTPMirrorPolicy,
    HTTPRedirect,
    HTTPRetry,
    HTTPRewrite,
    HTTPRoute,
    HTTPRouteDestination,
    LoadedConfig,
    RegexRewrite,
    ServiceEntry,
    ServicePort,
    Sidecar,
    Source,
    StringMatch,
    VirtualService,
    WorkloadEntry,
)
from tests.reference import reference, skip_unless_present

REFERENCE = reference("istio")
F = "t.yaml"


# -- helpers ------------------------------------------------------------------


def doc(kind: str, spec: str, *, name: str = "x", namespace: str | None = None, api: str = "v1") -> str:
    """One Istio document with ``spec`` (dedented YAML) under ``spec:``."""
    md = f"  name: {name}\n" + (f"  namespace: {namespace}\n" if namespace else "")
    body = textwrap.indent(textwrap.dedent(spec).strip("\n"), "  ")
    return f"apiVersion: networking.istio.io/{api}\nkind: {kind}\nmetadata:\n{md}spec:\n{body}\n"


def vs(spec: str, **kw: str) -> str:
    return doc("VirtualService", spec, **kw)


def dr(spec: str, **kw: str) -> str:
    return doc("DestinationRule", spec, **kw)


def se(spec: str, **kw: str) -> str:
    return doc("ServiceEntry", spec, **kw)


def load(text: str, file: str = F) -> LoadedConfig:
    return load_text(text, file)


def ok(text: str) -> LoadedConfig:
    cfg = load(text)
    assert cfg.errors == (), [str(e) for e in cfg.errors]
    return cfg


def one(text: str) -> object:
    cfg = ok(text)
    assert len(cfg.resources) == 1
    return cfg.resources[0]


def route_of(spec: str) -> HTTPRoute:
    resource = one(vs(spec))
    assert isinstance(resource, VirtualService)
    return resource.http[0]


def strs(diags: tuple) -> list[str]:
    return [str(d) for d in diags]


def has_diag(diags: tuple, where: str, fragment: str) -> bool:
    """Some diagnostic is located exactly at ``where`` ("t.yaml#0: spec.x") and mentions ``fragment``."""
    return any(s.startswith(where + ": ") and fragment in s for s in strs(diags))


def simple_route(host: str = "reviews") -> str:
    return f"""
        hosts: [{host}]
        http:
        - route:
          - destination:
              host: {host}
    """


# -- durations ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("7s", 7.0),
        ("0.5s", 0.5),
        ("100ms", 0.1),
        ("1m", 60.0),
        ("1h", 3600.0),
        ("1h30m", 5400.0),
        ("1h30m15.5s", 5415.5),
        ("300us", 0.0003),
        ("300\u00b5s", 0.0003),
        ("300\u03bcs", 0.0003),
        ("10ns", 1e-8),
        ("0", 0.0),
        ("0s", 0.0),
        ("+2s", 2.0),
        (".5s", 0.5),
        ("5.s", 5.0),
        ("1.5h", 5400.0),
    ],
)
def test_parse_duration_accepts_go_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds, abs=1e-12)


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        (5, "use a duration like '5s'"),
        (1.5, "use a duration like '5s'"),
        (True, "expected a duration string"),
        (None, "expected a duration string"),
        ("5", "missing unit"),
        ("", "empty duration"),
        ("-5s", "negative duration"),
        ("5 s", "invalid duration"),
        ("5sec", "invalid duration"),
        ("s", "invalid duration"),
        ("1d", "invalid duration"),
        ("\u0665s", "invalid duration"),  # Arabic-Indic digit five
        ("9999999999h", "out of range"),
    ],
)
def test_parse_duration_rejects_with_clear_message(value: object, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_duration(value)
    assert fragment in str(info.value)


# -- VirtualService: values ----------------------------------------------------------


FULL_VS = """
hosts: [reviews, reviews.example.com]
gateways: [mesh, istio-system/edge]
exportTo: ["."]
http:
- name: jason
  match:
  - name: m0
    uri: {prefix: /api}
    scheme: {exact: http}
    method: {regex: "GET|HEAD"}
    authority: {exact: reviews:9080}
    headers:
      end-user: {exact: jason}
      x-present: {}
    withoutHeaders:
      x-debug: {prefix: "1"}
    queryParams:
      v: {regex: "\\\\d+"}
    port: 9080
    sourceLabels: {app: productpage}
    sourceNamespace: frontend
    gateways: [mesh]
    ignoreUriCase: true
  - uri: {exact: /exact}
  route:
  - destination: {host: reviews, subset: v2, port: {number: 9080}}
    weight: 75
    headers:
      request:
        set: {X-Version: v2}
        add: {x-trace: "on"}
        remove: [X-Drop]
      response:
        remove: [server]
  - destination: {host: reviews, subset: v1}
    weight: 25
  rewrite:
    uri: /v2/api
    authority: reviews.internal
  timeout: 1.5s
  retries:
    attempts: 3
    perTryTimeout: 500ms
    retryOn: 5xx,connect-failure,503
    retryRemoteLocalities: true
  fault:
    delay:
      fixedDelay: 7s
      percentage: {value: 12.5}
    abort:
      httpStatus: 503
      percentage: {value: 50}
  mirror: {host: shadow}
  mirrorPercentage: {value: 10}
  corsPolicy:
    allowOrigins:
    - exact: https://example.com
    - regex: "https://.*\\\\.example\\\\.org"
    allowMethods: [GET, POST]
    allowHeaders: [X-Foo, "*"]
    exposeHeaders: [X-Bar]
    maxAge: 24h
    allowCredentials: false
    unmatchedPreflights: IGNORE
  headers:
    request:
      set: {x-route: jason}
    response:
      add: {x-served-by: pyproxy}
- route:
  - destination: {host: reviews, subset: v1}
"""


def test_virtual_service_every_field_family_is_parsed() -> None:
    resource = one(vs(FULL_VS, name="reviews", namespace="bookinfo"))
    assert isinstance(resource, VirtualService)
    assert resource.meta.kind == "VirtualService"
    assert resource.meta.api_version == "networking.istio.io/v1"
    assert (resource.meta.name, resource.meta.namespace) == ("reviews", "bookinfo")
    assert resource.meta.source == Source(F, 0)
    assert resource.hosts == ("reviews", "reviews.example.com")
    assert resource.gateways == ("mesh", "istio-system/edge")
    assert resource.export_to == (".",)
    assert len(resource.http) == 2

    rule = resource.http[0]
    assert rule.name == "jason"
    assert rule.origin == "t.yaml#0 spec.http[0]"
    assert resource.http[1].origin == "t.yaml#0 spec.http[1]"

    m = rule.match[0]
    assert m.name == "m0"
    assert m.uri == StringMatch("prefix", "/api")
    assert m.scheme == StringMatch("exact", "http")
    assert m.method == StringMatch("regex", "GET|HEAD")
    assert m.authority == StringMatch("exact", "reviews:9080")
    assert m.headers == (("end-user", StringMatch("exact", "jason")), ("x-present", StringMatch("present")))
    assert m.without_headers == (("x-debug", StringMatch("prefix", "1")),)
    assert m.query_params == (("v", StringMatch("regex", r"\d+")),)
    assert m.port == 9080
    assert m.source_labels == (("app", "productpage"),)
    assert m.source_namespace == "frontend"
    assert m.gateways == ("mesh",)
    assert m.ignore_uri_case is True
    assert rule.match[1].uri == StringMatch("exact", "/exact")
    assert rule.match[1].ignore_uri_case is False

    assert rule.route == (
        HTTPRouteDestination(
            destination=Destination("reviews", "v2", 9080),
            weight=75,
            weight_set=True,
            headers=Headers(
                request=HeaderOperations(
                    set=(("x-version", "v2"),), add=(("x-trace", "on"),), remove=("x-drop",)
                ),
                response=HeaderOperations(remove=("server",)),
            ),
        ),
        HTTPRouteDestination(destination=Destination("reviews", "v1"), weight=25, weight_set=True),
    )
    assert rule.rewrite == HTTPRewrite(uri="/v2/api", authority="reviews.internal")
    assert rule.timeout == 1.5
    assert rule.retries == HTTPRetry(
        attempts=3, per_try_timeout=0.5, retry_on="5xx,connect-failure,503", retry_remote_localities=True
    )
    assert rule.fault is not None
    assert rule.fault.delay == FaultDelay(fixed_delay=7.0, percentage=12.5)
    assert rule.fault.abort == FaultAbort(http_status=503, percentage=50.0)
    assert rule.mirrors == (HTTPMirrorPolicy(Destination("shadow"), 10.0),)
    assert rule.cors_policy == CorsPolicy(
        allow_origins=(
            StringMatch("exact", "https://example.com"),
            StringMatch("regex", r"https://.*\.example\.org"),
        ),
        allow_methods=("GET", "POST"),
        allow_headers=("X-Foo", "*"),
        expose_headers=("X-Bar",),
        max_age=86400.0,
        allow_credentials=False,
        unmatched_preflights="IGNORE",
    )
    assert rule.headers == Headers(
        request=HeaderOperations(set=(("x-route", "jason"),)),
        response=HeaderOperations(add=(("x-served-by", "pyproxy"),)),
    )


def test_virtual_service_defaults() -> None:
    resource = one(vs(simple_route()))
    assert isinstance(resource, VirtualService)
    assert resource.meta.namespace == "default"
    assert resource.gateways == ()
    assert resource.export_to == ()
    rule = resource.http[0]
    assert rule == HTTPRoute(
        route=(HTTPRouteDestination(destination=Destination("reviews")),), origin="t.yaml#0 spec.http[0]"
    )
    assert rule.route[0].weight == 0
    assert rule.route[0].weight_set is False


def test_weight_set_distinguishes_explicit_zero_from_unset() -> None:
    rule = route_of(
        """
        hosts: [r]
        http:
        - route:
          - destination: {host: a}
            weight: 0
          - destination: {host: b}
            weight: 100
        """
    )
    assert [(d.weight, d.weight_set) for d in rule.route] == [(0, True), (100, True)]


def test_single_destination_weight_is_accepted_whatever_its_value() -> None:
    rule = route_of("hosts: [r]\nhttp:\n- route:\n  - destination: {host: a}\n    weight: 7\n")
    assert rule.route[0].weight == 7


def test_redirect_and_direct_response() -> None:
    resource = one(
        vs(
            """
            hosts: [r]
            http:
            - match: [{uri: {exact: /old}}]
              redirect: {uri: /new, authority: other, port: 8443, scheme: https, redirectCode: 308}
            - match: [{uri: {exact: /derive}}]
              redirect: {authority: other, derivePort: FROM_REQUEST_PORT}
            - match: [{uri: {exact: /s}}]
              directResponse: {status: 503, body: {string: "unknown error"}}
            - match: [{uri: {exact: /b}}]
              directResponse: {status: 200, body: {bytes: "dW5rbm93biBlcnJvcg=="}}
            - directResponse: {status: 204}
            """
        )
    )
    assert isinstance(resource, VirtualService)
    http = resource.http
    assert http[0].redirect == HTTPRedirect(
        uri="/new", authority="other", port=8443, scheme="https", redirect_code=308
    )
    assert http[1].redirect == HTTPRedirect(
        authority="other", derive_port="FROM_REQUEST_PORT", redirect_code=301
    )
    assert http[2].direct_response is not None
    assert (http[2].direct_response.status, http[2].direct_response.body) == (503, b"unknown error")
    assert http[3].direct_response is not None
    assert http[3].direct_response.body == b"unknown error"
    assert http[4].direct_response is not None
    assert http[4].direct_response.body is None


def test_prefix_rewrite_redirect_is_an_istio_field() -> None:
    # Istio 1.31 added HTTPRedirect.prefix_rewrite (istio/api#3708): no warning.
    cfg = ok(vs("hosts: [r]\nhttp:\n- redirect: {prefixRewrite: /v2/}\n"))
    assert cfg.resources[0].http[0].redirect == HTTPRedirect(prefix_rewrite="/v2/")  # type: ignore[union-attr]
    assert not cfg.warnings
    # Istio's validation: only with prefix uri matches, never with uri.
    bad = load(vs("hosts: [r]\nhttp:\n- match: [{uri: {exact: /a}}]\n  redirect: {prefixRewrite: /v2/}\n"))
    assert has_diag(bad.errors, "t.yaml#0: spec.http[0].redirect.prefixRewrite", "prefix match")
    both = load(vs("hosts: [r]\nhttp:\n- redirect: {prefixRewrite: /v2/, uri: /x}\n"))
    assert has_diag(both.errors, "t.yaml#0: spec.http[0].redirect.prefixRewrite", "cannot both be set")


def test_regex_rewrite() -> None:
    rule = route_of(
        """
        hosts: [r]
        http:
        - rewrite:
            uriRegexRewrite: {match: "^/service/([^/]+)(/.*)$", rewrite: "/x/\\\\2/\\\\1"}
          route: [{destination: {host: r}}]
        """
    )
    assert rule.rewrite == HTTPRewrite(uri_regex_rewrite=RegexRewrite("^/service/([^/]+)(/.*)$", r"/x/\2/\1"))


def test_fault_without_percentage_is_zero_percent() -> None:
    rule = route_of(
        """
        hosts: [r]
        http:
        - fault:
            delay: {fixedDelay: 2s}
            abort: {grpcStatus: UNAVAILABLE}
          route: [{destination: {host: r}}]
        """
    )
    assert rule.fault is not None
    assert rule.fault.delay == FaultDelay(fixed_delay=2.0, percentage=0.0)
    assert rule.fault.abort == FaultAbort(grpc_status="UNAVAILABLE", percentage=0.0)


def test_deprecated_fault_percent_is_converted_with_a_warning() -> None:
    cfg = ok(
        vs(
            """
            hosts: [r]
            http:
            - fault:
                delay: {fixedDelay: 2s, percent: 50}
              route: [{destination: {host: r}}]
            """
        )
    )
    rule = cfg.resources[0].http[0]  # type: ignore[union-attr]
    assert rule.fault.delay.percentage == 50.0
    assert has_diag(cfg.warnings, "t.yaml#0: spec.http[0].fault.delay.percent", "deprecated")


def test_exponential_delay_is_warned_and_fixed_delay_still_required() -> None:
    cfg = load(
        vs(
            "hosts: [r]\nhttp:\n- fault: {delay: {exponentialDelay: 1s}}\n  route: [{destination: {host: r}}]\n"
        )
    )
    assert has_diag(cfg.warnings, "t.yaml#0: spec.http[0].fault.delay.exponentialDelay", "not implemented")
    assert has_diag(cfg.errors, "t.yaml#0: spec.http[0].fault.delay.fixedDelay", "is required")


def test_mirror_forms_are_normalised_into_mirrors() -> None:
    spec = """
        hosts: [r]
        http:
        - route: [{destination: {host: r}}]
          mirror: {host: shadow, subset: v2}
          mirrorPercent: 30
        - route: [{destination: {host: r}}]
          mirror: {host: shadow}
        - route: [{destination: {host: r}}]
          mirrors:
          - destination: {host: a}
            percentage: {value: 5.5}
          - destination: {host: b}
        """
    cfg = ok(vs(spec))
    http = cfg.resources[0].http  # type: ignore[union-attr]
    assert http[0].mirrors == (HTTPMirrorPolicy(Destination("shadow", "v2"), 30.0),)
    assert http[1].mirrors == (HTTPMirrorPolicy(Destination("shadow"), None),)
    assert http[2].mirrors == (
        HTTPMirrorPolicy(Destination("a"), 5.5),
        HTTPMirrorPolicy(Destination("b"), None),
    )
    assert has_diag(cfg.warnings, "t.yaml#0: spec.http[0].mirrorPercent", "deprecated")


def test_deprecated_cors_allow_origin_becomes_string_matches() -> None:
    cfg = ok(
        vs(
            """
            hosts: [r]
            http:
            - route: [{destination: {host: r}}]
              corsPolicy: {allowOrigin: ["https://a.example", "*"]}
            """
        )
    )
    cors = cfg.resources[0].http[0].cors_policy  # type: ignore[union-attr]
    assert cors.allow_origins == (StringMatch("exact", "https://a.example"), StringMatch("regex", ".*"))
    assert cors.unmatched_preflights == "FORWARD"
    assert has_diag(cfg.warnings, "t.yaml#0: spec.http[0].corsPolicy.allowOrigin", "deprecated")


def test_uppercase_match_header_is_lowercased_with_a_warning() -> None:
    cfg = ok(
        vs(
            "hosts: [r]\nhttp:\n- match: [{headers: {End-User: {exact: jason}}}]\n  route: [{destination: {host: r}}]\n"
        )
    )
    assert cfg.resources[0].http[0].match[0].headers == (("end-user", StringMatch("exact", "jason")),)  # type: ignore[union-attr]
    assert has_diag(cfg.warnings, "t.yaml#0: spec.http[0].match[0].headers.End-User", "lowercase")


def test_without_headers_regex_star_means_present() -> None:
    rule = route_of(
        'hosts: [r]\nhttp:\n- match: [{withoutHeaders: {x-a: {regex: "*"}}}]\n  route: [{destination: {host: r}}]\n'
    )
    assert rule.match[0].without_headers == (("x-a", StringMatch("present")),)


def test_gateway_only_virtual_service_is_parsed() -> None:
    # The "sidecars ignore it" warning is the sidecar's (tests/unit/test_validate.py).
    cfg = ok(vs("hosts: ['*']\ngateways: [bookinfo-gateway]\nhttp:\n- route: [{destination: {host: r}}]\n"))
    assert cfg.resources[0].gateways == ("bookinfo-gateway",)  # type: ignore[union-attr]
    assert cfg.warnings == ()


def test_gateways_including_mesh_give_no_gateway_warning() -> None:
    cfg = ok(vs("hosts: [r]\ngateways: [mesh, edge]\nhttp:\n- route: [{destination: {host: r}}]\n"))
    assert not [w for w in cfg.warnings if w.path == "spec.gateways"]


def test_delegate_rule_is_dropped_with_a_warning() -> None:
    cfg = ok(
        vs(
            """
            hosts: [r]
            http:
            - match: [{uri: {prefix: /a}}]
              delegate: {name: other, namespace: ns}
            - route: [{destination: {host: r}}]
            """
        )
    )
    http = cfg.resources[0].http  # type: ignore[union-attr]
    assert [r.origin for r in http] == ["t.yaml#0 spec.http[1]"]
    assert has_diag(cfg.warnings, "t.yaml#0: spec.http[0].delegate", "not implemented")


def test_virtual_service_without_hosts_is_a_delegate_with_a_warning() -> None:
    cfg = ok(vs("http:\n- " + R))
    assert cfg.resources[0].hosts == ()  # type: ignore[union-attr]
    assert has_diag(cfg.warnings, "t.yaml#0: spec.hosts", "delegation is not implemented")


def test_mirror_percentage_without_mirror_is_warned() -> None:
    cfg = ok(routed("mirrorPercentage: {value: 5}"))
    assert cfg.resources[0].http[0].mirrors == ()  # type: ignore[union-attr]
    assert has_diag(cfg.warnings, "t.yaml#0: spec.http[0].mirrorPercentage", "no effect without mirror")


def test_rules_after_a_catch_all_are_reported_unreachable() -> None:
    cfg = ok(
        vs("hosts: [r]\nhttp:\n- route: [{destination: {host: a}}]\n- route: [{destination: {host: b}}]\n")
    )
    assert has_diag(cfg.warnings, "t.yaml#0: spec.http[1]", "unreachable")


def test_v1alpha3_and_v1beta1_are_accepted() -> None:
    cfg = ok(
        vs(simple_route(), name="a", api="v1alpha3") + "---\n" + vs(simple_route(), name="b", api="v1beta1")
    )
    assert [r.meta.api_version for r in cfg.resources] == [
        "networking.istio.io/v1alpha3",
        "networking.istio.io/v1beta1",
    ]


# -- DestinationRule ----------------------------------------------------------------


FULL_DR = """
host: reviews.bookinfo.svc.cluster.local
exportTo: ["*"]
trafficPolicy:
  loadBalancer:
    simple: LEAST_REQUEST
  connectionPool:
    tcp:
      maxConnections: 100
      connectTimeout: 30ms
      maxConnectionDuration: 1h
      idleTimeout: 5m
    http:
      http1MaxPendingRequests: 10
      http2MaxRequests: 1000
      maxRequestsPerConnection: 1
      maxRetries: 3
      idleTimeout: 30s
      maxConcurrentStreams: 50
  outlierDetection:
    consecutive5xxErrors: 7
    consecutiveGatewayErrors: 3
    consecutiveLocalOriginFailures: 2
    splitExternalLocalOriginErrors: true
    interval: 5m
    baseEjectionTime: 15m
    maxEjectionPercent: 100
    minHealthPercent: 20
  portLevelSettings:
  - port: {number: 9080}
    loadBalancer:
      consistentHash:
        httpCookie: {name: user, path: /, ttl: 0s}
        ringHash: {minimumRingSize: 2048}
subsets:
- name: v1
  labels: {version: v1}
- name: v2
  labels: {version: v2, track: canary}
  trafficPolicy:
    loadBalancer:
      consistentHash:
        httpHeaderName: x-user
        maglev: {tableSize: 65537}
"""


def test_destination_rule_every_field_family_is_parsed() -> None:
    resource = one(dr(FULL_DR, name="reviews"))
    assert isinstance(resource, DestinationRule)
    assert resource.host == "reviews.bookinfo.svc.cluster.local"
    assert resource.export_to == ("*",)
    tp = resource.traffic_policy
    assert tp is not None and tp.load_balancer is not None
    assert tp.load_balancer.simple == "LEAST_REQUEST"
    assert tp.connection_pool is not None
    tcp, http = tp.connection_pool.tcp, tp.connection_pool.http
    assert tcp is not None and http is not None
    assert (tcp.max_connections, tcp.connect_timeout, tcp.max_connection_duration, tcp.idle_timeout) == (
        100,
        0.03,
        3600.0,
        300.0,
    )
    assert (
        http.http1_max_pending_requests,
        http.http2_max_requests,
        http.max_requests_per_connection,
        http.max_retries,
        http.idle_timeout,
        http.max_concurrent_streams,
    ) == (10, 1000, 1, 3, 30.0, 50)
    od = tp.outlier_detection
    assert od is not None
    assert (
        od.consecutive_5xx_errors,
        od.consecutive_gateway_errors,
        od.consecutive_local_origin_failures,
    ) == (7, 3, 2)
    assert od.split_external_local_origin_errors is True
    assert (od.interval, od.base_ejection_time, od.max_ejection_percent, od.min_health_percent) == (
        300.0,
        900.0,
        100,
        20,
    )
    (port_policy,) = tp.port_level_settings
    assert port_policy.port == 9080
    assert port_policy.load_balancer is not None
    assert port_policy.load_balancer.consistent_hash == ConsistentHashLB(
        http_cookie=HTTPCookie(name="user", path="/", ttl=0.0), minimum_ring_size=2048
    )
    assert [s.name for s in resource.subsets] == ["v1", "v2"]
    assert resource.subsets[1].labels == (("version", "v2"), ("track", "canary"))
    sub_tp = resource.subsets[1].traffic_policy
    assert sub_tp is not None and sub_tp.load_balancer is not None
    assert sub_tp.load_balancer.consistent_hash == ConsistentHashLB(
        http_header_name="x-user", maglev_table_size=65537
    )


def test_destination_rule_deprecated_names() -> None:
    cfg = ok(
        dr(
            """
            host: r
            trafficPolicy:
              loadBalancer:
                consistentHash: {useSourceIp: true, minimumRingSize: 512}
              outlierDetection: {consecutiveErrors: 5}
            subsets:
            - name: v1
              trafficPolicy: {loadBalancer: {simple: LEAST_CONN}}
            """
        )
    )
    rule = cfg.resources[0]
    assert isinstance(rule, DestinationRule)
    assert rule.traffic_policy is not None and rule.traffic_policy.load_balancer is not None
    assert rule.traffic_policy.load_balancer.consistent_hash == ConsistentHashLB(
        use_source_ip=True, minimum_ring_size=512
    )
    od = rule.traffic_policy.outlier_detection
    assert od is not None
    # Ignored, as istiod has since 1.7: Envoy's defaults apply (5 consecutive 5xx).
    assert od.consecutive_gateway_errors is None
    assert od.consecutive_5xx_errors is None
    sub = rule.subsets[0].traffic_policy
    assert sub is not None and sub.load_balancer is not None and sub.load_balancer.simple == "LEAST_REQUEST"
    for path in (
        "spec.trafficPolicy.loadBalancer.consistentHash.minimumRingSize",
        "spec.trafficPolicy.outlierDetection.consecutiveErrors",
        "spec.subsets[0].trafficPolicy.loadBalancer.simple",
    ):
        assert has_diag(cfg.warnings, f"t.yaml#0: {path}", "deprecated"), path


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        # consecutiveErrors is ignored (istiod since 1.7): only the explicit fields count.
        ("consecutiveErrors: 3, consecutive5xxErrors: 7", (7, None)),
        ("consecutiveErrors: 3, consecutiveGatewayErrors: 2", (None, 2)),
        ("consecutiveErrors: 3, consecutive5xxErrors: 7, consecutiveGatewayErrors: 2", (7, 2)),
        ("consecutiveErrors: 0", (None, None)),
    ],
)
def test_destination_rule_deprecated_consecutive_errors_with_explicit_fields(
    fields: str, expected: tuple[int | None, int | None]
) -> None:
    cfg = ok(dr(f"host: r\ntrafficPolicy: {{outlierDetection: {{{fields}}}}}\n"))
    rule = cfg.resources[0]
    assert isinstance(rule, DestinationRule) and rule.traffic_policy is not None
    od = rule.traffic_policy.outlier_detection
    assert od is not None
    assert (od.consecutive_5xx_errors, od.consecutive_gateway_errors) == expected
    assert has_diag(cfg.warnings, "t.yaml#0: spec.trafficPolicy.outlierDetection.consecutiveErrors", "deprecated")


def test_destination_rule_workload_selector_is_parsed_and_warned() -> None:
    cfg = ok(dr("host: r\nworkloadSelector: {matchLabels: {app: a}}\n"))
    assert cfg.resources[0].workload_selector == (("app", "a"),)  # type: ignore[union-attr]
    assert has_diag(cfg.warnings, "t.yaml#0: spec.workloadSelector", "not implemented")


# -- ServiceEntry, WorkloadEntry, Sidecar ----------------------------------------------


def test_service_entry_is_parsed() -> None:
    resource = one(
        se(
            """
            hosts: [api.example.com]
            addresses: [10.1.0.0/16]
            location: MESH_INTERNAL
            resolution: STATIC
            ports:
            - {number: 80, name: http, protocol: http}
            - {number: 443, name: https, protocol: HTTPS, targetPort: 8443}
            endpoints:
            - address: 10.1.2.3
              ports: {http: 8080}
              labels: {zone: a}
              weight: 3
              serviceAccount: api
            - address: unix:///var/run/api.sock
            exportTo: ["."]
            """
        )
    )
    assert isinstance(resource, ServiceEntry)
    assert resource.hosts == ("api.example.com",)
    assert resource.addresses == ("10.1.0.0/16",)
    assert resource.location == "MESH_INTERNAL"
    assert resource.resolution == "STATIC"
    assert resource.ports == (
        ServicePort(number=80, name="http", protocol="HTTP"),
        ServicePort(number=443, name="https", protocol="HTTPS", target_port=8443),
    )
    assert resource.endpoints == (
        WorkloadEntry(
            address="10.1.2.3",
            ports=(("http", 8080),),
            labels=(("zone", "a"),),
            weight=3,
            service_account="api",
        ),
        WorkloadEntry(address="unix:///var/run/api.sock"),
    )
    assert resource.export_to == (".",)


def test_service_entry_defaults() -> None:
    resource = one(
        se("hosts: [api.example.com]\nports: [{number: 443, name: tls, protocol: TLS}]\nresolution: DNS\n")
    )
    assert isinstance(resource, ServiceEntry)
    assert (resource.location, resource.endpoints, resource.workload_selector) == ("MESH_EXTERNAL", (), None)
    resource = one(se("hosts: [api.example.com]\n"))
    assert isinstance(resource, ServiceEntry)
    assert resource.resolution == "NONE"


def test_service_entry_workload_selector_and_dns_endpoints() -> None:
    resource = one(
        se(
            """
            hosts: [db.internal]
            ports: [{number: 5432, name: tcp-db, protocol: TCP}]
            resolution: DNS
            workloadSelector: {labels: {app: db}}
            """
        )
    )
    assert isinstance(resource, ServiceEntry)
    assert resource.workload_selector == (("app", "db"),)
    resource = one(se("hosts: [a.example]\nresolution: DNS\nendpoints: [{address: backend.example.com}]\n"))
    assert isinstance(resource, ServiceEntry)
    assert resource.endpoints[0].address == "backend.example.com"


def test_workload_entry_kind() -> None:
    cfg = ok(
        doc(
            "WorkloadEntry",
            """
            address: 10.0.0.5
            ports: {http: 8080}
            labels: {app: vm}
            network: vpc1
            locality: us/east/a
            weight: 2
            serviceAccount: vm-sa
            """,
            name="vm1",
            namespace="apps",
        )
    )
    (resource,) = cfg.resources
    assert isinstance(resource, WorkloadEntry)
    assert resource.meta is not None and resource.meta.key == ("WorkloadEntry", "apps", "vm1")
    assert (resource.address, resource.ports, resource.labels) == (
        "10.0.0.5",
        (("http", 8080),),
        (("app", "vm"),),
    )
    assert (resource.network, resource.locality, resource.weight, resource.service_account) == (
        "vpc1",
        "us/east/a",
        2,
        "vm-sa",
    )
    assert has_diag(cfg.warnings, "t.yaml#0: spec.network", "not implemented")
    assert has_diag(cfg.warnings, "t.yaml#0: spec.locality", "not implemented")


def test_sidecar() -> None:
    cfg = ok(
        doc(
            "Sidecar",
            """
            workloadSelector: {labels: {app: ratings}}
            outboundTrafficPolicy: {mode: REGISTRY_ONLY}
            egress:
            - hosts: ["./*"]
            """,
        )
    )
    (resource,) = cfg.resources
    assert resource == Sidecar(
        meta=resource.meta,  # type: ignore[union-attr]
        workload_selector=(("app", "ratings"),),
        outbound_traffic_policy_mode="REGISTRY_ONLY",
    )
    assert has_diag(cfg.warnings, "t.yaml#0: spec.egress", "not implemented by pyproxy, ignored")
    bare = one(doc("Sidecar", "outboundTrafficPolicy: {mode: ALLOW_ANY}"))
    assert isinstance(bare, Sidecar)
    assert (bare.workload_selector, bare.outbound_traffic_policy_mode) == (None, "ALLOW_ANY")


def test_sidecar_policy_without_mode_is_registry_only_like_istio() -> None:
    cfg = ok(doc("Sidecar", "outboundTrafficPolicy: {}"))
    assert cfg.resources[0].outbound_traffic_policy_mode == "REGISTRY_ONLY"  # type: ignore[union-attr]
    assert has_diag(cfg.warnings, "t.yaml#0: spec.outboundTrafficPolicy.mode", "REGISTRY_ONLY")


# -- errors: exact locations ---------------------------------------------------------

R = "route: [{destination: {host: r}}]"


def rule(text: str) -> str:
    """A VirtualService whose only HTTP rule is ``text`` (flow-style YAML lines)."""
    return vs("hosts: [r]\nhttp:\n- " + text.replace("\n", "\n  "))


def routed(text: str) -> str:
    """Like rule(), with a plain route added so the rule is otherwise valid."""
    return rule(f"{text}\n{R}")


def policy(text: str) -> str:
    return dr(f"host: r\ntrafficPolicy: {text}")


H = "spec.http[0]"
TP = "spec.trafficPolicy"
TWO = "route:\n- destination: {host: a}\n- destination: {host: b}"
# (id, document, path of the error, fragment of its message)
ERROR_CASES = [
    # wrong types
    ("vs-hosts-string", vs("hosts: reviews\nhttp:\n- " + R), "spec.hosts", "must be a list"),
    ("vs-http-map", vs("hosts: [r]\nhttp: {route: []}"), "spec.http", "must be a list"),
    ("weight-string", rule(f"{R[:-2]}, weight: '50'}}]"), f"{H}.route[0].weight", "must be an integer"),
    ("weight-bool", rule(f"{R[:-2]}, weight: true}}]"), f"{H}.route[0].weight", "got boolean true"),
    ("weight-float", rule(f"{R[:-2]}, weight: 50.5}}]"), f"{H}.route[0].weight", "must be an integer"),
    ("subset-int", rule("route: [{destination: {host: r, subset: 1}}]"), f"{H}.route[0].destination.subset",
     "must be a string, got integer 1 (quote it"),
    ("port-int", rule("route: [{destination: {host: r, port: 9080}}]"), f"{H}.route[0].destination.port",
     "{number: 9080}"),
    ("label-int", dr("host: r\nsubsets: [{name: v1, labels: {version: 1}}]"), "spec.subsets[0].labels.version",
     "must be a string"),
    ("bool-as-string", routed("match: [{ignoreUriCase: 'yes'}]"), f"{H}.match[0].ignoreUriCase", "true or false"),
    ("rule-null", vs("hosts: [r]\nhttp:\n- null"), H, "must be a mapping, got null"),
    # durations
    ("timeout-number", routed("timeout: 5"), f"{H}.timeout", "use a duration like '5s'"),
    ("timeout-bad", routed("timeout: 5 seconds"), f"{H}.timeout", "invalid duration"),
    ("timeout-negative", routed("timeout: -1s"), f"{H}.timeout", "negative duration"),
    ("timeout-zero", routed("timeout: 0s"), f"{H}.timeout", "at least 1ms"),
    ("timeout-sub-ms", routed("timeout: 1500us"), f"{H}.timeout", "millisecond precision"),
    ("interval-number", policy("{outlierDetection: {interval: 10}}"), f"{TP}.outlierDetection.interval",
     "use a duration like '5s'"),
    ("max-age-fraction", routed("corsPolicy: {maxAge: 1500ms}"), f"{H}.corsPolicy.maxAge", "whole number of seconds"),
    # weights and destinations
    ("weight-negative", rule(f"{TWO}\n  weight: -1"), f"{H}.route[1].weight", "must be >= 0"),
    ("weights-all-zero", rule(TWO), f"{H}.route", "total weight is 0"),
    ("no-host", rule("route: [{destination: {subset: v1}}]"), f"{H}.route[0].destination.host", "is required"),
    ("no-destination", rule("route: [{weight: 100}]"), f"{H}.route[0].destination", "is required"),
    ("bad-subset-name", rule("route: [{destination: {host: r, subset: V_1}}]"), f"{H}.route[0].destination.subset",
     "DNS-1123"),
    ("dest-port-range", rule("route: [{destination: {host: r, port: {number: 70000}}}]"),
     f"{H}.route[0].destination.port.number", "must be between 1 and 65535"),
    # which actions a rule has
    ("no-action", rule("match: [{uri: {prefix: /}}]"), H, "one of route, redirect, directResponse or delegate"),
    ("route-and-redirect", routed("redirect: {uri: /x}"), H, "redirect and route cannot both be set"),
    ("route-and-direct", routed("directResponse: {status: 503}"), H, "directResponse and route cannot both be set"),
    ("redirect-and-direct", rule("redirect: {uri: /x}\ndirectResponse: {status: 503}"), H,
     "redirect and directResponse cannot both be set"),
    ("mirror-and-mirrors", routed("mirror: {host: m}\nmirrors: [{destination: {host: n}}]"), H,
     "mirror and mirrors cannot both be set"),
    ("no-routes-at-all", vs("hosts: [r]"), "spec", "one of http, tcp or tls must be provided"),
    ("mesh-wildcard-host", vs("hosts: ['*']\nhttp:\n- " + R), "spec.hosts[0]", "wildcard host"),
    # string matches
    ("two-match-kinds", routed("match: [{uri: {exact: /a, prefix: /b}}]"), f"{H}.match[0].uri",
     "only one of exact, prefix or regex"),
    ("bad-regex", routed("match: [{uri: {regex: 'a('}}]"), f"{H}.match[0].uri.regex", "missing )"),
    ("lookahead-regex", routed("match: [{headers: {end-user: {regex: '(?=a)'}}}]"),
     f"{H}.match[0].headers.end-user.regex", "invalid RE2 regex"),
    ("long-regex", routed("match: [{uri: {regex: '" + "a" * 1025 + "'}}]"), f"{H}.match[0].uri.regex", "too long"),
    ("exact-int", routed("match: [{headers: {end-user: {exact: 42}}}]"), f"{H}.match[0].headers.end-user.exact",
     "must be a string"),
    ("empty-prefix", routed("match: [{headers: {x: {prefix: ''}}}]"), f"{H}.match[0].headers.x.prefix",
     "must not be empty"),
    ("null-header", routed("match: [{headers: {x: null}}]"), f"{H}.match[0].headers.x", "must not be null"),
    ("bad-header-name", routed("match: [{headers: {'x y': {exact: a}}}]"), f"{H}.match[0].headers.x y",
     "not a valid header name"),
    ("match-port", routed("match: [{port: 65536}]"), f"{H}.match[0].port", "must be between 0 and 65535"),
    ("jwt-claim-on-mesh", routed("match: [{headers: {'@request.auth.claims.sub': {exact: a}}}]"),
     f"{H}.match[0].headers.@request.auth.claims.sub", "only supported for gateways"),
    # percentages and statuses
    ("percentage-high", routed("fault: {abort: {httpStatus: 500, percentage: {value: 101}}}"),
     f"{H}.fault.abort.percentage.value", "must be between 0 and 100"),
    ("percentage-negative", routed("fault: {delay: {fixedDelay: 1s, percentage: {value: -1}}}"),
     f"{H}.fault.delay.percentage.value", "must be between 0 and 100"),
    ("percent-and-percentage", routed("fault: {delay: {fixedDelay: 1s, percent: 5, percentage: {value: 5}}}"),
     f"{H}.fault.delay", "percent and percentage cannot both be set"),
    ("mirror-percentage", routed("mirror: {host: m}\nmirrorPercentage: {value: 150}"),
     f"{H}.mirrorPercentage.value", "must be between 0 and 100"),
    ("abort-status-low", routed("fault: {abort: {httpStatus: 99}}"), f"{H}.fault.abort.httpStatus",
     "must be between 200 and 599"),
    ("abort-status-high", routed("fault: {abort: {httpStatus: 600}}"), f"{H}.fault.abort.httpStatus",
     "must be between 200 and 599"),
    ("abort-grpc", routed("fault: {abort: {grpcStatus: NOPE}}"), f"{H}.fault.abort.grpcStatus", "must be one of"),
    ("http2-error", routed("fault: {abort: {http2Error: x}}"), f"{H}.fault.abort.http2Error", "not supported"),
    ("empty-fault", routed("fault: {}"), f"{H}.fault", "delay and/or abort"),
    ("redirect-code", rule("redirect: {uri: /x, redirectCode: 200}"), f"{H}.redirect.redirectCode", "must be a 3xx"),
    ("redirect-empty", rule("redirect: {redirectCode: 302}"), f"{H}.redirect", "at least one of uri"),
    ("redirect-scheme", rule("redirect: {scheme: ftp}"), f"{H}.redirect.scheme", "'http' or 'https'"),
    ("redirect-port-and-derive", rule("redirect: {port: 80, derivePort: FROM_REQUEST_PORT}"), f"{H}.redirect",
     "port and derivePort cannot both be set"),
    ("direct-status", rule("directResponse: {status: 700}"), f"{H}.directResponse.status",
     "must be between 200 and 599"),
    ("direct-no-status", rule("directResponse: {body: {string: x}}"), f"{H}.directResponse.status", "is required"),
    ("direct-body-big", rule("directResponse: {status: 200, body: {string: '" + "x" * (2**20 + 1) + "'}}"),
     f"{H}.directResponse.body", "at most 1 MiB"),
    ("direct-body-both", rule("directResponse: {status: 200, body: {string: a, bytes: YQ==}}"),
     f"{H}.directResponse.body", "only one of string or bytes"),
    ("direct-body-base64", rule("directResponse: {status: 200, body: {bytes: '***'}}"),
     f"{H}.directResponse.body.bytes", "base64"),
    # rewrite, retries, CORS, headers
    ("rewrite-both", routed("rewrite: {uri: /a, uriRegexRewrite: {match: a, rewrite: b}}"), f"{H}.rewrite",
     "only one of uri or uriRegexRewrite"),
    ("retry-policy", routed("retries: {attempts: 2, retryOn: '5xx,sometimes'}"), f"{H}.retries.retryOn",
     "'sometimes' is not a valid retry condition"),
    ("retry-no-attempts", routed("retries: {perTryTimeout: 1s}"), f"{H}.retries.attempts", "retries disabled"),
    ("retry-negative", routed("retries: {attempts: -1}"), f"{H}.retries.attempts", "must be >= 0"),
    ("cors-method", routed("corsPolicy: {allowMethods: [FETCH]}"), f"{H}.corsPolicy.allowMethods[0]",
     "not a supported HTTP method"),
    ("cors-empty-origin", routed("corsPolicy: {allowOrigins: [{}]}"), f"{H}.corsPolicy.allowOrigins[0]",
     "one of exact, prefix or regex is required"),
    ("header-value-int", routed("headers: {request: {set: {x-a: 1}}}"), f"{H}.headers.request.set.x-a",
     "must be a string"),
    ("header-pseudo", routed("headers: {request: {set: {':path': /x}}}"), f"{H}.headers.request.set.:path",
     "pseudo-headers"),
    ("header-remove-host", routed("headers: {request: {remove: [Host]}}"), f"{H}.headers.request.remove[0]",
     "Host header"),
    ("authority-twice", routed("rewrite: {authority: a}\nheaders: {request: {set: {host: b}}}"), f"{H}.headers",
     "authority"),
    # DestinationRule
    ("dr-no-host", dr("subsets: [{name: v1}]"), "spec.host", "is required"),
    ("dup-subsets", dr("host: r\nsubsets:\n- name: v1\n- name: v1"), "spec.subsets[1].name",
     "duplicate subset name 'v1'"),
    ("subset-no-name", dr("host: r\nsubsets:\n- labels: {v: a}"), "spec.subsets[0].name", "is required"),
    ("lb-unknown", policy("{loadBalancer: {simple: FASTEST}}"), f"{TP}.loadBalancer.simple", "must be one of"),
    ("lb-both", policy("{loadBalancer: {simple: RANDOM, consistentHash: {useSourceIp: true}}}"),
     f"{TP}.loadBalancer", "only one of simple or consistentHash"),
    ("ejection-percent", policy("{outlierDetection: {maxEjectionPercent: 101}}"),
     f"{TP}.outlierDetection.maxEjectionPercent", "must be between 0 and 100"),
    ("negative-count", policy("{connectionPool: {tcp: {maxConnections: -1}}}"),
     f"{TP}.connectionPool.tcp.maxConnections", "must be >= 0"),
    ("negative-5xx", policy("{outlierDetection: {consecutive5xxErrors: -2}}"),
     f"{TP}.outlierDetection.consecutive5xxErrors", "must be >= 0"),
    ("local-origin-no-split", policy("{outlierDetection: {consecutiveLocalOriginFailures: 3}}"),
     f"{TP}.outlierDetection.consecutiveLocalOriginFailures", "splitExternalLocalOriginErrors"),
    ("empty-traffic-policy", policy("{}"), TP, "must set at least one of"),
    ("port-policy-no-port", policy("{portLevelSettings: [{loadBalancer: {simple: RANDOM}}]}"),
     f"{TP}.portLevelSettings[0].port", "is required"),
    ("maglev-prime", policy("{loadBalancer: {consistentHash: {useSourceIp: true, maglev: {tableSize: 1000}}}}"),
     f"{TP}.loadBalancer.consistentHash.maglev.tableSize", "prime"),
    ("cookie-no-name", policy("{loadBalancer: {consistentHash: {httpCookie: {ttl: 10s}}}}"),
     f"{TP}.loadBalancer.consistentHash.httpCookie.name", "is required"),
    # ServiceEntry
    ("se-no-hosts", se("ports: [{number: 80, name: http}]"), "spec.hosts", "at least one host is required"),
    ("se-resolution", se("hosts: [a.example]\nresolution: DYNAMIC"), "spec.resolution",
     "must be one of NONE, STATIC, DNS, DNS_ROUND_ROBIN"),
    ("se-port-range", se("hosts: [a.example]\nports: [{number: 0, name: http}]"), "spec.ports[0].number",
     "must be between 1 and 65535"),
    ("se-port-name", se("hosts: [a.example]\nports: [{number: 80}]"), "spec.ports[0].name", "is required"),
    ("se-protocol", se("hosts: [a.example]\nports: [{number: 80, name: p, protocol: GOPHER}]"),
     "spec.ports[0].protocol", "unsupported"),
    ("se-static-hostname", se("hosts: [a.example]\nresolution: STATIC\nendpoints: [{address: backend.example}]"),
     "spec.endpoints[0].address", "is not an IP address"),
    ("se-static-bad-unix", se("hosts: [a.example]\nresolution: STATIC\nendpoints: [{address: 'unix://rel.sock'}]"),
     "spec.endpoints[0].address", "absolute"),
    ("se-endpoint-port-name",
     se("hosts: [a.example]\nresolution: STATIC\nports: [{number: 80, name: http}]\n"
        "endpoints: [{address: 1.2.3.4, ports: {grpc: 9090}}]"),
     "spec.endpoints[0].ports.grpc", "not defined in the ServiceEntry ports"),
    ("se-none-with-endpoints", se("hosts: [a.example]\nendpoints: [{address: 1.2.3.4}]"), "spec.endpoints",
     "resolution is NONE"),
    ("se-endpoint-no-address", se("hosts: [a.example]\nresolution: STATIC\nendpoints: [{labels: {a: b}}]"),
     "spec.endpoints[0].address", "is required"),
    ("se-bad-address", se("hosts: [a.example]\naddresses: [not-an-ip]"), "spec.addresses[0]", "not an IP address"),
    ("se-dup-port", se("hosts: [a.example]\nports: [{number: 80, name: a}, {number: 80, name: b}]"),
     "spec.ports[1].number", "duplicate"),
    # Sidecar
    ("sidecar-mode", doc("Sidecar", "outboundTrafficPolicy: {mode: DENY_ALL}"), "spec.outboundTrafficPolicy.mode",
     "must be one of REGISTRY_ONLY, ALLOW_ANY"),
    ("sidecar-empty", doc("Sidecar", "workloadSelector: {labels: {app: a}}"), "spec", "must set at least one of"),
    # the object itself
    ("no-kind", "apiVersion: networking.istio.io/v1\nmetadata: {name: a}\nspec: {}\n", "kind", "is required"),
    ("no-name", "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {namespace: a}\n",
     "metadata.name", "is required"),
    ("no-metadata", "apiVersion: networking.istio.io/v1\nkind: VirtualService\nspec: {}\n", "metadata.name",
     "is required"),
    ("spec-list", "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: a}\nspec: []\n",
     "spec", "must be a mapping"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("text", "path", "fragment"), [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES]
)
def test_error_is_reported_at_exact_path(text: str, path: str, fragment: str) -> None:
    cfg = load(text)
    where = f"{F}#0: {path}"
    assert has_diag(cfg.errors, where, fragment), strs(cfg.errors)
    # A resource with errors is never part of the effective configuration.
    assert cfg.resources == ()
    assert not cfg.ok


def test_error_message_format_matches_the_documented_example() -> None:
    spec = "hosts: [r]\nhttp:\n- route:\n  - destination: {host: a}\n    weight: 1\n  - destination: {host: b}\n    weight: -5\n"
    text = (
        vs(simple_route(), name="a") + "---\n" + vs(simple_route(), name="b") + "---\n" + vs(spec, name="c")
    )
    cfg = load_text(text, "reviews.yaml")
    assert strs(cfg.errors) == ["reviews.yaml#2: spec.http[0].route[1].weight: must be >= 0"]
    assert [r.meta.name for r in cfg.resources] == ["a", "b"]


def test_metadata_namespace_and_labels() -> None:
    head = "apiVersion: networking.istio.io/v1\nkind: Sidecar\nspec: {outboundTrafficPolicy: {mode: ALLOW_ANY}}\n"
    cfg = ok(
        head + "metadata: {name: s, namespace: prod, labels: {team: a, tier: '1'}, annotations: {x: y}}\n"
    )
    meta = cfg.resources[0].meta
    assert meta is not None
    assert (meta.key, meta.labels) == (("Sidecar", "prod", "s"), (("team", "a"), ("tier", "1")))
    bad = load(head + "metadata: {name: s, namespace: 5, labels: {tier: 1}}\n")
    assert has_diag(bad.errors, "t.yaml#0: metadata.namespace", "must be a string")
    assert has_diag(bad.errors, "t.yaml#0: metadata.labels.tier", "must be a string")


def test_load_text_defaults_and_empty_input() -> None:
    cfg = load_text("")
    assert cfg == LoadedConfig(files=("<string>",))
    assert cfg.ok


def test_document_that_is_not_a_mapping_is_an_error() -> None:
    cfg = load("- just\n- a list\n---\nplain scalar\n")
    assert strs(cfg.errors) == [
        "t.yaml#0: a Kubernetes object must be a mapping, got a list",
        "t.yaml#1: a Kubernetes object must be a mapping, got string 'plain scalar'",
    ]


def test_all_errors_in_all_files_are_collected(tmp_path: Path) -> None:
    a = tmp_path / "a.yaml"
    b = tmp_path / "b.yaml"
    a.write_text(
        vs("hosts: [r]\nhttp:\n- timeout: 5\n  route: [{destination: {subset: v1}}]", name="one")
        + "---\n"
        + dr("host: r\nsubsets: [{name: v1}, {name: v1}]", name="two")
    )
    b.write_text(
        se("hosts: [x.example]\nresolution: MAGIC", name="three") + "---\n" + vs(simple_route(), name="fine")
    )
    cfg = load_paths([str(a), str(b), str(tmp_path / "missing.yaml")])
    assert strs(cfg.errors) == [
        f"{tmp_path}/missing.yaml: no such file or directory",
        f"{a}#0: spec.http[0].route[0].destination.host: is required",
        f"{a}#0: spec.http[0].timeout: expected a duration string, got integer 5; use a duration like '5s', '100ms' or '1m30s'",
        f"{a}#1: spec.subsets[1].name: duplicate subset name 'v1'",
        f"{b}#0: spec.resolution: must be one of NONE, STATIC, DNS, DNS_ROUND_ROBIN, got 'MAGIC'",
    ]
    assert [r.meta.name for r in cfg.resources] == ["fine"]
    assert cfg.files == (str(a), str(b))


# -- warnings ----------------------------------------------------------------------


def test_other_kinds_load_with_one_warning_each() -> None:
    text = (
        "apiVersion: networking.istio.io/v1alpha3\nkind: WorkloadGroup\nmetadata: {name: wg}\nspec: {}\n---\n"
        "apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata: {name: deny, namespace: ns}\nspec: {}\n---\n"
        "apiVersion: v1\nkind: Service\nmetadata: {name: svc}\nspec: {ports: [{port: 80}]}\n---\n"
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: k8s}\nspec: {gatewayClassName: x}\n"
    )
    cfg = ok(text)
    assert cfg.resources == ()
    assert strs(cfg.warnings) == [
        "t.yaml#0: kind WorkloadGroup is not used by pyproxy; default/wg ignored",
        "t.yaml#1: kind WasmPlugin (extensions.istio.io/v1alpha1) is not used by pyproxy; ns/deny ignored",
        "t.yaml#2: kind Service (v1) is not used by pyproxy; default/svc ignored",
        (
            "t.yaml#3: apiVersion: gateway.networking.k8s.io/v1 is not supported for Gateway "
            "(use networking.istio.io/v1, v1beta1 or v1alpha3); default/k8s ignored"
        ),
    ]


def test_a_misspelt_kind_or_version_of_istio_networking_is_an_error() -> None:
    # Skipping such a document would silently drop its routing rules.
    text = (
        "apiVersion: networking.istio.io/v1\nkind: VirtualSevice\nmetadata: {name: a}\nspec: {hosts: [r]}\n---\n"
        "apiVersion: networking.istio.io/v2\nkind: VirtualService\nmetadata: {name: b}\nspec: {hosts: [r]}\n---\n"
        "kind: DestinationRule\nmetadata: {name: c}\nspec: {host: r}\n"
    )
    cfg = load(text)
    assert cfg.resources == ()
    assert strs(cfg.errors) == [
        "t.yaml#0: kind: networking.istio.io has no kind 'VirtualSevice' (did you mean 'VirtualService'?)",
        (
            "t.yaml#1: apiVersion: networking.istio.io/v2 is not a version of VirtualService "
            "(use networking.istio.io/v1, v1beta1 or v1alpha3)"
        ),
        "t.yaml#2: apiVersion: is required (use networking.istio.io/v1)",
    ]


UNIMPLEMENTED = [
    (vs("hosts: [r]\ntls:\n- match: [{sniHosts: [r]}]\n  " + R), "spec.tls"),
    (vs("hosts: [r]\ntcp:\n- " + R), "spec.tcp"),
    (routed("match: [{statPrefix: s}]"), f"{H}.match[0].statPrefix"),
    (policy("{tunnel: {targetHost: a, targetPort: 8080}}"), f"{TP}.tunnel"),
    (policy("{proxyProtocol: {version: V2}}"), f"{TP}.proxyProtocol"),
    (policy("{loadBalancer: {simple: RANDOM, localityLbSetting: {enabled: true}}}"),
     f"{TP}.loadBalancer.localityLbSetting"),
    (policy("{loadBalancer: {simple: RANDOM, warmupDurationSecs: 10s}}"), f"{TP}.loadBalancer.warmupDurationSecs"),
    (policy("{loadBalancer: {consistentHash: {httpHeaderName: x, httpHeaderRegexRewrite: {match: a, rewrite: b}}}}"),
     f"{TP}.loadBalancer.consistentHash.httpHeaderRegexRewrite"),
    (policy("{connectionPool: {tcp: {tcpKeepalive: {time: 10s}}}}"), f"{TP}.connectionPool.tcp.tcpKeepalive"),
    (doc("Sidecar", "egress: [{hosts: ['./*']}]"), "spec.egress"),
    (doc("Sidecar", "ingress: [{port: {number: 80}}]"), "spec.ingress"),
    (doc("Sidecar", "inboundConnectionPool: {tcp: {maxConnections: 5}}"), "spec.inboundConnectionPool"),
    (doc("Sidecar", "outboundTrafficPolicy: {mode: ALLOW_ANY, egressProxy: {host: e}}"),
     "spec.outboundTrafficPolicy.egressProxy"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "path"), UNIMPLEMENTED, ids=[p for _, p in UNIMPLEMENTED])
def test_unimplemented_istio_fields_load_with_one_warning(text: str, path: str) -> None:
    cfg = ok(text)
    assert len(cfg.resources) == 1
    matching = [w for w in strs(cfg.warnings) if w.startswith(f"t.yaml#0: {path}: ")]
    assert matching == [f"t.yaml#0: {path}: not implemented by pyproxy, ignored"]


def test_export_to_is_parsed_and_warned() -> None:
    cfg = ok(vs("hosts: [r]\nexportTo: ['.', other]\nhttp:\n- " + R))
    assert cfg.resources[0].export_to == (".", "other")  # type: ignore[union-attr]
    assert has_diag(cfg.warnings, "t.yaml#0: spec.exportTo", "no effect")


def test_unknown_fields_are_errors_with_a_suggestion_and_the_document_is_rejected() -> None:
    text = vs(
        """
        hosts: [r]
        http:
        - route: [{destination: {host: r}}]
          timeuot: 5s
          fault:
            delay: {fixed_delay: 5s, fixedDelay: 1s}
        colour: blue
        """
    )
    cfg = load(text)
    assert cfg.resources == ()
    assert strs(cfg.errors) == [
        "t.yaml#0: spec.colour: unknown field 'colour' in VirtualService",
        "t.yaml#0: spec.http[0].timeuot: unknown field 'timeuot' in HTTPRoute (did you mean 'timeout'?)",
        (
            "t.yaml#0: spec.http[0].fault.delay.fixed_delay: unknown field 'fixed_delay' in "
            "HTTPFaultInjection.Delay (did you mean 'fixedDelay'?)"
        ),
    ]


def test_a_misspelt_match_field_is_an_error_not_a_match_all_rule() -> None:
    # uri: {prefx: /api} read leniently is uri: {} ("any URI"): every request
    # would take this rule. Istio's schema rejects the document.
    cfg = load(vs("hosts: [r]\nhttp:\n- match: [{uri: {prefx: /api}}]\n  route: [{destination: {host: canary}}]"))
    assert cfg.resources == ()
    assert strs(cfg.errors) == [
        "t.yaml#0: spec.http[0].match[0].uri.prefx: unknown field 'prefx' in StringMatch (did you mean 'prefix'?)"
    ]


UNKNOWN_INSIDE_UNIMPLEMENTED = [
    (vs("hosts: [r]\ntls:\n- match: [{sniHost: [r]}]\n  " + R), "spec.tls[0].match[0].sniHost", "TLSMatchAttributes"),
    (vs("hosts: [r]\ntcp:\n- route: [{destination: {host: r, port: {numbr: 1}}}]"),
     "spec.tcp[0].route[0].destination.port.numbr", "PortSelector"),
    (policy("{tls: {mdoe: ISTIO_MUTUAL}}"), f"{TP}.tls.mdoe", "ClientTLSSettings"),
    (policy("{portLevelSettings: [{port: {number: 80}, tls: {snii: a}}]}"), f"{TP}.portLevelSettings[0].tls.snii",
     "ClientTLSSettings"),
    (policy("{loadBalancer: {localityLbSetting: {failover: [{form: a, to: b}]}}}"),
     f"{TP}.loadBalancer.localityLbSetting.failover[0].form", "LocalityLoadBalancerSetting.Failover"),
    (policy("{connectionPool: {tcp: {tcpKeepalive: {tme: 10s}}}}"), f"{TP}.connectionPool.tcp.tcpKeepalive.tme",
     "ConnectionPoolSettings.TCPSettings.TcpKeepalive"),
    (doc("Sidecar", "egress: [{hosts: ['./*'], prot: {number: 1}}]"), "spec.egress[0].prot", "IstioEgressListener"),
    (doc("Sidecar", "inboundConnectionPool: {http: {maxRetrys: 1}}"), "spec.inboundConnectionPool.http.maxRetrys",
     "ConnectionPoolSettings.HTTPSettings"),
    (doc("Gateway", "selector: {istio: ingress}\nservers:\n- port: {number: 443, name: https, protocol: HTTPS}\n"
                    "  hosts: ['*']\n  tls: {mode: SIMPLE, credentialNam: c}"),
     "spec.servers[0].tls.credentialNam", "ServerTLSSettings"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("text", "path", "msg"), UNKNOWN_INSIDE_UNIMPLEMENTED, ids=[p for _, p, _ in UNKNOWN_INSIDE_UNIMPLEMENTED]
)
def test_unknown_fields_inside_unimplemented_blocks_are_errors(text: str, path: str, msg: str) -> None:
    cfg = load(text)
    assert cfg.resources == ()
    assert [e for e in strs(cfg.errors) if e.startswith(f"t.yaml#0: {path}: unknown field ")], strs(cfg.errors)
    assert all(f" in {msg}" in e for e in strs(cfg.errors)), strs(cfg.errors)


def test_newer_istio_fields_are_known() -> None:
    # Fields added to Istio's API recently load (with the "not implemented" warning).
    cfg = ok(
        dr("host: r\ntrafficPolicy:\n  retryBudget: {percent: 20, minRetryConcurrency: 3, budgetInterval: 1s}")
        + "---\n"
        + vs("hosts: [r]\nhttp:\n- " + R + "\n  retries: {attempts: 2, backoff: 25ms, retryIgnorePreviousHosts: true}")
    )
    assert len(cfg.resources) == 2


def test_unknown_top_level_and_metadata_fields_are_errors() -> None:
    cfg = load(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\n"
        "metadata: {name: a, namesapce: prod, annotations: {x: y}}\nspec: {host: r}\nsepc: {}\nstatus: {}\n"
    )
    assert cfg.resources == ()
    assert has_diag(cfg.errors, "t.yaml#0: metadata.namesapce", "did you mean 'namespace'")
    assert has_diag(cfg.errors, "t.yaml#0: sepc", "unknown field")
    assert not [w for w in strs(cfg.errors) + strs(cfg.warnings) if "annotations" in w or "status" in w]


def test_duplicate_yaml_keys_are_warned_with_line() -> None:
    cfg = ok(dr("host: a\nhost: b"))
    assert cfg.resources[0].host == "b"  # type: ignore[union-attr]
    assert strs(cfg.warnings) == [
        "t.yaml#0: line 7: duplicate key 'host'; the last value is used (kubectl rejects this)"
    ]


# -- documents, lists, YAML errors ------------------------------------------------------


def test_document_indices_count_empty_documents() -> None:
    text = (
        "---\n# only a comment\n---\n"
        + vs(simple_route(), name="a")
        + "---\n---\n"
        + vs("hosts: 5", name="b")
    )
    cfg = load(text)
    assert [r.meta.source for r in cfg.resources] == [Source(F, 1)]
    assert strs(cfg.errors)[0].startswith("t.yaml#3: spec.hosts: must be a list")


def test_kind_list_items_are_located_by_index() -> None:
    text = textwrap.dedent(
        """\
        apiVersion: v1
        kind: List
        items:
        - apiVersion: networking.istio.io/v1
          kind: VirtualService
          metadata: {name: a}
          spec: {hosts: [r], http: [{route: [{destination: {host: r}}]}]}
        - apiVersion: networking.istio.io/v1
          kind: DestinationRule
          metadata: {name: b}
          spec: {host: r, subsets: [{name: v1}, {name: v1}]}
        - apiVersion: networking.istio.io/v1alpha3
          kind: WorkloadGroup
          metadata: {name: wg}
        """
    )
    cfg = load("---\n" + text)
    assert [r.meta.name for r in cfg.resources] == ["a"]
    assert cfg.resources[0].meta.source == Source(F, 0)
    assert cfg.resources[0].http[0].origin == "t.yaml#0 items[0].spec.http[0]"  # type: ignore[union-attr]
    assert strs(cfg.errors) == ["t.yaml#0: items[1].spec.subsets[1].name: duplicate subset name 'v1'"]
    assert has_diag(cfg.warnings, "t.yaml#0: items[2]", "kind WorkloadGroup")
    assert cfg.raw[0][1]["metadata"]["name"] == "a"


def test_typed_list_items_may_omit_kind() -> None:
    cfg = ok(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRuleList\nitems:\n"
        "- metadata: {name: a}\n  spec: {host: r}\n"
    )
    assert isinstance(cfg.resources[0], DestinationRule)


def test_yaml_syntax_error_keeps_earlier_documents_and_reports_the_line() -> None:
    text = vs(simple_route(), name="a") + "---\nkind: VirtualService\nmetadata: {name: [unclosed\n"
    cfg = load(text)
    assert [r.meta.name for r in cfg.resources] == ["a"]
    (error,) = cfg.errors
    assert (error.file, error.doc) == (F, 1)
    assert "invalid YAML: line" in error.message


def test_yaml_error_in_first_document_is_a_whole_file_error() -> None:
    cfg = load("a: [1, 2\nb: c\n")
    (error,) = cfg.errors
    assert error.doc is None
    assert str(error).startswith("t.yaml: invalid YAML: line ")


def test_python_tags_are_refused() -> None:
    cfg = load("!!python/object/apply:os.system ['echo pwned']\n")
    (error,) = cfg.errors
    assert "invalid YAML" in error.message and "python/object" in error.message


# -- files, directories, ConfigMap mounts ------------------------------------------------


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def at(path: Path, mtime: int) -> Path:
    """Set ``path``'s modification time (seconds since the epoch)."""
    os.utime(path, (mtime, mtime))
    return path


def test_directory_files_non_recursive_skipping_dot_files_oldest_first_then_by_path(tmp_path: Path) -> None:
    d = tmp_path / "conf"
    at(write(d / "b.yaml", vs(simple_route(), name="b")), 1000)
    at(write(d / "a.yml", vs(simple_route(), name="a")), 1000)
    write(d / "c.txt", "not: yaml config")
    write(d / ".hidden.yaml", vs(simple_route(), name="hidden"))
    write(d / "sub" / "d.yaml", vs(simple_route(), name="nested"))
    (d / "dir.yaml").mkdir()
    single = at(write(tmp_path / "z.yaml", vs(simple_route(), name="z")), 2000)
    old = at(write(d / "y.yaml", vs(simple_route(), name="y")), 500)
    expected = [str(old), str(d / "a.yml"), str(d / "b.yaml"), str(single)]
    assert expand_paths([str(single), str(d)]) == expected
    cfg = load_paths([str(single), str(d)])
    assert [r.meta.name for r in cfg.resources] == ["y", "a", "b", "z"]
    assert cfg.files == tuple(expected)


def test_missing_path_is_an_error_and_not_expanded(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope")
    assert expand_paths([missing]) == []
    cfg = load_paths([missing])
    assert strs(cfg.errors) == [f"{missing}: no such file or directory"]


def test_special_file_is_an_error_not_a_hang(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.yaml"
    os.mkfifo(fifo)
    assert expand_paths([str(fifo), str(tmp_path)]) == []
    assert strs(load_paths([str(fifo)]).errors) == [f"{fifo}: not a regular file or directory"]


def test_invalid_utf8_file_is_an_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"kind: \xff\xfe\xfa\n")
    cfg = load_paths([str(bad)])
    assert strs(cfg.errors) == [f"{bad}: not valid UTF-8 text (byte 6)"]


def test_configmap_style_mount_follows_symlinks_and_sees_atomic_swaps(tmp_path: Path) -> None:
    mount = tmp_path / "config"
    first = mount / "..2024_01_01_00_00_00.000000001"
    write(first / "a.yaml", vs(simple_route(), name="a"))
    write(first / "b.yaml", dr("host: reviews", name="b"))
    os.symlink(first.name, mount / "..data")
    for name in ("a.yaml", "b.yaml"):
        os.symlink(f"..data/{name}", mount / name)

    cfg = ok_paths([str(mount)])
    assert [(type(r).__name__, r.meta.name) for r in cfg.resources] == [
        ("VirtualService", "a"),
        ("DestinationRule", "b"),
    ]
    assert cfg.files == (str(mount / "a.yaml"), str(mount / "b.yaml"))

    # Kubernetes updates the mount by writing a new timestamped dir and
    # renaming a fresh ..data symlink over the old one (atomic).
    second = mount / "..2024_01_02_00_00_00.000000002"
    write(second / "a.yaml", vs(simple_route("ratings"), name="a2"))
    write(second / "b.yaml", dr("host: ratings", name="b"))
    os.symlink(second.name, mount / "..data_tmp")
    os.replace(mount / "..data_tmp", mount / "..data")

    cfg = ok_paths([str(mount)])
    assert [r.meta.name for r in cfg.resources] == ["a2", "b"]
    assert cfg.resources[1].host == "ratings"  # type: ignore[union-attr]


def ok_paths(paths: list[str]) -> LoadedConfig:
    cfg = load_paths(paths)
    assert cfg.errors == (), strs(cfg.errors)
    return cfg


# -- de-duplication -------------------------------------------------------------------


def test_most_recently_modified_file_wins_with_a_warning_naming_both(tmp_path: Path) -> None:
    # Istio's tasks in order: the delay, then the abort (both "VirtualService
    # ratings"); the abort must win although "delay" sorts after "abort".
    delay = at(write(tmp_path / "fault-delay.yaml",
                     dr("host: delay", name="ratings") + "---\n" + dr("host: other", name="other")), 1000)
    abort = at(write(tmp_path / "fault-abort.yaml", dr("host: abort", name="ratings")), 2000)
    cfg = ok_paths([str(tmp_path)])
    assert [(r.meta.name, r.host) for r in cfg.resources] == [("other", "other"), ("ratings", "abort")]  # type: ignore[union-attr]
    assert [src for src, _ in cfg.raw] == [Source(str(delay), 1), Source(str(abort), 0)]
    assert strs(cfg.warnings) == [
        (f"{abort}#0: metadata.name: DestinationRule default/ratings is defined twice: {delay}#0 and {abort}#0; "
        f"{abort} wins (the most recently modified file, as with kubectl apply in that order)")
    ]
    # Touching the delay file again makes it the latest: it wins now.
    at(delay, 3000)
    cfg = ok_paths([str(tmp_path)])
    assert {r.meta.name: r.host for r in cfg.resources} == {"other": "other", "ratings": "delay"}  # type: ignore[union-attr]


def test_same_modification_time_then_the_path_decides(tmp_path: Path) -> None:
    # A ConfigMap update gives every file the same time.
    a = at(write(tmp_path / "a.yaml", dr("host: a", name="r")), 1000)
    b = at(write(tmp_path / "b.yaml", dr("host: b", name="r")), 1000)
    cfg = ok_paths([str(b), str(a)])
    assert [r.host for r in cfg.resources] == ["b"]  # type: ignore[union-attr]
    assert cfg.files == (str(a), str(b))


def test_the_watcher_watches_what_the_loader_reads_in_its_order(tmp_path: Path) -> None:
    from pyproxy.config.watch import config_signature

    a = at(write(tmp_path / "a.yaml", dr("host: a", name="r")), 2000)
    b = at(write(tmp_path / "b.yaml", dr("host: b", name="r")), 1000)
    write(tmp_path / ".hidden.yaml", "x: 1")
    write(tmp_path / "notes.txt", "x")
    sig = config_signature([str(tmp_path), str(tmp_path / "missing.yaml")])
    assert [entry[0] for entry in sig] == [*expand_paths([str(tmp_path)]), str(tmp_path / "missing.yaml")]
    assert [entry[0] for entry in sig[:2]] == [str(b), str(a)]
    at(b, 3000)  # the order changes, so does the signature
    assert config_signature([str(tmp_path), str(tmp_path / "missing.yaml")]) != sig


def test_same_key_twice_in_one_file_later_document_wins() -> None:
    cfg = ok(dr("host: first", name="r") + "---\n" + dr("host: second", name="r"))
    assert [r.host for r in cfg.resources] == ["second"]  # type: ignore[union-attr]
    assert has_diag(cfg.warnings, "t.yaml#1: metadata.name", "the later document in the file wins")


def test_same_name_in_other_namespace_or_kind_is_not_a_duplicate() -> None:
    cfg = ok(
        dr("host: a", name="r")
        + "---\n"
        + dr("host: b", name="r", namespace="other")
        + "---\n"
        + vs(simple_route(), name="r")
    )
    assert len(cfg.resources) == 3
    assert cfg.warnings == ()


def test_invalid_later_definition_does_not_replace_a_valid_one() -> None:
    cfg = load(dr("host: good", name="r") + "---\n" + dr("subsets: []", name="r"))
    assert [r.host for r in cfg.resources] == ["good"]  # type: ignore[union-attr]
    assert not cfg.ok


# -- reference files, scale, CLI ---------------------------------------------------------


def reference_files() -> list[Path]:
    if not REFERENCE.is_dir():
        return []
    return sorted(p for sub in ("bookinfo", "circuit-breaking") for p in (REFERENCE / sub).glob("*.yaml"))


@skip_unless_present(REFERENCE)
@pytest.mark.parametrize("path", reference_files(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_reference_istio_sample_loads_without_errors(path: Path) -> None:
    cfg = load_paths([str(path)])
    assert cfg.errors == (), strs(cfg.errors)
    assert cfg.files == (str(path),)


@skip_unless_present(REFERENCE)
def test_reference_samples_values() -> None:
    cfg = ok_paths([str(REFERENCE / "bookinfo"), str(REFERENCE / "circuit-breaking")])
    by_key = {r.meta.key: r for r in cfg.resources}
    httpbin = by_key[("DestinationRule", "default", "httpbin")]
    assert isinstance(httpbin, DestinationRule) and httpbin.traffic_policy is not None
    od = httpbin.traffic_policy.outlier_detection
    assert od is not None
    assert (od.consecutive_5xx_errors, od.interval, od.base_ejection_time, od.max_ejection_percent) == (
        1,
        1.0,
        180.0,
        100,
    )
    pool = httpbin.traffic_policy.connection_pool
    assert pool is not None and pool.tcp is not None and pool.http is not None
    assert (
        pool.tcp.max_connections,
        pool.http.http1_max_pending_requests,
        pool.http.max_requests_per_connection,
    ) == (1, 1, 1)
    delay = load_paths([str(REFERENCE / "bookinfo" / "virtual-service-ratings-test-delay.yaml")]).resources[0]
    assert isinstance(delay, VirtualService)
    assert delay.http[0].fault == HTTPFaultInjection(delay=FaultDelay(fixed_delay=7.0, percentage=100.0))
    assert delay.http[0].match[0].headers == (("end-user", StringMatch("exact", "jason")),)


def big_config(n_vs: int = 1000, n_rules: int = 10) -> str:
    docs = []
    for v in range(n_vs):
        rules = "".join(
            f"  - match: [{{uri: {{prefix: /p{r}}}, headers: {{x-user: {{exact: u{r}}}}}}}]\n"
            f"    route:\n    - destination: {{host: svc{v}, subset: v{r % 3}}}\n      weight: 90\n"
            f"    - destination: {{host: svc{v}, subset: canary}}\n      weight: 10\n"
            f"    timeout: {r + 1}s\n"
            for r in range(n_rules)
        )
        docs.append(
            f"apiVersion: networking.istio.io/v1\nkind: VirtualService\n"
            f"metadata: {{name: vs{v}, namespace: ns{v % 5}}}\nspec:\n  hosts: [svc{v}]\n  http:\n{rules}"
        )
    return "---\n".join(docs)


def test_thousand_virtual_services_with_ten_rules_each() -> None:
    cfg = ok(big_config())
    assert len(cfg.resources) == 1000
    assert cfg.warnings == ()
    last = cfg.resources[-1]
    assert isinstance(last, VirtualService)
    assert (last.meta.name, last.meta.namespace, last.meta.source) == ("vs999", "ns4", Source(F, 999))
    assert len(last.http) == 10
    assert last.http[9].timeout == 10.0
    assert last.http[9].match[0].uri == StringMatch("prefix", "/p9")
    assert [d.destination.subset for d in last.http[9].route] == ["v0", "canary"]
    assert last.http[9].origin == "t.yaml#999 spec.http[9]"


def test_validate_cli_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(
        tmp_path / "a.yaml",
        vs(simple_route(), name="a")
        + "---\n"
        + dr("host: r\ntrafficPolicy: {proxyProtocol: {version: V2}}", name="b"),
    )
    assert validate.main([str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert out == "1 files, 2 resources: OK\n"
    lines = err.splitlines()
    assert lines[0] == f"warning: {tmp_path}/a.yaml#1: spec.trafficPolicy.proxyProtocol: not implemented by pyproxy, ignored"
    # Then what the proxies would warn about (tests/unit/test_validate.py): no registry here.
    assert lines[1] == (f"warning: {tmp_path}/a.yaml#1: DestinationRule default/b: host r.default.svc.cluster.local "
                        "is not in the service registry: the rule has no effect")


def test_validate_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(tmp_path / "a.yaml", vs("hosts: [r]\nhttp:\n- timeout: 0s\n  " + R + "\n  colour: red", name="a"))
    write(tmp_path / "b.yaml", dr("subsets: [{name: v1}]", name="b"))
    assert validate.main([str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert out == "3 errors\n"
    assert err.splitlines() == [
        f"{tmp_path}/a.yaml#0: spec.http[0].colour: unknown field 'colour' in HTTPRoute",
        f"{tmp_path}/a.yaml#0: spec.http[0].timeout: must be at least 1ms",
        f"{tmp_path}/b.yaml#0: spec.host: is required",
    ]
