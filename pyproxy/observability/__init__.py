"""Telemetry: Istio metrics, tracing and the access log (see observer.py for the hooks)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..worker import Worker


def build_observer(worker: Worker, processor: Any = None) -> Any:
    """The observer for a worker. Metrics are always on; tracing follows
    ``--tracing`` (spans exported only with an OTLP endpoint in the
    environment, or to ``processor`` when a test passes one); the access log
    follows ``--access-log``. Called before the first config is built, so
    every cluster gets its metric binding when it is created."""
    from .accesslog import open_access_log
    from .metrics import IstioMetrics
    from .observer import TelemetryObserver
    from .tracing import Tracer, otlp_processor_from_env, resource_for

    opts = worker.options
    metrics = IstioMetrics(worker.identity)
    worker.cluster_listeners.append(metrics.bind_cluster)
    worker.on_reload.append(lambda w: setattr(metrics, "snapshot", w.snapshot))
    creds = worker.certs.current if worker.certs is not None else None
    if creds is not None:
        import dataclasses

        metrics.me_tls = dataclasses.replace(metrics.me, principal=creds.uri)
    me = metrics.me
    tracer = None
    if opts.tracing == "on":
        if processor is None:
            processor = otlp_processor_from_env()
        resource = resource_for(f"{me.canonical_service}.{me.namespace}") if processor is not None else None
        tracer = Tracer(
            opts.trace_sampling,
            processor,
            resource,
            node_id=f"sidecar~{me.workload}.{me.namespace}",
            loop=worker.loop,
        )
    access_log = open_access_log(opts.access_log, opts.access_log_format, worker.loop)
    return TelemetryObserver(metrics, me, tracer, access_log)


def worker_metric_state(worker: Worker) -> dict:
    """A worker's metric state, what ``/stats`` and ``/stats/prometheus`` merge
    across workers (see ``metrics.worker_state``)."""
    from .metrics import worker_state

    obs = worker.observer
    metrics = getattr(obs, "metrics", None)
    log_ = getattr(obs, "access_log", None)
    return worker_state(worker, metrics, {"access_log_dropped": log_.dropped if log_ is not None else 0,
                                          "pid": os.getpid()})
