"""The sidecar process: one worker plus what the process around it needs.

``serve()`` composes the process: the ``Worker`` (the data plane, ``worker.py``),
the signal handlers, and on the primary the admin and stats servers
(``admin/server.py``) and the supervisor of the other workers
(``supervisor.py``); on a secondary worker, the control socket the primary
queries. This module sits on top: it imports the worker, the admin, the
telemetry and the supervisor, and none of them imports it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from . import __version__
from .admin.server import AdminServer, clusters_view, set_log_level
from .observability import build_observer, worker_metric_state
from .options import RunOptions
from .supervisor import ControlServer, WorkerPool, set_parent_death_signal, socket_path
from .worker import ConfigError, Worker

log = logging.getLogger("pyproxy")


def install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a hard dependency
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
        stream=sys.stderr,
    )


async def serve(options: RunOptions, ready_cb: Callable[[Worker], None] | None = None) -> int:
    """Run one worker until SIGTERM/SIGINT/quitquitquit; returns the exit code.

    Worker 0 (the primary) serves admin and stats and, with ``--workers N``,
    supervises the other workers (supervisor.py); the others serve only the
    data plane and a control socket for the primary."""
    loop = asyncio.get_running_loop()
    certs = None
    if options.certs:
        from .security.certs import CertStore, CredentialError, resolve_identity

        certs = CertStore(options.certs)
        try:
            creds = certs.load()
            resolve_identity(creds, options.service_account, options.trust_domain,
                             options.namespace if options.namespace_set else "")
        except CredentialError as exc:
            print(f"pyproxy: workload certificate: {exc}; not starting", file=sys.stderr)
            return 1
        if not options.namespace_set:
            options = dataclasses.replace(options, namespace=creds.identity.namespace)
        log.info("workload identity %s from %s", creds.uri, options.certs)
    worker = Worker(options, loop, observer_factory=build_observer, certs=certs)
    try:
        await worker.start()
    except ConfigError as exc:
        for e in exc.errors:
            print(e, file=sys.stderr)
        print(f"pyproxy: invalid configuration ({len(exc.errors)} error(s)); not starting", file=sys.stderr)
        await worker.stop()
        return 1
    except OSError as exc:
        print(f"pyproxy: cannot bind a listener or open a file: {exc}", file=sys.stderr)
        await worker.stop()
        return 1
    # Set by SIGTERM/SIGINT and by the admin's POST /quitquitquit.
    stop = asyncio.Event()
    primary = options.worker_index == 0
    pool = None
    admin = None
    control = None
    if primary:
        if options.workers > 1:
            pool = WorkerPool(options.workers)
            pool.spawn_all()
            pool.start_monitor(loop)
        admin = AdminServer(worker, pool, quit=stop.set)
        try:
            await admin.start()
        except OSError as exc:
            print(f"pyproxy: cannot bind admin/stats: {exc}", file=sys.stderr)
            if pool is not None:
                await pool.stop(options.drain_timeout + 2)
            await worker.stop()
            return 1
    else:
        control = await _start_control(worker)
    signals_seen = 0

    def on_term() -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen > 1:
            log.warning("second termination signal: exiting now")
            os._exit(0)
        stop.set()

    def on_hup() -> None:
        loop.create_task(worker.reload("SIGHUP"))
        if pool is not None:
            pool.signal_all(signal.SIGHUP)

    def on_usr1() -> None:
        access_log = getattr(worker.observer, "access_log", None)
        if access_log is not None:
            access_log.reopen()
        if pool is not None:
            pool.signal_all(signal.SIGUSR1)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_term)
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    loop.add_signal_handler(signal.SIGUSR1, on_usr1)
    log.info(
        "pyproxy %s ready (worker %d of %d): outbound %s, inbound %s -> app %s, admin %s, stats %s (workload %s.%s)",
        __version__, options.worker_index, options.workers, options.outbound, options.inbound, options.app,
        options.admin if primary else "-", options.stats if primary else "-",
        worker.identity.workload, worker.identity.namespace,
    )
    if ready_cb is not None:
        ready_cb(worker)
    await stop.wait()
    log.info("draining (up to %.1fs)", options.drain_timeout)
    if pool is not None:
        pool.signal_all(signal.SIGTERM)  # all workers drain at the same time
    await worker.drain(options.drain_timeout)
    if pool is not None:
        await pool.stop(options.drain_timeout + 2)
    if admin is not None:
        await admin.stop()
    if control is not None:
        await control.stop()
    await worker.stop()
    return 0


async def _start_control(worker: Worker) -> ControlServer | None:
    """A secondary worker's control socket (see supervisor.py)."""
    set_parent_death_signal()
    control_dir = os.environ.get("PYPROXY_CONTROL_DIR")
    if not control_dir:
        return None

    async def state(req: dict[str, Any]) -> object:
        return worker_metric_state(worker)

    async def clusters(req: dict[str, Any]) -> object:
        return clusters_view(worker)

    async def ready(req: dict[str, Any]) -> object:
        return {"ready": worker.ready and not worker.draining}

    async def reload(req: dict[str, Any]) -> object:
        ok = await worker.reload("admin /reload")
        return {"ok": ok, "version": worker.version, "errors": worker.reload_status.errors}

    async def logging_(req: dict[str, Any]) -> object:
        set_log_level(str(req.get("level", "info")))
        return {"ok": True}

    async def drain(req: dict[str, Any]) -> object:
        worker.loop.create_task(worker.drain(worker.options.drain_timeout))
        return {"ok": True}

    control = ControlServer(socket_path(control_dir, worker.options.worker_index), {
        "state": state, "clusters": clusters, "ready": ready, "reload": reload, "logging": logging_,
        "drain": drain,
    })
    await control.start()
    return control


def run(options: RunOptions) -> int:
    configure_logging(options.log_level)
    install_uvloop()
    return asyncio.run(serve(options))
