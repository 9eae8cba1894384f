"""The worker's once-a-second tick as each exchange sees it (Exchange.on_tick,
called by its connection's on_tick from Worker.sweep): Envoy's stream idle
timeout without a timer per request. Real Exchange on the fake loop."""

from __future__ import annotations

from tests.unit.fakes import Mesh, service


def mesh() -> Mesh:
    return Mesh(service("svc", [9080]))


def test_a_request_without_progress_for_the_stream_idle_timeout_gets_504_si() -> None:
    m = mesh()
    ex, down = m.request("svc:9080")
    m.loop.connect()  # the head went upstream, which never answers
    assert down.status is None
    ex.on_tick(10.0, 2.0)  # first look: progress marked
    ex.on_tick(11.0, 2.0)
    assert down.status is None  # 1 s without progress: not yet
    ex.on_tick(12.0, 2.0)
    assert down.status == 504
    assert "SI" in ex.flags and ex.finished


def test_progress_between_ticks_restarts_the_idle_clock() -> None:
    m = mesh()
    ex, down = m.request("svc:9080")
    m.loop.connect()
    ex.on_tick(10.0, 2.0)
    ex.response_bytes += 1  # something moved (as a body chunk would)
    ex.on_tick(12.0, 2.0)
    assert down.status is None
    ex.on_tick(13.0, 2.0)
    assert down.status is None
    ex.on_tick(14.0, 2.0)
    assert down.status == 504


def test_a_finished_request_ignores_the_tick() -> None:
    m = mesh()
    ex, down = m.request("svc:9080")
    m.loop.connect().respond(200, b"ok")
    assert down.status == 200 and ex.finished
    flags = list(ex.flags)
    ex.on_tick(10.0, 1.0)
    ex.on_tick(20.0, 1.0)
    assert ex.flags == flags and down.status == 200
