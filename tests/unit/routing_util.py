"""Helpers for routing unit tests: real ``Exchange`` objects (the request
parsing the matchers see) over a stub connection, and snapshots built from
YAML text. No sockets, no event loop running."""

from __future__ import annotations

import random
import textwrap
from typing import Any

from pyproxy.config.loader import load_text
from pyproxy.http.exchange import OUTBOUND, Exchange
from pyproxy.options import Limits
from pyproxy.snapshot import BuildContext, ProxyIdentity, Snapshot, build_snapshot


class FakeLoop:
    """Enough of an event loop for building snapshots (nothing is run)."""

    def __init__(self) -> None:
        self.now = 0.0
        self.scheduled: list[tuple[float, Any]] = []

    def time(self) -> float:
        return self.now

    def call_later(self, delay: float, cb: Any, *args: Any) -> Any:
        handle = _Handle(self.now + delay, cb, args)
        self.scheduled.append((self.now + delay, handle))
        return handle

    def call_soon(self, cb: Any, *args: Any) -> Any:
        return self.call_later(0, cb, *args)

    def create_task(self, coro: Any) -> Any:
        coro.close()  # connections are never opened in unit tests
        return None


class _Handle:
    def __init__(self, when: float, cb: Any, args: tuple) -> None:
        self._when, self.cb, self.args, self.cancelled = when, cb, args, False

    def cancel(self) -> None:
        self.cancelled = True

    def when(self) -> float:
        return self._when


class FakeTransport:
    def __init__(self, peer: tuple[str, int] = ("127.0.0.1", 40000), sock: tuple[str, int] = ("127.0.0.1", 15001)):
        self.extra = {"peername": peer, "sockname": sock}
        self.written: list[bytes] = []

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.extra.get(name, default)

    def write(self, data: bytes) -> None:
        self.written.append(data)


class FakeWorker:
    def __init__(self, snapshot: Snapshot | None = None, seed: int = 1) -> None:
        self.snapshot = snapshot
        self.loop = FakeLoop()
        self.rng = random.Random(seed)
        self.observer = None
        self.limits = Limits()
        self.certs = None  # no workload certificate: mTLS off


class FakeConn:
    """The downstream connection as an Exchange uses it; responses written
    to it are collected in ``written``."""

    def __init__(self, worker: FakeWorker | None = None, peer: tuple[str, int] = ("127.0.0.1", 40000)) -> None:
        self.worker = worker or FakeWorker()
        self.direction = OUTBOUND
        self.listen_port = 15001
        self.transport = FakeTransport(peer)
        self.peer_ip = peer[0]
        self.peer_ip_bytes = peer[0].encode()
        self.original_dst = None
        self.draining = False
        self.closed = False
        self.tls_peer = None  # plaintext
        self.written: list[bytes] = []
        self.done: list[Any] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def exchange_done(self, ex: Any) -> None:
        self.done.append(ex)

    def pause_reading_for(self, ex: Any) -> None:
        pass

    def resume_reading_for(self, ex: Any) -> None:
        pass

    @property
    def response(self) -> bytes:
        return b"".join(self.written)


def request(target: str | bytes, headers: dict[str, str] | list[tuple[str, str]] | None = None,
            method: str = "GET", host: str = "reviews", port: int | None = None,
            conn: FakeConn | None = None) -> Exchange:
    """A parsed request as the router sees it. ``port`` overrides the
    effective service port (what ``Exchange.service_port`` sets)."""
    pairs = list(headers.items()) if isinstance(headers, dict) else list(headers or [])
    if not any(k.lower() == "host" for k, _ in pairs):
        pairs.insert(0, ("host", host))
    raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in pairs]
    t = target.encode() if isinstance(target, str) else target
    ex = Exchange(conn or FakeConn(), method.encode(), t, raw, "1.1", True, False)
    if port is not None:
        ex.port = port
    return ex


def send(snapshot: Snapshot, target: str, headers: dict[str, str] | list[tuple[str, str]] | None = None,
         method: str = "GET", host: str = "reviews", worker: FakeWorker | None = None,
         peer: tuple[str, int] = ("127.0.0.1", 40000), complete: bool = True) -> Exchange:
    """Route one request (no body) through ``Exchange.start``: the upstream
    head is built and the attempt queued on the chosen endpoint (no socket is
    opened), or a local reply is in ``ex.conn.written``."""
    worker = worker or FakeWorker(snapshot)
    worker.snapshot = snapshot
    if not hasattr(worker, "mirror"):
        from pyproxy.filters.mirror import Mirror

        worker.mirror = Mirror(worker.loop, worker.rng)  # type: ignore[attr-defined,arg-type]
    ex = request(target, headers, method=method, host=host, conn=FakeConn(worker, peer))
    ex.request_complete = complete
    ex.start()
    return ex


def head_of(ex: Exchange) -> tuple[bytes, dict[bytes, list[bytes]]]:
    """(request line, headers by name) of the upstream request head."""
    lines = ex.upstream_head.split(b"\r\n")
    out: dict[bytes, list[bytes]] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(b": ")
            out.setdefault(name, []).append(value)
    return lines[0], out


def build(text: str, *, labels: dict[str, str] | None = None, namespace: str = "default",
          previous: Snapshot | None = None, rng: random.Random | None = None) -> Snapshot:
    loaded = load_text(textwrap.dedent(text), "t.yaml")
    assert loaded.ok, [str(e) for e in loaded.errors]
    assert not [w for w in loaded.warnings if "duplicate key" in str(w)], "documents run together (missing ---?)"
    ident = ProxyIdentity(workload="test", namespace=namespace, labels=tuple((labels or {}).items()))
    ctx = BuildContext(FakeLoop(), rng or random.Random(7))  # type: ignore[arg-type]
    return build_snapshot(loaded, ident, ctx, previous)


def service_entry(name: str, endpoints: list[tuple[str, int, dict[str, str]]], ports: tuple[int, ...] = (9080,),
                  namespace: str = "default") -> str:
    eps = "\n".join(
        f"  - address: {addr}\n    ports: {{http: {p}}}\n    labels: {labels or {}}".replace("'", '"')
        for addr, p, labels in endpoints
    )
    port_list = ", ".join(f"{{number: {p}, name: {'http' if i == 0 else f'http{i}'}, protocol: HTTP}}"
                          for i, p in enumerate(ports))
    return f"""
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {name}, namespace: {namespace}}}
spec:
  hosts: [{name}]
  ports: [{port_list}]
  resolution: STATIC
  endpoints:
{eps}
"""
