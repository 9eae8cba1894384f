"""EnvoyFilter parsing, narrowly: the rate-limit shapes (internal to the loader).

Istio has no rate-limit API; its documented way ("Enabling Rate Limits using
Envoy") is EnvoyFilter patches that insert Envoy's ``local_ratelimit`` or
``ratelimit`` HTTP filter and merge ``rate_limits`` actions or a per-route
``typed_per_filter_config`` into virtual hosts and routes. pyproxy applies
exactly those shapes (current and older revisions of the task):

- ``HTTP_FILTER`` ``INSERT_BEFORE``/``INSERT_AFTER``/``INSERT_FIRST`` of a
  local or global rate-limit filter (``typed_config`` direct or wrapped in a
  ``udpa.type.v1.TypedStruct`` / ``xds.type.v3.TypedStruct``);
- ``VIRTUAL_HOST`` / ``HTTP_ROUTE`` ``MERGE`` of ``rate_limits``,
  ``route.rate_limits``, ``include_vh_rate_limits`` or a rate-limit
  ``typed_per_filter_config``;
- ``CLUSTER`` ``ADD`` (the old revision's ``rate_limit_cluster``): accepted,
  pyproxy reaches the rate-limit decision with ``--ratelimit-redis`` or
  ``--ratelimit-service`` instead.

Field lists follow istio/api networking/v1alpha3/envoy_filter.proto and
Envoy's protos (field names in snake_case or lowerCamelCase, as proto JSON
accepts). An EnvoyFilter with no rate-limit patch loads with one warning
naming what is ignored. In an EnvoyFilter that does rate limiting, anything
pyproxy cannot honour exactly is an error at its path: never half-applied.
"""

from __future__ import annotations

import re
from typing import Any

from ._common import regex_problem, selector_labels
from ._duration import duration_ns
from ._reader import Node, Report, describe, join, message
from .model import (
    EnvoyFilter,
    EnvoyFilterPatch,
    GlobalRateLimitSpec,
    HeaderMatcherSpec,
    HeaderValueSpec,
    LocalDescriptorSpec,
    LocalRateLimitSpec,
    Meta,
    RateLimitActionSpec,
    RateLimitSpec,
    TokenBucketSpec,
)

ENVOY_FILTER = message("EnvoyFilter", "workloadSelector configPatches priority targetRefs")

LOCAL_TYPE = "envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit"
GLOBAL_TYPE = "envoy.extensions.filters.http.ratelimit.v3.RateLimit"
GLOBAL_PER_ROUTE_TYPE = "envoy.extensions.filters.http.ratelimit.v3.RateLimitPerRoute"
TYPED_STRUCTS = ("udpa.type.v1.TypedStruct", "xds.type.v3.TypedStruct")
HCM_NAMES = ("envoy.filters.network.http_connection_manager", "envoy.http_connection_manager")
ROUTER_NAMES = ("envoy.filters.http.router", "envoy.router")
LOCAL_NAMES = ("envoy.filters.http.local_ratelimit", "envoy.local_rate_limit")
GLOBAL_NAMES = ("envoy.filters.http.ratelimit", "envoy.rate_limit")
CONTEXTS = ("ANY", "SIDECAR_INBOUND", "SIDECAR_OUTBOUND", "GATEWAY")
ROUTE_ACTIONS = ("ANY", "ROUTE", "REDIRECT", "DIRECT_RESPONSE")
APPLY_TO = ("INVALID", "LISTENER", "FILTER_CHAIN", "NETWORK_FILTER", "HTTP_FILTER", "ROUTE_CONFIGURATION",
            "VIRTUAL_HOST", "HTTP_ROUTE", "CLUSTER", "EXTENSION_CONFIG", "BOOTSTRAP", "LISTENER_FILTER")
_DENOMINATORS = {"HUNDRED": 100, "TEN_THOUSAND": 10_000, "MILLION": 1_000_000}
_CAMEL = re.compile(r"(?<=[a-z0-9])([A-Z])")
_PROTO_DURATION = re.compile(r"-?\d+(\.\d{1,9})?s")


def _snake(key: str) -> str:
    return _CAMEL.sub(lambda m: "_" + m.group(1).lower(), key)


class _Msg:
    """An Envoy (or Istio) proto message in a rate-limit EnvoyFilter: every
    field must be known and supported, else it is an error (pyproxy would
    otherwise apply something other than what was written). Keys may be
    snake_case or lowerCamelCase, as proto JSON accepts."""

    __slots__ = ("data", "path", "rep")

    def __init__(self, rep: Report, path: str, data: dict, name: str, fields: str,
                 unsupported: str = "") -> None:
        rep.spend(1 + len(data))
        self.rep = rep
        self.path = path
        self.data: dict[str, Any] = {}
        known = set(fields.split())
        refused = set(unsupported.split())
        for key, value in data.items():
            if not isinstance(key, str):
                rep.error(path, f"field names must be strings, got {describe(key)}")
                continue
            snake = _snake(key)
            if snake in refused:
                if value is not None:
                    rep.error(join(path, key), f"{name}.{snake} is not supported by pyproxy's rate limiting")
            elif snake not in known:
                rep.error(join(path, key), f"unknown field {key!r} in {name}")
            elif value is not None:
                self.data[snake] = (key, value)

    def at(self, field: str) -> str:
        entry = self.data.get(field)
        return join(self.path, entry[0] if entry else field)

    def has(self, field: str) -> bool:
        return field in self.data

    def get(self, field: str) -> Any:
        entry = self.data.get(field)
        return entry[1] if entry else None

    def error(self, field: str, text: str) -> None:
        self.rep.error(self.at(field), text)

    def string(self, field: str, *, required: bool = False) -> str:
        value = self.get(field)
        if value is None:
            if required:
                self.error(field, "is required")
            return ""
        if not isinstance(value, str):
            self.error(field, f"must be a string, got {describe(value)}")
            return ""
        return value

    def boolean(self, field: str, default: bool = False) -> bool:
        value = self.get(field)
        if value is None:
            return default
        if isinstance(value, dict) and set(value) == {"value"}:  # google.protobuf.BoolValue
            value = value["value"]
        if not isinstance(value, bool):
            self.error(field, f"must be true or false, got {describe(value)}")
            return default
        return value

    def integer(self, field: str, *, lo: int = 0, hi: int = 2**32 - 1, default: int | None = None) -> int | None:
        value = self.get(field)
        if value is None:
            return default
        if isinstance(value, dict) and set(value) == {"value"}:  # UInt32Value
            value = value["value"]
        if isinstance(value, str) and value.isdigit():  # proto JSON writes 64-bit integers as strings
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            self.error(field, f"must be an integer, got {describe(value)}")
            return default
        if not lo <= value <= hi:
            self.error(field, f"must be between {lo} and {hi}")
            return default
        return value

    def duration(self, field: str) -> float | None:
        value = self.get(field)
        if value is None:
            return None
        if isinstance(value, str) and _PROTO_DURATION.fullmatch(value):
            return duration_ns(value) / 1e9
        self.error(field, f"must be a protobuf duration such as \"60s\" or \"0.25s\", got {describe(value)}")
        return None

    def child(self, field: str, name: str, fields: str, unsupported: str = "") -> _Msg | None:
        value = self.get(field)
        if value is None:
            return None
        if not isinstance(value, dict):
            self.error(field, f"must be a mapping, got {describe(value)}")
            return None
        return _Msg(self.rep, self.at(field), value, name, fields, unsupported)

    def children(self, field: str, name: str, fields: str, unsupported: str = "") -> list[_Msg]:
        value = self.get(field)
        if value is None:
            return []
        if not isinstance(value, list):
            self.error(field, f"must be a list, got {describe(value)}")
            return []
        out = []
        for i, item in enumerate(value):
            path = f"{self.at(field)}[{i}]"
            if isinstance(item, dict):
                out.append(_Msg(self.rep, path, item, name, fields, unsupported))
            else:
                self.rep.error(path, f"must be a mapping, got {describe(item)}")
        return out

    def enum(self, field: str, allowed: tuple[str, ...], default: str) -> str:
        value = self.get(field)
        if value is None:
            return default
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(allowed):
            return allowed[value]
        if value not in allowed:
            self.error(field, f"must be one of {', '.join(allowed)}, got {describe(value)}")
            return default
        return str(value)


# -- the resource ------------------------------------------------------------------


def parse_envoy_filter(meta: Meta, spec: Node) -> EnvoyFilter:
    rep = spec.rep
    workload_selector = selector_labels(spec, "workloadSelector", match_labels=False)
    priority = spec.integer("priority", lo=-(2**31)) or 0
    items = spec.items("configPatches")
    relevant = [i for i, (_, item) in enumerate(items) if isinstance(item, dict) and _is_rate_limit(item)]
    if not relevant:
        ignored = ", ".join(f"configPatches[{i}] ({_describe_patch(item)})" for i, (_, item) in enumerate(items))
        rep.warn(spec.path, f"EnvoyFilter {meta.namespace}/{meta.name}: pyproxy applies only rate-limit "
                            f"patches; ignored: {ignored or 'no configPatches'}")
        return EnvoyFilter(meta, workload_selector, (), priority)
    if spec.has("targetRefs"):
        spec.error("targetRefs", "not supported by pyproxy (use workloadSelector)")
    patches: list[EnvoyFilterPatch] = []
    for path, item in items:
        if not isinstance(item, dict):
            rep.error(path, f"must be a mapping, got {describe(item)}")
            continue
        patch = _patch(rep, path, item)
        if patch is not None:
            patches.append(patch)
    return EnvoyFilter(meta, workload_selector, tuple(patches), priority)


def _describe_patch(item: object) -> str:
    if not isinstance(item, dict):
        return describe(item)
    patch = item.get("patch")
    op = patch.get("operation") if isinstance(patch, dict) else None
    return f"{item.get('applyTo', '?')} {op or '?'}"


def _type_url(value: object) -> str:
    """The message type of a ``typed_config`` (TypedStruct unwrapped), or ""."""
    if not isinstance(value, dict):
        return ""
    url = value.get("@type")
    if not isinstance(url, str):
        return ""
    name = url.rpartition("/")[2]
    if name in TYPED_STRUCTS:
        inner = value.get("type_url", value.get("typeUrl"))
        return inner.rpartition("/")[2] if isinstance(inner, str) else ""
    return name


def _is_rate_limit(item: dict) -> bool:
    """Does this patch configure rate limiting (so it must be honoured exactly)?"""
    patch = item.get("patch")
    value = patch.get("value") if isinstance(patch, dict) else None
    if not isinstance(value, dict):
        return False
    apply_to = item.get("applyTo")
    if apply_to == "HTTP_FILTER":
        typed = value.get("typed_config", value.get("typedConfig"))
        return _type_url(typed) in (LOCAL_TYPE, GLOBAL_TYPE) or value.get("name") in (*LOCAL_NAMES, *GLOBAL_NAMES)
    if apply_to in ("VIRTUAL_HOST", "HTTP_ROUTE"):
        route = value.get("route")
        keys = set(value) | (set(route) if isinstance(route, dict) else set())
        if keys & {"rate_limits", "rateLimits", "include_vh_rate_limits", "includeVhRateLimits"}:
            return True
        per_filter = value.get("typed_per_filter_config", value.get("typedPerFilterConfig"))
        if isinstance(per_filter, dict):
            return any(_type_url(v) in (LOCAL_TYPE, GLOBAL_PER_ROUTE_TYPE) or k in (*LOCAL_NAMES, *GLOBAL_NAMES)
                       for k, v in per_filter.items())
    return False


# -- one patch ---------------------------------------------------------------------


def _patch(rep: Report, path: str, item: dict) -> EnvoyFilterPatch | None:
    if "listener" in item and "match" not in item:
        # Older revisions of Istio's task put ``listener:`` beside ``match:``;
        # Kubernetes prunes the unknown field, so the patch had no match.
        rep.warn(join(path, "listener"), "not a field of a config patch (it belongs under match:); "
                 "Kubernetes drops it, so this patch has no match and applies to every HTTP filter chain")
        item = {k: v for k, v in item.items() if k != "listener"}
    node = _Msg(rep, path, item, "EnvoyConfigObjectPatch", "apply_to match patch")
    apply_to = node.string("apply_to", required=True)
    if apply_to and apply_to not in APPLY_TO:
        node.error("apply_to", f"must be one of {', '.join(APPLY_TO[1:])}, got {apply_to!r}")
        return None
    patch = node.child("patch", "Patch", "operation value", unsupported="filter_class")
    if patch is None:
        node.error("patch", "is required")
        return None
    operation = patch.string("operation", required=True)
    origin = f"{rep.file}#{rep.doc} {path}"
    fields: dict[str, Any] = {"apply_to": apply_to, "origin": origin}
    _match(node, apply_to, fields)
    value = patch.get("value")
    value_path = patch.at("value")
    if apply_to == "CLUSTER":
        if operation != "ADD":
            patch.error("operation", f"only ADD is supported for CLUSTER in a rate-limit EnvoyFilter, got {operation!r}")
        # The cluster of the rate-limit service: pyproxy reaches the decision
        # through --ratelimit-redis or --ratelimit-service instead.
        return EnvoyFilterPatch(**fields)
    if not isinstance(value, dict):
        rep.error(value_path, f"must be a mapping, got {describe(value)}")
        return None
    if apply_to == "HTTP_FILTER":
        if operation not in ("INSERT_BEFORE", "INSERT_AFTER", "INSERT_FIRST"):
            patch.error("operation", "a rate-limit filter must be inserted with INSERT_BEFORE, INSERT_AFTER or "
                                     f"INSERT_FIRST (before the router), got {operation!r}")
        if operation == "INSERT_AFTER" and fields.pop("_sub_filter", "") in ("", *ROUTER_NAMES):
            patch.error("operation", "INSERT_AFTER the router (or at the end): Envoy never runs the filter")
        fields.pop("_sub_filter", None)
        _http_filter(rep, value_path, value, fields)
        return EnvoyFilterPatch(**fields)
    fields.pop("_sub_filter", None)
    if apply_to in ("VIRTUAL_HOST", "HTTP_ROUTE"):
        if operation != "MERGE":
            patch.error("operation", f"only MERGE is supported for {apply_to} in a rate-limit EnvoyFilter, "
                                     f"got {operation!r}")
        _route_merge(rep, value_path, value, apply_to, fields)
        return EnvoyFilterPatch(**fields)
    node.error("apply_to", f"{apply_to} patches are not supported in a rate-limit EnvoyFilter (pyproxy applies "
                           "HTTP_FILTER, VIRTUAL_HOST, HTTP_ROUTE and CLUSTER ADD)")
    return None


def _match(node: _Msg, apply_to: str, fields: dict[str, Any]) -> None:
    match = node.child("match", "EnvoyConfigObjectMatch", "context listener route_configuration cluster",
                       unsupported="proxy")
    if match is None:
        return
    fields["context"] = match.enum("context", CONTEXTS, "ANY")
    listener = match.child("listener", "ListenerMatch", "port_number filter_chain",
                           unsupported="port_name name listener_filter")
    if listener is not None:
        if apply_to not in ("HTTP_FILTER",):
            listener.rep.error(listener.path, f"a listener match on a {apply_to} patch is not supported")
        fields["port_number"] = listener.integer("port_number", lo=1, hi=65535)
        chain = listener.child("filter_chain", "FilterChainMatch", "filter",
                               unsupported="name sni transport_protocol application_protocols destination_port")
        flt = chain.child("filter", "FilterMatch", "name sub_filter") if chain is not None else None
        if flt is not None:
            name = flt.string("name")
            if name and name not in HCM_NAMES:
                flt.error("name", f"a rate-limit filter lives in the HTTP connection manager "
                                  f"({HCM_NAMES[0]}), got {name!r}")
            sub = flt.child("sub_filter", "SubFilterMatch", "name")
            if sub is not None:
                fields["_sub_filter"] = sub.string("name")
    route_config = match.child("route_configuration", "RouteConfigurationMatch", "port_number vhost name",
                               unsupported="port_name gateway")
    if route_config is not None:
        if apply_to not in ("VIRTUAL_HOST", "HTTP_ROUTE"):
            route_config.rep.error(route_config.path, f"a routeConfiguration match on a {apply_to} patch is "
                                                      "not supported")
        fields["port_number"] = route_config.integer("port_number", lo=1, hi=65535)
        if route_config.has("name"):
            route_config.error("name", "matching route configurations by name is not supported by pyproxy "
                                       "(match vhost.name instead)")
        vhost = route_config.child("vhost", "VirtualHostMatch", "name route", unsupported="domain_name")
        if vhost is not None:
            fields["vhost_name"] = vhost.string("name")
            route = vhost.child("route", "RouteMatch", "name action")
            if route is not None:
                fields["route_name"] = route.string("name")
                fields["route_action"] = route.enum("action", ROUTE_ACTIONS, "ANY")
    if match.has("cluster") and apply_to != "CLUSTER":
        match.error("cluster", f"a cluster match on a {apply_to} patch is not supported")


# -- HTTP filters -------------------------------------------------------------------


def _typed_config(rep: Report, path: str, value: object) -> tuple[str, str, dict] | None:
    """(type name, path of the fields, fields) of a ``typed_config``, TypedStruct unwrapped."""
    if not isinstance(value, dict):
        rep.error(path, f"must be a mapping with \"@type\", got {describe(value)}")
        return None
    url = value.get("@type")
    if not isinstance(url, str):
        rep.error(join(path, "@type"), "is required")
        return None
    name = url.rpartition("/")[2]
    if name in TYPED_STRUCTS:
        wrapper = _Msg(rep, path, value, name, "@type type_url value")
        inner = wrapper.string("type_url", required=True).rpartition("/")[2]
        fields = wrapper.get("value")
        if fields is None:
            fields = {}
        if not isinstance(fields, dict):
            wrapper.error("value", f"must be a mapping, got {describe(fields)}")
            return None
        return inner, wrapper.at("value"), fields
    return name, path, {k: v for k, v in value.items() if k != "@type"}


def _http_filter(rep: Report, path: str, value: dict, fields: dict[str, Any]) -> None:
    node = _Msg(rep, path, value, "HttpFilter", "name typed_config", unsupported="config_discovery is_optional "
                                                                                  "disabled config")
    typed = _typed_config(rep, node.at("typed_config"), node.get("typed_config")) if node.has("typed_config") \
        else None
    if typed is None:
        if not node.has("typed_config"):
            node.error("typed_config", "is required for a rate-limit filter")
        return
    type_name, fpath, data = typed
    if type_name == LOCAL_TYPE:
        fields["local"] = _local(rep, fpath, data, route_level=False)
    elif type_name == GLOBAL_TYPE:
        fields["global_"] = _global(rep, fpath, data)
    else:
        rep.error(join(node.at("typed_config"), "@type"),
                  f"{type_name!r} is not a rate-limit filter (pyproxy applies {LOCAL_TYPE} and {GLOBAL_TYPE})")


def _fraction(parent: _Msg, field: str) -> float:
    """A RuntimeFractionalPercent's default (pyproxy has no runtime layer)."""
    node = parent.child(field, "RuntimeFractionalPercent", "default_value runtime_key")
    if node is None:
        return 0.0
    default = node.child("default_value", "FractionalPercent", "numerator denominator")
    if default is None:
        node.error("default_value", "is required")
        return 0.0
    numerator = default.integer("numerator", default=0) or 0
    denominator = _DENOMINATORS[default.enum("denominator", tuple(_DENOMINATORS), "HUNDRED")]
    return min(1.0, numerator / denominator)


def _status(parent: _Msg, field: str, default: int) -> int:
    node = parent.child(field, "HttpStatus", "code")
    if node is None:
        return default
    code = node.integer("code", lo=100, hi=599)
    if code is None:
        node.error("code", "is required (a number such as 429)")
        return default
    return code


def _token_bucket(parent: _Msg, field: str) -> TokenBucketSpec | None:
    node = parent.child(field, "TokenBucket", "max_tokens tokens_per_fill fill_interval")
    if node is None:
        return None
    max_tokens = node.integer("max_tokens", lo=1)
    if max_tokens is None and not node.has("max_tokens"):
        node.error("max_tokens", "is required")
    per_fill = node.integer("tokens_per_fill", lo=1, default=1)
    interval = node.duration("fill_interval")
    if interval is None and not node.has("fill_interval"):
        node.error("fill_interval", "is required")
    elif interval is not None and interval < 0.05:
        node.error("fill_interval", "must be at least 50ms (Envoy's minimum)")
        interval = None
    if max_tokens is None or per_fill is None or interval is None:
        return None
    return TokenBucketSpec(max_tokens, per_fill, interval)


def _header_values(parent: _Msg, field: str) -> tuple[HeaderValueSpec, ...]:
    out = []
    for option in parent.children(field, "HeaderValueOption", "header append append_action keep_empty_value"):
        header = option.child("header", "HeaderValue", "key value", unsupported="raw_value")
        if header is None:
            option.error("header", "is required")
            continue
        key = header.string("key", required=True).lower()
        append = option.boolean("append", True)
        action = option.enum("append_action", ("APPEND_IF_EXISTS_OR_ADD", "ADD_IF_ABSENT",
                                                "OVERWRITE_IF_EXISTS_OR_ADD", "OVERWRITE_IF_EXISTS"), "")
        if action in ("ADD_IF_ABSENT", "OVERWRITE_IF_EXISTS"):
            option.error("append_action", f"{action} is not supported by pyproxy")
        if action:
            append = action == "APPEND_IF_EXISTS_OR_ADD"
        if key:
            out.append(HeaderValueSpec(key, header.string("value"), append))
    return tuple(out)


def _local(rep: Report, path: str, data: dict, *, route_level: bool) -> LocalRateLimitSpec | None:
    node = _Msg(rep, path, data, "LocalRateLimit",
                "stat_prefix token_bucket filter_enabled filter_enforced status response_headers_to_add "
                "request_headers_to_add_when_not_enforced descriptors stage enable_x_ratelimit_headers "
                "vh_rate_limits always_consume_default_token_bucket rate_limited_as_resource_exhausted",
                unsupported="local_rate_limit_per_downstream_connection local_cluster_rate_limit rate_limits "
                            "max_dynamic_descriptors enable_x_rate_limit_headers")
    stat_prefix = node.string("stat_prefix", required=True)
    bucket = _token_bucket(node, "token_bucket")
    if route_level and bucket is None and not node.has("token_bucket"):
        # Envoy rejects a per-route config without a bucket.
        node.error("token_bucket", "is required in a per-route local rate limit")
    descriptors = []
    for d in node.children("descriptors", "LocalRateLimitDescriptor", "entries token_bucket"):
        entries = []
        for e in d.children("entries", "RateLimitDescriptor.Entry", "key value"):
            key = e.string("key", required=True)
            value = e.string("value")
            if not value:
                e.error("value", "an empty value (a wildcard descriptor) is not supported by pyproxy")
            entries.append((key, value))
        dbucket = _token_bucket(d, "token_bucket")
        if dbucket is None and not d.has("token_bucket"):
            d.error("token_bucket", "is required")
        if entries and dbucket is not None:
            descriptors.append(LocalDescriptorSpec(tuple(entries), dbucket))
    headers = node.enum("enable_x_ratelimit_headers", ("OFF", "DRAFT_VERSION_03"), "OFF")
    return LocalRateLimitSpec(
        stat_prefix=stat_prefix,
        token_bucket=bucket,
        filter_enabled=_fraction(node, "filter_enabled"),
        filter_enforced=_fraction(node, "filter_enforced"),
        status=_status(node, "status", 429),
        response_headers_to_add=_header_values(node, "response_headers_to_add"),
        request_headers_to_add_when_not_enforced=_header_values(node, "request_headers_to_add_when_not_enforced"),
        descriptors=tuple(descriptors),
        stage=node.integer("stage", hi=10) or 0,
        x_ratelimit_headers=headers == "DRAFT_VERSION_03",
        always_consume_default_token_bucket=node.boolean("always_consume_default_token_bucket", True),
        rate_limited_as_resource_exhausted=node.boolean("rate_limited_as_resource_exhausted"),
        vh_rate_limits=node.enum("vh_rate_limits", ("OVERRIDE", "INCLUDE", "IGNORE"), "OVERRIDE"),
        origin=f"{rep.file}#{rep.doc} {path}",
    )


def _global(rep: Report, path: str, data: dict) -> GlobalRateLimitSpec | None:
    node = _Msg(rep, path, data, "RateLimit",
                "domain stage request_type timeout failure_mode_deny rate_limit_service rate_limited_status "
                "status_on_error disable_x_envoy_ratelimited_header enable_x_ratelimit_headers "
                "rate_limited_as_resource_exhausted stat_prefix",
                unsupported="rate_limit_service_descriptors response_headers_to_add failure_mode_deny_percent "
                            "enable_dynamic_metadata filter_enabled filter_enforced")
    domain = node.string("domain", required=True)
    cluster = ""
    service = node.child("rate_limit_service", "RateLimitServiceConfig", "grpc_service transport_api_version")
    if service is None:
        node.error("rate_limit_service", "is required")
    else:
        service.enum("transport_api_version", ("AUTO", "V2", "V3"), "V3")
        grpc = service.child("grpc_service", "GrpcService", "envoy_grpc timeout initial_metadata",
                             unsupported="google_grpc retry_policy")
        if grpc is None:
            service.error("grpc_service", "is required")
        else:
            envoy_grpc = grpc.child("envoy_grpc", "GrpcService.EnvoyGrpc", "cluster_name authority",
                                    unsupported="retry_policy max_receive_message_length "
                                                "skip_envoy_headers")
            if envoy_grpc is None:
                grpc.error("envoy_grpc", "is required (pyproxy names the service's cluster from it)")
            else:
                cluster = envoy_grpc.string("cluster_name", required=True)
    timeout = node.duration("timeout")
    request_type = node.string("request_type") or "both"
    if request_type not in ("both", "internal", "external"):
        node.error("request_type", f"must be both, internal or external, got {request_type!r}")
    headers = node.enum("enable_x_ratelimit_headers", ("OFF", "DRAFT_VERSION_03"), "OFF")
    return GlobalRateLimitSpec(
        domain=domain,
        stage=node.integer("stage", hi=10) or 0,
        request_type=request_type,
        timeout=0.02 if timeout is None else timeout,
        failure_mode_deny=node.boolean("failure_mode_deny"),
        cluster_name=cluster,
        rate_limited_status=_status(node, "rate_limited_status", 429),
        status_on_error=_status(node, "status_on_error", 500),
        disable_x_envoy_ratelimited_header=node.boolean("disable_x_envoy_ratelimited_header"),
        x_ratelimit_headers=headers == "DRAFT_VERSION_03",
        rate_limited_as_resource_exhausted=node.boolean("rate_limited_as_resource_exhausted"),
        origin=f"{rep.file}#{rep.doc} {path}",
    )


# -- virtual host and route merges -----------------------------------------------------


def _route_merge(rep: Report, path: str, value: dict, apply_to: str, fields: dict[str, Any]) -> None:
    if apply_to == "VIRTUAL_HOST":
        node = _Msg(rep, path, value, "VirtualHost", "rate_limits typed_per_filter_config")
        fields["rate_limits"] = _rate_limits(node, "rate_limits")
    else:
        node = _Msg(rep, path, value, "Route", "route typed_per_filter_config")
        action = node.child("route", "RouteAction", "rate_limits include_vh_rate_limits")
        if action is not None:
            fields["rate_limits"] = _rate_limits(action, "rate_limits")
            if action.has("include_vh_rate_limits"):
                fields["include_vh_rate_limits"] = action.boolean("include_vh_rate_limits")
    per_filter = node.get("typed_per_filter_config")
    if per_filter is None:
        return
    base = node.at("typed_per_filter_config")
    if not isinstance(per_filter, dict):
        rep.error(base, f"must be a mapping, got {describe(per_filter)}")
        return
    for name, config in per_filter.items():
        where = join(base, str(name))
        typed = _typed_config(rep, where, config)
        if typed is None:
            continue
        type_name, fpath, data = typed
        if type_name == LOCAL_TYPE:
            fields["local"] = _local(rep, fpath, data, route_level=True)
        elif type_name == GLOBAL_PER_ROUTE_TYPE:
            per_route = _Msg(rep, fpath, data, "RateLimitPerRoute", "vh_rate_limits",
                             unsupported="override_option rate_limits domain")
            fields["global_vh_rate_limits"] = per_route.enum("vh_rate_limits", ("OVERRIDE", "INCLUDE", "IGNORE"),
                                                             "OVERRIDE")
        else:
            rep.error(join(where, "@type"), f"{type_name!r}: pyproxy applies per-route configuration of the "
                                            "rate-limit filters only")


def _rate_limits(parent: _Msg, field: str) -> tuple[RateLimitSpec, ...]:
    out = []
    for entry in parent.children("rate_limits" if field == "rate_limits" else field, "RateLimit",
                                 "stage actions hits_addend",
                                 unsupported="disable_key limit apply_on_stream_done"):
        actions = []
        for a in entry.children("actions", "RateLimit.Action",
                                "source_cluster destination_cluster request_headers remote_address generic_key "
                                "header_value_match",
                                unsupported="dynamic_metadata metadata extension masked_remote_address "
                                            "query_parameter_value_match query_parameters"):
            action = _action(a)
            if action is not None:
                actions.append(action)
        if not entry.has("actions"):
            entry.error("actions", "is required")
        hits = None
        if entry.has("hits_addend"):
            hits_node = entry.child("hits_addend", "HitsAddend", "number", unsupported="format")
            hits = hits_node.integer("number", lo=0, default=1) if hits_node is not None else None
        out.append(RateLimitSpec(tuple(actions), entry.integer("stage", hi=10) or 0, hits))
    return tuple(out)


def _action(a: _Msg) -> RateLimitActionSpec | None:
    kinds = list(a.data)
    if len(kinds) != 1:
        a.rep.error(a.path, f"an action must set exactly one of its kinds, got {', '.join(kinds) or 'none'}")
        return None
    kind = kinds[0]
    if kind in ("source_cluster", "destination_cluster", "remote_address"):
        a.child(kind, kind, "")  # {} (no fields)
        return RateLimitActionSpec(kind)
    if kind == "request_headers":
        n = a.child(kind, "RequestHeaders", "header_name descriptor_key skip_if_absent")
        if n is None:
            return None
        return RateLimitActionSpec(kind, key=n.string("descriptor_key", required=True),
                                   header_name=n.string("header_name", required=True).lower(),
                                   skip_if_absent=n.boolean("skip_if_absent"))
    if kind == "generic_key":
        n = a.child(kind, "GenericKey", "descriptor_value descriptor_key")
        if n is None:
            return None
        return RateLimitActionSpec(kind, key=n.string("descriptor_key") or "generic_key",
                                   value=n.string("descriptor_value", required=True))
    n = a.child(kind, "HeaderValueMatch", "descriptor_key descriptor_value expect_match headers")
    if n is None:
        return None
    matchers = tuple(m for m in (_header_matcher(h) for h in n.children(
        "headers", "HeaderMatcher",
        "name exact_match safe_regex_match present_match prefix_match suffix_match contains_match string_match "
        "invert_match treat_missing_header_as_empty",
        unsupported="range_match")) if m is not None)
    return RateLimitActionSpec(kind, key=n.string("descriptor_key") or "header_match",
                               value=n.string("descriptor_value", required=True),
                               expect_match=n.boolean("expect_match", True), headers=matchers)


def _regex(parent: _Msg, field: str) -> str | None:
    node = parent.child(field, "RegexMatcher", "google_re2 regex")
    if node is None:
        return None
    regex = node.string("regex", required=True)
    problem = regex_problem(regex) if regex else None
    if problem:
        node.error("regex", problem)
        return None
    return regex


def _header_matcher(h: _Msg) -> HeaderMatcherSpec | None:
    name = h.string("name", required=True).lower()
    invert = h.boolean("invert_match")
    missing = h.boolean("treat_missing_header_as_empty")
    specs = [k for k in ("exact_match", "safe_regex_match", "present_match", "prefix_match", "suffix_match",
                         "contains_match", "string_match") if h.has(k)]
    if len(specs) > 1:
        h.rep.error(h.path, f"only one match kind may be set, got {', '.join(specs)}")
        return None
    if not specs:
        # No match kind: the header must be present.
        return HeaderMatcherSpec(name, "present", invert=invert, missing_as_empty=missing)
    spec = specs[0]
    if spec == "present_match":
        return HeaderMatcherSpec(name, "present", present=h.boolean("present_match", True), invert=invert,
                                 missing_as_empty=missing)
    if spec == "safe_regex_match":
        regex = _regex(h, spec)
        return None if regex is None else HeaderMatcherSpec(name, "regex", regex, invert=invert,
                                                             missing_as_empty=missing)
    if spec == "string_match":
        sm = h.child(spec, "StringMatcher", "exact prefix suffix contains safe_regex ignore_case")
        if sm is None:
            return None
        kinds = [k for k in ("exact", "prefix", "suffix", "contains", "safe_regex") if sm.has(k)]
        if len(kinds) != 1:
            sm.rep.error(sm.path, "exactly one of exact, prefix, suffix, contains, safe_regex is required")
            return None
        kind = kinds[0]
        ignore_case = sm.boolean("ignore_case")
        if kind == "safe_regex":
            regex = _regex(sm, kind)
            return None if regex is None else HeaderMatcherSpec(name, "regex", regex, invert=invert,
                                                                 missing_as_empty=missing)
        return HeaderMatcherSpec(name, kind, sm.string(kind), invert=invert, ignore_case=ignore_case,
                                 missing_as_empty=missing)
    return HeaderMatcherSpec(name, spec[: -len("_match")], h.string(spec), invert=invert, missing_as_empty=missing)
