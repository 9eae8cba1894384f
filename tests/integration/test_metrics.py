"""Istio-standard metrics scraped over HTTP from real proxies and parsed
with prometheus-client's parser.

Two sidecars in a row, as in a mesh: the client app calls its sidecar's
outbound listener (reporter=source), which calls the server sidecar's
inbound listener (reporter=destination), which calls the server app. The
two sidecars learn each other's identity from the peer-metadata headers."""

from __future__ import annotations

import aiohttp
from aiohttp import web

from tests.harness import Upstream, http_get, running_proxy, service_entry
from tests.integration.obs_helpers import samples, scrape, value, wait_for

MESH_NS = "default"
BOUNDS = [
    "0.5",
    "1",
    "5",
    "10",
    "25",
    "50",
    "100",
    "250",
    "500",
    "1000",
    "2500",
    "5000",
    "10000",
    "30000",
    "60000",
    "300000",
    "600000",
    "1800000",
    "3600000",
    "+Inf",
]


def istio_labels(**kw: str) -> dict[str, str]:
    """Every label Istio puts on its request metrics, defaulted to what an
    unknown peer gets."""
    base = {
        "reporter": "source",
        "source_workload": "unknown",
        "source_canonical_service": "unknown",
        "source_canonical_revision": "latest",
        "source_workload_namespace": "unknown",
        "source_principal": "unknown",
        "source_app": "unknown",
        "source_version": "unknown",
        "source_cluster": "unknown",
        "destination_workload": "unknown",
        "destination_workload_namespace": "unknown",
        "destination_principal": "unknown",
        "destination_app": "unknown",
        "destination_version": "unknown",
        "destination_service": "unknown",
        "destination_canonical_service": "unknown",
        "destination_canonical_revision": "latest",
        "destination_service_name": "unknown",
        "destination_service_namespace": "unknown",
        "destination_cluster": "unknown",
        "request_protocol": "http",
        "response_code": "200",
        "grpc_response_status": "",
        "response_flags": "-",
        "connection_security_policy": "unknown",
    }
    base.update(kw)
    return base


def requests_total(fams: dict) -> list:
    return samples(fams, "istio_requests_total")


async def test_source_and_destination_reporters_across_two_sidecars() -> None:
    seen_app_headers: list[dict] = []

    async def app_handler(request: web.Request) -> web.Response:
        seen_app_headers.append({k.lower(): v for k, v in request.headers.items()})
        body = await request.read()
        return (
            web.Response(text="r" * 300, headers={"x-app": "reviews"})
            if body
            else web.Response(text="r" * 300)
        )

    async with Upstream("reviews-app", handler=app_handler) as app:
        mesh = service_entry("reviews", [(app.port, {"app": "reviews", "version": "v2"})])
        with running_proxy(
            mesh, app_port=app.port, args=["--workload", "reviews-v2", "--labels", "app=reviews,version=v2"]
        ) as server:
            client_mesh = service_entry("reviews", [(server.inbound, {"app": "reviews", "version": "v2"})])
            with running_proxy(client_mesh, args=["--labels", "app=productpage,version=v1"]) as client:
                async with aiohttp.ClientSession() as s:
                    for _ in range(3):
                        async with s.get(
                            client.outbound_url + "/reviews/0", headers={"Host": "reviews:9080"}
                        ) as r:
                            assert r.status == 200
                            assert (await r.read()) == b"r" * 300
                            # the caller's app never sees the metadata exchange
                            assert not [h for h in r.headers if "peer-metadata" in h.lower()]
                    async with s.post(
                        client.outbound_url + "/reviews/0", data=b"x" * 700, headers={"Host": "reviews:9080"}
                    ) as r:
                        assert r.status == 200
                        await r.read()

                src = scrape(client)
                dst = scrape(server)
    # The server app never sees the caller's metadata either.
    assert seen_app_headers and all("x-pyproxy-peer-metadata" not in h for h in seen_app_headers)

    expect_src = istio_labels(
        reporter="source",
        source_workload="productpage-v1",
        source_canonical_service="productpage",
        source_canonical_revision="v1",
        source_workload_namespace=MESH_NS,
        source_app="productpage",
        source_version="v1",
        destination_workload="reviews-v2",
        destination_workload_namespace=MESH_NS,
        destination_app="reviews",
        destination_version="v2",
        destination_service="reviews.default.svc.cluster.local",
        destination_canonical_service="reviews",
        destination_canonical_revision="v2",
        destination_service_name="reviews",
        destination_service_namespace=MESH_NS,
        connection_security_policy="unknown",
    )
    got = requests_total(src)
    assert [s.labels for s in got] == [expect_src], got
    assert got[0].value == 4

    expect_dst = dict(expect_src, reporter="destination", connection_security_policy="none")
    got = requests_total(dst)
    assert [s.labels for s in got] == [expect_dst], got
    assert got[0].value == 4

    # Histograms: Istio's (Envoy's default) buckets, cumulative, with _sum/_count.
    for fams in (src, dst):
        for name in ("istio_request_duration_milliseconds", "istio_request_bytes", "istio_response_bytes"):
            assert fams[name].type == "histogram"
            buckets = samples(fams, name + "_bucket")
            assert [b.labels["le"] for b in buckets] == BOUNDS
            counts = [b.value for b in buckets]
            assert counts == sorted(counts) and counts[-1] == 4
            assert value(fams, name + "_count") == 4
        rb = {b.labels["le"]: b.value for b in samples(fams, "istio_response_bytes_bucket")}
        assert rb["250"] == 0 and rb["500"] == 4  # 300-byte bodies
        assert value(fams, "istio_response_bytes_sum") == 1200
        qb = {b.labels["le"]: b.value for b in samples(fams, "istio_request_bytes_bucket")}
        assert qb["0.5"] == 3 and qb["500"] == 3 and qb["1000"] == 4  # three GETs, one 700-byte POST
        assert value(fams, "istio_request_bytes_sum") == 700
        d = {b.labels["le"]: b.value for b in samples(fams, "istio_request_duration_milliseconds_bucket")}
        assert d["+Inf"] == 4 and d["60000"] == 4
        assert 0 < value(fams, "istio_request_duration_milliseconds_sum") < 60000

    # Envoy-style cluster counters on each side.
    assert (
        value(
            src,
            "envoy_cluster_upstream_rq_total",
            cluster_name="outbound|9080||reviews.default.svc.cluster.local",
        )
        == 4
    )
    assert (
        value(
            src,
            "envoy_cluster_upstream_rq_completed_total",
            cluster_name="outbound|9080||reviews.default.svc.cluster.local",
        )
        == 4
    )
    assert value(dst, "envoy_cluster_upstream_rq_total", cluster_name=f"inbound|{app.port}||") == 4
    assert (
        value(
            src,
            "envoy_cluster_membership_healthy",
            cluster_name="outbound|9080||reviews.default.svc.cluster.local",
        )
        == 1
    )
    assert src["envoy_cluster_upstream_rq_active"].type == "gauge"
    assert value(src, "envoy_http_downstream_cx_total") >= 1


async def test_inbound_answers_peer_metadata_only_to_sidecars() -> None:
    from tests.harness import raw_request

    async with Upstream("app") as app:
        with running_proxy(
            service_entry("svc", [(app.port, {})]), app_port=app.port, args=["--labels", "app=svc,version=v1"]
        ) as px:
            plain = await raw_request(px.inbound, b"GET / HTTP/1.1\r\nHost: svc\r\n\r\n")
            from pyproxy.observability.peer import encode_peer, peer_from_labels

            meta = encode_peer(peer_from_labels("caller-v1", "default", (("app", "caller"),)))
            sidecar = await raw_request(
                px.inbound, b"GET / HTTP/1.1\r\nHost: svc\r\nx-pyproxy-peer-metadata: " + meta + b"\r\n\r\n"
            )
    assert plain.startswith(b"HTTP/1.1 200") and b"peer-metadata" not in plain.lower()
    head = sidecar.split(b"\r\n\r\n")[0].decode()
    assert "x-pyproxy-peer-metadata-id: sidecar~svc-v1.default" in head
    assert "peer-metadata" not in str(app.seen[1].headers)


async def test_destination_without_sidecar_is_named_from_the_registry() -> None:
    async with Upstream("ratings") as up:
        mesh = (
            service_entry("ratings", [(up.port, {"app": "ratings", "version": "v1"})], namespace="prod")
            + """---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ratings-vm, namespace: prod}
spec:
  hosts: [ratings-vm]
  ports: [{number: 9080, name: http, protocol: HTTP}]
  resolution: STATIC
  workloadSelector: {labels: {role: vm}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: ratings-vm-7, namespace: prod}
spec:
  address: 127.0.0.1
  ports: {http: %d}
  labels: {app: ratings, version: v9, role: vm}
"""
            % up.port
        )
        with running_proxy(
            mesh, args=["--labels", "app=productpage,version=v1", "--namespace", "prod"]
        ) as px:
            async with aiohttp.ClientSession() as s:
                for host in ("ratings", "ratings-vm") * 10:
                    async with s.get(px.outbound_url + "/ratings/1", headers={"Host": host}) as r:
                        assert r.status == 200
            fams = scrape(px)
    got = {s.labels["destination_workload"]: s for s in requests_total(fams)}
    # An inline endpoint has no name: Istio-style "app-version"; a WorkloadEntry is named by its metadata.
    assert set(got) == {"ratings-v1", "ratings-vm-7"}, got
    inline = got["ratings-v1"].labels
    assert inline == istio_labels(
        source_workload="productpage-v1",
        source_canonical_service="productpage",
        source_canonical_revision="v1",
        source_workload_namespace="prod",
        source_app="productpage",
        source_version="v1",
        destination_workload="ratings-v1",
        destination_workload_namespace="prod",
        destination_app="ratings",
        destination_version="v1",
        destination_service="ratings.prod.svc.cluster.local",
        destination_canonical_service="ratings",
        destination_canonical_revision="v1",
        destination_service_name="ratings",
        destination_service_namespace="prod",
    )
    vm = got["ratings-vm-7"].labels
    assert (
        vm["destination_app"],
        vm["destination_version"],
        vm["destination_canonical_revision"],
        vm["destination_service"],
    ) == ("ratings", "v9", "v9", "ratings-vm.prod.svc.cluster.local")
    assert got["ratings-v1"].value == 10 and got["ratings-vm-7"].value == 10


async def test_local_replies_carry_their_response_flags() -> None:
    cfg = (
        (
            service_entry("down", [(1, {"app": "down", "version": "v1"})])
            + "---\n"
            + service_entry("empty", [(1, {"version": "v1"})])
        )
        + """---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: empty}
spec:
  host: empty
  subsets:
  - {name: v2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: down}
spec:
  hosts: [down]
  http:
  - match: [{uri: {prefix: /nosubset}}]
    route: [{destination: {host: down, subset: missing}}]
  - match: [{uri: {prefix: /up}}]
    route: [{destination: {host: down}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: empty}
spec:
  hosts: [empty]
  http:
  - route: [{destination: {host: empty, subset: v2}}]
"""
    )
    with running_proxy(cfg) as px:
        async with aiohttp.ClientSession() as s:
            for path, host, status in (
                ("/nothing", "down", 404),
                ("/nosubset", "down", 503),
                ("/up", "down", 503),
                ("/", "empty", 503),
                ("/nothing", "down", 404),
            ):
                async with s.get(px.outbound_url + path, headers={"Host": host}) as r:
                    assert r.status == status, (path, host)
        fams = scrape(px)
    by_flag = {}
    for smp in requests_total(fams):
        by_flag[(smp.labels["response_flags"], smp.labels["response_code"])] = smp
    # The connect failure is retried by the mesh's default policy (2 retries), hence URX.
    assert set(by_flag) == {("NR", "404"), ("NC", "503"), ("URX,UF", "503"), ("UH", "503")}, by_flag
    assert by_flag[("NR", "404")].value == 2
    nr = by_flag[("NR", "404")].labels
    assert (
        nr["destination_service"] == "down.default.svc.cluster.local"
        and nr["destination_workload"] == "unknown"
    )
    uf = by_flag[("URX,UF", "503")].labels
    assert uf["destination_workload"] == "down-v1"  # the endpoint that refused the connection
    assert by_flag[("UH", "503")].labels["destination_service_name"] == "empty"
    assert (
        value(
            fams,
            "envoy_cluster_upstream_cx_connect_fail_total",
            cluster_name="outbound|9080||down.default.svc.cluster.local",
        )
        >= 1
    )


async def test_passthrough_and_admin_and_stats_ports_serve_the_same_metrics() -> None:
    async with Upstream("outside") as up:
        with running_proxy(service_entry("svc", [(1, {})])) as px:
            async with aiohttp.ClientSession() as s:
                async with s.get(f"http://127.0.0.1:{up.port}/x", proxy=px.outbound_url) as r:
                    assert r.status == 200
            fams = scrape(px)
            admin_fams = scrape(px, port=px.admin)
            status, text = http_get(px.admin_url + "/stats")
    got = requests_total(fams)
    assert len(got) == 1
    assert got[0].labels["destination_service_name"] == "PassthroughCluster"
    assert got[0].labels["destination_service"] == "127.0.0.1"
    assert [s.labels for s in requests_total(admin_fams)] == [got[0].labels]
    assert status == 200
    lines = dict(line.split(": ", 1) for line in text.decode().splitlines())
    assert lines["cluster.PassthroughCluster.upstream_rq_total"] == "1"
    assert lines["pyproxy.istio_requests_total"] == "1"


async def test_metric_children_are_bound_per_cluster_not_per_request() -> None:
    """Many requests with one outcome make exactly one series; the per-cluster
    cache is reused (observable: the series count stays 1 and counts add up)."""
    async with Upstream() as up:
        with running_proxy(service_entry("svc", [(up.port, {"app": "svc"})])) as px:
            async with aiohttp.ClientSession() as s:
                for _ in range(50):
                    async with s.get(px.outbound_url + "/", headers={"Host": "svc"}) as r:
                        assert r.status == 200

            async def counted() -> bool:
                got = requests_total(scrape(px))
                return len(got) == 1 and got[0].value == 50

            await wait_for(counted, timeout=5, what="50 requests in one series")
