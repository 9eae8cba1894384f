"""Helpers for routing unit tests: real ``Exchange`` objects (the request
parsing the matchers see) over a stub connection (``fakes.StubConn``), and
snapshots built from YAML text. No sockets, no event loop running."""

from __future__ import annotations

import random
import textwrap

from pyproxy.config.loader import load_text
from pyproxy.http.exchange import Exchange
from pyproxy.snapshot import BuildContext, ProxyIdentity, Snapshot, build_snapshot

from .fakes import StubConn, StubLoop, StubWorker


def request(target: str | bytes, headers: dict[str, str] | list[tuple[str, str]] | None = None,
            method: str = "GET", host: str = "reviews", port: int | None = None,
            conn: StubConn | None = None) -> Exchange:
    """A parsed request as the router sees it. ``port`` overrides the
    effective service port (what ``Exchange.service_port`` sets)."""
    pairs = list(headers.items()) if isinstance(headers, dict) else list(headers or [])
    if not any(k.lower() == "host" for k, _ in pairs):
        pairs.insert(0, ("host", host))
    raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in pairs]
    t = target.encode() if isinstance(target, str) else target
    ex = Exchange(conn or StubConn(), method.encode(), t, raw, "1.1", True, False)
    if port is not None:
        ex.port = port
    return ex


def send(snapshot: Snapshot, target: str, headers: dict[str, str] | list[tuple[str, str]] | None = None,
         method: str = "GET", host: str = "reviews", worker: StubWorker | None = None,
         peer: tuple[str, int] = ("127.0.0.1", 40000), complete: bool = True) -> Exchange:
    """Route one request (no body) through ``Exchange.start``: the upstream
    head is built and the attempt queued on the chosen endpoint (no socket is
    opened), or a local reply is in ``ex.conn.written``."""
    worker = worker or StubWorker(snapshot)
    worker.snapshot = snapshot
    if not hasattr(worker, "mirror"):
        from pyproxy.filters.mirror import Mirror

        worker.mirror = Mirror(worker.loop, worker.rng)  # type: ignore[attr-defined,arg-type]
    ex = request(target, headers, method=method, host=host, conn=StubConn(worker, peer))
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
    ctx = BuildContext(StubLoop(), rng or random.Random(7))  # type: ignore[arg-type]
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
