"""``--workers N``: N processes, one event loop each, sharing the data-plane
ports with ``SO_REUSEPORT`` (the kernel spreads new connections across them).

The process started by the user is worker 0, the *primary*: it also serves
admin and stats, and supervises workers 1..N-1, which it starts as
``python -m pyproxy run <same arguments>`` with ``PYPROXY_WORKER_INDEX`` and
``PYPROXY_CONTROL_DIR`` set.

Each secondary worker listens on a unix socket ``<control dir>/worker-<i>.sock``
(the directory is private to the user, mode 0700) for one-line JSON commands
from the primary:

- ``state``: its metric state (see ``metrics.worker_state``); the primary
  merges every worker's state into what ``/stats`` and ``/stats/prometheus``
  show, at scrape time;
- ``clusters``: its ``/clusters`` view (merged the same way);
- ``ready``: whether its listeners are bound and config loaded;
- ``reload``, ``logging``, ``drain``: what the admin endpoints ask.

Every worker also watches the config files itself, so an edit reaches all
of them without the primary; SIGHUP and ``POST /reload`` on the primary are
forwarded. SIGTERM/SIGINT to the primary drains and stops every worker. A
secondary that dies unexpectedly is restarted (at most 5 times a minute);
a secondary whose primary dies gets SIGTERM from the kernel
(``PR_SET_PDEATHSIG``) and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger("pyproxy.workers")

CONTROL_TIMEOUT = 3.0
MAX_LINE = 1 << 26


def socket_path(control_dir: str, index: int) -> str:
    return os.path.join(control_dir, f"worker-{index}.sock")


def set_parent_death_signal() -> None:
    """Linux: SIGTERM this process when its parent (the primary) dies."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class ControlServer:
    """A secondary worker's command socket."""

    def __init__(self, path: str, handlers: dict[str, Callable[[dict[str, Any]], Awaitable[Any]]]) -> None:
        self.path = path
        self.handlers = handlers
        self.server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self.server = await asyncio.start_unix_server(self._handle, self.path, limit=MAX_LINE)
        os.chmod(self.path, 0o600)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), CONTROL_TIMEOUT)
            req = json.loads(line)
            handler = self.handlers.get(req.get("cmd"))
            if handler is None:
                result: Any = {"error": f"unknown command {req.get('cmd')!r}"}
            else:
                result = await handler(req)
            writer.write(json.dumps(result, separators=(",", ":")).encode() + b"\n")
            await writer.drain()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("control command failed")
        finally:
            writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        with contextlib.suppress(OSError):
            os.unlink(self.path)


async def control_request(path: str, cmd: str, timeout: float = CONTROL_TIMEOUT, **args: Any) -> Any:
    reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path, limit=MAX_LINE), timeout)
    try:
        writer.write(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), timeout)
        if not line:
            raise ConnectionError("worker closed the control connection")
        return json.loads(line)
    finally:
        writer.close()


class WorkerPool:
    """The primary's view of its secondary workers."""

    def __init__(self, count: int, argv: list[str] | None = None) -> None:
        self.count = count  # including the primary
        self.argv = argv if argv is not None else [sys.executable, "-m", "pyproxy", *sys.argv[1:]]
        self.control_dir = tempfile.mkdtemp(prefix="pyproxy-ctl-")
        self.children: dict[int, subprocess.Popen[bytes]] = {}
        self.restarts: list[float] = []
        self.stopping = False
        self.monitor: asyncio.Task[None] | None = None

    def spawn_all(self) -> None:
        for i in range(1, self.count):
            self._spawn(i)

    def _spawn(self, index: int) -> None:
        env = dict(os.environ, PYPROXY_WORKER_INDEX=str(index), PYPROXY_CONTROL_DIR=self.control_dir)
        self.children[index] = subprocess.Popen(self.argv, env=env)
        log.info("started worker %d (pid %d)", index, self.children[index].pid)

    async def watch(self) -> None:
        """Restart a secondary that died while the primary is running."""
        while not self.stopping:
            await asyncio.sleep(1.0)
            for index, proc in list(self.children.items()):
                if proc.poll() is None or self.stopping:
                    continue
                now = time.monotonic()
                self.restarts = [t for t in self.restarts if now - t < 60]
                if len(self.restarts) >= 5:
                    log.error(
                        "worker %d exited with %s; too many restarts, leaving it down", index, proc.returncode
                    )
                    del self.children[index]
                    continue
                log.error("worker %d exited with %s; restarting it", index, proc.returncode)
                self.restarts.append(now)
                self._spawn(index)

    def start_monitor(self, loop: asyncio.AbstractEventLoop) -> None:
        self.monitor = loop.create_task(self.watch())

    def signal_all(self, sig: int) -> None:
        for proc in self.children.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sig)

    async def query_all(self, cmd: str, timeout: float = CONTROL_TIMEOUT, **args: Any) -> dict[int, Any]:
        """{worker index: result or {"error": ...}} for every secondary."""
        indexes = sorted(self.children)

        async def one(i: int) -> Any:
            try:
                return await control_request(socket_path(self.control_dir, i), cmd, timeout, **args)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a dead or busy worker must not break admin
                return {"error": f"worker {i}: {type(exc).__name__}: {exc}"}

        results = await asyncio.gather(*(one(i) for i in indexes))
        return dict(zip(indexes, results, strict=True))

    async def stop(self, timeout: float) -> None:
        self.stopping = True
        if self.monitor is not None:
            self.monitor.cancel()
        self.signal_all(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(p.poll() is None for p in self.children.values()):
            await asyncio.sleep(0.05)
        for proc in self.children.values():
            if proc.poll() is None:
                log.warning("worker pid %d did not stop in time: killing it", proc.pid)
                proc.kill()
                proc.wait()
        shutil.rmtree(self.control_dir, ignore_errors=True)
