"""The HTTP filter chain (filters/chain.py): compiled per route in phase order,
empty for routes without filters, stopped by a local reply, paused and resumed
after an asynchronous decision (fake loop, real Exchange, no sockets)."""

from __future__ import annotations

from pyproxy.filters import chain
from pyproxy.filters.chain import FilterContext
from pyproxy.filters.cors import CorsFilter
from pyproxy.filters.fault import FaultFilter
from tests.unit.fakes import Mesh, service


def vs(extra: str = "") -> str:
    return f"""apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: svc}}
spec:
  hosts: [svc]
  http:
  - route: [{{destination: {{host: svc}}}}]
{extra}"""


def mesh(extra: str = "") -> Mesh:
    return Mesh("---\n".join([service("svc", [1001]), vs(extra)]))


def route_of(m: Mesh):  # type: ignore[no-untyped-def]
    vh = m.snapshot.hosts.exact[b"svc"]
    return vh.routes[0]


class Recorder:
    """A filter that records its calls and does what the test says."""

    def __init__(self, phase: int, log: list[str], name: str, action: str = "continue") -> None:
        self.phase = phase
        self.log = log
        self.name = name
        self.action = action
        self.paused: FilterContext | None = None

    def on_request(self, ex: FilterContext) -> bool:
        self.log.append(self.name)
        if self.action == "reply":
            ex.send_local_reply(429, b"local reply from " + self.name.encode(), flag="RL")
            return True
        if self.action == "pause":
            self.paused = ex  # an asynchronous decision (a rate-limit lookup) is pending
            return True
        return False


def test_a_route_without_filters_has_an_empty_chain() -> None:
    assert route_of(mesh()).filters == ()


def test_fault_and_cors_compile_into_the_chain_in_istios_order() -> None:
    m = mesh("    corsPolicy: {allowOrigins: [{exact: 'https://a.example'}]}\n"
             "    fault: {abort: {httpStatus: 503, percentage: {value: 100}}}\n")
    filters = route_of(m).filters
    assert [type(f) for f in filters] == [FaultFilter, CorsFilter]
    assert [f.phase for f in filters] == [chain.FAULT, chain.CORS]
    assert chain.METADATA_EXCHANGE < chain.AUTHN < chain.AUTHZ < chain.RATE_LIMIT < chain.FAULT < chain.CORS \
        < chain.STATS


def test_filters_run_in_order_then_the_router_forwards() -> None:
    m = mesh()
    log: list[str] = []
    route_of(m).filters = (Recorder(chain.AUTHZ, log, "authz"), Recorder(chain.CORS, log, "cors"))
    ex, down = m.request("svc")
    assert log == ["authz", "cors"]
    m.loop.connect().respond(200)
    assert down.status == 200 and ex.finished


def test_a_filter_stops_the_chain_with_a_local_reply() -> None:
    m = mesh()
    log: list[str] = []
    route_of(m).filters = (Recorder(chain.RATE_LIMIT, log, "rl", "reply"), Recorder(chain.CORS, log, "cors"))
    ex, down = m.request("svc")
    assert log == ["rl"]  # the later filter and the router never ran
    assert down.status == 429 and down.body == b"local reply from rl"
    assert ex.flags == ["RL"] and ex.finished
    assert not m.loop.connects


def test_a_paused_chain_resumes_with_the_next_filter_after_the_decision() -> None:
    m = mesh()
    log: list[str] = []
    waiting = Recorder(chain.RATE_LIMIT, log, "rl", "pause")
    route_of(m).filters = (waiting, Recorder(chain.CORS, log, "cors"))
    ex, down = m.request("svc")
    assert log == ["rl"] and not m.loop.connects and not ex.finished
    assert waiting.paused is ex
    ex.resume_chain()  # the lookup answered "under the limit"
    assert log == ["rl", "cors"]
    m.loop.connect().respond(200)
    assert down.status == 200


def test_a_late_resume_after_the_request_ended_does_nothing() -> None:
    m = mesh()
    log: list[str] = []
    route_of(m).filters = (Recorder(chain.RATE_LIMIT, log, "rl", "pause"), Recorder(chain.CORS, log, "cors"))
    ex, _down = m.request("svc")
    ex.on_downstream_closed()  # the client left while the decision was pending
    assert ex.finished
    ex.resume_chain()
    assert log == ["rl"] and not m.loop.connects


def test_a_paused_timer_is_cancelled_with_the_request() -> None:
    m = mesh("    fault: {delay: {fixedDelay: 5s, percentage: {value: 100}}}\n")
    ex, _down = m.request("svc")
    assert m.loop.pending_timers()
    ex.on_downstream_closed()
    assert not m.loop.pending_timers()
    m.loop.advance(10)
    assert not m.loop.connects


def test_an_encoder_sees_the_response_head() -> None:
    m = mesh()

    class AddsHeader:
        phase = chain.STATS

        def on_request(self, ex: FilterContext) -> bool:
            ex.add_encoder(self)
            return False

        def on_response_headers(self, ex: FilterContext, headers: list[tuple[bytes, bytes]]
                                ) -> list[tuple[bytes, bytes]]:
            return [*headers, (b"x-filter", b"seen")]

    route_of(m).filters = (AddsHeader(),)
    _ex, down = m.request("svc")
    m.loop.connect().respond(200)
    assert down.status == 200 and down.response_header("x-filter") == "seen"


def test_a_filter_before_the_route_lookup_can_pause_and_resume_too() -> None:
    m = mesh()
    log: list[str] = []
    waiting = Recorder(chain.AUTHN, log, "authn", "pause")
    # Security filters run before the route lookup (snapshot.security_filters, by direction).
    m.snapshot.security_filters = ((waiting, Recorder(chain.AUTHZ, log, "authz")), ())
    route_of(m).filters = (Recorder(chain.CORS, log, "cors"),)
    ex, down = m.request("svc")
    assert log == ["authn"] and ex.route is None and not m.loop.connects
    ex.resume_chain()  # e.g. a key fetch finished
    assert log == ["authn", "authz", "cors"] and ex.route is route_of(m)
    m.loop.connect().respond(200)
    assert down.status == 200


def test_a_filter_before_the_route_lookup_answers_before_the_router_would_say_no_route() -> None:
    m = mesh()
    log: list[str] = []
    m.snapshot.security_filters = ((Recorder(chain.AUTHZ, log, "authz", "reply"),), ())
    _ex, down = m.request("unknown-host")
    assert log == ["authz"] and down.status == 429  # not a 404 NR / passthrough
