"""gRPC through two pyproxy sidecars, as in a mesh: a grpcio client ->
client sidecar (outbound, h2c in) -> ISTIO_MUTUAL with ALPN istio-h2 ->
server sidecar (STRICT inbound, ALPN h2) -> h2c to a grpcio server. Call
shapes, status codes, deadline, cancellation, and the Istio metrics both
sidecars report, read from /stats/prometheus with prometheus-client's
parser: request_protocol, grpc_response_status (from trailers and from
trailers-only responses) and the message counters. Then a config reload of
both sidecars under gRPC load, with no failed call."""

from __future__ import annotations

import concurrent.futures
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pyproxy.security.ca import init_ca, issue_to_dir
from tests.harness import Proxy, http_get, running_proxy
from tests.integration.test_h2_upstream import EchoServer, channel, m

CLIENT_URI = "spiffe://cluster.local/ns/default/sa/client"
ECHO_URI = "spiffe://cluster.local/ns/default/sa/echo"

STRICT = """---
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


def vs(tag: str) -> str:
    return f"""apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: echo, namespace: default}}
spec:
  hosts: [echo]
  http:
  - route: [{{destination: {{host: echo}}}}]
    headers: {{response: {{set: {{x-config: "{tag}"}}}}}}
"""


@pytest.fixture(scope="module")
def creds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("grpc-mesh")
    init_ca(base / "ca")
    for sa in ("client", "echo"):
        issue_to_dir(base / "ca", base / sa, "default", sa)
    return {"client": base / "client", "echo": base / "echo"}


def scrape(px: Proxy) -> list[Any]:
    status, body = http_get(px.stats_url + "/stats/prometheus")
    assert status == 200
    return [s for f in text_string_to_metric_families(body.decode()) for s in f.samples]


def grpc_requests(samples: list[Any]) -> dict[str, float]:
    """istio_requests_total of gRPC calls by grpc_response_status."""
    out: dict[str, float] = {}
    for s in samples:
        if s.name == "istio_requests_total" and s.labels["request_protocol"] == "grpc":
            out[s.labels["grpc_response_status"]] = out.get(s.labels["grpc_response_status"], 0) + s.value
    return out


def messages(samples: list[Any]) -> tuple[float, float]:
    req = sum(s.value for s in samples if s.name == "istio_request_messages_total")
    resp = sum(s.value for s in samples if s.name == "istio_response_messages_total")
    return req, resp


def test_grpc_through_two_sidecars_with_istio_metrics(creds: dict[str, Path]) -> None:
    with EchoServer() as srv:
        with running_proxy({"10-se.yaml": entry(srv.port), "20-pa.yaml": STRICT}, app_port=srv.port,
                           args=["--certs", str(creds["echo"]), "--labels", "app=echo,version=v1"]) as server, \
                running_proxy({"10-se.yaml": entry(server.inbound)},
                              args=["--certs", str(creds["client"]), "--labels", "app=client"]) as client, \
                channel(client) as ch:
            # Phase 1: calls whose messages are all known.
            for i in range(3):  # unary: 1 message each way, grpc-status 0 in trailers after the body
                assert m(ch, "Unary")(b"u%d" % i, timeout=10) == b"echo:u%d" % i
            assert list(m(ch, "ServerStream", "unary_stream")(b"5", timeout=10)) == [b"msg-%d" % i for i in range(5)]
            assert m(ch, "ClientStream", "stream_unary")(iter([b"a", b"b", b"c", b"d"]), timeout=10) == b"a|b|c|d"
            assert list(m(ch, "Bidi", "stream_stream")(iter([b"x", b"y", b"z"]), timeout=10)) == [b"X", b"Y", b"Z"]
            with pytest.raises(grpc.RpcError) as err:  # an error status: a trailers-only response
                m(ch, "Fail")(b"f", timeout=10)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            # (the grpcio server may send the statuses a moment after the
            # client has them: the sidecars record a call when it ends)
            deadline = time.monotonic() + 10
            while True:
                client_samples, server_samples = scrape(client), scrape(server)
                if sum(grpc_requests(server_samples).values()) >= 7 and sum(grpc_requests(client_samples).values()) >= 7:
                    break
                assert time.monotonic() < deadline, (grpc_requests(client_samples), grpc_requests(server_samples))
                time.sleep(0.1)
            for samples in (client_samples, server_samples):
                assert grpc_requests(samples) == {"0": 6, "5": 1}
                # requests: 3 + 1 + 4 + 3 + 1; responses: 3 + 5 + 1 + 3 + 0
                assert messages(samples) == (12, 12)
                assert not [s for s in samples if s.name == "istio_requests_total"
                            and s.labels["request_protocol"] != "grpc"]
            (src,) = {s.labels["reporter"]: s for s in client_samples
                      if s.name == "istio_request_messages_total"}.values()
            assert src.labels["reporter"] == "source" and src.labels["destination_principal"] == ECHO_URI
            assert src.labels["source_principal"] == CLIENT_URI and src.labels["destination_service_name"] == "echo"
            dst = next(s for s in server_samples if s.name == "istio_requests_total"
                       and s.labels["grpc_response_status"] == "5")
            assert dst.labels["reporter"] == "destination" and dst.labels["connection_security_policy"] == "mutual_tls"
            assert dst.labels["source_principal"] == CLIENT_URI and dst.labels["response_code"] == "200"

            # Phase 2: deadline and cancellation.
            with pytest.raises(grpc.RpcError) as err:
                m(ch, "Slow")(b"", timeout=0.3)
            # The sidecars' grpc-timeout (UT -> 14) or the client's own deadline, whichever is first.
            assert err.value.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)
            stream = m(ch, "Forever", "unary_stream")(b"", timeout=30)
            assert next(stream) == b"tick-0"
            stream.cancel()
            assert srv.cancelled.wait(10)
            assert m(ch, "Unary")(b"after", timeout=10) == b"echo:after"
            deadline = time.monotonic() + 10
            while sum(grpc_requests(scrape(client)).values()) < 10:
                assert time.monotonic() < deadline, grpc_requests(scrape(client))
                time.sleep(0.1)
            got = grpc_requests(scrape(client))
            # The cancelled stream had its headers (200) and no grpc-status:
            # 2, Envoy's httpToGrpcStatus(200). The slow call: 14 from a
            # sidecar's timeout, or "" when the client gave up first (no response).
            assert got["0"] == 7 and got["5"] == 1 and got["2"] == 1 and sum(got.values()) == 10, got
            assert set(got) <= {"0", "5", "2", "14", ""}, got
            client_stats = http_get(client.admin_url + "/stats")[1].decode()
            server_stats = http_get(server.admin_url + "/stats")[1].decode()
    # One mTLS connection between the sidecars, negotiated as h2.
    assert "ssl.handshake: 1" in client_stats and "ssl.handshake: 1" in server_stats
    assert "http.downstream_cx_http2_total: 1" in server_stats, server_stats


def test_reload_under_grpc_load_fails_no_call(creds: dict[str, Path]) -> None:
    calls = 400
    with EchoServer() as srv:
        with running_proxy({"10-se.yaml": entry(srv.port), "20-pa.yaml": STRICT, "30-vs.yaml": vs("0")},
                           app_port=srv.port, args=["--certs", str(creds["echo"]), "--labels", "app=echo"]) as server, \
                running_proxy({"10-se.yaml": entry(server.inbound), "30-vs.yaml": vs("0")},
                              args=["--certs", str(creds["client"]), "--labels", "app=client"]) as client, \
                channel(client) as ch:
            failures: list[str] = []
            done = threading.Event()
            seen_tags: set[str] = set()

            def one(i: int) -> None:
                try:
                    if i % 4 == 3:
                        got = list(m(ch, "ServerStream", "unary_stream")(b"3", timeout=15))
                        assert got == [b"msg-0", b"msg-1", b"msg-2"], got
                        return
                    resp, call = m(ch, "Unary").with_call(b"%d" % i, timeout=15)
                    assert resp == b"echo:%d" % i, resp
                    seen_tags.update(v for k, v in call.initial_metadata() if k == "x-config")
                except Exception as exc:  # noqa: BLE001  (every failure is collected and reported)
                    failures.append(f"{i}: {exc!r}")

            def reloads() -> int:
                n = 0
                for tag in ("1", "2", "3"):
                    time.sleep(0.15)
                    for px in (client, server):
                        px.write_config("30-vs.yaml", vs(tag))
                        result = px.reload()
                        assert result["http_status"] == 200, result
                        n += 1
                done.set()
                return n

            with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
                reloader = pool.submit(reloads)
                list(pool.map(one, range(calls)))
                assert reloader.result(timeout=60) == 6
            assert done.is_set()
            assert failures == [], failures[:5]
            final = m(ch, "Unary").with_call(b"last", timeout=10)[1]
            assert ("x-config", "3") in final.initial_metadata()
            client_stats = http_get(client.admin_url + "/stats")[1].decode()
    # The calls ran across the reloads (more than one config answered).
    assert len(seen_tags) >= 2, seen_tags
    assert "pyproxy.config_reloads.success: 3" in client_stats, client_stats
