"""Shared integration-test harness: the real proxy as a process, scripted
upstreams on ephemeral ports, small raw-socket clients.

Everything here uses real sockets on 127.0.0.1. The proxy runs as a separate
``python -m pyproxy run`` process with every port chosen free by the test, so
tests can run side by side.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 5.0, method: str = "GET", data: bytes | None = None) -> tuple[int, bytes]:
    """Tiny blocking client (stdlib) for admin/stats endpoints."""
    req = urllib.request.Request(url, method=method, data=data)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@dataclass
class Proxy:
    """A running ``pyproxy run`` process."""

    config_dir: Path
    outbound: int
    inbound: int
    admin: int
    stats: int
    app: int
    process: subprocess.Popen
    log_path: Path
    extra_args: list[str] = field(default_factory=list)

    @property
    def outbound_url(self) -> str:
        return f"http://127.0.0.1:{self.outbound}"

    @property
    def inbound_url(self) -> str:
        return f"http://127.0.0.1:{self.inbound}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin}"

    @property
    def stats_url(self) -> str:
        return f"http://127.0.0.1:{self.stats}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def write_config(self, name: str, text: str) -> Path:
        """Write (or replace) one config file atomically."""
        path = self.config_dir / name
        tmp = self.config_dir / f".{name}.tmp"
        tmp.write_text(textwrap.dedent(text))
        os.replace(tmp, path)
        return path

    def remove_config(self, name: str) -> None:
        (self.config_dir / name).unlink()

    def reload(self) -> dict:
        status, body = http_get(self.admin_url + "/reload", method="POST", data=b"")
        result = json.loads(body)
        result["http_status"] = status
        return result

    def admin_json(self, path: str) -> Any:
        status, body = http_get(self.admin_url + path)
        assert status == 200, (path, status, body[:500])
        return json.loads(body)

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        return self.process.returncode


def start_proxy(
    config: str | dict[str, str] | None = None,
    *,
    config_dir: Path | None = None,
    app_port: int | None = None,
    args: list[str] | None = None,
    env: dict[str, str] | None = None,
    wait_ready: bool = True,
    timeout: float = 15.0,
) -> Proxy:
    """Start the proxy with ``config`` (one YAML text, or {filename: text})
    written into a fresh directory, and wait until /healthz/ready is 200.

    Ports are picked free by the harness; another process can take one
    before the proxy binds it, so a start that fails to bind is retried with
    fresh ports (up to 3 times)."""
    if config_dir is None:
        config_dir = Path(tempfile.mkdtemp(prefix="pyproxy-test-"))
    if isinstance(config, str):
        config = {"mesh.yaml": config}
    for name, text in (config or {}).items():
        (config_dir / name).write_text(textwrap.dedent(text))
    for attempt in range(3):
        try:
            return _start_once(config_dir, app_port, args, env, wait_ready, timeout)
        except _PortTaken:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


class _PortTaken(RuntimeError):
    pass


def _start_once(config_dir: Path, app_port: int | None, args: list[str] | None, env: dict[str, str] | None,
                wait_ready: bool, timeout: float) -> Proxy:
    ports = {k: free_port() for k in ("outbound", "inbound", "admin", "stats")}
    app = app_port or free_port()
    log_path = config_dir.parent / f"{config_dir.name}.log"
    cmd = [
        sys.executable, "-m", "pyproxy", "run", "--config", str(config_dir),
        "--outbound", f"127.0.0.1:{ports['outbound']}", "--inbound", f"127.0.0.1:{ports['inbound']}",
        "--admin", f"127.0.0.1:{ports['admin']}", "--stats", f"127.0.0.1:{ports['stats']}",
        "--app", f"127.0.0.1:{app}", *(args or []),
    ]
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = str(ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
    # No drain grace unless a test asks (--drain-grace wins): stopping the
    # proxy after each test should not wait for it.
    full_env.setdefault("PYPROXY_DRAIN_GRACE", "0")
    full_env.update(env or {})
    with open(log_path, "wb") as logf:  # the child keeps its own descriptor
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=full_env, cwd=str(ROOT))
    # A test may override a listener in ``args`` (the last flag wins).
    for flag in ("outbound", "inbound", "admin", "stats"):
        given = [a for i, a in enumerate(args or []) if i and (args or [])[i - 1] == f"--{flag}"]
        if given:
            ports[flag] = int(given[-1].rpartition(":")[2])
    proxy = Proxy(config_dir, ports["outbound"], ports["inbound"], ports["admin"], ports["stats"], app,
                  proc, log_path, args or [])
    if wait_ready:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                text = proxy.log()
                if "address already in use" in text.lower():
                    raise _PortTaken(text)
                raise RuntimeError(f"proxy exited with {proc.returncode}:\n{text}")
            try:
                status, body = http_get(proxy.admin_url + "/server_info", timeout=1)
                # Ready, and really this process (not another one that took the port).
                if status == 200 and json.loads(body).get("pid", proc.pid) == proc.pid:
                    status, _ = http_get(proxy.stats_url + "/healthz/ready", timeout=1)
                    if status == 200:
                        break
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                proxy.stop()
                raise RuntimeError(f"proxy not ready after {timeout}s:\n{proxy.log()}")
            time.sleep(0.05)
    return proxy


@contextlib.contextmanager
def running_proxy(*a: Any, **kw: Any):
    proxy = start_proxy(*a, **kw)
    try:
        yield proxy
    finally:
        proxy.stop()


# ---------------------------------------------------------------------------
# Scripted upstreams


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class Upstream:
    """An aiohttp server on an ephemeral port whose handler is a script.

    ``handler(request) -> web.StreamResponse`` may be replaced at any time;
    every request is recorded in ``seen`` (headers lower-cased)."""

    def __init__(self, name: str = "upstream", handler: Callable[[web.Request], Awaitable[web.StreamResponse]] | None = None,
                 host: str = "127.0.0.1", port: int = 0, record_body: bool = True) -> None:
        self.name = name
        self.record_body = record_body  # False: the handler streams request.content itself
        self.host = host
        self.port = port
        self.handler = handler or self.default_handler
        self.seen: list[Seen] = []
        self.runner: web.AppRunner | None = None

    async def default_handler(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"upstream": self.name, "path": request.path_qs})

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        body = await request.read() if self.record_body else b""
        self.seen.append(Seen(request.method, request.path_qs,
                              {k.lower(): v for k, v in request.headers.items()}, body))
        return await self.handler(request)

    async def start(self) -> Self:
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.host, self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


class RawUpstream:
    """A TCP server whose connection handler is a coroutine script over
    (reader, writer): for resets, stalls, malformed responses."""

    def __init__(self, script: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
                 host: str = "127.0.0.1") -> None:
        self.script = script
        self.host = host
        self.port = 0
        self.server: asyncio.base_events.Server | None = None
        self.connections = 0

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.script(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> Self:
        self.server = await asyncio.start_server(self._handle, self.host, 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 2)


async def read_request_head(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


def service_entry(name: str, endpoints: list[tuple[int, dict[str, str]]], port: int = 9080,
                  namespace: str | None = None, host: str = "127.0.0.1") -> str:
    """A STATIC ServiceEntry for ``name`` with endpoints on ``host``:port, labels."""
    eps = "\n".join(
        f"  - address: {host}\n    ports: {{http: {p}}}\n    labels: {json.dumps(labels)}"
        for p, labels in endpoints
    )
    ns = f"\n  namespace: {namespace}" if namespace else ""
    return f"""apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: {name}{ns}
spec:
  hosts: [{name}]
  ports: [{{number: {port}, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints:
{eps}
"""


async def raw_request(port: int, data: bytes, host: str = "127.0.0.1", read_timeout: float = 5.0,
                      until_close: bool = False) -> bytes:
    """Send raw bytes, return what comes back (until close, or one response)."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(data)
        await writer.drain()
        if until_close:
            return await asyncio.wait_for(reader.read(), read_timeout)
        return await asyncio.wait_for(read_response(reader), read_timeout)
    finally:
        writer.close()


async def read_response(reader: asyncio.StreamReader) -> bytes:
    """One HTTP/1.1 response (Content-Length or chunked framing) as raw bytes."""
    head = await reader.readuntil(b"\r\n\r\n")
    lower = head.lower()
    if b"transfer-encoding: chunked" in lower:
        body = b""
        while True:
            line = await reader.readuntil(b"\r\n")
            size = int(line.strip().split(b";")[0], 16)
            data = await reader.readexactly(size + 2)
            body += data[:-2]
            if size == 0:
                break
        return head + body
    for line in lower.split(b"\r\n"):
        if line.startswith(b"content-length:"):
            n = int(line.split(b":")[1])
            return head + await reader.readexactly(n)
    return head
