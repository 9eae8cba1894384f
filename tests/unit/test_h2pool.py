"""The HTTP/2 upstream pool (upstream/h2pool.py) on the fake loop: the real
Exchange, H2Endpoint, H2Connection and H2Attempt, an ``h2`` library server
as the upstream, no sockets, an injected clock."""

from __future__ import annotations

from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings
import hyperframe.frame
from h2.errors import ErrorCodes

from pyproxy.http.exchange import Exchange
from pyproxy.upstream.h2pool import STREAM_WINDOW, H2Attempt, H2Connection, H2Endpoint
from pyproxy.upstream.settings import DOWNSTREAM, H2, HTTP1, upstream_protocol
from tests.unit.fakes import FakeDownstream, FakeTransport, Mesh


def grpc_service(protocol: str = "GRPC") -> str:
    return f"""apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: svc}}
spec:
  hosts: [svc]
  ports: [{{number: 9080, name: grpc, protocol: {protocol}}}]
  resolution: STATIC
  endpoints:
  - address: 127.0.0.1
    ports: {{grpc: 1001}}
"""


def dr(http: str) -> str:
    return ("apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: svc}\n"
            f"spec:\n  host: svc\n  trafficPolicy:\n    connectionPool: {{http: {http}}}\n")


def mesh(*extra: str) -> Mesh:
    return Mesh("---\n".join([grpc_service(), *extra]))


class Peer:
    """One upstream HTTP/2 connection: the proxy's H2Connection on a fake
    transport, and an ``h2`` server state machine answering it."""

    def __init__(self, m: Mesh, ep: H2Endpoint, max_streams: int | None = None) -> None:
        self.loop = m.loop
        self.conn = H2Connection(ep)
        self.conn.created = m.loop.now
        self.conn.on_made = ep._h2_connect_done
        self.transport = FakeTransport(m.loop, self.conn)
        self.server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
        self.server.initiate_connection()
        if max_streams is not None:
            self.server.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: max_streams})
        self.events: list[Any] = []
        self.conn.connection_made(self.transport)
        self.loop.run_ready()
        self.pump()

    def pump(self) -> None:
        """Exchange bytes both ways until neither side has anything to say."""
        for _ in range(20):
            data = bytes(self.transport.written)
            self.transport.written.clear()
            if data and not self.server_closed:
                self.events += self.server.receive_data(data)
            out = self.server.data_to_send()
            if out and not self.conn.closed:
                self.conn.data_received(out)
            self.loop.run_ready()
            if not data and not out:
                return

    @property
    def server_closed(self) -> bool:
        return any(isinstance(e, h2.events.ConnectionTerminated) for e in self.events)

    def requests(self) -> dict[int, dict[bytes, bytes]]:
        return {e.stream_id: dict(e.headers) for e in self.events if isinstance(e, h2.events.RequestReceived)}

    def respond(self, sid: int, status: int = 200, body: bytes = b"ok",
                trailers: list[tuple[bytes, bytes]] | None = None) -> None:
        head = [(b":status", str(status).encode())]
        if trailers is None:
            head.append((b"content-length", str(len(body)).encode()))
        self.server.send_headers(sid, head, end_stream=False)
        self.server.send_data(sid, body, end_stream=trailers is None)
        if trailers is not None:
            self.server.send_headers(sid, trailers, end_stream=True)
        self.pump()


def connect(m: Mesh, ep: H2Endpoint, max_streams: int | None = None) -> Peer:
    m.loop._next_connect(ep)
    return Peer(m, ep, max_streams)


def endpoint(m: Mesh) -> H2Endpoint:
    ep = m.cluster("svc").endpoints[0]
    assert isinstance(ep, H2Endpoint)
    return ep


def test_protocol_selection_follows_istiod() -> None:
    from pyproxy.config.model import HTTPSettings
    assert upstream_protocol("GRPC", None) == H2
    assert upstream_protocol("HTTP2", HTTPSettings(h2_upgrade_policy="DO_NOT_UPGRADE")) == H2
    assert upstream_protocol("GRPC-WEB", HTTPSettings(use_client_protocol=True)) == H2
    assert upstream_protocol("HTTP", None) == HTTP1
    assert upstream_protocol("HTTP", HTTPSettings(h2_upgrade_policy="UPGRADE")) == H2
    # (istiod applies the upgrade after useClientProtocol: it wins)
    assert upstream_protocol("HTTP", HTTPSettings(h2_upgrade_policy="UPGRADE", use_client_protocol=True)) == H2
    assert upstream_protocol("HTTP", HTTPSettings(use_client_protocol=True)) == DOWNSTREAM
    # a sniffed port uses the client's protocol on a sidecar, not on a gateway
    assert upstream_protocol("", HTTPSettings(h2_upgrade_policy="UPGRADE")) == DOWNSTREAM
    assert upstream_protocol("", None, sidecar=False) == HTTP1
    # h2UpgradePolicy is for outbound clusters only
    assert upstream_protocol("HTTP", HTTPSettings(h2_upgrade_policy="UPGRADE"), outbound=False) == HTTP1
    m = Mesh("---\n".join([grpc_service("HTTP"), dr("{h2UpgradePolicy: UPGRADE, maxConcurrentStreams: 7}")]))
    assert m.cluster("svc").settings.upstream_protocol == H2
    assert m.cluster("svc").settings.max_concurrent_streams == 7
    assert isinstance(m.cluster("svc").endpoints[0], H2Endpoint)
    m = Mesh(grpc_service("HTTP"))
    assert type(m.cluster("svc").endpoints[0]).__name__ == "ClusterEndpoint"


def test_requests_share_one_connection_and_get_their_responses() -> None:
    m = mesh()
    ep = endpoint(m)
    exs = [m.request("svc", f"/r{i}") for i in range(3)]
    assert len(m.loop.connects) == 1  # three waiting streams: one connection
    peer = connect(m, ep)
    reqs = peer.requests()
    assert sorted(h[b":path"] for h in reqs.values()) == [b"/r0", b"/r1", b"/r2"]
    assert all(h[b":authority"] == b"svc" and h[b":method"] == b"GET" for h in reqs.values())
    assert all(b"host" not in h and b"connection" not in h for h in reqs.values())
    for sid, h in reqs.items():
        peer.respond(sid, body=b"answer " + h[b":path"])
    for i, (ex, down) in enumerate(exs):
        assert down.status == 200
        assert down.body == b"answer /r%d" % i
        assert ex.finished
    s = m.cluster("svc").stats
    assert (s.upstream_cx_total, s.upstream_rq_total, s.upstream_rq_active, s.upstream_rq_pending_active) == (1, 3, 0, 0)
    assert (s.upstream_cx_http2_total, s.upstream_cx_http1_total) == (1, 0)
    # the next request takes a stream on the same connection at once
    ex, down = m.request("svc", "/again")
    assert not m.loop.connects and isinstance(ex.upconn, H2Attempt)
    peer.pump()
    (sid,) = [sid for sid, h in peer.requests().items() if h[b":path"] == b"/again"]
    peer.respond(sid)
    assert down.status == 200 and s.upstream_cx_total == 1


def test_peer_stream_limit_with_max_connections_one_makes_requests_wait() -> None:
    m = mesh(dr("{}").replace("connectionPool: {http: {}}", "connectionPool: {tcp: {maxConnections: 1}}"))
    ep = endpoint(m)
    first = m.request("svc", "/a")
    peer = connect(m, ep, max_streams=2)
    second = m.request("svc", "/b")
    third = m.request("svc", "/c")
    peer.pump()
    assert len(peer.requests()) == 2  # the peer allows two at once
    assert third[0].waiting_pending and not m.loop.connects  # maxConnections: no second connection
    assert m.cluster("svc").stats.upstream_cx_overflow >= 1
    sid_a = next(sid for sid, h in peer.requests().items() if h[b":path"] == b"/a")
    peer.respond(sid_a)
    assert first[1].status == 200
    assert not third[0].waiting_pending  # a stream ended: the waiting request took it
    peer.pump()
    reqs = peer.requests()
    assert sorted(h[b":path"] for h in reqs.values()) == [b"/a", b"/b", b"/c"]
    for sid, h in reqs.items():
        if h[b":path"] != b"/a":
            peer.respond(sid)
    assert second[1].status == 200 and third[1].status == 200


def test_busy_connection_opens_another_without_a_connection_limit() -> None:
    m = mesh(dr("{maxConcurrentStreams: 1}"))
    ep = endpoint(m)
    m.request("svc", "/a")
    peer = connect(m, ep)
    assert len(peer.requests()) == 1
    _ex, _down = m.request("svc", "/b")
    assert len(m.loop.connects) == 1  # maxConcurrentStreams 1: the second needs its own connection
    peer2 = connect(m, ep)
    assert [h[b":path"] for h in peer2.requests().values()] == [b"/b"]


def test_max_requests_per_connection_drains_the_connection() -> None:
    m = mesh(dr("{maxRequestsPerConnection: 2}"))
    ep = endpoint(m)
    m.request("svc", "/a")
    m.request("svc", "/b")
    peer = connect(m, ep)
    m.request("svc", "/c")
    assert len(m.loop.connects) == 1  # the first connection took its two requests
    for sid in list(peer.requests()):
        peer.respond(sid)
    assert peer.conn.closed and peer.server_closed  # GOAWAY once its last stream ended
    assert m.cluster("svc").stats.upstream_cx_max_requests == 1


def test_idle_connection_closes_with_goaway_after_idle_timeout() -> None:
    m = mesh(dr("{idleTimeout: 5s}"))
    ep = endpoint(m)
    m.request("svc", "/a")
    peer = connect(m, ep)
    (sid,) = peer.requests()
    m.loop.advance(4.0)
    peer.respond(sid)  # idle from now
    m.loop.advance(4.0)
    assert not peer.conn.closed
    m.request("svc", "/b")  # busy again: the idle clock restarts after it
    peer.pump()
    sid_b = max(peer.requests())
    m.loop.advance(3.0)
    peer.respond(sid_b)
    m.loop.advance(4.9)
    assert not peer.conn.closed
    m.loop.advance(0.2)
    peer.pump()
    assert peer.conn.closed and peer.server_closed
    s = m.cluster("svc").stats
    assert (s.upstream_cx_idle_timeout, s.upstream_cx_active) == (1, 0)


def test_goaway_refuses_streams_above_last_stream_id_and_they_are_retried() -> None:
    m = mesh()  # the mesh default retry policy includes refused-stream
    ep = endpoint(m)
    a = m.request("svc", "/a")
    b = m.request("svc", "/b")
    peer = connect(m, ep)
    sids = sorted(peer.requests())
    # The server's GOAWAY, written by hand: the h2 library's own server
    # could not answer /a after sending one.
    goaway = hyperframe.frame.GoAwayFrame(0)
    goaway.last_stream_id = sids[0]
    peer.conn.data_received(goaway.serialize())
    m.loop.run_ready()
    peer.pump()
    # /b was above the last stream id: refused, retried on a new connection
    assert not peer.conn.closed and peer.conn.draining
    m.loop.advance(1.0)  # (the retry's back-off)
    assert len(m.loop.connects) == 1
    peer2 = connect(m, ep)
    assert [h[b":path"] for h in peer2.requests().values()] == [b"/b"]
    peer2.respond(next(iter(peer2.requests())), body=b"second")
    assert b[1].status == 200 and b[1].body == b"second"
    # /a, below it, is answered on the draining connection, which then closes
    peer.server.send_headers(sids[0], [(b":status", b"200")], end_stream=True)
    peer.pump()
    assert a[1].status == 200
    assert peer.conn.closed
    s = m.cluster("svc").stats
    assert (s.upstream_rq_retry, s.upstream_cx_total) == (1, 2)


def test_refused_stream_is_retried_and_other_resets_are_503_ur() -> None:
    m = mesh()
    ep = endpoint(m)
    refused = m.request("svc", "/refused")
    peer = connect(m, ep)
    (sid,) = peer.requests()
    peer.server.reset_stream(sid, ErrorCodes.REFUSED_STREAM)
    peer.pump()
    m.loop.advance(1.0)
    peer.pump()
    (sid2,) = [s for s in peer.requests() if s != sid]  # a new stream on the same connection
    peer.respond(sid2)
    assert refused[1].status == 200
    cancelled = m.request("svc", "/cancelled")
    peer.pump()
    sid3 = max(peer.requests())
    peer.server.reset_stream(sid3, ErrorCodes.CANCEL)
    peer.pump()
    m.loop.advance(1.0)
    assert cancelled[1].status == 503
    assert b"reset reason: remote reset" in cancelled[1].body
    assert cancelled[0].flag_string == "UR"


def test_slow_client_stops_acknowledging_only_its_own_stream() -> None:
    m = mesh()
    ep = endpoint(m)
    slow_ex, slow = m.request("svc", "/slow")
    _fast_ex, fast = m.request("svc", "/fast")
    peer = connect(m, ep)
    by_path = {h[b":path"]: sid for sid, h in peer.requests().items()}
    s_slow, s_fast = by_path[b"/slow"], by_path[b"/fast"]
    slow_ex.on_downstream_write_paused()  # its client stopped reading
    chunk = b"x" * 16384
    for sid in (s_slow, s_fast):
        peer.server.send_headers(sid, [(b":status", b"200")])
    sent = {s_slow: 0, s_fast: 0}
    for _ in range(80):  # 1.25 MiB offered to each
        for sid in (s_slow, s_fast):
            if peer.server.local_flow_control_window(sid) >= len(chunk):
                peer.server.send_data(sid, chunk)
                sent[sid] += len(chunk)
        peer.pump()
    assert sent[s_slow] <= STREAM_WINDOW  # held at its window: nothing acknowledged
    assert sent[s_fast] == 80 * len(chunk)  # the other stream was not stalled
    assert fast.body.count(b"x") == sent[s_fast]
    slow_ex.on_downstream_write_resumed()
    peer.pump()
    assert peer.server.local_flow_control_window(s_slow) > 0.4 * STREAM_WINDOW  # handed back on resume
    assert slow.body.count(b"x") == sent[s_slow]


def test_response_trailers_reach_an_http2_client_and_not_an_http1_one() -> None:
    from pyproxy.http.h2downstream import H2Stream

    m = mesh()
    ep = endpoint(m)
    # An HTTP/1.1 client: chunked body, trailers dropped.
    _ex1, down1 = m.request("svc", "/h1")
    peer = connect(m, ep)
    (sid,) = peer.requests()
    peer.respond(sid, body=b"data", trailers=[(b"grpc-status", b"0")])
    assert down1.status == 200
    assert bytes(down1.out).endswith(b"4\r\ndata\r\n0\r\n\r\n")
    assert b"grpc-status" not in bytes(down1.out)
    # An HTTP/2 client ("2"): the last chunk carries them as trailer fields,
    # which its H2Stream sends as a trailers frame.
    down2 = FakeDownstream(m.worker)
    ex2 = Exchange(down2, b"POST", b"/h2", [(b"host", b"svc"), (b"content-length", b"0")], "2", True, False)  # type: ignore[arg-type]
    ex2.on_request_complete()
    peer.pump()
    sid2 = max(peer.requests())
    peer.respond(sid2, body=b"data", trailers=[(b"grpc-status", b"7"), (b"grpc-message", b"no")])
    assert bytes(down2.out).endswith(b"4\r\ndata\r\n0\r\ngrpc-status: 7\r\ngrpc-message: no\r\n\r\n")
    assert H2Stream  # (its parsing of those bytes is covered by test_h2_upstream's h2 client)


def test_request_trailers_of_an_http2_client_reach_an_http2_upstream() -> None:
    m = mesh()
    ep = endpoint(m)
    down = FakeDownstream(m.worker)
    down.request_trailers = [(b"x-checksum", b"abc")]  # type: ignore[attr-defined]  # (H2Stream's field)
    ex = Exchange(down, b"POST", b"/up", [(b"host", b"svc"), (b"transfer-encoding", b"chunked")],  # type: ignore[arg-type]
                  "2", True, False)
    ex.start()
    ex.on_request_body(b"part1")
    peer = connect(m, ep)
    ex.on_request_body(b"part2")
    ex.on_request_complete()
    peer.pump()
    (sid,) = peer.requests()
    got = [e for e in peer.events if getattr(e, "stream_id", None) == sid]
    assert b"".join(e.data for e in got if isinstance(e, h2.events.DataReceived)) == b"part1part2"
    (trailers,) = [e for e in got if isinstance(e, h2.events.TrailersReceived)]
    assert trailers.headers == [(b"x-checksum", b"abc")]
    assert any(isinstance(e, h2.events.StreamEnded) for e in got)
    assert b"transfer-encoding" not in peer.requests()[sid]


def test_grpc_status_in_response_headers_feeds_outlier_detection() -> None:
    od = ("apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: svc}\n"
          "spec:\n  host: svc\n  trafficPolicy:\n    outlierDetection: {consecutive5xxErrors: 5, interval: 10s}\n")
    vs = ("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: svc}\nspec:\n  hosts: [svc]\n"
          "  http:\n  - route: [{destination: {host: svc}}]\n    retries: {attempts: 0}\n")
    m = mesh(od, vs)
    ep = endpoint(m)

    def grpc_call(headers: list[tuple[bytes, bytes]], trailers: list[tuple[bytes, bytes]] | None) -> None:
        down = FakeDownstream(m.worker)
        ex = Exchange(down, b"POST", b"/pkg.S/M", [(b"host", b"svc"), (b"content-type", b"application/grpc"),  # type: ignore[arg-type]
                                                   (b"content-length", b"5")], "1.1", True, False)
        ex.start()
        ex.on_request_body(b"\0\0\0\0\0")
        ex.on_request_complete()
        peer = peers[0] if peers else connect(m, ep)
        if not peers:
            peers.append(peer)
        peer.pump()
        sid = max(peer.requests())
        peer.server.send_headers(sid, [(b":status", b"200"), (b"content-type", b"application/grpc"), *headers],
                                 end_stream=trailers is None)
        if trailers is not None:
            peer.server.send_data(sid, b"\0\0\0\0\0")
            peer.server.send_headers(sid, trailers, end_stream=True)
        peer.pump()
        assert down.status == 200

    peers: list[Peer] = []
    # Trailers-only UNAVAILABLE: Envoy counts it as a 503.
    grpc_call([(b"grpc-status", b"14")], None)
    assert (ep.consecutive_5xx, ep.consecutive_gateway) == (1, 1)
    grpc_call([(b"grpc-status", b"13")], None)  # INTERNAL -> 500
    assert (ep.consecutive_5xx, ep.consecutive_gateway) == (2, 0)
    # UNAVAILABLE in trailers after a body: not seen by outlier detection (HTTP 200 resets).
    grpc_call([], [(b"grpc-status", b"14")])
    assert (ep.consecutive_5xx, ep.consecutive_gateway) == (0, 0)


def test_inbound_protocol_from_the_service_port_of_this_workload() -> None:
    import random

    from pyproxy.config.loader import load_text
    from pyproxy.snapshot import BuildContext, ProxyIdentity, build_snapshot
    from tests.unit.fakes import FakeLoop

    def inbound(protocol: str | None, labels: str = "{app: echo}") -> str:
        port = "{number: 9080, name: p" + (f", protocol: {protocol}" if protocol is not None else "") + "}"
        loaded = load_text(f"""apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: echo}}
spec:
  hosts: [echo]
  ports: [{port}]
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1, ports: {{p: 7000}}, labels: {labels}}}]
""", "mesh.yaml")
        assert loaded.ok, [str(e) for e in loaded.errors]
        loop = FakeLoop()
        ident = ProxyIdentity(labels=(("app", "echo"), ("version", "v1")), app_port=7000)
        snap = build_snapshot(loaded, ident, BuildContext(loop, random.Random(1), None, loop.time))  # type: ignore[arg-type]
        return snap.inbound_cluster.settings.upstream_protocol

    assert inbound("GRPC") == H2
    assert inbound("HTTP2") == H2
    assert inbound("HTTP") == HTTP1
    assert inbound(None) == DOWNSTREAM  # sniffed: the client's protocol
    assert inbound("GRPC", labels="{app: other}") == HTTP1  # not this workload's endpoint


def test_per_try_timeout_cancels_the_stream_and_retries_on_a_new_one() -> None:
    vs = ("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: svc}\nspec:\n  hosts: [svc]\n"
          "  http:\n  - route: [{destination: {host: svc}}]\n"
          "    retries: {attempts: 2, perTryTimeout: 1s, retryOn: reset}\n")
    m = mesh(vs)
    ep = endpoint(m)
    ex, down = m.request("svc", "/slow")
    peer = connect(m, ep)
    (first,) = peer.requests()
    m.loop.advance(1.0)  # the per-try timeout
    peer.pump()
    resets = [e for e in peer.events if isinstance(e, h2.events.StreamReset)]
    assert [(r.stream_id, r.error_code) for r in resets] == [(first, ErrorCodes.CANCEL)]
    m.loop.advance(0.5)  # the back-off
    peer.pump()
    (second,) = [sid for sid in peer.requests() if sid != first]
    assert second > first  # a new stream, on the same connection
    peer.respond(second, body=b"late but fine")
    assert down.status == 200 and down.body == b"late but fine"
    s = m.cluster("svc").stats
    assert (s.upstream_rq_per_try_timeout, s.upstream_rq_retry, s.upstream_cx_total) == (1, 1, 1)
    assert ex.finished and not peer.conn.streams


def test_an_upstream_that_does_not_read_its_acknowledgements_is_cut(monkeypatch: Any) -> None:
    from pyproxy.upstream import h2pool

    monkeypatch.setattr(h2pool, "MAX_UNREAD_OUTPUT", 64 << 10)  # (8 MiB: the same, 130 times longer)
    # (The PING budget would end this flood first; its own test is
    # tests/integration/test_h2_upstream_hostile.py.)
    monkeypatch.setattr(h2pool, "CONTROL_BURST", 10 ** 9)
    m = mesh()
    ep = endpoint(m)
    ex, down = m.request("svc", "/x")
    peer = connect(m, ep)
    ping = hyperframe.frame.PingFrame(0)
    ping.opaque_data = b"12345678"
    flood = ping.serialize() * 1000  # 17 bytes of PING ACK each
    peer.transport.written.clear()
    for _ in range(600):  # the peer never reads: the ACKs pile up past the bound
        if peer.conn.closed:
            break
        peer.conn.data_received(flood)
    assert peer.conn.closed
    m.loop.run_ready()
    assert m.cluster("svc").stats.upstream_cx_protocol_error == 1
    assert down.status == 503 and ex.flag_string == "UC"  # its stream was reset with the connection


def test_a_replaced_cluster_drains_its_http2_connections() -> None:
    m = mesh()
    ep = endpoint(m)
    cluster = m.cluster("svc")
    _ex, down = m.request("svc", "/in-flight")
    peer = connect(m, ep)
    (sid,) = peer.requests()
    cluster.drain()  # a reload replaced it: no new streams on its connections
    assert not peer.conn.closed and peer.conn.draining
    peer.respond(sid, body=b"finished")
    assert down.status == 200 and down.body == b"finished"
    assert peer.conn.closed and peer.server_closed  # GOAWAY once its last stream ended
    assert cluster.stats.upstream_cx_active == 0
