"""Rate limiting, one module at a time: token bucket (injected clock),
descriptor actions, the ratelimit service's matching (its README examples
1-4 and more), key scheme and window alignment, EnvoyFilter parsing, and the
local/global filters on the real Exchange over the fake loop (no sockets)."""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import hiredis
import pytest
import yaml

from pyproxy.config.loader import load_paths, load_text
from pyproxy.config.model import HeaderMatcherSpec, RateLimitActionSpec, RateLimitSpec
from pyproxy.demo.launcher import RATELIMIT_SCENARIOS
from pyproxy.http.exchange import Exchange
from pyproxy.ratelimit.bucket import SharedBuckets, TokenBucket
from pyproxy.ratelimit.descriptors import CompiledRateLimit, compile_action
from pyproxy.ratelimit.filter import RateLimitRuntime
from pyproxy.ratelimit.service_config import (
    OK,
    OVER_LIMIT,
    ServiceConfig,
    cache_key,
    decide,
    load_service_config,
    plan,
    window_start,
)
from pyproxy.ratelimit.service_config import (
    load_text as load_rls,
)
from pyproxy.snapshot import BuildContext, ProxyIdentity, build_snapshot
from tests.unit.fakes import FakeDownstream, FakeLoop, FakeWorker, service


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# -- token bucket ---------------------------------------------------------------------


def test_bucket_starts_full_and_refills_continuously() -> None:
    clock = Clock()
    bucket = TokenBucket(4, 4, 60.0, clock)  # Istio's task: 4 per minute
    assert [bucket.consume() >= 0 for _ in range(5)] == [True, True, True, True, False]
    clock.now += 14.9  # one token takes 15 s at 4 per 60 s
    assert bucket.consume() < 0
    clock.now += 0.2
    assert bucket.consume() >= 0
    assert bucket.consume() < 0
    clock.now += 3600  # capped at max_tokens
    assert [bucket.consume() >= 0 for _ in range(5)] == [True, True, True, True, False]


def test_bucket_reset_is_the_time_one_token_takes() -> None:
    # Envoy 1.40 reported x-ratelimit-reset: 30 for 2 tokens per 60 s.
    assert TokenBucket(2, 2, 60.0, Clock()).reset_seconds == 30
    assert TokenBucket(10, 1, 0.1, Clock()).reset_seconds == 1


def test_remaining_counts_tokens_after_consumption() -> None:
    clock = Clock()
    bucket = TokenBucket(3, 1, 1.0, clock)
    assert bucket.consume() == pytest.approx(2.0)
    assert bucket.remaining() == pytest.approx(2.0)


def test_shared_buckets_enforce_one_limit_across_mappings(tmp_path: Any) -> None:
    # Two mappings of one file stand for two worker processes.
    clock = Clock()
    path = str(tmp_path / "buckets")
    a, b = SharedBuckets(path, clock), SharedBuckets(path, clock)
    try:
        ba = a.bucket("listener|x", 4, 4, 60.0)
        bb = b.bucket("listener|x", 4, 4, 60.0)
        results = [(ba if i % 2 else bb).consume() >= 0 for i in range(6)]
        assert results == [True, True, True, True, False, False]
        clock.now += 15.0
        assert bb.consume() >= 0 and ba.consume() < 0
        # Another definition gets another slot (starts full).
        other = b.bucket("listener|y", 1, 1, 60.0)
        assert other.consume() >= 0 and other.consume() < 0
    finally:
        a.close()
        b.close(unlink=True)


# -- descriptors -----------------------------------------------------------------------


class Req:
    """The attributes descriptor actions read from an Exchange."""

    def __init__(self, target: bytes = b"/", headers: list[tuple[bytes, bytes]] | None = None) -> None:
        self.target = target
        self.path, _, self.query = target.partition(b"?")
        self.headers = headers or []
        self.hdict: dict[bytes, bytes] = {}
        for n, v in self.headers:
            self.hdict[n] = self.hdict[n] + b"," + v if n in self.hdict else v
        self.authority = self.hdict.get(b"host", b"example.com")
        self.method = b"GET"
        self.scheme = b"http"
        self.port = 9080
        self.target_choice: Any = None

        class Conn:
            peer_ip_bytes = b"10.0.0.7"

        self.conn = Conn()


def action(kind: str, **kw: Any) -> RateLimitActionSpec:
    return RateLimitActionSpec(kind, **kw)


def test_request_headers_action_path_includes_the_query() -> None:
    a = compile_action(action("request_headers", key="PATH", header_name=":path"), b"src")
    assert a(Req(b"/productpage?u=normal")) == (b"PATH", b"/productpage?u=normal")


def test_request_headers_action_missing_header_drops_or_skips() -> None:
    drop = CompiledRateLimit(RateLimitSpec((action("request_headers", key="U", header_name="x-user"),
                                            action("generic_key", key="g", value="v"))), b"src")
    assert drop.descriptor(Req()) is None
    skip = CompiledRateLimit(RateLimitSpec((action("request_headers", key="U", header_name="x-user",
                                                   skip_if_absent=True),
                                            action("generic_key", key="", value="v"))), b"src")
    assert skip.descriptor(Req()) == ((b"", b"v"),)
    only_skipped = CompiledRateLimit(RateLimitSpec((action("request_headers", key="U", header_name="x-user",
                                                           skip_if_absent=True),)), b"src")
    assert only_skipped.descriptor(Req()) is None  # no entry: no descriptor


def test_request_headers_action_takes_the_first_value() -> None:
    a = compile_action(action("request_headers", key="U", header_name="x-user"), b"src")
    assert a(Req(headers=[(b"x-user", b"a"), (b"x-user", b"b")])) == (b"U", b"a")


def test_generic_remote_source_actions() -> None:
    spec = RateLimitSpec((action("generic_key", key="generic_key", value="gv"), action("remote_address"),
                          action("source_cluster")))
    assert CompiledRateLimit(spec, b"productpage.default").descriptor(Req()) == (
        (b"generic_key", b"gv"), (b"remote_address", b"10.0.0.7"), (b"source_cluster", b"productpage.default"))


def test_remote_address_as_istio_configures_envoy() -> None:
    # Sidecars: use_remote_address false (the rightmost x-forwarded-for
    # address); gateways: true (the TCP peer).
    forwarded = Req(headers=[(b"x-forwarded-for", b"1.2.3.4, 10.1.1.1")])
    sidecar = compile_action(action("remote_address"), b"s", gateway=False)
    gateway = compile_action(action("remote_address"), b"s", gateway=True)
    assert sidecar(forwarded) == (b"remote_address", b"10.1.1.1")
    assert sidecar(Req()) == (b"remote_address", b"10.0.0.7")
    assert gateway(forwarded) == (b"remote_address", b"10.0.0.7")


def test_destination_cluster_action_uses_the_chosen_target() -> None:
    class Target:
        def cluster_for(self, port: int) -> Any:
            class C:
                name = f"outbound|{port}|v1|reviews.default.svc.cluster.local"
            return C()

    req = Req()
    a = compile_action(action("destination_cluster"), b"src")
    assert a(req) is None
    req.target_choice = Target()
    assert a(req) == (b"destination_cluster", b"outbound|9080|v1|reviews.default.svc.cluster.local")


def test_header_value_match_action() -> None:
    regex = HeaderMatcherSpec(":path", "regex", "/api/v1/products/[1-9]{1,2}")
    a = compile_action(action("header_value_match", key="PATH", value="api", headers=(regex,)), b"s")
    assert a(Req(b"/api/v1/products/12")) == (b"PATH", b"api")
    assert a(Req(b"/api/v1/products/abc")) is None
    inverted = compile_action(action("header_value_match", key="k", value="v", expect_match=False,
                                     headers=(regex,)), b"s")
    assert inverted(Req(b"/api/v1/products/abc")) == (b"k", b"v")
    present = HeaderMatcherSpec("x-debug", "present")
    absent = HeaderMatcherSpec("x-debug", "present", present=False)
    assert compile_action(action("header_value_match", key="k", value="v", headers=(present,)), b"s")(
        Req(headers=[(b"x-debug", b"1")])) == (b"k", b"v")
    assert compile_action(action("header_value_match", key="k", value="v", headers=(absent,)), b"s")(
        Req(headers=[(b"x-debug", b"1")])) is None
    prefix = HeaderMatcherSpec("x-user", "prefix", "adm", ignore_case=True)
    assert compile_action(action("header_value_match", key="k", value="v", headers=(prefix,)), b"s")(
        Req(headers=[(b"x-user", b"ADMIN")])) == (b"k", b"v")


# -- the ratelimit service's matching --------------------------------------------------------


def rls(text: str) -> ServiceConfig:
    domains: dict = {}
    errors = load_rls(text, "rls.yaml", domains)
    assert not errors, [str(e) for e in errors]
    return ServiceConfig(domains)


def limit_of(config: ServiceConfig, domain: str, *entries: tuple[str, str]) -> tuple[int, str] | None:
    limit, _ = config.limit_for(domain, tuple((k.encode(), v.encode()) for k, v in entries))
    return None if limit is None else (limit.requests_per_unit, limit.unit)


def test_readme_example_1_database_limits() -> None:
    config = rls("""
domain: mongo_cps
descriptors:
  - key: database
    value: users
    rate_limit: {unit: second, requests_per_unit: 500}
  - key: database
    value: default
    rate_limit: {unit: second, requests_per_unit: 500}
""")
    assert limit_of(config, "mongo_cps", ("database", "users")) == (500, "second")
    assert limit_of(config, "mongo_cps", ("database", "other")) is None
    assert limit_of(config, "other_domain", ("database", "users")) is None


def test_readme_example_2_nested_and_key_only() -> None:
    config = rls("""
domain: messaging
descriptors:
  - key: message_type
    value: marketing
    descriptors:
      - key: to_number
        rate_limit: {unit: day, requests_per_unit: 5}
  - key: to_number
    rate_limit: {unit: day, requests_per_unit: 100}
""")
    assert limit_of(config, "messaging", ("message_type", "marketing"), ("to_number", "2061111111")) == (5, "day")
    assert limit_of(config, "messaging", ("to_number", "2061111111")) == (100, "day")
    assert limit_of(config, "messaging", ("message_type", "marketing")) is None  # a level without a limit


def test_readme_example_3_key_value_before_key() -> None:
    config = rls("""
domain: edge_proxy_per_ip
descriptors:
  - key: remote_address
    rate_limit: {unit: second, requests_per_unit: 10}
  - key: remote_address
    value: 50.0.0.5
    rate_limit: {unit: second, requests_per_unit: 0}
""")
    assert limit_of(config, "edge_proxy_per_ip", ("remote_address", "50.0.0.1")) == (10, "second")
    assert limit_of(config, "edge_proxy_per_ip", ("remote_address", "50.0.0.5")) == (0, "second")


def test_readme_example_4_depth_must_match() -> None:
    flat = rls("""
domain: example4
descriptors:
  - key: key
    value: value
    rate_limit: {requests_per_unit: 300, unit: second}
""")
    assert limit_of(flat, "example4", ("key", "value"), ("subkey", "subvalue")) is None
    nested = rls("""
domain: example4
descriptors:
  - key: key
    value: value
    descriptors:
      - key: subkey
        rate_limit: {requests_per_unit: 300, unit: second}
""")
    assert limit_of(nested, "example4", ("key", "value"), ("subkey", "subvalue")) == (300, "second")


def test_wildcards_unlimited_whitelist() -> None:
    config = rls("""
domain: d
descriptors:
  - key: path
    value: /api/*/items
    rate_limit: {unit: minute, requests_per_unit: 20}
  - key: ldap
    rate_limit: {unlimited: true}
  - key: free
""")
    assert limit_of(config, "d", ("path", "/api/v1/items")) == (20, "minute")
    assert limit_of(config, "d", ("path", "/api/v1/other")) is None
    unlimited, _ = config.limit_for("d", ((b"ldap", b"x"),))
    assert unlimited is not None and unlimited.unlimited
    assert config.limit_for("d", ((b"free", b"x"),))[0] is None  # whitelisted: no limit
    check = plan(config, "d", [((b"ldap", b"x"),)], 100)
    assert check.keys == ()  # unlimited: no Redis call


def test_task_config_with_query_string() -> None:
    config = rls("""
domain: ratelimit
descriptors:
  - key: PATH
    value: "/productpage"
    rate_limit: {unit: minute, requests_per_unit: 1}
  - key: PATH
    value: "api"
    rate_limit: {unit: minute, requests_per_unit: 2}
  - key: PATH
    rate_limit: {unit: minute, requests_per_unit: 100}
""")
    assert limit_of(config, "ratelimit", ("PATH", "/productpage")) == (1, "minute")
    assert limit_of(config, "ratelimit", ("PATH", "/productpage?u=normal")) == (100, "minute")


def test_config_errors_name_file_document_and_path() -> None:
    errors = load_rls("""
domain: d
descriptors:
  - key: a
    rate_limit: {unit: fortnight, requests_per_unit: 1}
  - key: b
    rate_limit: {unit: second, requests_per_unit: 1, unlimited: true}
  - key: c
    valu: typo
  - key: a
""", "rls.yaml")
    text = [str(e) for e in errors]
    assert any(t.startswith("rls.yaml#0: descriptors[0].rate_limit.unit: must be one of") for t in text)
    assert "rls.yaml#0: descriptors[1].rate_limit.unit: must not be set with unlimited: true" in text
    assert any(t.startswith("rls.yaml#0: descriptors[2].valu: unknown field") for t in text)
    assert "rls.yaml#0: descriptors[3]: duplicate descriptor composite key 'a'" in text


def test_duplicate_domain_across_files_is_an_error() -> None:
    domains: dict = {}
    where: dict = {}
    assert load_rls("domain: d\ndescriptors: []\n", "a.yaml", domains, where) == []
    errors = load_rls("domain: d\ndescriptors: []\n", "b.yaml", domains, where)
    assert [str(e) for e in errors] == ["b.yaml#0: domain: domain 'd' is already defined in a.yaml#0"]


# -- keys, windows, decisions ----------------------------------------------------------------


def test_window_is_aligned_to_the_epoch() -> None:
    assert window_start(1_700_000_039, 60) == 1_699_999_980
    assert window_start(1_700_000_040, 60) == 1_700_000_040
    assert window_start(1_700_000_099, 60) == 1_700_000_040
    assert window_start(1_700_000_060, 1) == 1_700_000_060
    assert window_start(1_700_003_599, 3600) == 1_700_002_800


def test_cache_key_is_the_services_scheme() -> None:
    d = ((b"PATH", b"/productpage"),)
    assert cache_key(b"", b"ratelimit", d, 60, 1_700_000_059) == b"ratelimit_PATH_/productpage_1700000040"
    nested = ((b"message_type", b"marketing"), (b"to_number", b"2061111111"))
    assert cache_key(b"pfx_", b"messaging", nested, 86400, 1_700_000_000) == \
        b"pfx_messaging_message_type_marketing_to_number_2061111111_1699920000"


def test_decide_over_limit_shadow_and_replaces() -> None:
    config = rls("""
domain: d
descriptors:
  - key: k1
    value: v1
    descriptors:
      - key: user
        value: u
        rate_limit: {name: specific_limit, requests_per_unit: 5, unit: second}
  - key: k2
    value: v2
    descriptors:
      - key: user
        value: u
        rate_limit: {replaces: [{name: specific_limit}], requests_per_unit: 10, unit: second}
  - key: soft
    shadow_mode: true
    rate_limit: {requests_per_unit: 1, unit: minute}
""")
    d1 = ((b"k1", b"v1"), (b"user", b"u"))
    d2 = ((b"k2", b"v2"), (b"user", b"u"))
    both = plan(config, "d", [d1, d2], 1000, jitter=[7, 7])
    assert [k[0] for k in both.keys] == [1]  # the replaced limit is not counted
    assert both.keys[0][2] == 1 + 7  # expiry: the unit plus the jitter
    code, statuses = decide(both, [11], 1000)
    assert code == OVER_LIMIT and statuses[1].code == OVER_LIMIT and statuses[0].code == OK
    alone = plan(config, "d", [d1], 1000)
    assert decide(alone, [5], 1000)[0] == OK
    assert decide(alone, [6], 1000)[0] == OVER_LIMIT
    shadow = plan(config, "d", [((b"soft", b"x"),)], 1000)
    code, statuses = decide(shadow, [50], 1000)
    assert code == OK and statuses[0].remaining == 0
    assert decide(plan(config, "d", [((b"soft", b"x"),)], 1030), [1], 1030)[1][0].reset == 50


# -- EnvoyFilter parsing ------------------------------------------------------------------------

TASK_GLOBAL = """
apiVersion: networking.istio.io/v1alpha3
kind: EnvoyFilter
metadata: {name: filter-ratelimit, namespace: istio-system}
spec:
  workloadSelector:
    labels: {istio: ingressgateway}
  configPatches:
    - applyTo: HTTP_FILTER
      match:
        context: GATEWAY
        listener:
          filterChain:
            filter:
              name: "envoy.filters.network.http_connection_manager"
              subFilter: {name: "envoy.filters.http.router"}
      patch:
        operation: INSERT_BEFORE
        value:
          name: envoy.filters.http.ratelimit
          typed_config:
            "@type": type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimit
            domain: ratelimit
            failure_mode_deny: true
            timeout: 10s
            rate_limit_service:
              grpc_service:
                envoy_grpc:
                  cluster_name: outbound|8081||ratelimit.default.svc.cluster.local
                  authority: ratelimit.default.svc.cluster.local
              transport_api_version: V3
---
apiVersion: networking.istio.io/v1alpha3
kind: EnvoyFilter
metadata: {name: filter-ratelimit-svc, namespace: istio-system}
spec:
  workloadSelector:
    labels: {istio: ingressgateway}
  configPatches:
    - applyTo: VIRTUAL_HOST
      match:
        context: GATEWAY
        routeConfiguration:
          vhost:
            name: ""
            route: {action: ANY}
      patch:
        operation: MERGE
        value:
          rate_limits:
            - actions:
              - request_headers: {header_name: ":path", descriptor_key: "PATH"}
"""

LOCAL_FILTER = """
apiVersion: networking.istio.io/v1alpha3
kind: EnvoyFilter
metadata: {{name: filter-local-ratelimit-svc, namespace: istio-system}}
spec:
  workloadSelector:
    labels: {{app: productpage}}
  configPatches:
    - applyTo: HTTP_FILTER
      match:
        context: {context}
        listener:
          filterChain:
            filter: {{name: "envoy.filters.network.http_connection_manager"}}
      patch:
        operation: INSERT_BEFORE
        value:
          name: envoy.filters.http.local_ratelimit
          typed_config:
            "@type": type.googleapis.com/udpa.type.v1.TypedStruct
            type_url: type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit
            value:
              stat_prefix: http_local_rate_limiter
{bucket}
{extra}
"""

BUCKET = "              token_bucket: {max_tokens: 4, tokens_per_fill: 4, fill_interval: 60s}"
ENABLED = """              filter_enabled:
                runtime_key: local_rate_limit_enabled
                default_value: {numerator: 100, denominator: HUNDRED}
              filter_enforced:
                runtime_key: local_rate_limit_enforced
                default_value: {numerator: 100, denominator: HUNDRED}
              response_headers_to_add:
                - append: false
                  header: {key: x-local-rate-limit, value: 'true'}"""


def test_task_files_load_without_diagnostics() -> None:
    cfg = load_text(TASK_GLOBAL + "---\n" + LOCAL_FILTER.format(context="SIDECAR_INBOUND", bucket=BUCKET,
                                                                 extra=ENABLED), "ef.yaml")
    assert cfg.ok and not cfg.warnings, [str(d) for d in (*cfg.errors, *cfg.warnings)]
    gf, vh, local = cfg.resources
    assert gf.patches[0].global_.domain == "ratelimit"  # type: ignore[union-attr]
    assert gf.patches[0].global_.timeout == 10.0 and gf.patches[0].global_.failure_mode_deny  # type: ignore[union-attr]
    assert vh.patches[0].rate_limits[0].actions[0].header_name == ":path"  # type: ignore[union-attr]
    spec = local.patches[0].local  # type: ignore[union-attr]
    assert spec.token_bucket.max_tokens == 4 and spec.filter_enabled == 1.0 and spec.filter_enforced == 1.0


def test_other_envoy_filters_load_with_one_warning() -> None:
    cfg = load_text("""
apiVersion: networking.istio.io/v1alpha3
kind: EnvoyFilter
metadata: {name: lua}
spec:
  configPatches:
  - applyTo: HTTP_FILTER
    patch: {operation: INSERT_BEFORE, value: {name: envoy.lua}}
  - applyTo: NETWORK_FILTER
    patch: {operation: MERGE, value: {}}
""", "ef.yaml")
    assert cfg.ok
    assert [str(w) for w in cfg.warnings] == [(
        "ef.yaml#0: spec: EnvoyFilter default/lua: pyproxy applies only rate-limit patches; ignored: "
        "configPatches[0] (HTTP_FILTER INSERT_BEFORE), configPatches[1] (NETWORK_FILTER MERGE)")]


def test_rate_limit_envoy_filter_pyproxy_cannot_honour_is_an_error_with_its_path() -> None:
    text = LOCAL_FILTER.format(context="SIDECAR_INBOUND", bucket=BUCKET, extra=ENABLED + """
              local_rate_limit_per_downstream_connection: true""")
    cfg = load_text(text, "ef.yaml")
    assert [str(e) for e in cfg.errors] == [(
        "ef.yaml#0: spec.configPatches[0].patch.value.typed_config.value.local_rate_limit_per_downstream_connection: "
        "LocalRateLimit.local_rate_limit_per_downstream_connection is not supported by pyproxy's rate limiting")]
    mixed = TASK_GLOBAL.split("---")[0] + """    - applyTo: LISTENER
      patch: {operation: MERGE, value: {}}
"""
    cfg = load_text(mixed, "ef.yaml")
    assert any(str(e).startswith("ef.yaml#0: spec.configPatches[1].applyTo: LISTENER patches are not supported")
               for e in cfg.errors)
    typo = TASK_GLOBAL.replace("failure_mode_deny: true", "failure_mode_denny: true")
    cfg = load_text(typo, "ef.yaml")
    assert [str(e) for e in cfg.errors] == [(
        "ef.yaml#0: spec.configPatches[0].patch.value.typed_config.failure_mode_denny: unknown field "
        "'failure_mode_denny' in RateLimit")]


def test_xds_typed_struct_camel_case_and_legacy_names() -> None:
    text = """
apiVersion: networking.istio.io/v1alpha3
kind: EnvoyFilter
metadata: {name: old}
spec:
  configPatches:
  - applyTo: HTTP_FILTER
    listener:
      filterChain:
        filter: {name: envoy.http_connection_manager, subFilter: {name: envoy.router}}
    patch:
      operation: INSERT_BEFORE
      value:
        name: envoy.rate_limit
        typedConfig:
          "@type": type.googleapis.com/xds.type.v3.TypedStruct
          typeUrl: type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimit
          value:
            domain: productpage-ratelimit
            failureModeDeny: false
            rateLimitService:
              grpcService: {envoyGrpc: {clusterName: rate_limit_cluster}, timeout: 10s}
              transportApiVersion: V3
  - applyTo: CLUSTER
    match: {cluster: {service: ratelimit.default.svc.cluster.local}}
    patch:
      operation: ADD
      value: {name: rate_limit_cluster, type: STRICT_DNS}
"""
    cfg = load_text(text, "ef.yaml")
    assert cfg.ok, [str(e) for e in cfg.errors]
    # The misplaced listener: (old revision) is pruned as Kubernetes does, with a warning.
    assert [str(w).split(":")[1].strip() for w in cfg.warnings] == ["spec.configPatches[0].listener"]
    patch = cfg.resources[0].patches[0]  # type: ignore[union-attr]
    assert patch.context == "ANY" and patch.global_.cluster_name == "rate_limit_cluster"
    assert cfg.resources[0].patches[1].apply_to == "CLUSTER"  # type: ignore[union-attr]


# -- the filters on the request path (fake loop) ---------------------------------------------------

GATEWAY_MESH = """apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw, namespace: istio-system}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 8080, name: http, protocol: HTTP}
    hosts: ["*"]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: bookinfo, namespace: istio-system}
spec:
  hosts: ["*"]
  gateways: [gw]
  http:
  - name: api
    match: [{uri: {prefix: /api/v1/products}}]
    route: [{destination: {host: svc.default.svc.cluster.local}}]
  - route: [{destination: {host: svc.default.svc.cluster.local}}]
"""


class RLMesh:
    """A real snapshot with rate limiting on the fake loop."""

    def __init__(self, yaml_text: str, identity: ProxyIdentity, decider: Any = None) -> None:
        loaded = load_text(yaml_text, "mesh.yaml")
        assert loaded.ok, [str(e) for e in loaded.errors]
        self.loop = FakeLoop()
        self.rng = random.Random(1)
        self.clock = Clock()
        self.runtime = RateLimitRuntime(self.rng, clock=self.clock)
        self.runtime.decider = decider
        ctx = BuildContext(self.loop, self.rng, None, self.loop.time, ratelimit=self.runtime)  # type: ignore[arg-type]
        self.snapshot = build_snapshot(loaded, identity, ctx)
        self.worker = FakeWorker(self.snapshot, self.loop, self.rng)
        self.worker.ratelimit = self.runtime  # type: ignore[attr-defined]

    def request(self, path: str, host: str = "svc", inbound: bool = False,
                headers: tuple[tuple[bytes, bytes], ...] = ()) -> tuple[Exchange, FakeDownstream]:
        down = FakeDownstream(self.worker)  # type: ignore[arg-type]
        if inbound:
            down.direction = 1
        ex = Exchange(down, b"GET", path.encode(), [(b"host", host.encode()), *headers], "1.1", True, False)  # type: ignore[arg-type]
        ex.on_request_complete()
        self.loop.run_ready()
        return ex, down


def local_mesh(context: str = "SIDECAR_INBOUND", extra: str = ENABLED, bucket: str = BUCKET) -> RLMesh:
    text = "---\n".join([service("svc", [1001]), LOCAL_FILTER.format(context=context, bucket=bucket, extra=extra)])
    return RLMesh(text, ProxyIdentity(labels=(("app", "productpage"),)))


@pytest.mark.parametrize(("context", "inbound", "outbound"), [
    ("SIDECAR_INBOUND", True, False), ("SIDECAR_OUTBOUND", False, True), ("ANY", True, True)])
def test_the_rate_limit_filter_is_only_on_routes_of_listeners_a_patch_can_reach(
        context: str, inbound: bool, outbound: bool) -> None:
    # Elsewhere every policy would be None: those routes keep no filter, so
    # they run no chain at all (nothing per request for an unused feature).
    snap = local_mesh(context).snapshot
    assert bool(snap.inbound_route.filters) is inbound
    routes = [r for vh in snap.hosts.exact.values() for r in vh.routes]
    assert routes and all(bool(r.filters) is outbound for r in routes)


def test_local_limit_answers_429_local_rate_limited_with_flag_rl() -> None:
    m = local_mesh()
    statuses = []
    for _ in range(5):
        ex, down = m.request("/", inbound=True)
        if down.status is None:
            m.loop.upstream_of(ex).respond(200, b"ok")
        statuses.append(down.status)
    assert statuses == [200, 200, 200, 200, 429]
    assert down.body == b"local_rate_limited"
    assert down.response_header("x-local-rate-limit") == "true"
    assert down.response_header("x-envoy-ratelimited") is None  # Envoy 1.40 does not set it
    assert ex.flags == ["RL"]
    stats = m.runtime.counters()
    assert stats["http_local_rate_limiter.http_local_rate_limit.enabled"] == 5
    assert stats["http_local_rate_limiter.http_local_rate_limit.ok"] == 4
    assert stats["http_local_rate_limiter.http_local_rate_limit.rate_limited"] == 1
    assert stats["http_local_rate_limiter.http_local_rate_limit.enforced"] == 1
    m.clock.now += 15.0  # one token back
    _, down = m.request("/", inbound=True)
    assert down.status is None  # forwarded


def test_local_limit_applies_only_in_its_context() -> None:
    m = local_mesh()
    for _ in range(6):
        ex, down = m.request("/")  # outbound: SIDECAR_INBOUND filter does not apply
        assert down.status is None
        m.loop.upstream_of(ex).respond(200)


def test_local_limit_without_filter_enabled_limits_nothing() -> None:
    # Envoy: filter_enabled and filter_enforced default to 0 %.
    m = local_mesh(extra="")
    assert m.snapshot.ratelimit is not None
    for _ in range(6):
        ex, down = m.request("/", inbound=True)
        assert down.status is None
        m.loop.upstream_of(ex).respond(200)
    assert set(m.runtime.counters().values()) == {0}  # the stats exist (as in Envoy), nothing counted


def test_enabled_but_not_enforced_counts_and_passes() -> None:
    extra = """              filter_enabled: {default_value: {numerator: 100}}
              request_headers_to_add_when_not_enforced:
                - append: false
                  header: {key: x-would-be-limited, value: 'yes'}"""
    m = local_mesh(extra=extra, bucket="              token_bucket: {max_tokens: 1, fill_interval: 60s}")
    ex, _ = m.request("/", inbound=True)
    m.loop.upstream_of(ex).respond(200)
    ex, down = m.request("/", inbound=True)
    assert down.status is None
    assert m.loop.upstream_of(ex).sent.count(b"x-would-be-limited: yes\r\n") == 1  # the second request only
    stats = m.runtime.counters()
    assert stats["http_local_rate_limiter.http_local_rate_limit.rate_limited"] == 1
    assert stats["http_local_rate_limiter.http_local_rate_limit.enforced"] == 0


def test_x_ratelimit_headers_only_when_enabled() -> None:
    m = local_mesh(extra=ENABLED + "\n              enable_x_ratelimit_headers: DRAFT_VERSION_03",
                   bucket="              token_bucket: {max_tokens: 2, tokens_per_fill: 2, fill_interval: 60s}")
    ex, down = m.request("/", inbound=True)
    m.loop.upstream_of(ex).respond(200, b"ok")
    assert (down.response_header("x-ratelimit-limit"), down.response_header("x-ratelimit-remaining"),
            down.response_header("x-ratelimit-reset")) == ("2", "1", "30")
    plain = local_mesh()
    ex, down = plain.request("/", inbound=True)
    plain.loop.upstream_of(ex).respond(200, b"ok")
    assert down.response_header("x-ratelimit-limit") is None


def test_per_route_local_bucket_replaces_the_listener_config() -> None:
    route_patch = """---
apiVersion: networking.istio.io/v1alpha3
kind: EnvoyFilter
metadata: {name: per-route, namespace: istio-system}
spec:
  workloadSelector:
    labels: {app: productpage}
  configPatches:
    - applyTo: HTTP_ROUTE
      match:
        context: SIDECAR_INBOUND
        routeConfiguration:
          vhost:
            name: "inbound|http|9080"
            route: {action: ANY}
      patch:
        operation: MERGE
        value:
          typed_per_filter_config:
            envoy.filters.http.local_ratelimit:
              "@type": type.googleapis.com/udpa.type.v1.TypedStruct
              type_url: type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit
              value:
                stat_prefix: http_local_rate_limiter
                token_bucket: {max_tokens: 2, tokens_per_fill: 2, fill_interval: 60s}
                filter_enabled: {default_value: {numerator: 100, denominator: HUNDRED}}
                filter_enforced: {default_value: {numerator: 100, denominator: HUNDRED}}
"""
    text = "---\n".join([service("svc", [1001]), LOCAL_FILTER.format(context="SIDECAR_INBOUND", bucket="",
                                                                     extra="")]) + route_patch
    m = RLMesh(text, ProxyIdentity(labels=(("app", "productpage"),)))
    statuses = []
    for _ in range(3):
        ex, down = m.request("/", inbound=True)
        if down.status is None:
            m.loop.upstream_of(ex).respond(200)
        statuses.append(down.status)
    assert statuses == [200, 200, 429]
    # A per-route config without a bucket is refused, as Envoy does.
    bad = load_text(route_patch.replace("                token_bucket: {max_tokens: 2, tokens_per_fill: 2, "
                                        "fill_interval: 60s}\n", ""), "ef.yaml")
    assert any("token_bucket: is required in a per-route local rate limit" in str(e) for e in bad.errors)


def test_workload_selector_and_namespace_pick_the_proxy() -> None:
    text = "---\n".join([service("svc", [1001]), LOCAL_FILTER.format(context="ANY", bucket=BUCKET,
                                                                     extra=ENABLED)])
    other = RLMesh(text, ProxyIdentity(labels=(("app", "reviews"),)))
    assert other.snapshot.ratelimit is None  # nothing per request on a proxy it does not select
    chosen = RLMesh(text, ProxyIdentity(labels=(("app", "productpage"),)))
    assert chosen.snapshot.ratelimit is not None
    scoped = text.replace("namespace: istio-system", "namespace: other")
    assert RLMesh(scoped, ProxyIdentity(labels=(("app", "productpage"),))).snapshot.ratelimit is None


class Decider:
    """Answers global checks by hand."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list]] = []
        self.callbacks: list[Any] = []
        self.raise_: BaseException | None = None

    def check(self, domain: str, descriptors: list, callback: Any, want_statuses: bool = True) -> None:
        if self.raise_ is not None:
            raise self.raise_
        self.calls.append((domain, descriptors))
        self.callbacks.append(callback)


def gateway_mesh(decider: Decider, extra_ef: str = "", deny: bool = True) -> RLMesh:
    efs = TASK_GLOBAL if deny else TASK_GLOBAL.replace("failure_mode_deny: true", "failure_mode_deny: false")
    text = "---\n".join([service("svc", [1001]), GATEWAY_MESH, efs]) + extra_ef
    return RLMesh(text, ProxyIdentity(namespace="istio-system", labels=(("istio", "ingressgateway"),),
                                      gateway="istio-system/gw"), decider)


API_ROUTE_EF = """---
apiVersion: networking.istio.io/v1alpha3
kind: EnvoyFilter
metadata: {name: filter-ratelimit-svc-api, namespace: istio-system}
spec:
  workloadSelector:
    labels: {istio: ingressgateway}
  configPatches:
    - applyTo: HTTP_ROUTE
      match:
        context: GATEWAY
        routeConfiguration:
          vhost:
            name: "*:8080"
            route: {name: "api"}
      patch:
        operation: MERGE
        value:
          route:
            rate_limits:
            - actions:
              - header_value_match:
                  descriptor_key: "PATH"
                  descriptor_value: "api"
                  headers:
                    - name: ":path"
                      safe_regex_match:
                        google_re2: {}
                        regex: "/api/v1/products/[1-9]{1,2}"
"""


def test_global_descriptors_route_limits_replace_vhost_limits() -> None:
    d = Decider()
    m = gateway_mesh(d, API_ROUTE_EF)
    m.request("/productpage?u=normal")
    m.request("/api/v1/products/12")
    ex, down = m.request("/api/v1/products/abc")  # route action produced nothing: no call
    assert down.status is None and m.loop.upstream_of(ex) is not None
    assert d.calls == [("ratelimit", [(((b"PATH", b"/productpage?u=normal"),), None)]),
                       ("ratelimit", [(((b"PATH", b"api"),), None)])]


def test_global_over_limit_ok_and_errors() -> None:
    d = Decider()
    m = gateway_mesh(d)
    ex, down = m.request("/productpage")
    assert down.status is None and ex.cluster is None  # waiting for the decision
    d.callbacks[-1]((OVER_LIMIT, []))
    assert down.status == 429 and down.response_header("x-envoy-ratelimited") == "true" and ex.flags == ["RL"]
    ex, down = m.request("/productpage")
    d.callbacks[-1]((OK, []))
    m.loop.run_ready()
    assert m.loop.upstream_of(ex) is not None  # resumed and forwarded
    # failure_mode_deny: an error is 500 RLSE; a timeout too.
    ex, down = m.request("/productpage")
    d.callbacks[-1](ConnectionError("redis down"))
    assert down.status == 500 and ex.flags == ["RLSE"]
    ex, down = m.request("/productpage")
    m.loop.advance(10.0)
    assert down.status == 500 and ex.flags == ["RLSE"]
    d.callbacks[-1]((OK, []))  # a late answer changes nothing
    d.raise_ = ConnectionError("not connected")
    _, down = m.request("/productpage")
    assert down.status == 500
    stats = m.runtime.counters()
    prefix = "cluster.outbound|8081||ratelimit.default.svc.cluster.local.ratelimit."
    assert {k[len(prefix):]: v for k, v in stats.items() if k.startswith(prefix)} == {
        "ok": 1, "over_limit": 1, "error": 3, "failure_mode_allowed": 0}


def test_global_fails_open_by_default() -> None:
    d = Decider()
    m = gateway_mesh(d, deny=False)
    d.raise_ = ConnectionError("not connected")
    ex, down = m.request("/productpage")
    assert down.status is None and m.loop.upstream_of(ex) is not None
    d.raise_ = None
    ex, down = m.request("/productpage")
    m.loop.advance(0.02)  # the default timeout is 10s in the task file; use its value
    assert down.status is None
    m.loop.advance(10.0)
    assert m.loop.upstream_of(ex) is not None
    stats = m.runtime.counters()
    assert stats["cluster.outbound|8081||ratelimit.default.svc.cluster.local.ratelimit.failure_mode_allowed"] == 2


def test_client_gone_while_waiting_for_the_decision() -> None:
    d = Decider()
    m = gateway_mesh(d)
    ex, down = m.request("/productpage")
    ex.on_downstream_closed()
    d.callbacks[-1]((OVER_LIMIT, []))
    assert down.out == b""


# -- Bookinfo: the scenario files and the compose wiring -------------------------------------------

BOOKINFO = Path(__file__).resolve().parents[2] / "config" / "bookinfo"
COMPOSE = Path(__file__).resolve().parents[2] / "docker" / "bookinfo" / "compose.yaml"


@pytest.mark.parametrize("name", [n for n, _ in RATELIMIT_SCENARIOS])
def test_bookinfo_rate_limit_scenarios_select_their_proxies(name: str) -> None:
    # As the demo runs them: the sidecars read the mesh directory, the ingress gateway.yaml too.
    mesh = [str(BOOKINFO / "local"), str(BOOKINFO / name)]
    loop = FakeLoop()
    ingress = ProxyIdentity(labels=(("istio", "ingressgateway"), ("app", "istio-ingressgateway")),
                            gateway="default/bookinfo-gateway")
    productpage = ProxyIdentity(labels=(("app", "productpage"), ("version", "v1")))
    reviews = ProxyIdentity(labels=(("app", "reviews"), ("version", "v1")))
    built = {}
    for label, identity in (("ingress", ingress), ("productpage", productpage), ("reviews", reviews)):
        loaded = load_paths([*mesh, str(BOOKINFO / "gateway.yaml")] if identity.gateway else mesh)
        assert loaded.ok and not loaded.warnings, [str(d) for d in (*loaded.errors, *loaded.warnings)]
        ctx = BuildContext(loop, random.Random(0), None, loop.time,  # type: ignore[arg-type]
                           ratelimit=RateLimitRuntime(random.Random(0)))
        snap = build_snapshot(loaded, identity, ctx)
        assert snap.warnings == [], snap.warnings
        built[label] = snap.ratelimit is not None
    expected = {"ratelimit-global.yaml": {"ingress": True, "productpage": False, "reviews": False},
                "ratelimit-local.yaml": {"ingress": False, "productpage": True, "reviews": False}}
    assert built == expected[name]


def test_bookinfo_ratelimit_service_config_loads() -> None:
    config, errors = load_service_config([str(BOOKINFO / "ratelimit")])
    assert errors == [] and config is not None
    assert limit_of(config, "ratelimit", ("PATH", "/productpage")) == (1, "minute")


def test_compose_runs_a_pinned_redis_for_the_ingress() -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    redis = services["redis"]
    assert re.fullmatch(r"docker\.io/library/redis:\d+\.\d+\.\d+", redis["image"])
    assert "--save" in redis["command"] and "--appendonly" in redis["command"]  # no persistence
    env = services["ingress"]["environment"]
    assert env["PYPROXY_RATELIMIT_REDIS"] == "redis://redis:6379"
    assert services["ingress"]["depends_on"]["redis"] == {"condition": "service_healthy"}
    assert "mesh" in redis["networks"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in services["ingress"]["volumes"]}
    source = (COMPOSE.parent / mounts[env["PYPROXY_RATELIMIT_CONFIG"]]).resolve()
    assert source == (BOOKINFO / "ratelimit").resolve()


# -- the Redis decider (a recording client: the commands it would send) --------------------------


class RecordingClient:
    def __init__(self) -> None:
        self.sent: list[tuple[list, Any]] = []

    def send(self, commands: list, callback: Any, setup: bool = False) -> None:
        self.sent.append((list(commands), callback))


def test_redis_decider_sends_the_services_pipeline_per_window() -> None:
    from pyproxy.ratelimit.decide import RedisDecider

    config = rls("""
domain: ratelimit
descriptors:
  - key: PATH
    value: "/productpage"
    rate_limit: {unit: minute, requests_per_unit: 1}
""")
    client = RecordingClient()
    clock = Clock(1_700_000_059.9)
    decider = RedisDecider(client, config, random.Random(0), jitter_max=0, clock=clock)  # type: ignore[arg-type]
    results: list[Any] = []
    d = ((b"PATH", b"/productpage"),)
    decider.check("ratelimit", [(d, None)], results.append)
    commands, callback = client.sent[-1]
    assert commands == [(b"INCRBY", b"ratelimit_PATH_/productpage_1700000040", 1),
                        (b"EXPIRE", b"ratelimit_PATH_/productpage_1700000040", 60)]
    callback([1, 1])
    clock.now = 1_700_000_100.0  # the next window: a new key (the memo keeps only the key's stem)
    decider.check("ratelimit", [(d, 3)], results.append)
    commands, callback_over = client.sent[-1]
    assert commands[0] == (b"INCRBY", b"ratelimit_PATH_/productpage_1700000100", 3)
    callback_over([4, 1])
    assert [r[0] for r in results] == [OK, OVER_LIMIT]
    # A reply that is not a count, and a lost connection, are errors (the failure mode decides).
    decider.check("ratelimit", [(d, None)], results.append)
    client.sent[-1][1]([hiredis.ReplyError("WRONGTYPE"), 1])
    decider.check("ratelimit", [(d, None)], results.append)
    client.sent[-1][1](ConnectionError("lost"))
    assert isinstance(results[2], Exception) and isinstance(results[3], ConnectionError)
    # No limit matched: no Redis call at all; a reloaded config forgets what was remembered.
    decider.check("ratelimit", [(((b"PATH", b"/other"),), None)], results.append)
    assert len(client.sent) == 4 and results[-1][0] == OK
    decider.config = rls("domain: ratelimit\ndescriptors: [{key: PATH, rate_limit: {unit: second, requests_per_unit: 5}}]\n")
    decider.check("ratelimit", [(((b"PATH", b"/other"),), None)], results.append)
    assert client.sent[-1][0][1] == (b"EXPIRE", b"ratelimit_PATH_/other_1700000100", 1)
