"""Metrics: Istio's standard request metrics, Envoy-style cluster and
listener stats, and pyproxy's own counters. Every family is declared here.

Hot path: recording a request is a dict lookup on the cluster
(``Cluster.metric_cache``, keyed by status, response flags and the
destination identity) that yields a ``Series`` of plain ints, then three
``bisect`` calls into fixed bucket arrays. Label values are computed once per
distinct key, when the key is first seen; destination-service labels are
bound to each cluster when the cluster is built (``bind_cluster``). No
prometheus_client object is touched per request: at scrape time the
``StateCollector`` turns a plain-data *state* (mergeable across worker
processes) into metric families.

Names (see README "Metrics"):

- ``istio_requests_total`` (counter), ``istio_request_duration_milliseconds``,
  ``istio_request_bytes``, ``istio_response_bytes`` (histograms) with Istio's
  full label set and Envoy's default histogram buckets (Istio sets no
  others): 0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000,
  30000, 60000, 300000, 600000, 1800000, 3600000.
- ``envoy_cluster_<stat>{cluster_name="outbound|9080|v1|reviews..."}`` for
  every ``ClusterStats`` field (Envoy's stat names). Gauges keep Envoy's
  name; counters follow the Prometheus convention of a ``_total`` suffix
  (``envoy_cluster_upstream_rq_retry_total``; names that already end in
  ``_total`` are unchanged), which Envoy's own exposition omits.
- ``envoy_cluster_membership_total``/``_healthy`` gauges,
  ``envoy_http_downstream_*`` (listener counters), ``envoy_server_live``,
  ``envoy_server_uptime``, ``envoy_server_concurrency``.
- ``pyproxy_config_reloads_total{result="success"|"failure"}``,
  ``pyproxy_config_update_rejected_total`` (Envoy's xDS ``update_rejected``),
  ``pyproxy_config_version``, ``pyproxy_access_log_dropped_total``,
  ``pyproxy_mirror_rq_{sent,completed,failed,dropped}_total``.

Counters never go backwards: Istio series live for the life of the process,
and a cluster replaced by a reload continues its predecessor's counters
(the old cluster's final values are folded into a per-name base when it is
garbage collected), as Envoy's stats store does per cluster name.
"""

from __future__ import annotations

import dataclasses
import re
import time
import weakref
from bisect import bisect_left
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from ..upstream.cluster import ClusterStats
from .peer import UNKNOWN, UNKNOWN_PEER, PeerInfo, peer_from_labels

if TYPE_CHECKING:
    from ..snapshot import ProxyIdentity
    from ..upstream.cluster import Cluster, ClusterEndpoint
    from .view import ExchangeView

# Envoy's default histogram buckets (HistogramSettingsImpl::defaultBuckets);
# Istio uses them for all three request histograms.
BUCKETS: tuple[float, ...] = (
    0.5,
    1,
    5,
    10,
    25,
    50,
    100,
    250,
    500,
    1000,
    2500,
    5000,
    10000,
    30000,
    60000,
    300000,
    600000,
    1800000,
    3600000,
)
NBUCKETS = len(BUCKETS) + 1  # + the +Inf bucket
LE = tuple(("%g" % b if b < 1 else str(int(b))) for b in BUCKETS) + ("+Inf",)

# Istio's label set, in the order Istio's stats plugin emits it.
ISTIO_LABELS = (
    "reporter",
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_service",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_service_name",
    "destination_service_namespace",
    "destination_cluster",
    "request_protocol",
    "response_code",
    "grpc_response_status",
    "response_flags",
    "connection_security_policy",
)

CLUSTER_STATS: tuple[str, ...] = ClusterStats.__slots__
# Envoy's convention: the gauges are the ``*_active`` stats, everything else counts.
CLUSTER_GAUGES = frozenset(s for s in CLUSTER_STATS if s.endswith("_active"))
DOWNSTREAM_GAUGES = frozenset({"downstream_cx_active"})

# Bound on per-cache keys built from request input (Host header, peer
# identity): past it the cache is reset rather than grown.
MAX_CACHE_KEYS = 4096
MAX_EXTERNAL_HOSTS = 1024


# istio_request_messages_total / istio_response_messages_total carry the
# labels the stats filter has when it adds them (before the request's
# protocol, codes, flags and security policy): the first 20 (istio/proxy
# testdata/metric/*_request_messages.yaml.tmpl).
MESSAGE_LABELS = ISTIO_LABELS[:20]


class Series:
    """One Istio label set: a counter and three histograms, as plain numbers."""

    __slots__ = ("labels", "count", "dur", "dur_sum", "req", "req_sum", "resp", "resp_sum", "messages")

    def __init__(self, labels: tuple[str, ...]) -> None:
        self.labels = labels
        # gRPC series: [request messages, response messages] of its MESSAGE_LABELS
        self.messages: list[int] | None = None
        self.count = 0
        self.dur = [0] * NBUCKETS
        self.dur_sum = 0.0
        self.req = [0] * NBUCKETS
        self.req_sum = 0
        self.resp = [0] * NBUCKETS
        self.resp_sum = 0

    def record(self, ms: float, req: int, resp: int) -> None:
        # (IstioMetrics.record has a copy of this, inlined)
        self.count += 1
        self.dur[bisect_left(BUCKETS, ms)] += 1
        self.dur_sum += ms
        self.req[bisect_left(BUCKETS, req)] += 1
        self.req_sum += req
        self.resp[bisect_left(BUCKETS, resp)] += 1
        self.resp_sum += resp

    def row(self) -> list:
        return [
            list(self.labels),
            self.count,
            self.dur,
            self.dur_sum,
            self.req,
            self.req_sum,
            self.resp,
            self.resp_sum,
        ]


class DestService:
    """A cluster's destination-service labels, bound when the cluster is built."""

    __slots__ = ("service", "name", "namespace")

    def __init__(self, service: str, name: str, namespace: str) -> None:
        self.service = service
        self.name = name
        self.namespace = namespace


UNKNOWN_SERVICE = DestService(UNKNOWN, UNKNOWN, UNKNOWN)


def service_labels(hostname: str, namespace: str) -> DestService:
    """``reviews.default.svc.cluster.local`` → name ``reviews``, namespace
    ``default``; other hosts (ServiceEntry ``httpbin.org``) keep the whole
    host as the name and the ServiceEntry's namespace, as Istio reports them."""
    parts = hostname.split(".")
    if len(parts) >= 3 and parts[2] == "svc":
        return DestService(hostname, parts[0], parts[1])
    return DestService(hostname, hostname, namespace or UNKNOWN)


class ClusterStatsRegistry:
    """Every cluster ever built, by name, so counters survive replacement."""

    def __init__(self) -> None:
        self.entries: dict[str, list[tuple[weakref.ref, ClusterStats]]] = {}
        self.base: dict[str, dict[str, int]] = {}

    def add(self, cluster: Cluster) -> None:
        self.entries.setdefault(cluster.name, []).append((weakref.ref(cluster), cluster.stats))

    def snapshot(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for name, entries in list(self.entries.items()):
            base = self.base.get(name)
            values = dict(base) if base else {s: 0 for s in CLUSTER_STATS if s not in CLUSTER_GAUGES}
            for g in CLUSTER_GAUGES:
                values[g] = 0
            live = []
            members = healthy = 0
            for ref, stats in entries:
                cluster = ref()
                for s in CLUSTER_STATS:
                    if s in CLUSTER_GAUGES:
                        if cluster is not None:
                            values[s] += getattr(stats, s)
                    else:
                        values[s] = values.get(s, 0) + getattr(stats, s)
                if cluster is None:
                    # Gone for good: fold its final counters into the base.
                    b = self.base.setdefault(name, {})
                    for s in CLUSTER_STATS:
                        if s not in CLUSTER_GAUGES:
                            b[s] = b.get(s, 0) + getattr(stats, s)
                else:
                    live.append((ref, stats))
                    if not cluster.draining:
                        members += len(cluster.endpoints)
                        healthy += sum(1 for e in cluster.endpoints if not e.ejected)
            self.entries[name] = live
            values["membership_total"] = members
            values["membership_healthy"] = healthy
            out[name] = values
        return out


class IstioMetrics:
    """Istio request metrics for one worker."""

    def __init__(self, identity: ProxyIdentity) -> None:
        self.me = peer_from_labels(identity.workload, identity.namespace, identity.labels)
        # This proxy as the end of an mTLS connection: principal = its certificate's URI SAN.
        self.me_tls = self.me
        self.series: dict[tuple[str, ...], Series] = {}
        # gRPC message counts by MESSAGE_LABELS values: [request, response]
        self.messages: dict[tuple[str, ...], list[int]] = {}
        self.clusters = ClusterStatsRegistry()
        # Requests with no cluster (404 NR, 503 NC, REGISTRY_ONLY) and
        # inbound requests: keyed by request data, bounded.
        self.other_cache: dict[tuple, Series] = {}
        self.inbound_cache: dict[tuple, Series] = {}
        # Passthrough destination hosts given their own label value (bounded for
        # the life of the process, so the number of series stays bounded).
        self.external_hosts: set[str] = set()
        self.snapshot: Any = None  # the worker's current snapshot (for inbound service lookup)

    # -- binding (config load time) ---------------------------------------

    def bind_cluster(self, cluster: Cluster) -> None:
        svc = cluster.service
        if cluster.kind == "outbound" and svc is not None:
            cluster.metric_labels = service_labels(svc.hostname, svc.namespace)
        else:
            cluster.metric_labels = None
        cluster.metric_cache = {}
        self.clusters.add(cluster)

    def series_for(self, labels: tuple[str, ...]) -> Series:
        s = self.series.get(labels)
        if s is None:
            s = self.series[labels] = Series(labels)
        return s

    # -- request path ---------------------------------------------------------

    def record(self, ex: ExchangeView) -> None:
        status = ex.status
        flags = ex.flag_string if ex.flags else "-"
        if ex.grpc is not None:
            self._record_grpc(ex, status, flags)
            return
        cluster = ex.cluster
        if ex.direction:  # inbound: the caller's identity came in a header
            key: tuple = (status, flags, ex.peer, ex.host)
            cache = self.inbound_cache
            s = cache.get(key)
            if s is None:
                s = self._bind_inbound(key, ex)
        elif cluster is not None and cluster.metric_labels is not None:
            dest = ex.peer or ex.upstream_host
            key = (status, flags, dest)
            cache = cluster.metric_cache
            s = cache.get(key)
            if s is None:
                s = self._bind_outbound(cache, key, cluster.metric_labels, dest)
        else:
            key = (status, flags, ex.host, cluster is not None, ex.peer)
            cache = self.other_cache
            s = cache.get(key)
            if s is None:
                s = self._bind_other(key, ex)
        # Series.record, inlined (once per request)
        ms = (ex.end_time - ex.start_time) * 1000.0
        req = ex.request_bytes
        resp = ex.response_bytes
        s.count += 1
        s.dur[bisect_left(BUCKETS, ms)] += 1
        s.dur_sum += ms
        s.req[bisect_left(BUCKETS, req)] += 1
        s.req_sum += req
        s.resp[bisect_left(BUCKETS, resp)] += 1
        s.resp_sum += resp

    def _record_grpc(self, ex: ExchangeView, status: int, flags: str) -> None:
        """``record`` for a gRPC call: request_protocol "grpc", its
        grpc_response_status (part of the key), and its message counts."""
        call = ex.grpc
        assert call is not None
        grpc = call.status(status)
        cluster = ex.cluster
        if ex.direction:
            key: tuple = (status, flags, ex.peer, ex.host, grpc)
            s = self.inbound_cache.get(key)
            if s is None:
                s = self._bind_inbound(key, ex, grpc)
        elif cluster is not None and cluster.metric_labels is not None:
            dest = ex.peer or ex.upstream_host
            key = (status, flags, dest, grpc)
            cache = cluster.metric_cache
            s = cache.get(key)
            if s is None:
                s = self._bind_outbound(cache, key, cluster.metric_labels, dest, grpc)
        else:
            key = (status, flags, ex.host, cluster is not None, ex.peer, grpc)
            s = self.other_cache.get(key)
            if s is None:
                s = self._bind_other(key, ex, grpc)
        s.record((ex.end_time - ex.start_time) * 1000.0, ex.request_bytes, ex.response_bytes)
        counts = s.messages
        if counts is None:
            prefix = s.labels[:len(MESSAGE_LABELS)]
            counts = self.messages.get(prefix)
            if counts is None:
                counts = self.messages[prefix] = [0, 0]
            s.messages = counts
        counts[0] += call.requests.count
        counts[1] += call.responses.count

    # -- label computation (once per distinct key) ----------------------------

    def _labels(
        self,
        reporter: str,
        src: PeerInfo,
        dst: PeerInfo,
        svc: DestService,
        status: int,
        flags: str,
        policy: str,
        grpc: str | None = None,
    ) -> tuple[str, ...]:
        """Istio's label values; ``grpc`` is the grpc_response_status of a
        gRPC call (request_protocol "grpc"), None for any other request."""
        return (
            reporter,
            src.workload,
            src.canonical_service,
            src.canonical_revision,
            src.namespace,
            src.principal,
            src.app,
            src.version,
            src.cluster,
            dst.workload,
            dst.namespace,
            dst.principal,
            dst.app,
            dst.version,
            svc.service,
            dst.canonical_service,
            dst.canonical_revision,
            svc.name,
            svc.namespace,
            dst.cluster,
            "http" if grpc is None else "grpc",
            str(status),
            grpc or "",
            flags,
            policy,
        )

    def _bind_outbound(self, cache: dict, key: tuple, svc: DestService, dest: Any, grpc: str | None = None) -> Series:
        if isinstance(dest, PeerInfo):
            dst = dest
        elif dest is not None:
            dst = endpoint_peer(dest)
            if dest.tls_principal:  # ISTIO_MUTUAL to a destination without peer metadata
                dst = dataclasses.replace(dst, principal=dest.tls_principal)
        else:
            dst = UNKNOWN_PEER
        # Istio's source reporter: source_principal is the local certificate of
        # an mTLS upstream connection; connection_security_policy is "unknown".
        src = self.me_tls if dst.principal != UNKNOWN else self.me
        s = self.series_for(self._labels("source", src, dst, svc, key[0], key[1], "unknown", grpc))
        if len(cache) >= MAX_CACHE_KEYS:
            cache.clear()
        cache[key] = s
        return s

    def _bind_inbound(self, key: tuple, ex: ExchangeView, grpc: str | None = None) -> Series:
        src = ex.peer or UNKNOWN_PEER
        svc = self._service_for_host(ex.host)
        if src.principal != UNKNOWN:  # set only from a verified client certificate
            s = self.series_for(self._labels("destination", src, self.me_tls, svc, key[0], key[1], "mutual_tls",
                                             grpc))
        else:
            s = self.series_for(self._labels("destination", src, self.me, svc, key[0], key[1], "none", grpc))
        if len(self.inbound_cache) >= MAX_CACHE_KEYS:
            self.inbound_cache.clear()
        self.inbound_cache[key] = s
        return s

    def _bind_other(self, key: tuple, ex: ExchangeView, grpc: str | None = None) -> Series:
        # Passthrough (destination outside the registry) or a local reply
        # before any cluster was chosen.
        cluster = ex.cluster
        if cluster is not None and cluster.kind == "passthrough":
            host = ex.host.decode("latin-1", "replace") or UNKNOWN
            hosts = self.external_hosts
            if host not in hosts:
                if len(hosts) >= MAX_EXTERNAL_HOSTS:
                    host = UNKNOWN  # a flood of distinct hosts must not explode cardinality
                else:
                    hosts.add(host)
            svc = DestService(host, "PassthroughCluster", UNKNOWN)
            dst = ex.peer or UNKNOWN_PEER
        else:
            svc = self._service_for_host(ex.host)
            if svc is UNKNOWN_SERVICE and ex.target_choice is not None:
                svc = self._service_for_host(ex.target_choice.host.encode())
            dst = UNKNOWN_PEER
        s = self.series_for(self._labels("source", self.me, dst, svc, key[0], key[1], "unknown", grpc))
        if len(self.other_cache) >= MAX_CACHE_KEYS:
            self.other_cache.clear()
        self.other_cache[key] = s
        return s

    def _service_for_host(self, host: bytes) -> DestService:
        snap = self.snapshot
        if snap is None or not host:
            return UNKNOWN_SERVICE
        vh = snap.hosts.lookup(host)
        if vh is None or vh.service is None:
            return UNKNOWN_SERVICE
        return service_labels(vh.service.hostname, vh.service.namespace)

    # -- scrape ---------------------------------------------------------------

    def rows(self) -> list[list]:
        return [s.row() for s in list(self.series.values())]

    def message_rows(self) -> list[list]:
        """[MESSAGE_LABELS values, request messages, response messages] per gRPC label set."""
        return [[list(k), v[0], v[1]] for k, v in list(self.messages.items())]


def endpoint_peer(ep: ClusterEndpoint) -> PeerInfo:
    """A destination without a sidecar: identity from the registry endpoint
    (WorkloadEntry name or ``app-version``, namespace, labels)."""
    return peer_from_labels(ep.workload if ep.workload != UNKNOWN else "", ep.namespace, ep.labels)


# ---------------------------------------------------------------------------
# State: plain data, mergeable across worker processes


def worker_state(worker: Any, metrics: IstioMetrics | None, extra: dict | None = None) -> dict:
    """Everything /stats and /stats/prometheus show, for one worker, as JSON-able data."""
    st = worker.reload_status
    mirror = getattr(worker, "mirror", None)
    return {
        "istio": metrics.rows() if metrics is not None else [],
        "istio_messages": metrics.message_rows() if metrics is not None else [],
        "mirror": mirror.stats.as_dict() if mirror is not None else {},
        "clusters": metrics.clusters.snapshot() if metrics is not None else {},
        "downstream": worker.stats.as_dict(),
        "reloads": {"success": st.successes, "failure": st.failures},
        "started_at": worker.started_at,
        "config_version": worker.version,
        "workers": 1,
        "tls": tls_state(getattr(worker, "certs", None)),
        "security": _security_state(),
        "ratelimit": ratelimit_state(worker),
        **(extra or {}),
    }


def _security_state() -> dict:
    from ..authz.guard import STATS

    return STATS.as_dict()
def ratelimit_state(worker: Any) -> dict[str, int]:
    """Rate-limit counters by Envoy stat name (``<stat_prefix>.http_local_rate_limit.*``,
    ``cluster.<rls cluster>.ratelimit.*``) plus the backend's ``ratelimit_*`` ones."""
    runtime = getattr(worker, "ratelimit", None)
    backend = getattr(worker, "ratelimit_backend", None)
    out: dict[str, int] = runtime.counters() if runtime is not None else {}
    if backend is not None:
        out.update(backend.counters())
    return out


def tls_state(certs: Any) -> dict:
    """The workload certificate and the TLS handshake counters (empty
    without --certs)."""
    if certs is None:
        from ..security.certs import TLS_STATS

        # TLS origination (SIMPLE/MUTUAL) works without a workload certificate.
        return {"ssl": dict(TLS_STATS)} if any(TLS_STATS.values()) else {}
    creds = certs.current
    return {
        "ssl": dict(certs.stats),
        "cert": {} if creds is None else {
            "uri": creds.uri, "not_before": creds.not_before, "not_after": creds.not_after,
        },
        "cert_reloads": {"success": certs.reloads, "failure": certs.reload_failures},
    }


def merge_states(states: list[dict]) -> dict:
    """Sum several workers' states (the first one's reload counters are kept:
    every worker loads the same files, so adding them would count each
    reload once per worker)."""
    if len(states) == 1:
        return states[0]
    first = states[0]
    istio: dict[tuple, list] = {}
    messages: dict[tuple, list] = {}
    clusters: dict[str, dict[str, int]] = {}
    downstream: dict[str, int] = {}
    mirror: dict[str, int] = {}
    ssl_counts: dict[str, int] = {}
    jwt: dict[str, int] = {}
    rbac: dict[str, int] = {}
    ratelimit: dict[str, int] = {}
    dropped = 0
    for state in states:
        for k, v in state.get("ratelimit", {}).items():
            ratelimit[k] = ratelimit.get(k, 0) + v
        security = state.get("security", {})
        for k, v in security.get("jwt", {}).items():
            jwt[k] = jwt.get(k, 0) + v
        for k, v in security.get("rbac", {}).items():
            rbac[k] = rbac.get(k, 0) + v
        for row in state["istio"]:
            key = tuple(row[0])
            cur = istio.get(key)
            if cur is None:
                istio[key] = [
                    row[0],
                    row[1],
                    list(row[2]),
                    row[3],
                    list(row[4]),
                    row[5],
                    list(row[6]),
                    row[7],
                ]
                continue
            cur[1] += row[1]
            for i in (2, 4, 6):
                cur[i] = [a + b for a, b in zip(cur[i], row[i], strict=True)]
            for i in (3, 5, 7):
                cur[i] += row[i]
        for row in state.get("istio_messages", ()):
            cur = messages.get(tuple(row[0]))
            if cur is None:
                messages[tuple(row[0])] = [row[0], row[1], row[2]]
            else:
                cur[1] += row[1]
                cur[2] += row[2]
        for name, values in state["clusters"].items():
            acc = clusters.setdefault(name, {})
            for k, v in values.items():
                acc[k] = acc.get(k, 0) + v
        for k, v in state["downstream"].items():
            downstream[k] = downstream.get(k, 0) + v
        for k, v in state.get("mirror", {}).items():
            mirror[k] = mirror.get(k, 0) + v
        dropped += state.get("access_log_dropped", 0)
        for k, v in state.get("tls", {}).get("ssl", {}).items():
            ssl_counts[k] = ssl_counts.get(k, 0) + v
    tls = first.get("tls", {})
    if tls:
        tls = {**tls, "ssl": ssl_counts}
    return {
        "tls": tls,
        "istio": list(istio.values()),
        "istio_messages": list(messages.values()),
        "clusters": clusters,
        "downstream": downstream,
        "mirror": mirror,
        "ratelimit": ratelimit,
        "reloads": first["reloads"],
        "started_at": first["started_at"],
        "config_version": first["config_version"],
        "workers": sum(s.get("workers", 1) for s in states),
        "access_log_dropped": dropped,
        "security": {"jwt": jwt, "rbac": rbac},
    }


def _cumulative(counts: list[int]) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    acc = 0
    for le, n in zip(LE, counts, strict=True):
        acc += n
        out.append((le, acc))
    return out


class StateCollector:
    """A prometheus_client collector over a (merged) state, built per scrape."""

    def __init__(self, state: dict) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        state = self.state
        labels = list(ISTIO_LABELS)
        requests = CounterMetricFamily(
            "istio_requests", "Requests handled by the proxy (Istio standard metric)", labels=labels
        )
        duration = HistogramMetricFamily(
            "istio_request_duration_milliseconds",
            "Request duration in milliseconds (Istio standard metric)",
            labels=labels,
        )
        req_bytes = HistogramMetricFamily(
            "istio_request_bytes", "Request body sizes in bytes (Istio standard metric)", labels=labels
        )
        resp_bytes = HistogramMetricFamily(
            "istio_response_bytes", "Response body sizes in bytes (Istio standard metric)", labels=labels
        )
        for row in sorted(state["istio"], key=lambda r: r[0]):
            lv = row[0]
            requests.add_metric(lv, row[1])
            duration.add_metric(lv, _cumulative(row[2]), row[3])
            req_bytes.add_metric(lv, _cumulative(row[4]), row[5])
            resp_bytes.add_metric(lv, _cumulative(row[6]), row[7])
        yield requests
        yield duration
        yield req_bytes
        yield resp_bytes
        message_rows = state.get("istio_messages")
        if message_rows:
            # gRPC only (Istio's stats filter adds them for gRPC requests).
            names = list(MESSAGE_LABELS)
            req_msgs = CounterMetricFamily("istio_request_messages",
                                           "gRPC messages sent by clients (Istio standard metric)", labels=names)
            resp_msgs = CounterMetricFamily("istio_response_messages",
                                            "gRPC messages sent by servers (Istio standard metric)", labels=names)
            for row in sorted(message_rows, key=lambda r: r[0]):
                req_msgs.add_metric(row[0], row[1])
                resp_msgs.add_metric(row[0], row[2])
            yield req_msgs
            yield resp_msgs

        clusters = state["clusters"]
        names = sorted(clusters)
        for stat in (*CLUSTER_STATS, "membership_total", "membership_healthy"):
            metric = f"envoy_cluster_{stat}"
            doc = f"Envoy cluster stat {stat}"
            fam: Metric
            if stat in CLUSTER_GAUGES or stat.startswith("membership_"):
                fam = GaugeMetricFamily(metric, doc, labels=["cluster_name"])
            else:
                fam = CounterMetricFamily(metric, doc, labels=["cluster_name"])
            for name in names:
                fam.add_metric([name], clusters[name].get(stat, 0))
            yield fam

        for stat, value in sorted(state["downstream"].items()):
            metric = f"envoy_http_{stat}"
            if stat in DOWNSTREAM_GAUGES:
                g = GaugeMetricFamily(metric, f"Listener stat {stat} (all listeners)")
                g.add_metric([], value)
                yield g
            else:
                c = CounterMetricFamily(metric, f"Listener stat {stat} (all listeners)")
                c.add_metric([], value)
                yield c

        for stat, value in sorted(state.get("mirror", {}).items()):
            c = CounterMetricFamily(f"pyproxy_{stat}", f"Request mirroring: {stat} (filters/mirror.py)")
            c.add_metric([], value)
            yield c

        security = state.get("security", {})
        if security.get("jwt"):
            c = CounterMetricFamily("envoy_http_jwt_authn", "RequestAuthentication (jwt_authn) results",
                                    labels=["result"])
            for result, value in sorted(security["jwt"].items()):
                c.add_metric([result], value)
            yield c
        if security.get("rbac"):
            c = CounterMetricFamily("pyproxy_rbac", "AuthorizationPolicy results per policy (allowed, denied, "
                                    "shadow_allowed, shadow_denied, audit)", labels=["policy", "result"])
            for key, value in sorted(security["rbac"].items()):
                policy, _, result = key.rpartition("|")
                c.add_metric([policy, result], value)
            yield c
        yield from _ratelimit_metrics(state.get("ratelimit", {}))

        reloads = CounterMetricFamily(
            "pyproxy_config_reloads", "Config reloads (after the initial load) by result", labels=["result"]
        )
        reloads.add_metric(["success"], state["reloads"]["success"])
        reloads.add_metric(["failure"], state["reloads"]["failure"])
        yield reloads
        # Envoy's name for a config update refused by validation (the xDS
        # subscription stat update_rejected, as in cluster_manager.cds.*).
        rejected = CounterMetricFamily(
            "pyproxy_config_update_rejected", "Config reloads rejected (invalid files); the config in force stays"
        )
        rejected.add_metric([], state["reloads"]["failure"])
        yield rejected
        version = GaugeMetricFamily("pyproxy_config_version", "Version of the config in force (1 = initial)")
        version.add_metric([], state["config_version"])
        yield version
        dropped = CounterMetricFamily(
            "pyproxy_access_log_dropped", "Access log lines dropped because the writer fell behind"
        )
        dropped.add_metric([], state.get("access_log_dropped", 0))
        yield dropped
        yield from _tls_metrics(state.get("tls", {}))
        for name, value, doc in (
            ("envoy_server_live", 1, "1 while the proxy serves"),
            ("envoy_server_uptime", int(time.time() - state["started_at"]), "Seconds since start"),
            ("envoy_server_concurrency", state.get("workers", 1), "Worker processes"),
        ):
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], value)
            yield g


def _ratelimit_metrics(counters: dict[str, int]) -> Iterator[Metric]:
    """Envoy's rate-limit stats as its Prometheus exporter names them: the
    cluster's with a ``cluster_name`` label, the local filter's by prefix."""
    by_stat: dict[str, list[tuple[str, int]]] = {}
    for name, value in sorted(counters.items()):
        if name.startswith("cluster."):
            cluster, _, stat = name[len("cluster."):].rpartition(".ratelimit.")
            by_stat.setdefault(stat, []).append((cluster, value))
        elif name.startswith("ratelimit_"):
            c = CounterMetricFamily(f"pyproxy_{name}", f"Rate-limit backend: {name}")
            c.add_metric([], value)
            yield c
        else:
            c = CounterMetricFamily("envoy_" + re.sub(r"[^a-zA-Z0-9_]", "_", name), f"Envoy stat {name}")
            c.add_metric([], value)
            yield c
    for stat, rows in sorted(by_stat.items()):
        fam = CounterMetricFamily(f"envoy_cluster_ratelimit_{stat}", f"Global rate limit: {stat}",
                                  labels=["cluster_name"])
        for cluster, value in rows:
            fam.add_metric([cluster], value)
        yield fam


def _tls_metrics(tls: dict) -> Iterator[Metric]:
    if not tls:
        return
    for stat, value in sorted(tls.get("ssl", {}).items()):
        # Envoy's listener/cluster ssl.* counters, summed over both directions.
        c = CounterMetricFamily("envoy_" + stat.replace(".", "_"), f"TLS {stat} (inbound and outbound)")
        c.add_metric([], value)
        yield c
    cert = tls.get("cert") or {}
    if cert:
        # Envoy's server.days_until_first_cert_expiring, plus the exact time.
        days = GaugeMetricFamily("envoy_server_days_until_first_cert_expiring",
                                 "Days until the workload certificate expires")
        days.add_metric([], int((cert["not_after"] - time.time()) // 86400))
        yield days
        expiry = GaugeMetricFamily("pyproxy_workload_cert_expiry_timestamp_seconds",
                                   "When the workload certificate expires (Unix time)", labels=["spiffe_id"])
        expiry.add_metric([cert["uri"]], cert["not_after"])
        yield expiry
    reloads = tls.get("cert_reloads")
    if reloads is not None:
        c = CounterMetricFamily("pyproxy_workload_cert_reloads", "Workload certificate reloads by result",
                                labels=["result"])
        c.add_metric(["success"], reloads["success"])
        c.add_metric(["failure"], reloads["failure"])
        yield c


def render_prometheus(state: dict) -> bytes:
    from prometheus_client import generate_latest

    return generate_latest(StateCollector(state))  # type: ignore[arg-type]


def render_text(state: dict, filter_re: Any = None) -> str:
    """``/stats``: Envoy's plain ``name: value`` lines."""
    lines: list[str] = []
    for name in sorted(state["clusters"]):
        for stat, value in sorted(state["clusters"][name].items()):
            lines.append(f"cluster.{name}.{stat}: {value}")
    for stat, value in sorted(state["downstream"].items()):
        lines.append(f"http.{stat}: {value}")
    for stat, value in sorted(state.get("mirror", {}).items()):
        lines.append(f"pyproxy.{stat}: {value}")
    security = state.get("security", {})
    for stat, value in sorted(security.get("jwt", {}).items()):
        lines.append(f"http.jwt_authn.{stat}: {value}")
    for key, value in sorted(security.get("rbac", {}).items()):
        policy, _, result = key.rpartition("|")
        lines.append(f"rbac.{policy}.{result}: {value}")
    for stat, value in sorted(state.get("ratelimit", {}).items()):
        lines.append(f"{'pyproxy.' if stat.startswith('ratelimit_') else ''}{stat}: {value}")
    lines.append(f"pyproxy.config_reloads.failure: {state['reloads']['failure']}")
    lines.append(f"pyproxy.config_reloads.success: {state['reloads']['success']}")
    lines.append(f"pyproxy.config.update_rejected: {state['reloads']['failure']}")
    lines.append(f"pyproxy.config_version: {state['config_version']}")
    lines.append(f"pyproxy.access_log_dropped: {state.get('access_log_dropped', 0)}")
    total = sum(row[1] for row in state["istio"])
    lines.append(f"pyproxy.istio_requests_total: {total}")
    messages = state.get("istio_messages", ())
    if messages:
        lines.append(f"pyproxy.istio_request_messages_total: {sum(row[1] for row in messages)}")
        lines.append(f"pyproxy.istio_response_messages_total: {sum(row[2] for row in messages)}")
    for stat, value in sorted(state.get("tls", {}).get("ssl", {}).items()):
        lines.append(f"{stat}: {value}")
    lines.append(f"server.concurrency: {state.get('workers', 1)}")
    lines.append("server.live: 1")
    lines.append(f"server.uptime: {int(time.time() - state['started_at'])}")
    if filter_re is not None:
        lines = [line for line in lines if filter_re.search(line.split(":", 1)[0])]
    return "\n".join(lines) + "\n"
