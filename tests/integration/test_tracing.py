"""Tracing: W3C and B3 in and out, one server span per request and one
client span per attempt, exported with the OpenTelemetry SDK.

In-process tests run a real ``Worker`` (real sockets) in the test's event
loop with an in-memory span exporter; end-to-end tests run two sidecar
processes exporting over OTLP/HTTP to a tiny collector that decodes the
protobuf with opentelemetry-proto."""

from __future__ import annotations

import asyncio
import gzip
import random
from pathlib import Path
from typing import Any, Self

import aiohttp
from aiohttp import web
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from pyproxy.observability import build_observer
from pyproxy.options import Address, RunOptions, parse_labels
from pyproxy.worker import Worker
from tests.harness import Upstream, running_proxy, service_entry
from tests.integration.obs_helpers import wait_for

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


class InProcessProxy:
    """A Worker in this event loop, exporting spans to memory."""

    def __init__(
        self,
        config: Path,
        app_port: int = 9,
        tracing: str = "on",
        sampling: float = 1.0,
        labels: str = "app=productpage,version=v1",
    ) -> None:
        self.exporter = InMemorySpanExporter()
        self.options = RunOptions(
            config=(str(config),),
            labels=parse_labels(labels),
            outbound=Address("127.0.0.1", 0),
            inbound=Address("127.0.0.1", 0),
            app=Address("127.0.0.1", app_port),
            tracing=tracing,
            trace_sampling=sampling,
            watch_interval=0,
            seed=7,
        )
        self.worker: Worker | None = None

    async def __aenter__(self) -> Self:
        loop = asyncio.get_running_loop()
        exporter = self.exporter
        self.worker = Worker(
            self.options,
            loop,
            rng=random.Random(7),
            observer_factory=lambda w: build_observer(w, processor=SimpleSpanProcessor(exporter)),
        )
        await self.worker.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.worker is not None
        await self.worker.stop()

    @property
    def outbound_url(self) -> str:
        assert self.worker is not None
        return f"http://127.0.0.1:{self.worker.listeners[0].port}"

    @property
    def inbound_url(self) -> str:
        assert self.worker is not None
        return f"http://127.0.0.1:{self.worker.listeners[1].port}"

    def spans(self) -> list:
        return list(self.exporter.get_finished_spans())


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "mesh.yaml"
    p.write_text(text)
    return p


def traceparent_of(headers: dict[str, str]) -> tuple[str, str, str]:
    version, trace, span, flags = headers["traceparent"].split("-")
    assert version == "00"
    return trace, span, flags


async def test_w3c_in_and_out_with_server_and_client_spans(tmp_path: Path) -> None:
    async with Upstream("reviews") as up:
        cfg = write(tmp_path, service_entry("reviews", [(up.port, {"app": "reviews"})]))
        async with InProcessProxy(cfg) as px, aiohttp.ClientSession() as s:
            async with s.get(
                px.outbound_url + "/reviews/0?x=1",
                headers={
                    "Host": "reviews",
                    "traceparent": f"00-{TRACE}-{PARENT}-01",
                    "tracestate": "congo=t61rcWkgMzE",
                    "x-request-id": "req-1",
                    "user-agent": "test-agent",
                },
            ) as r:
                assert r.status == 200
            spans = px.spans()
    seen = up.seen[0].headers
    trace, span, flags = traceparent_of(seen)
    assert trace == TRACE and flags == "01"
    assert seen["tracestate"] == "congo=t61rcWkgMzE"  # passed on unchanged
    assert seen["x-b3-traceid"] == TRACE and seen["x-b3-spanid"] == span and seen["x-b3-sampled"] == "1"
    assert "b3" not in seen  # single-header B3 only when it came in that way
    server = [sp for sp in spans if sp.kind == SpanKind.SERVER]
    client = [sp for sp in spans if sp.kind == SpanKind.CLIENT]
    assert len(server) == 1 and len(client) == 1
    srv, cli = server[0], client[0]
    assert srv.context.trace_id == cli.context.trace_id == int(TRACE, 16)
    assert srv.parent.span_id == int(PARENT, 16)
    assert cli.parent.span_id == srv.context.span_id
    assert f"{cli.context.span_id:016x}" == span  # the app's parent is the proxy's client span
    assert seen["x-b3-parentspanid"] == f"{srv.context.span_id:016x}"
    assert srv.attributes["http.request.method"] == "GET"
    assert srv.attributes["url.path"] == "/reviews/0" and srv.attributes["url.query"] == "x=1"
    assert srv.attributes["http.response.status_code"] == 200
    assert srv.attributes["guid:x-request-id"] == "req-1"
    assert srv.attributes["user_agent.original"] == "test-agent"
    assert srv.attributes["upstream_cluster"] == "outbound|9080||reviews.default.svc.cluster.local"
    assert srv.attributes["response_flags"] == "-"
    assert cli.attributes["upstream_address"] == f"127.0.0.1:{up.port}"
    assert cli.attributes["pyproxy.attempt"] == 1 and cli.attributes["http.response.status_code"] == 200
    assert srv.start_time <= cli.start_time <= cli.end_time <= srv.end_time
    assert srv.resource.attributes["service.name"] == "productpage.default"


async def test_one_client_span_per_attempt(tmp_path: Path) -> None:
    calls = []

    async def flaky(request: web.Request) -> web.Response:
        calls.append(request.headers.get("x-b3-spanid"))
        return web.Response(status=503 if len(calls) == 1 else 200, text="x")

    async with Upstream("flaky", handler=flaky) as up:
        cfg = write(
            tmp_path,
            service_entry("svc", [(up.port, {})])
            + """---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: svc}
spec:
  hosts: [svc]
  http:
  - route: [{destination: {host: svc}}]
    retries: {attempts: 3, retryOn: 5xx, perTryTimeout: 2s}
""",
        )
        async with InProcessProxy(cfg) as px, aiohttp.ClientSession() as s:
            async with s.get(px.outbound_url + "/", headers={"Host": "svc"}) as r:
                assert r.status == 200
            spans = px.spans()
    client = sorted(
        (sp for sp in spans if sp.kind == SpanKind.CLIENT), key=lambda sp: sp.attributes["pyproxy.attempt"]
    )
    assert [sp.attributes["pyproxy.attempt"] for sp in client] == [1, 2]
    assert [sp.attributes["http.response.status_code"] for sp in client] == [503, 200]
    # each attempt carried its own span id upstream
    assert calls == [f"{client[0].context.span_id:016x}", f"{client[1].context.span_id:016x}"]
    assert client[0].status.status_code.name == "ERROR"
    server = [sp for sp in spans if sp.kind == SpanKind.SERVER]
    assert len(server) == 1 and server[0].parent is None  # a new trace starts here
    assert all(sp.parent.span_id == server[0].context.span_id for sp in client)


async def test_connect_failure_attempts_get_spans_with_their_flag(tmp_path: Path) -> None:
    cfg = write(tmp_path, service_entry("down", [(1, {})]))
    async with InProcessProxy(cfg) as px, aiohttp.ClientSession() as s:
        async with s.get(px.outbound_url + "/", headers={"Host": "down"}) as r:
            assert r.status == 503
        spans = px.spans()
    client = sorted(
        (sp for sp in spans if sp.kind == SpanKind.CLIENT), key=lambda sp: sp.attributes["pyproxy.attempt"]
    )
    assert len(client) == 3  # the mesh default: 2 retries on connect failure
    assert [sp.attributes["response_flags"] for sp in client] == ["UF", "UF", "URX,UF"]
    assert all(sp.attributes["http.response.status_code"] == 0 for sp in client)
    server = next(sp for sp in spans if sp.kind == SpanKind.SERVER)
    assert (
        server.attributes["response_flags"] == "URX,UF"
        and server.attributes["http.response.status_code"] == 503
    )


async def test_b3_multi_and_single_in_and_out(tmp_path: Path) -> None:
    async with Upstream() as up:
        cfg = write(tmp_path, service_entry("svc", [(up.port, {})]))
        async with InProcessProxy(cfg) as px, aiohttp.ClientSession() as s:
            async with s.get(
                px.outbound_url + "/",
                headers={
                    "Host": "svc",
                    "x-b3-traceid": "463ac35c9f6413ad",
                    "x-b3-spanid": "a2fb4a1d1a96d312",
                    "x-b3-sampled": "1",
                },
            ) as r:
                assert r.status == 200
            async with s.get(
                px.outbound_url + "/",
                headers={"Host": "svc", "b3": "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1"},
            ) as r:
                assert r.status == 200
            spans = px.spans()
    multi, single = up.seen[0].headers, up.seen[1].headers
    # 64-bit B3 trace ids stay 64-bit in B3 and are left-padded in traceparent
    assert multi["x-b3-traceid"] == "463ac35c9f6413ad"
    assert traceparent_of(multi)[0] == "0000000000000000463ac35c9f6413ad"
    assert multi["x-b3-spanid"] != "a2fb4a1d1a96d312" and multi["x-b3-sampled"] == "1"
    assert "b3" not in multi
    trace, span, flags = single["b3"].split("-")[:3]
    assert trace == "80f198ee56343ba864fe8b2a57d3eff7" and span != "e457b5a2e4d86bd1" and flags == "1"
    assert single["b3"].split("-")[3] == single["x-b3-parentspanid"]
    assert traceparent_of(single)[0] == trace
    servers = {sp.context.trace_id: sp for sp in spans if sp.kind == SpanKind.SERVER}
    assert servers[0x463AC35C9F6413AD].parent.span_id == 0xA2FB4A1D1A96D312
    assert servers[int(trace, 16)].parent.span_id == 0xE457B5A2E4D86BD1


async def test_sampling_decisions(tmp_path: Path) -> None:
    async with Upstream() as up:
        cfg = write(tmp_path, service_entry("svc", [(up.port, {})]))
        # ratio 0: no new trace is sampled, an incoming sampled=1 still is
        async with InProcessProxy(cfg, sampling=0.0) as px, aiohttp.ClientSession() as s:
            for _ in range(5):
                async with s.get(px.outbound_url + "/", headers={"Host": "svc"}) as r:
                    assert r.status == 200
            async with s.get(
                px.outbound_url + "/", headers={"Host": "svc", "traceparent": f"00-{TRACE}-{PARENT}-01"}
            ) as r:
                assert r.status == 200
            async with s.get(px.outbound_url + "/", headers={"Host": "svc", "x-b3-sampled": "0"}) as r:
                assert r.status == 200
            spans = px.spans()
    assert {sp.context.trace_id for sp in spans} == {int(TRACE, 16)}
    unsampled = up.seen[:5] + [up.seen[6]]
    for seen in unsampled:
        trace, _, flags = traceparent_of(seen.headers)
        assert flags == "00" and seen.headers["x-b3-sampled"] == "0"  # the decision travels on
        assert len(trace) == 32 and trace != "0" * 32
    assert len({traceparent_of(seen.headers)[0] for seen in unsampled}) == 6  # new trace each time
    assert traceparent_of(up.seen[5].headers)[2] == "01"


async def test_tracing_off_passes_headers_through_unchanged(tmp_path: Path) -> None:
    async with Upstream() as up:
        cfg = write(tmp_path, service_entry("svc", [(up.port, {})]))
        async with InProcessProxy(cfg, tracing="off") as px, aiohttp.ClientSession() as s:
            async with s.get(
                px.outbound_url + "/",
                headers={"Host": "svc", "traceparent": f"00-{TRACE}-{PARENT}-01", "x-b3-spanid": PARENT},
            ) as r:
                assert r.status == 200
            async with s.get(px.outbound_url + "/", headers={"Host": "svc"}) as r:
                assert r.status == 200
            assert px.worker is not None and px.worker.observer.tracer is None
            spans = px.spans()
    assert spans == []
    assert up.seen[0].headers["traceparent"] == f"00-{TRACE}-{PARENT}-01"
    assert up.seen[0].headers["x-b3-spanid"] == PARENT
    assert "traceparent" not in up.seen[1].headers and "x-b3-traceid" not in up.seen[1].headers
    assert len(up.seen[1].headers["x-request-id"]) == 36  # the engine still generates it


# ---------------------------------------------------------------------------
# End to end: two sidecar processes, OTLP/HTTP to a test collector


class Collector:
    """Accepts OTLP/HTTP protobuf trace exports."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, Any]] = []  # (service.name, Span proto)
        self.requests = 0
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def handle(self, request: web.Request) -> web.Response:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
            ExportTraceServiceResponse,
        )

        body = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        assert request.headers["Content-Type"] == "application/x-protobuf"
        msg = ExportTraceServiceRequest()
        msg.ParseFromString(body)
        self.requests += 1
        for rs in msg.resource_spans:
            service = next(
                (a.value.string_value for a in rs.resource.attributes if a.key == "service.name"), ""
            )
            for ss in rs.scope_spans:
                assert ss.scope.name == "pyproxy"
                for sp in ss.spans:
                    self.spans.append((service, sp))
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(), content_type="application/x-protobuf"
        )

    async def __aenter__(self) -> Self:
        app = web.Application()
        app.router.add_post("/v1/traces", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


def attrs(span: Any) -> dict[str, Any]:
    out = {}
    for a in span.attributes:
        v = a.value
        out[a.key] = v.string_value if v.HasField("string_value") else v.int_value
    return out


async def test_trace_continues_across_two_sidecars_and_is_exported_over_otlp() -> None:
    async with Collector() as collector, Upstream("reviews-app") as app:
        env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{collector.port}",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        }
        mesh = service_entry("reviews", [(app.port, {"app": "reviews"})])
        with running_proxy(
            mesh, app_port=app.port, env=env, args=["--labels", "app=reviews,version=v2"]
        ) as server:
            client_mesh = service_entry("reviews", [(server.inbound, {"app": "reviews"})])
            with running_proxy(
                client_mesh, env=env, args=["--labels", "app=productpage,version=v1"]
            ) as client:
                async with aiohttp.ClientSession() as s:
                    async with s.get(
                        client.outbound_url + "/reviews/1",
                        headers={"Host": "reviews", "traceparent": f"00-{TRACE}-{PARENT}-01"},
                    ) as r:
                        assert r.status == 200
                await wait_for(lambda: len(collector.spans) >= 4, timeout=15, what="4 spans at the collector")
    seen = app.seen[0].headers
    trace, app_parent, _ = traceparent_of(seen)
    assert trace == TRACE
    by_id = {sp.span_id.hex(): (svc, sp) for svc, sp in collector.spans}
    assert len(by_id) == 4
    assert {sp.trace_id.hex() for _, sp in collector.spans} == {TRACE}
    # Walk the chain from the app's parent back to the caller's span.
    svc, c2 = by_id[app_parent]
    assert svc == "reviews.default" and c2.kind == c2.SPAN_KIND_CLIENT
    svc, s2 = by_id[c2.parent_span_id.hex()]
    assert svc == "reviews.default" and s2.kind == s2.SPAN_KIND_SERVER
    assert attrs(s2)["pyproxy.direction"] == "inbound"
    svc, c1 = by_id[s2.parent_span_id.hex()]
    assert svc == "productpage.default" and c1.kind == c1.SPAN_KIND_CLIENT
    assert attrs(c1)["upstream_cluster"] == "outbound|9080||reviews.default.svc.cluster.local"
    svc, s1 = by_id[c1.parent_span_id.hex()]
    assert svc == "productpage.default" and s1.kind == s1.SPAN_KIND_SERVER
    assert s1.parent_span_id.hex() == PARENT
    assert attrs(s1)["http.response.status_code"] == 200 and attrs(s1)["url.path"] == "/reviews/1"
    assert s1.start_time_unix_nano <= c1.start_time_unix_nano <= s2.start_time_unix_nano
    assert s2.end_time_unix_nano <= c1.end_time_unix_nano <= s1.end_time_unix_nano
    assert collector.requests >= 1


async def test_no_otlp_endpoint_means_no_export_but_headers_continue() -> None:
    async with Upstream() as up:
        with running_proxy(
            service_entry("svc", [(up.port, {})]), env={"OTEL_EXPORTER_OTLP_ENDPOINT": ""}
        ) as px:
            async with aiohttp.ClientSession() as s:
                async with s.get(
                    px.outbound_url + "/", headers={"Host": "svc", "traceparent": f"00-{TRACE}-{PARENT}-01"}
                ) as r:
                    assert r.status == 200
            assert "exporting spans" not in px.log()
    trace, span, _ = traceparent_of(up.seen[0].headers)
    assert trace == TRACE and span != PARENT
