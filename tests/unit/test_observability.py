"""Unit tests (no sockets) for the observability building blocks: trace
context parsing, peer metadata, metric series and state merging, access-log
formatting and escaping, the config stat signature and watcher, config_dump
JSON conversion."""

from __future__ import annotations

import asyncio
import base64
import json
import os
from types import SimpleNamespace

import pytest

from pyproxy.admin.server import jsonable, merge_clusters
from pyproxy.config.watch import ConfigWatcher, config_signature
from pyproxy.observability import accesslog
from pyproxy.observability.metrics import (
    BUCKETS,
    LE,
    Series,
    StateCollector,
    merge_states,
    render_prometheus,
    service_labels,
)
from pyproxy.observability.peer import (
    UNKNOWN_PEER,
    PeerCache,
    decode_peer,
    encode_peer,
    peer_from_labels,
    peer_header_lines,
)
from pyproxy.observability.tracing import extract, parse_b3_single, parse_traceparent

# -- trace context ----------------------------------------------------------------


def test_traceparent_valid_and_sampled_flag() -> None:
    ctx = parse_traceparent(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", b"vendor=x")
    assert ctx is not None
    assert ctx.trace_hex == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert ctx.parent == 0x00F067AA0BA902B7
    assert ctx.sampled is True
    assert ctx.tracestate == "vendor=x"
    assert parse_traceparent(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00").sampled is False


@pytest.mark.parametrize(
    "value",
    [
        b"00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # zero trace id
        b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",  # zero span id
        b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # forbidden version
        b"00-4bf92f3577b34da6a3ce929d0e0e47-00f067aa0ba902b7-01",  # short trace id
        b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",  # v00 has exactly 4 fields
        b"00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",  # not hex
        b"garbage",
    ],
)
def test_traceparent_invalid(value: bytes) -> None:
    assert parse_traceparent(value) is None


def test_b3_single_forms() -> None:
    ctx = parse_b3_single(b"80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90")
    assert ctx is not None and ctx.trace_hex == "80f198ee56343ba864fe8b2a57d3eff7"
    assert ctx.parent == 0xE457B5A2E4D86BD1 and ctx.sampled is True and ctx.b3_single
    ctx = parse_b3_single(b"463ac35c9f6413ad-463ac35c9f6413ad")  # 64-bit trace id, no decision
    assert ctx is not None and ctx.trace_hex == "463ac35c9f6413ad" and ctx.sampled is None
    ctx = parse_b3_single(b"0")  # decision only
    assert ctx is not None and ctx.trace_hex == "" and ctx.sampled is False
    assert parse_b3_single(b"d").sampled is True
    assert parse_b3_single(b"nonsense") is None


def test_extract_precedence_w3c_then_b3_single_then_multi() -> None:
    tp = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    hd = {
        b"traceparent": tp,
        b"b3": b"80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1",
        b"x-b3-traceid": b"463ac35c9f6413ad",
        b"x-b3-spanid": b"463ac35c9f6413ad",
    }
    assert extract(hd).trace_hex == "4bf92f3577b34da6a3ce929d0e0e4736"
    del hd[b"traceparent"]
    assert extract(hd).trace_hex == "80f198ee56343ba864fe8b2a57d3eff7"
    del hd[b"b3"]
    ctx = extract(hd)
    assert ctx.trace_hex == "463ac35c9f6413ad" and ctx.sampled is None
    hd[b"x-b3-flags"] = b"1"  # debug implies sampled
    assert extract(hd).sampled is True
    # an invalid traceparent falls back to B3
    hd[b"traceparent"] = b"junk"
    assert extract(hd).trace_hex == "463ac35c9f6413ad"
    assert extract({b"host": b"x"}) is None


def test_padded_64bit_b3_trace_id_stays_64bit_across_hops() -> None:
    hd = {
        b"traceparent": b"00-0000000000000000463ac35c9f6413ad-a2fb4a1d1a96d312-01",
        b"x-b3-traceid": b"463ac35c9f6413ad",
        b"x-b3-spanid": b"a2fb4a1d1a96d312",
    }
    assert extract(hd).trace_hex == "463ac35c9f6413ad"
    hd[b"x-b3-traceid"] = b"1111111111111111"  # a different trace: W3C wins as sent
    assert extract(hd).trace_hex == "0000000000000000463ac35c9f6413ad"


# -- peer metadata -------------------------------------------------------------------


def test_peer_identity_fallbacks_follow_istio() -> None:
    p = peer_from_labels("reviews-v2", "prod", (("app", "reviews"), ("version", "v2")))
    assert (p.workload, p.namespace, p.app, p.version) == ("reviews-v2", "prod", "reviews", "v2")
    assert (p.canonical_service, p.canonical_revision) == ("reviews", "v2")
    q = peer_from_labels("db", "default", {"service.istio.io/canonical-name": "database"})
    assert (q.app, q.version, q.canonical_service, q.canonical_revision) == (
        "unknown",
        "unknown",
        "database",
        "latest",
    )


def test_peer_metadata_round_trip_and_header_lines() -> None:
    p = peer_from_labels("reviews-v2", "default", (("app", "reviews"), ("version", "v2")))
    back = decode_peer(encode_peer(p))
    assert back is not None
    assert (back.workload, back.app, back.version, back.canonical_revision) == (
        "reviews-v2",
        "reviews",
        "v2",
        "v2",
    )
    assert dict(back.labels) == {"app": "reviews", "version": "v2"}
    lines = peer_header_lines(p)
    assert lines.startswith(b"x-pyproxy-peer-metadata: ")
    assert b"\r\nx-pyproxy-peer-metadata-id: sidecar~reviews-v2.default\r\n" in lines
    doc = json.loads(base64.b64decode(lines.split(b": ", 1)[1].split(b"\r\n")[0]))
    assert doc["workload"] == "reviews-v2"


@pytest.mark.parametrize(
    "value", [b"not base64!", base64.b64encode(b"[1,2]"), base64.b64encode(b"{bad json"), b"A" * 9000]
)
def test_peer_metadata_malformed_is_rejected(value: bytes) -> None:
    assert decode_peer(value) is None


def test_peer_metadata_non_string_fields_read_as_unknown() -> None:
    raw = base64.b64encode(json.dumps({"workload": 5, "app": "", "labels": {"a": 1, "b": "c"}}).encode())
    p = decode_peer(raw)
    assert p is not None and p.workload == "unknown" and p.app == "unknown" and dict(p.labels) == {"b": "c"}


def test_peer_cache_is_bounded() -> None:
    cache = PeerCache(limit=2)
    a = encode_peer(peer_from_labels("a", "ns", ()))
    b = encode_peer(peer_from_labels("b", "ns", ()))
    c = encode_peer(peer_from_labels("c", "ns", ()))
    assert cache.get(a).workload == "a"
    assert cache.get(a) is cache.get(a)  # decoded once
    assert cache.get(b).workload == "b"
    assert cache.get(c) is UNKNOWN_PEER  # over the limit: no new label values
    assert cache.rejected == 1
    assert cache.get(b"garbage") is UNKNOWN_PEER


# -- metrics ---------------------------------------------------------------------------


def test_series_buckets_are_le_inclusive() -> None:
    s = Series(("x",))
    s.record(0.5, 0, 1)  # exactly on a bound: counted in that bucket (le = less or equal)
    s.record(0.6, 1001, 100)
    s.record(4_000_000, 5, 10**10)  # beyond the last bound: +Inf
    assert s.count == 3
    assert s.dur[0] == 1 and s.dur[BUCKETS.index(1)] == 1 and s.dur[-1] == 1
    assert s.req[0] == 1 and s.req[BUCKETS.index(2500)] == 1 and s.req[BUCKETS.index(5)] == 1
    assert s.resp[BUCKETS.index(1)] == 1 and s.resp[BUCKETS.index(100)] == 1 and s.resp[-1] == 1
    assert s.dur_sum == pytest.approx(4_000_001.1)
    assert LE[0] == "0.5" and LE[1] == "1" and LE[-2] == "3600000" and LE[-1] == "+Inf"


def test_service_labels() -> None:
    svc = service_labels("reviews.prod.svc.cluster.local", "default")
    assert (svc.service, svc.name, svc.namespace) == ("reviews.prod.svc.cluster.local", "reviews", "prod")
    ext = service_labels("httpbin.org", "egress")
    assert (ext.service, ext.name, ext.namespace) == ("httpbin.org", "httpbin.org", "egress")


def _state(count: int, dur_bucket: int, cluster_total: int, active: int) -> dict:
    s = Series(("source",) + ("v",) * 24)
    for _ in range(count):
        s.record(BUCKETS[dur_bucket], 10, 20)
    return {
        "istio": [s.row()],
        "clusters": {"outbound|80||a": {"upstream_rq_total": cluster_total, "upstream_rq_active": active}},
        "downstream": {"downstream_cx_total": count, "downstream_cx_active": 1},
        "reloads": {"success": 2, "failure": 1},
        "started_at": 0.0,
        "config_version": 3,
        "workers": 1,
        "access_log_dropped": 0,
    }


def test_merge_states_sums_workers_and_keeps_one_reload_count() -> None:
    merged = merge_states([_state(2, 0, 5, 1), _state(3, 2, 7, 2)])
    row = merged["istio"][0]
    assert row[1] == 5
    assert row[2][0] == 2 and row[2][2] == 3
    assert row[5] == 50 and row[7] == 100
    assert merged["clusters"]["outbound|80||a"] == {"upstream_rq_total": 12, "upstream_rq_active": 3}
    assert merged["downstream"]["downstream_cx_total"] == 5
    assert merged["reloads"] == {"success": 2, "failure": 1}
    assert merged["workers"] == 2


def test_prometheus_rendering_parses_with_cumulative_buckets() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    text = render_prometheus(_state(3, 1, 4, 0)).decode()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    assert fams["istio_requests"].type == "counter"
    assert [s.value for s in fams["istio_requests"].samples if s.name == "istio_requests_total"] == [3]
    buckets = [s for s in fams["istio_request_duration_milliseconds"].samples if s.name.endswith("_bucket")]
    assert [b.labels["le"] for b in buckets] == list(LE)
    assert [b.value for b in buckets] == [0, 3] + [3] * (len(LE) - 2)
    assert "# TYPE istio_requests_total counter" in text
    assert 'envoy_cluster_upstream_rq_total{cluster_name="outbound|80||a"} 4.0' in text
    assert (
        "envoy_cluster_upstream_rq_active" in fams
        and fams["envoy_cluster_upstream_rq_active"].type == "gauge"
    )
    assert 'pyproxy_config_reloads_total{result="failure"} 1.0' in text
    assert list(StateCollector(_state(0, 0, 0, 0)).collect())  # empty istio rows still render families


# -- access log -------------------------------------------------------------------------


def test_escape_blocks_log_forging() -> None:
    assert accesslog.escape(None) == "-"
    assert accesslog.escape(b"") == "-"
    assert accesslog.escape(b"curl/8.0") == "curl/8.0"
    forged = accesslog.escape(b'x"\r\n[2024-01-01T00:00:00.000Z] "GET /admin HTTP/1.1" 200\\')
    assert "\r" not in forged and "\n" not in forged
    assert forged.startswith('x\\"\\x0d\\x0a[')
    assert forged.endswith("\\\\")
    assert accesslog.escape(b"caf\xc3\xa9\x00\x7f") == "caf\\xc3\\xa9\\x00\\x7f"


def _fake_exchange(**kw: object) -> SimpleNamespace:
    base = {
        "method": b"GET",
        "path": b"/reviews/0",
        "query": b"a=1",
        "version": "1.1",
        "status": 200,
        "flags": [],
        "flag_string": "-",
        "request_bytes": 0,
        "response_bytes": 295,
        "start_time": 1000.0,
        "end_time": 1000.0042,
        "upstream_latency": 0.003,
        "hdict": {b"user-agent": b"curl/8.5.0"},
        "request_id": b"5b4c-id",
        "authority": b"reviews:9080",
        "upstream_host": SimpleNamespace(address="127.0.0.1:9081", tls=None, tls_principal=""),
        "cluster": SimpleNamespace(name="outbound|9080||r"),
        "authz_policy": "",
        "auth": None,
        "conn": SimpleNamespace(tls_peer=None),  # plaintext
    }
    base.update(kw)
    return SimpleNamespace(**base)


def test_text_format_is_envoys_default_layout() -> None:
    log = accesslog.AccessLog.__new__(accesslog.AccessLog)
    log.clock = accesslog.WallClock()
    line = log.format_text(_fake_exchange())  # type: ignore[arg-type]
    import re

    m = re.fullmatch(
        r'\[(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z)\] "GET /reviews/0\?a=1 HTTP/1\.1" 200 - 0 295 4 3 '
        r'"-" "curl/8\.5\.0" "5b4c-id" "reviews:9080" "127\.0\.0\.1:9081"\n',
        line,
    )
    assert m, line
    # missing values are "-"; the original path wins over the rewritten one
    line = log.format_text(
        _fake_exchange(
            upstream_latency=-1.0,
            upstream_host=None,
            status=404,
            flags=["NR"],
            flag_string="NR",
            hdict={b"x-envoy-original-path": b"/orig"},
        )
    )  # type: ignore[arg-type]
    assert '"GET /orig HTTP/1.1" 404 NR 0 295 4 - "-" "-" "5b4c-id" "reviews:9080" "-"\n' in line


def test_json_format_escapes_and_nulls() -> None:
    log = accesslog.AccessLog.__new__(accesslog.AccessLog)
    log.clock = accesslog.WallClock()
    line = log.format_json(_fake_exchange(hdict={b"user-agent": b'evil\r\n"x'}, upstream_latency=-1.0))  # type: ignore
    assert line.endswith("\n") and line.count("\n") == 1
    doc = json.loads(line)
    assert doc["user_agent"] == 'evil\r\n"x'
    assert doc["upstream_service_time"] is None and doc["x_forwarded_for"] is None
    assert doc["response_code"] == 200 and doc["duration"] == 4 and doc["path"] == "/reviews/0?a=1"


def test_json_format_carries_the_rbac_policy_and_the_jwt_principal() -> None:
    log = accesslog.AccessLog.__new__(accesslog.AccessLog)
    log.clock = accesslog.WallClock()
    doc = json.loads(log.format_json(_fake_exchange()))  # type: ignore[arg-type]
    assert doc["rbac_policy"] is None and doc["request_auth_principal"] is None
    auth = SimpleNamespace(principal="https://issuer.example/alice")
    doc = json.loads(log.format_json(_fake_exchange(authz_policy="default/readers", auth=auth)))  # type: ignore[arg-type]
    assert doc["rbac_policy"] == "default/readers"
    assert doc["request_auth_principal"] == "https://issuer.example/alice"


def test_wall_clock_format() -> None:
    import re
    import time

    clock = accesslog.WallClock()
    s = clock.iso(time.monotonic() + 0.25)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", s)
    assert abs(time.mktime(time.strptime(s[:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone - time.time()) < 5


# -- config signature and watcher ----------------------------------------------------------


def test_signature_changes_on_edit_add_remove_and_ignores_hidden(tmp_path) -> None:
    d = tmp_path / "cfg"
    d.mkdir()
    (d / "a.yaml").write_text("a: 1\n")
    s0 = config_signature([str(d)])
    (d / ".hidden.yaml").write_text("x")
    (d / "notes.txt").write_text("x")
    assert config_signature([str(d)]) == s0
    (d / "a.yaml").write_text("a: 22\n")  # size changes
    s1 = config_signature([str(d)])
    assert s1 != s0
    (d / "b.yml").write_text("b: 1\n")
    s2 = config_signature([str(d)])
    assert s2 != s1
    (d / "b.yml").unlink()
    assert config_signature([str(d)]) != s2
    assert config_signature([str(tmp_path / "missing")]) == ((str(tmp_path / "missing"), "missing"),)


def test_signature_follows_configmap_style_symlink_swap(tmp_path) -> None:
    """Kubernetes mounts: name.yaml -> ..data/name.yaml, ..data -> ..<timestamp>;
    an update creates a new timestamped dir and swaps ..data atomically."""
    mount = tmp_path / "mount"
    mount.mkdir()
    v1 = mount / "..2024_01_01"
    v1.mkdir()
    (v1 / "mesh.yaml").write_text("version: 1\n")
    os.symlink("..2024_01_01", mount / "..data")
    os.symlink("..data/mesh.yaml", mount / "mesh.yaml")
    s1 = config_signature([str(mount)])
    v2 = mount / "..2024_01_02"
    v2.mkdir()
    (v2 / "mesh.yaml").write_text("version: 2\n")  # same size as before
    os.symlink("..2024_01_02", mount / "..data_tmp")
    os.replace(mount / "..data_tmp", mount / "..data")
    assert config_signature([str(mount)]) != s1


async def test_watcher_debounces_and_skips_already_loaded(tmp_path) -> None:
    f = tmp_path / "a.yaml"
    f.write_text("1")
    current = [config_signature([str(f)])]
    reloads: list[str] = []

    async def reload(trigger: str) -> None:
        reloads.append(trigger)
        current[0] = config_signature([str(f)])

    w = ConfigWatcher(
        [str(f)],
        lambda: current[0],
        reload,
        asyncio.get_running_loop(),
        interval=0.01,
        settle=0.05,
        max_wait=1.0,
    )
    assert await w.check() is False
    f.write_text("22")

    async def more_edits() -> None:
        for i in range(3):
            await asyncio.sleep(0.02)
            f.write_text("x" * (3 + i))

    edits = asyncio.create_task(more_edits())
    assert await w.check() is True
    await edits
    await w.check()  # catches any edit that landed after the debounce window
    assert 1 <= len(reloads) <= 2
    assert current[0] == config_signature([str(f)])
    assert await w.check() is False  # nothing new


# -- admin helpers -------------------------------------------------------------------------


def test_jsonable_handles_aliases_depth_and_yaml_types() -> None:
    import datetime

    shared = {"a": [1, 2]}
    deep: dict = {}
    cur = deep
    for _ in range(200):
        cur["x"] = {}
        cur = cur["x"]
    doc = {
        "one": shared,
        "two": shared,
        "when": datetime.date(2024, 1, 2),
        "raw": b"\x00",
        "deep": deep,
        "set": {1},
    }
    out = jsonable(doc)
    text = json.dumps(out)
    assert out["one"] == out["two"] == {"a": [1, 2]}
    assert out["when"] == "2024-01-02" and out["set"] == [1]
    assert "nested too deep" in text
    assert jsonable(list(range(10)), max_nodes=5)[-1] == "<truncated: too many values>"


def test_merge_clusters_marks_ejection_in_any_worker() -> None:
    def view(ejected: bool, active: int) -> list[dict]:
        return [
            {
                "name": "c",
                "stats": {"upstream_rq_total": 1},
                "circuit_breakers": {
                    "connections_active": 1,
                    "pending_active": 0,
                    "requests_active": active,
                    "retries_active": 0,
                },
                "outlier_detection": {"ejections_active": int(ejected)},
                "endpoints": [
                    {
                        "address": "h:1",
                        "ejected": ejected,
                        "health": "ejected" if ejected else "healthy",
                        "active_requests": active,
                        "connections": 1,
                        "idle_connections": 0,
                        "pending_requests": 0,
                        "ejection_count": int(ejected),
                        "ejection_remaining_s": 3.0 if ejected else 0,
                    }
                ],
            }
        ]

    merged = merge_clusters([view(False, 1), view(True, 2)])
    ep = merged[0]["endpoints"][0]
    assert ep["ejected"] is True and ep["health"] == "ejected" and ep["ejected_in_workers"] == [1]
    assert ep["active_requests"] == 3 and merged[0]["stats"]["upstream_rq_total"] == 2
    assert merged[0]["outlier_detection"]["ejections_active"] == 1


async def test_access_log_writer_never_blocks_the_loop_and_bounds_memory(tmp_path, monkeypatch) -> None:
    """A stalled disk or pipe stalls only the writer thread: log() keeps
    returning, and past the pending limit lines are dropped and counted."""
    import threading

    gate = threading.Event()

    class StalledFile:
        def __init__(self) -> None:
            self.data: list[bytes] = []

        def write(self, b: bytes) -> None:
            gate.wait(30)
            self.data.append(b)

        def flush(self) -> None:
            pass

        def close(self) -> None:
            pass

    monkeypatch.setattr(accesslog, "MAX_PENDING_BYTES", 50_000)
    log = accesslog.AccessLog(str(tmp_path / "a.log"), "text", asyncio.get_running_loop())
    stalled = StalledFile()
    log.fh.close()
    log.fh = stalled  # type: ignore[assignment]
    ex = _fake_exchange()
    for _ in range(3000):  # ~130 bytes each: far more than the 50 kB allowed in flight
        log.log(ex)  # type: ignore[arg-type]
    log.flush()
    assert stalled.data == []  # the writer is still stuck, yet every log() call returned
    assert log.dropped > 0
    assert log.pending <= 50_000
    gate.set()
    log.close()
    written = b"".join(stalled.data).count(b"\n")
    assert written + log.dropped == 3000


def test_stdout_writes_are_cut_at_line_boundaries_within_pipe_buf(monkeypatch) -> None:
    """Several workers share stdout: each write() must be whole lines of at
    most PIPE_BUF bytes so lines from different processes never interleave."""
    r, w = os.pipe()
    try:
        log = accesslog.AccessLog.__new__(accesslog.AccessLog)
        log.target = "-"

        class Out:
            def write(self, b: bytes) -> None:
                raise AssertionError("large batches must go through os.write")

            def flush(self) -> None:
                pass

            def fileno(self) -> int:
                return w

        log.fh = Out()  # type: ignore[assignment]
        writes: list[int] = []
        real_write = os.write

        def spy(fd: int, data: object) -> int:
            n = real_write(fd, data)  # type: ignore[arg-type]
            writes.append(n)
            assert bytes(data)[n - 1 : n] == b"\n"  # type: ignore[arg-type]
            return n

        monkeypatch.setattr(os, "write", spy)
        lines = [(f"line {i} " + "x" * (i % 300)).encode() + b"\n" for i in range(200)]
        data = b"".join(lines)
        log._write(data)
        assert all(n <= accesslog.PIPE_BUF for n in writes) and len(writes) > 1
        got = b""
        while len(got) < len(data):
            got += os.read(r, 65536)
        assert got == data
    finally:
        os.close(r)
        os.close(w)
