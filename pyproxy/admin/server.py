"""Admin (``--admin``, loopback by default) and stats (``--stats``) HTTP servers.

Both run in the primary worker's event loop on a small HTTP/1.1 server
(``admin/http.py``): they are not on the data path. Envoy's admin paths where they fit:

=============================  =====================================================
``GET /``                      this list
``GET /ready``                 200 ``LIVE`` / 503 (not ready, draining, or failed by
                               ``/healthcheck/fail``)
``GET /server_info``           version, state, uptime, workload, labels, config version, last reload
``GET /config_dump``           effective resources with their source files, reload status
``GET /clusters``              JSON per cluster and endpoint (``?format=text``: Envoy's
                               ``cluster::host::stat::value`` lines)
``GET /stats``                 plain ``name: value`` lines (``?filter=REGEX``)
``GET /stats/prometheus``      Prometheus text exposition
``POST /reload``               reload the config now
``POST /logging?level=L``      set the log level (debug, info, warning, error)
``POST /healthcheck/fail|ok``  fail (or restore) ``/ready`` and ``/healthz/ready``
``POST /drain_listeners``      stop accepting, close idle keep-alive connections
``POST /quitquitquit``         drain and exit
=============================  =====================================================

Mutating endpoints (every POST) answer 403 to callers that are not on a
loopback address, even when ``--admin`` binds a wider address.

With ``--workers N`` the primary asks every other worker over its control
socket (``supervisor.py``) and merges: ``/stats``, ``/stats/prometheus`` and
``/clusters`` cover all workers; ``/reload``, ``/logging`` and
``/drain_listeners`` apply to all of them.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import logging
import os
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..observability import worker_metric_state
from .http import AdminHTTPServer, Request, Response, Router

if TYPE_CHECKING:
    from ..supervisor import WorkerPool
    from ..worker import Worker

log = logging.getLogger("pyproxy.admin")

LEVELS = {
    "trace": logging.DEBUG,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
    "off": logging.CRITICAL,
}

ENDPOINTS = [
    ("GET", "/ready", "200 LIVE when serving, else 503"),
    ("GET", "/server_info", "version, state, uptime, workload, labels, config version, last reload"),
    ("GET", "/config_dump", "effective config (resources with source files) and last reload status"),
    ("GET", "/clusters", "clusters and endpoints (JSON; ?format=text for Envoy-style lines)"),
    ("GET", "/stats", "plain text counters (?filter=REGEX)"),
    ("GET", "/stats/prometheus", "Prometheus exposition"),
    ("POST", "/reload", "reload config now"),
    ("POST", "/logging?level=LEVEL", "set the log level"),
    ("POST", "/healthcheck/fail", "make /ready and /healthz/ready answer 503"),
    ("POST", "/healthcheck/ok", "undo /healthcheck/fail"),
    ("POST", "/drain_listeners", "stop accepting connections and drain"),
    ("POST", "/quitquitquit", "drain and exit"),
]


def _dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=False)


def jsonable(obj: Any, max_depth: int = 64, max_nodes: int = 1_000_000) -> Any:
    """A JSON-safe copy of a YAML document: nested too deep → a marker
    instead of a RecursionError, YAML timestamps/binary/sets → strings or
    lists, shared (aliased) subtrees copied (bounded by ``max_nodes``)."""
    budget = [max_nodes]

    def conv(o: Any, depth: int) -> Any:
        budget[0] -= 1
        if budget[0] < 0:
            return "<truncated: too many values>"
        if o is None or isinstance(o, (bool, int, float, str)):
            return o
        if depth >= max_depth:
            return "<truncated: nested too deep>"
        if isinstance(o, dict):
            return {str(k): conv(v, depth + 1) for k, v in o.items()}
        if isinstance(o, (list, tuple, set, frozenset)):
            return [conv(v, depth + 1) for v in o]
        if isinstance(o, (datetime.date, datetime.datetime)):
            return o.isoformat()
        if isinstance(o, bytes):
            return o.decode("latin-1")
        return str(o)

    return conv(obj, 0)


def _loopback(request: Request) -> bool:
    remote = request.remote
    if not remote:
        return False
    try:
        addr = ipaddress.ip_address(remote.split("%")[0])
    except ValueError:
        return False
    if addr.is_loopback:
        return True
    mapped = getattr(addr, "ipv4_mapped", None)
    return bool(mapped is not None and mapped.is_loopback)


def loopback_only_for_mutations(request: Request) -> Response | None:
    if request.method not in ("GET", "HEAD") and not _loopback(request):
        return Response(status=403, text="admin: mutating endpoints are only served to loopback callers\n")
    return None


def clusters_view(worker: Worker) -> list[dict]:
    """JSON-able view of every cluster in the current snapshot."""
    out = []
    snap = worker.snapshot
    if snap is None:
        return out
    now = worker.loop.time()
    for c in snap.all_clusters():
        s = c.settings
        od = s.outlier
        endpoints = []
        for ep in c.endpoints:
            endpoints.append(
                {
                    "address": ep.address,
                    "host": ep.host,
                    "port": ep.port,
                    "labels": dict(ep.labels),
                    "weight": ep.weight,
                    "workload": ep.workload,
                    "namespace": ep.namespace,
                    "health": "ejected" if ep.ejected else "healthy",
                    "ejected": ep.ejected,
                    "ejection_remaining_s": round(max(0.0, ep.ejected_until - now), 3) if ep.ejected else 0,
                    "ejection_count": ep.ejection_count,
                    "active_requests": ep.active_requests,
                    "connections": ep.connections,
                    "idle_connections": len(ep.idle),
                    "pending_requests": len(ep.pending),
                    "consecutive_5xx": ep.consecutive_5xx,
                    "consecutive_gateway_errors": ep.consecutive_gateway,
                    "consecutive_local_origin_failures": ep.consecutive_local,
                }
            )
        out.append(
            {
                "name": c.name,
                "kind": c.kind,
                "service": c.service.hostname if c.service is not None else None,
                "port": c.service_port,
                "subset": c.subset or None,
                "load_balancer": s.lb_policy,
                "circuit_breakers": {
                    "max_connections": s.max_connections,
                    "max_pending_requests": s.max_pending,
                    "max_requests": s.max_requests,
                    "max_retries": s.max_retries,
                    "max_requests_per_connection": s.max_requests_per_connection,
                    "connections_active": c.stats.upstream_cx_active,
                    "pending_active": c.stats.upstream_rq_pending_active,
                    "requests_active": c.stats.upstream_rq_active,
                    "retries_active": c.retries_active,
                },
                "outlier_detection": None
                if od is None
                else {
                    "consecutive_5xx": od.consecutive_5xx,
                    "consecutive_gateway_errors": od.consecutive_gateway,
                    "interval_s": od.interval,
                    "base_ejection_time_s": od.base_ejection_time,
                    "max_ejection_percent": od.max_ejection_percent,
                    "ejections_active": c.stats.outlier_detection_ejections_active,
                },
                "stats": c.stats.as_dict(),
                "endpoints": endpoints,
            }
        )
    return out


def merge_clusters(views: list[list[dict]]) -> list[dict]:
    """Combine the per-worker views: counters and gauges summed, an endpoint
    ejected in any worker shows as ejected (each worker runs its own
    outlier detector) with ``ejected_in_workers`` listing where."""
    if len(views) == 1:
        for c in views[0]:
            for ep in c["endpoints"]:
                ep["ejected_in_workers"] = [0] if ep["ejected"] else []
        return views[0]
    merged: dict[str, dict] = {}
    order: list[str] = []
    for wi, view in enumerate(views):
        for c in view:
            cur = merged.get(c["name"])
            if cur is None:
                cur = json.loads(json.dumps(c))
                for ep in cur["endpoints"]:
                    ep["ejected_in_workers"] = [wi] if ep["ejected"] else []
                merged[c["name"]] = cur
                order.append(c["name"])
                continue
            for k, v in c["stats"].items():
                cur["stats"][k] = cur["stats"].get(k, 0) + v
            for k in ("connections_active", "pending_active", "requests_active", "retries_active"):
                cur["circuit_breakers"][k] += c["circuit_breakers"][k]
            if cur["outlier_detection"] is not None and c["outlier_detection"] is not None:
                cur["outlier_detection"]["ejections_active"] += c["outlier_detection"]["ejections_active"]
            by_addr = {ep["address"]: ep for ep in cur["endpoints"]}
            for ep in c["endpoints"]:
                mine = by_addr.get(ep["address"])
                if mine is None:
                    continue
                for k in ("active_requests", "connections", "idle_connections", "pending_requests"):
                    mine[k] += ep[k]
                if ep["ejected"]:
                    mine["ejected"] = True
                    mine["health"] = "ejected"
                    mine["ejected_in_workers"].append(wi)
                    mine["ejection_count"] = max(mine["ejection_count"], ep["ejection_count"])
                    mine["ejection_remaining_s"] = max(
                        mine["ejection_remaining_s"], ep["ejection_remaining_s"]
                    )
    return [merged[n] for n in order]


def clusters_text(view: list[dict]) -> str:
    """Envoy's /clusters text format."""
    lines = []
    for c in view:
        n = c["name"]
        cb = c["circuit_breakers"]
        lines.append(f"{n}::default_priority::max_connections::{cb['max_connections']}")
        lines.append(f"{n}::default_priority::max_pending_requests::{cb['max_pending_requests']}")
        lines.append(f"{n}::default_priority::max_requests::{cb['max_requests']}")
        lines.append(f"{n}::default_priority::max_retries::{cb['max_retries']}")
        lines.append(f"{n}::added_via_api::false")
        for ep in c["endpoints"]:
            a = ep["address"]
            lines.append(f"{n}::{a}::cx_active::{ep['connections']}")
            lines.append(f"{n}::{a}::rq_active::{ep['active_requests']}")
            lines.append(f"{n}::{a}::health_flags::{'/failed_outlier_check' if ep['ejected'] else 'healthy'}")
            lines.append(f"{n}::{a}::weight::{ep['weight']}")
            lines.append(f"{n}::{a}::canary::false")
    return "\n".join(lines) + "\n"


def config_dump(worker: Worker) -> dict:
    st = worker.reload_status
    loaded = worker.loaded
    resources = []
    if loaded is not None:
        for source, raw in loaded.raw:
            md = raw.get("metadata") if isinstance(raw, dict) else None
            md = md if isinstance(md, dict) else {}
            resources.append(
                {
                    "kind": raw.get("kind") if isinstance(raw, dict) else None,
                    "apiVersion": raw.get("apiVersion") if isinstance(raw, dict) else None,
                    "name": md.get("name"),
                    "namespace": md.get("namespace") or "default",
                    "source": {"file": source.file, "document": source.doc},
                    "resource": jsonable(raw),
                }
            )
    return {
        "version": worker.version,
        "paths": list(worker.options.config),
        "files": list(loaded.files) if loaded is not None else [],
        "resources": resources,
        "warnings": list(st.warnings),
        "last_reload": st.as_dict(),
    }


class AdminServer:
    def __init__(self, worker: Worker, pool: WorkerPool | None = None,
                 quit: Callable[[], None] | None = None) -> None:
        self.worker = worker
        self.pool = pool
        # POST /quitquitquit: the process's own shutdown (process.serve), which
        # drains this worker and the others; without one the endpoint only answers.
        self._quit = quit
        self.servers: list[AdminHTTPServer] = []

    def admin_app(self) -> Router:
        r = Router(guard=loopback_only_for_mutations)
        r.add_get("/", self.index)
        r.add_get("/ready", self.ready)
        r.add_get("/server_info", self.server_info)
        r.add_get("/config_dump", self.config_dump)
        r.add_get("/clusters", self.clusters)
        r.add_get("/stats", self.stats)
        r.add_get("/stats/prometheus", self.prometheus)
        r.add_post("/reload", self.reload)
        r.add_post("/logging", self.logging)
        r.add_post("/healthcheck/fail", self.healthcheck_fail)
        r.add_post("/healthcheck/ok", self.healthcheck_ok)
        r.add_post("/drain_listeners", self.drain_listeners)
        r.add_post("/quitquitquit", self.quit)
        return r

    def stats_app(self) -> Router:
        r = Router()
        r.add_get("/healthz/ready", self.ready)
        r.add_get("/stats/prometheus", self.prometheus)
        return r

    async def start(self) -> None:
        o = self.worker.options
        for router, addr in ((self.admin_app(), o.admin), (self.stats_app(), o.stats)):
            server = AdminHTTPServer(router, self.worker.loop)
            await server.start(addr.host, addr.port)
            self.servers.append(server)

    async def stop(self) -> None:
        for server in self.servers:
            await server.stop()
        self.servers = []

    # -- read-only ----------------------------------------------------------

    async def index(self, request: Request) -> Response:
        lines = ["pyproxy admin commands:"] + [f"  {m:<5} {p:<24} {d}" for m, p, d in ENDPOINTS]
        return Response(text="\n".join(lines) + "\n")

    async def ready(self, request: Request) -> Response:
        w = self.worker
        if w.health_failed:
            return Response(status=503, text="FAILED (healthcheck/fail)\n")
        if not (w.ready and not w.draining and w.snapshot is not None):
            return Response(status=503, text="DRAINING\n" if w.draining else "NOT READY\n")
        if self.pool is not None:
            results = await self.pool.query_all("ready", timeout=1.0)
            waiting = [i for i, r in results.items() if not r.get("ready")]
            if waiting or len(results) < w.options.workers - 1:
                return Response(status=503, text=f"NOT READY (workers {waiting} starting)\n")
        return Response(text="LIVE\n")

    async def server_info(self, request: Request) -> Response:
        w = self.worker
        o = w.options
        info = {
            "version": __version__,
            "pid": os.getpid(),
            "state": "DRAINING" if w.draining else ("LIVE" if w.ready else "INITIALIZING"),
            "health_check_failed": w.health_failed,
            "uptime_seconds": int(time.time() - w.started_at),
            "uptime_current_epoch": int(time.time() - w.started_at),
            "workload": w.identity.workload,
            "namespace": w.identity.namespace,
            "labels": dict(w.identity.labels),
            "gateway": w.identity.gateway or None,
            "config_version": w.version,
            "last_reload_ok": w.reload_status.ok,
            # The last reload's result and errors (a rejected one keeps the
            # previous config in force), and how many warnings the config has.
            "last_reload": {**w.reload_status.as_dict(), "warnings": len(w.reload_status.warnings)},
            "workers": o.workers,
            "worker_status": await self.worker_status(),
            "command_line_options": {
                "config": list(o.config),
                "inbound": str(o.inbound),
                "outbound": str(o.outbound),
                "app": str(o.app),
                "admin": str(o.admin),
                "stats": str(o.stats),
                "workers": o.workers,
                "log_level": logging.getLevelName(logging.getLogger("pyproxy").getEffectiveLevel()).lower(),
                "access_log": o.access_log,
                "access_log_format": o.access_log_format,
                "tracing": o.tracing,
                "trace_sampling": o.trace_sampling * 100,
            },
        }
        return Response(text=_dumps(info), content_type="application/json")

    async def worker_status(self) -> list[dict]:
        """Per worker process: pid, readiness, connections and requests served."""

        def summary(index: int, state: dict) -> dict:
            if "istio" not in state:
                return {"index": index, "error": state.get("error")}
            return {
                "index": index,
                "pid": state.get("pid"),
                "config_version": state.get("config_version"),
                "downstream_cx_total": state["downstream"].get("downstream_cx_total", 0),
                "requests_total": sum(row[1] for row in state["istio"]),
            }

        out = [summary(0, worker_metric_state(self.worker))]
        if self.pool is not None:
            for i, r in sorted((await self.pool.query_all("state")).items()):
                out.append(summary(i, r))
        return out

    async def config_dump(self, request: Request) -> Response:
        return Response(text=_dumps(config_dump(self.worker)), content_type="application/json")

    async def clusters(self, request: Request) -> Response:
        views = [clusters_view(self.worker)]
        if self.pool is not None:
            for _, r in sorted((await self.pool.query_all("clusters")).items()):
                if isinstance(r, list):
                    views.append(r)
                else:
                    log.warning("/clusters: %s", r.get("error"))
        view = merge_clusters(views)
        if request.query.get("format") == "text":
            return Response(text=clusters_text(view))
        return Response(text=_dumps({"cluster_statuses": view}), content_type="application/json")

    async def gather_state(self) -> dict:
        from ..observability.metrics import merge_states

        states = [worker_metric_state(self.worker)]
        if self.pool is not None:
            for _, r in sorted((await self.pool.query_all("state")).items()):
                if "istio" in r:
                    states.append(r)
                else:
                    log.warning("stats: %s", r.get("error"))
        return merge_states(states)

    async def stats(self, request: Request) -> Response:
        from ..observability.metrics import render_text

        flt = request.query.get("filter")
        regex = None
        if flt:
            try:
                regex = re.compile(flt)
            except re.error as exc:
                return Response(status=400, text=f"invalid filter regex: {exc}\n")
        state = await self.gather_state()
        if request.query.get("format") == "json":
            text = render_text(state, regex)
            stats = []
            for line in text.splitlines():
                name, _, value = line.partition(": ")
                stats.append({"name": name, "value": int(value) if value.lstrip("-").isdigit() else value})
            return Response(text=_dumps({"stats": stats}), content_type="application/json")
        return Response(text=render_text(state, regex))

    async def prometheus(self, request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        from ..observability.metrics import render_prometheus

        body = render_prometheus(await self.gather_state())
        return Response(body=body, content_type=CONTENT_TYPE_LATEST)

    # -- mutating -----------------------------------------------------------

    async def reload(self, request: Request) -> Response:
        ok = await self.worker.reload("admin /reload")
        status = self.worker.reload_status
        body: dict[str, Any] = {
            "ok": ok,
            "version": status.version,
            "errors": status.errors,
            "warnings": status.warnings,
        }
        if self.pool is not None:
            results = await self.pool.query_all("reload", timeout=30.0)
            body["workers"] = {str(i): r for i, r in results.items()}
            ok = ok and all(r.get("ok") for r in results.values())
            body["ok"] = ok
        return Response(text=_dumps(body), status=200 if ok else 400, content_type="application/json")

    async def logging(self, request: Request) -> Response:
        level = request.query.get("level")
        if level is None:
            current = logging.getLevelName(logging.getLogger("pyproxy").getEffectiveLevel()).lower()
            return Response(
                text=f"current level: {current}\nuse POST /logging?level=LEVEL "
                f"({', '.join(sorted(LEVELS))})\n"
            )
        if level.lower() not in LEVELS:
            return Response(
                status=400, text=f"unknown level {level!r}; one of {', '.join(sorted(LEVELS))}\n"
            )
        set_log_level(level)
        if self.pool is not None:
            await self.pool.query_all("logging", level=level)
        return Response(text=f"log level set to {level.lower()}\n")

    async def healthcheck_fail(self, request: Request) -> Response:
        self.worker.health_failed = True
        log.warning("admin: health check failed by /healthcheck/fail")
        return Response(text="OK\n")

    async def healthcheck_ok(self, request: Request) -> Response:
        self.worker.health_failed = False
        log.info("admin: health check restored by /healthcheck/ok")
        return Response(text="OK\n")

    async def drain_listeners(self, request: Request) -> Response:
        w = self.worker
        w.loop.create_task(w.drain(w.options.drain_timeout))
        if self.pool is not None:
            await self.pool.query_all("drain")
        return Response(text="OK\n")

    async def quit(self, request: Request) -> Response:
        if self._quit is not None:
            self._quit()
        return Response(text="OK\n")


def set_log_level(level: str) -> None:
    lv = LEVELS[level.lower()]
    logging.getLogger("pyproxy").setLevel(lv)
    logging.getLogger().setLevel(lv)
    log.warning("log level set to %s", level.lower())
