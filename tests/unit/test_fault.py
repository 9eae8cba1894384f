"""Fault injection: policy compilation, seeded draws, and the interplay with
the route timeout and retries (fake loop, no sockets)."""

from __future__ import annotations

import random

import pytest

from pyproxy.config.model import FaultAbort, FaultDelay, HTTPFaultInjection
from pyproxy.filters.fault import compile_fault
from tests.unit.fakes import Mesh, service


def mesh(fault: str, extra: str = "", seed: int = 11) -> Mesh:
    vs = f"""apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: svc}}
spec:
  hosts: [svc]
  http:
  - route: [{{destination: {{host: svc}}}}]
    fault: {fault}
{extra}"""
    return Mesh("---\n".join([service("svc", [1001, 1002]), vs]), seed=seed)


def test_fault_that_can_never_fire_compiles_to_nothing() -> None:
    assert compile_fault(None) is None
    assert compile_fault(HTTPFaultInjection(delay=FaultDelay(fixed_delay=1.0))) is None  # no percentage: 0%
    assert compile_fault(HTTPFaultInjection(abort=FaultAbort(http_status=503, percentage=0.0))) is None


def test_full_percentage_never_consumes_randomness() -> None:
    policy = compile_fault(HTTPFaultInjection(abort=FaultAbort(http_status=503, percentage=100.0),
                                              delay=FaultDelay(fixed_delay=2.0, percentage=100.0)))
    assert policy is not None
    rng = random.Random(5)
    state = rng.getstate()
    assert policy.draw_delay(rng) == 2.0 and policy.draw_abort(rng) == 503
    assert rng.getstate() == state


@pytest.mark.parametrize("pct", [50.0, 10.0, 0.5])
def test_partial_percentages_hit_their_share_with_a_seeded_rng(pct: float) -> None:
    policy = compile_fault(HTTPFaultInjection(abort=FaultAbort(http_status=500, percentage=pct)))
    assert policy is not None
    rng = random.Random(42)
    n = 20_000
    hits = sum(1 for _ in range(n) if policy.draw_abort(rng))
    p = pct / 100
    sigma = (n * p * (1 - p)) ** 0.5
    assert abs(hits - n * p) < 5 * sigma
    # Same seed, same sequence: tests built on it are deterministic.
    rng2 = random.Random(42)
    assert hits == sum(1 for _ in range(n) if policy.draw_abort(rng2))


def test_abort_replies_locally_with_fi_and_is_never_retried() -> None:
    m = mesh("{abort: {httpStatus: 503, percentage: {value: 100}}}", "    retries: {attempts: 3, retryOn: 5xx}\n")
    ex, down = m.request("svc")
    assert down.status == 503 and down.body == b"fault filter abort"
    assert ex.flags == ["FI"]
    assert not m.loop.connects and not m.loop.pending_timers()
    assert m.cluster("svc").stats.upstream_rq_retry == 0


def test_delay_then_forward_with_di_flag() -> None:
    m = mesh("{delay: {fixedDelay: 2s, percentage: {value: 100}}}")
    ex, down = m.request("svc")
    assert not m.loop.connects
    m.loop.advance(1.999)
    assert not m.loop.connects
    m.loop.advance(0.001)
    m.loop.connect().respond(200)
    assert down.status == 200 and ex.flags == ["DI"]


def test_delay_does_not_count_against_the_route_timeout() -> None:
    m = mesh("{delay: {fixedDelay: 2s, percentage: {value: 100}}}", "    timeout: 1s\n")
    ex, down = m.request("svc")
    m.loop.advance(2.0)  # the delay is longer than the route timeout ...
    assert down.status is None
    up = m.loop.connect()
    assert up.header("x-envoy-expected-rq-timeout-ms") == "1000"
    m.loop.advance(0.5)
    up.respond(200)  # ... yet an answer 0.5 s after forwarding is in time
    assert down.status == 200 and ex.flags == ["DI"]


def test_route_timeout_starts_after_the_delay() -> None:
    m = mesh("{delay: {fixedDelay: 2s, percentage: {value: 100}}}", "    timeout: 1s\n")
    ex, down = m.request("svc")
    m.loop.advance(2.0)
    m.loop.connect()  # this upstream never answers
    m.loop.advance(0.999)
    assert down.status is None
    m.loop.advance(0.001)
    assert down.status == 504 and down.body == b"upstream request timeout"
    assert ex.flag_string == "DI,UT"


def test_delay_then_abort_both_apply() -> None:
    m = mesh("{delay: {fixedDelay: 1s, percentage: {value: 100}}, abort: {httpStatus: 418, percentage: {value: 100}}}")
    ex, down = m.request("svc")
    assert down.status is None
    m.loop.advance(1.0)
    assert down.status == 418 and ex.flag_string == "DI,FI"
    assert not m.loop.connects


def test_client_leaving_during_the_delay_cancels_everything() -> None:
    m = mesh("{delay: {fixedDelay: 1s, percentage: {value: 100}}}")
    ex, down = m.request("svc")
    ex.on_downstream_closed()
    assert not m.loop.pending_timers()
    m.loop.advance(2.0)
    assert not m.loop.connects and down.out == b""
    assert ex.flag_string == "DI,DC"  # Envoy: in the order set


def test_grpc_status_abort_answers_like_envoy() -> None:
    m = mesh("{abort: {grpcStatus: UNAVAILABLE, percentage: {value: 100}}}")
    ex, down = m.request("svc", headers=((b"content-type", b"application/grpc"),))
    assert down.status == 200
    assert down.response_header("grpc-status") == "14"
    assert down.response_header("grpc-message") == "fault filter abort"
    ex, down = m.request("svc")
    assert down.status == 200 and down.body == b"fault filter abort" and ex.flags == ["FI"]


def test_fifty_percent_abort_through_the_exchange_is_seeded() -> None:
    def run(seed: int) -> list[int]:
        m = mesh("{abort: {httpStatus: 500, percentage: {value: 50}}}", seed=seed)
        statuses = []
        for _ in range(200):
            ex, down = m.request("svc")
            if down.status is None:
                m.loop.upstream_of(ex).respond(200)
            statuses.append(down.status or 0)
        return statuses

    first = run(3)
    assert 60 < first.count(500) < 140 and first.count(500) + first.count(200) == 200
    assert run(3) == first
