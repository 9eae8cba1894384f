"""Admin (``--admin``, loopback by default) and stats (``--stats``) HTTP servers.

Both run on aiohttp in the worker's event loop: they are not on the data path.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING

from aiohttp import web

from .. import __version__

if TYPE_CHECKING:
    from ..app import Worker


class AdminServer:
    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.runners: list[web.AppRunner] = []

    def admin_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/ready", self.ready)
        app.router.add_get("/server_info", self.server_info)
        app.router.add_post("/reload", self.reload)
        app.router.add_post("/quitquitquit", self.quit)
        return app

    def stats_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/healthz/ready", self.ready)
        return app

    async def start(self) -> None:
        o = self.worker.options
        for app, addr in ((self.admin_app(), o.admin), (self.stats_app(), o.stats)):
            runner = web.AppRunner(app, access_log=None, handle_signals=False)
            await runner.setup()
            site = web.TCPSite(runner, addr.host, addr.port, reuse_address=True)
            await site.start()
            self.runners.append(runner)

    async def stop(self) -> None:
        for runner in self.runners:
            await runner.cleanup()
        self.runners = []

    async def ready(self, request: web.Request) -> web.Response:
        w = self.worker
        if w.ready and not w.draining and w.snapshot is not None:
            return web.Response(text="LIVE\n")
        return web.Response(status=503, text="DRAINING\n" if w.draining else "NOT READY\n")

    async def server_info(self, request: web.Request) -> web.Response:
        w = self.worker
        info = {
            "version": __version__,
            "state": "DRAINING" if w.draining else ("LIVE" if w.ready else "INITIALIZING"),
            "uptime_seconds": int(time.time() - w.started_at),
            "workload": w.identity.workload,
            "namespace": w.identity.namespace,
            "labels": dict(w.identity.labels),
            "gateway": w.identity.gateway or None,
            "config_version": w.version,
        }
        return web.json_response(info, dumps=lambda o: json.dumps(o, indent=2))

    async def reload(self, request: web.Request) -> web.Response:
        ok = await self.worker.reload()
        status = self.worker.reload_status
        body = {"ok": ok, "version": status.version, "errors": status.errors}
        return web.json_response(body, status=200 if ok else 400)

    async def quit(self, request: web.Request) -> web.Response:
        ev = getattr(self.worker, "quit_event", None)
        if ev is not None:
            ev.set()
        return web.Response(text="OK\n")
