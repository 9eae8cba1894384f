"""No-socket fakes for unit tests of the request path: a fake event loop
with a manual clock, fake transports, a fake downstream connection and a
way to build a real snapshot from Istio YAML on top of them.

The real ``Exchange``, ``ClusterEndpoint`` pools, ``UpstreamConnection``
(with its httptools parser), retry policy, fault policy and outlier detector
run unchanged; only the loop, the sockets and the clock are fake. Upstream
connects never happen by themselves: a test completes them with
``FakeLoop.connect`` / ``FakeLoop.refuse``.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections import deque
from collections.abc import Callable
from typing import Any

from pyproxy.config.loader import load_text
from pyproxy.http.exchange import OUTBOUND, Exchange
from pyproxy.options import Limits
from pyproxy.snapshot import BuildContext, ProxyIdentity, Snapshot, build_snapshot
from pyproxy.upstream.cluster import Cluster, ClusterEndpoint
from pyproxy.upstream.connection import UpstreamConnection
from pyproxy.worker import WorkerStats


class FakeTimer:
    __slots__ = ("at", "seq", "callback", "args", "cancelled")

    def __init__(self, at: float, seq: int, callback: Callable[..., Any], args: tuple) -> None:
        self.at = at
        self.seq = seq
        self.callback = callback
        self.args = args
        self.cancelled = False

    def when(self) -> float:
        return self.at

    def cancel(self) -> None:
        self.cancelled = True

    def __lt__(self, other: FakeTimer) -> bool:
        return (self.at, self.seq) < (other.at, other.seq)


class FakeLoop:
    """Just enough of an event loop for the request path, with a manual clock."""

    def __init__(self) -> None:
        self.now = 1000.0
        self._seq = itertools.count()
        self.timers: list[FakeTimer] = []
        self.ready: deque[tuple[Callable[..., Any], tuple]] = deque()
        # (endpoint, None) for every upstream connect the pool started.
        self.connects: deque[tuple[ClusterEndpoint, Any]] = deque()
        self.upstreams: dict[int, FakeUpstream] = {}

    # -- the loop API the code under test uses ---------------------------

    def time(self) -> float:
        return self.now

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any) -> FakeTimer:
        timer = FakeTimer(self.now + max(0.0, delay), next(self._seq), callback, args)
        heapq.heappush(self.timers, timer)
        return timer

    def call_soon(self, callback: Callable[..., Any], *args: Any) -> FakeTimer:
        self.ready.append((callback, args))
        return FakeTimer(self.now, next(self._seq), callback, args)

    def create_task(self, coro: Any) -> Any:
        # Only ClusterEndpoint._connect creates tasks on this path.
        ep = coro.cr_frame.f_locals.get("self") if coro.cr_frame is not None else None
        coro.close()  # the real connect never runs: the test completes it
        self.connects.append((ep, None))
        return None

    # -- driving it --------------------------------------------------------

    def run_ready(self) -> None:
        while self.ready:
            callback, args = self.ready.popleft()
            callback(*args)

    def advance(self, seconds: float) -> None:
        """Move the clock, firing due timers in order (and what they schedule)."""
        end = self.now + seconds
        self.run_ready()
        while self.timers and self.timers[0].at <= end:
            timer = heapq.heappop(self.timers)
            if timer.cancelled:
                continue
            self.now = max(self.now, timer.at)
            timer.callback(*timer.args)
            self.run_ready()
        self.now = end

    def pending_timers(self) -> list[FakeTimer]:
        """Timers still to fire, other than the endpoints' idle-connection
        timers (a pooled idle connection legitimately keeps one)."""
        return sorted(t for t in self.timers
                      if not t.cancelled and getattr(t.callback, "__name__", "") != "_on_idle_timer")

    def _next_connect(self, ep: ClusterEndpoint | None) -> ClusterEndpoint:
        for i, (endpoint, coro) in enumerate(self.connects):
            if ep is None or endpoint is ep:
                del self.connects[i]
                return endpoint
        raise AssertionError(f"no connect in progress to {ep}")

    def connect(self, ep: ClusterEndpoint | None = None, settle: bool = True) -> FakeUpstream:
        """Complete the oldest connect in progress (to ``ep``) successfully;
        ``settle=False``: return without running the callbacks it queued."""
        endpoint = self._next_connect(ep)
        conn = UpstreamConnection(endpoint)
        conn.created = self.now
        transport = FakeTransport(self, conn)
        conn.connection_made(transport)
        up = self.upstreams[id(conn)] = FakeUpstream(conn, transport)
        endpoint._connect_done(conn)
        if settle:
            self.run_ready()
        return up

    def upstream_of(self, ex: Exchange) -> FakeUpstream:
        """The connection ``ex`` is using now; completes a connect when it waits for one."""
        if ex.upconn is None and ex.waiting_pending:
            self.connect(ex.endpoint)
        assert ex.upconn is not None, "the exchange has no upstream connection"
        return self.upstreams[id(ex.upconn)]

    def refuse(self, ep: ClusterEndpoint | None = None) -> ClusterEndpoint:
        """Fail the oldest connect in progress (connection refused)."""
        endpoint = self._next_connect(ep)
        endpoint._connect_done(None, "connection failure")
        self.run_ready()
        return endpoint


class FakeTransport:
    def __init__(self, loop: FakeLoop, protocol: Any) -> None:
        self.loop = loop
        self.protocol = protocol
        self.written = bytearray()
        self.closing = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def get_write_buffer_size(self) -> int:
        return len(self.written)  # (what the fake peer has not taken yet)

    def write(self, data: bytes) -> None:
        assert not self.closing, "write after close"
        self.written += data

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            self.loop.call_soon(self.protocol.connection_lost, None)

    def abort(self) -> None:
        self.close()

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class FakeUpstream:
    """One fake upstream connection: what the proxy sent, and a way to answer."""

    def __init__(self, conn: UpstreamConnection, transport: FakeTransport) -> None:
        self.conn = conn
        self.transport = transport

    @property
    def sent(self) -> bytes:
        return bytes(self.transport.written)

    def header(self, name: str) -> str | None:
        head = self.sent.split(b"\r\n\r\n", 1)[0].decode("latin-1")
        for line in head.split("\r\n")[1:]:
            k, _, v = line.partition(":")
            if k.strip().lower() == name:
                return v.strip()
        return None

    def respond(self, status: int, body: bytes = b"", headers: tuple[tuple[str, str], ...] = (),
                settle: bool = True) -> None:
        """Send a whole response; ``settle=False``: return without running
        the callbacks it queued (what happened within the read itself)."""
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers)
        self.conn.data_received(
            f"HTTP/1.1 {status} X\r\ncontent-length: {len(body)}\r\n{extra}\r\n".encode() + body
        )
        if settle:
            self.transport.loop.run_ready()

    def reset(self, settle: bool = True) -> None:
        """The upstream closes the connection (before or during a response)."""
        self.transport.closing = True
        self.conn.connection_lost(None)
        if settle:
            self.transport.loop.run_ready()


class FakeWorker:
    def __init__(self, snapshot: Snapshot, loop: FakeLoop, rng: random.Random, limits: Limits | None = None) -> None:
        self.snapshot = snapshot
        self.loop = loop
        self.rng = rng
        self.limits = limits or Limits()
        self.observer = None
        self.stats = WorkerStats()
        self.certs = None  # no workload certificate: mTLS off


class FakeDownstream:
    """The client side of one exchange: collects what the proxy answered."""

    def __init__(self, worker: FakeWorker) -> None:
        self.worker = worker
        self.direction = OUTBOUND
        self.listen_port = 15001
        self.peer_ip = "127.0.0.1"
        self.peer_ip_bytes = b"127.0.0.1"
        self.original_dst = None
        self.closed = False
        self.draining = False
        self.tls_peer = None  # plaintext
        self.write_paused = False  # the client reads (DownstreamConnection.pause_writing)
        self.limits = worker.limits
        self.out = bytearray()
        self.done: list[Exchange] = []
        self.corked = False
        self.wbuf: list[bytes] = []
        self.writes = 0  # transport writes (one per uncork with data)

    def write(self, data: bytes) -> None:
        if self.corked:
            self.wbuf.append(data)
        else:
            self.out += data
            self.writes += 1

    def cork(self) -> bool:
        if self.corked:
            return False
        self.corked = True
        return True

    def uncork(self) -> None:
        self.corked = False
        if self.wbuf:
            self.out += b"".join(self.wbuf)
            self.wbuf.clear()
            self.writes += 1

    def pause_reading_for(self, ex: Exchange) -> None:
        pass

    def resume_reading_for(self, ex: Exchange) -> None:
        pass

    def exchange_done(self, ex: Exchange) -> None:
        self.done.append(ex)

    @property
    def status(self) -> int | None:
        if not self.out:
            return None
        return int(bytes(self.out).split(b" ", 2)[1])

    def response_header(self, name: str) -> str | None:
        head = bytes(self.out).split(b"\r\n\r\n", 1)[0].decode("latin-1")
        for line in head.split("\r\n")[1:]:
            k, _, v = line.partition(":")
            if k.strip().lower() == name:
                return v.strip()
        return None

    @property
    def body(self) -> bytes:
        return bytes(self.out).split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in self.out else b""


class Mesh:
    """A real snapshot built from YAML on a fake loop, and a way to send requests."""

    def __init__(self, yaml_text: str, seed: int = 1, limits: Limits | None = None) -> None:
        loaded = load_text(yaml_text, "mesh.yaml")
        assert loaded.ok, [str(e) for e in loaded.errors]
        self.loop = FakeLoop()
        self.rng = random.Random(seed)
        ctx = BuildContext(self.loop, self.rng, None, self.loop.time)  # type: ignore[arg-type]
        self.snapshot = build_snapshot(loaded, ProxyIdentity(), ctx)
        for c in self.snapshot.all_clusters():
            c.outlier.start()
        self.worker = FakeWorker(self.snapshot, self.loop, self.rng, limits)

    def cluster(self, host: str, port: int = 9080, subset: str = "") -> Cluster:
        return self.snapshot.clusters[f"outbound|{port}|{subset}|{host}.default.svc.cluster.local"]

    def request(self, host: str, path: str = "/", method: bytes = b"GET", body: bytes | None = None,
                headers: tuple[tuple[bytes, bytes], ...] = (), complete: bool = True) -> tuple[Exchange, FakeDownstream]:
        """Start one request. ``complete=False`` with a body: headers and
        body sent, end of request not yet (call ``ex.on_request_complete()``)."""
        down = FakeDownstream(self.worker)
        hdrs = [(b"host", host.encode()), *headers]
        if body is not None:
            hdrs.append((b"content-length", str(len(body)).encode()))
        ex = Exchange(down, method, path.encode(), hdrs, "1.1", True, False)  # type: ignore[arg-type]
        if body:
            ex.start()
            ex.on_request_body(body)
            if complete:
                ex.on_request_complete()
        else:
            ex.on_request_complete()
        self.loop.run_ready()
        return ex, down


def service(name: str, ports: list[int], extra_labels: list[dict[str, str]] | None = None) -> str:
    """A STATIC ServiceEntry with one endpoint per port on 127.0.0.1."""
    labels = extra_labels or [{} for _ in ports]
    eps = "\n".join(
        f"  - address: 127.0.0.1\n    ports: {{http: {p}}}\n    labels: {lab or {'i': str(i)}}"
        for i, (p, lab) in enumerate(zip(ports, labels))
    )
    return f"""apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {name}}}
spec:
  hosts: [{name}]
  ports: [{{number: 9080, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints:
{eps}
"""


# -- stubs for routing and builder tests: record, never run -------------------


class StubLoop:
    """Enough of an event loop for building snapshots and routing single
    requests: calls are recorded in ``scheduled`` as (delay, handle), nothing
    is run (``FakeLoop`` above runs them on a manual clock)."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now
        self.scheduled: list[tuple[float, StubHandle]] = []

    def time(self) -> float:
        return self.now

    def call_later(self, delay: float, cb: Any, *args: Any) -> Any:
        handle = StubHandle(self.now + delay, cb, args)
        self.scheduled.append((delay, handle))
        return handle

    def call_soon(self, cb: Any, *args: Any) -> Any:
        return self.call_later(0, cb, *args)

    def create_task(self, coro: Any) -> Any:
        coro.close()  # connections are never opened in unit tests
        return None


class StubHandle:
    def __init__(self, when: float, cb: Any, args: tuple) -> None:
        self._when, self.cb, self.args, self.cancelled = when, cb, args, False

    def cancel(self) -> None:
        self.cancelled = True

    def when(self) -> float:
        return self._when


class StubTransport:
    def __init__(self, peer: tuple[str, int] = ("127.0.0.1", 40000), sock: tuple[str, int] = ("127.0.0.1", 15001)):
        self.extra = {"peername": peer, "sockname": sock}
        self.written: list[bytes] = []

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.extra.get(name, default)

    def write(self, data: bytes) -> None:
        self.written.append(data)


class StubWorker:
    def __init__(self, snapshot: Snapshot | None = None, seed: int = 1) -> None:
        self.snapshot = snapshot
        self.loop = StubLoop()
        self.rng = random.Random(seed)
        self.observer = None
        self.limits = Limits()
        self.certs = None  # no workload certificate: mTLS off


class StubConn:
    """The downstream connection as an Exchange uses it; responses written
    to it are collected in ``written``."""

    def __init__(self, worker: StubWorker | None = None, peer: tuple[str, int] = ("127.0.0.1", 40000)) -> None:
        self.worker = worker or StubWorker()
        self.direction = OUTBOUND
        self.listen_port = 15001
        self.transport = StubTransport(peer)
        self.peer_ip = peer[0]
        self.peer_ip_bytes = peer[0].encode()
        self.original_dst = None
        self.draining = False
        self.closed = False
        self.tls_peer = None  # plaintext
        self.write_paused = False
        self.limits = self.worker.limits
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
