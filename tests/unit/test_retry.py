"""Retry policy decisions and the retry state of an exchange (fake loop and
clock, seeded RNG, no sockets)."""

from __future__ import annotations

import random

import pytest

from pyproxy.config.model import HTTPRetry
from pyproxy.options import Limits
from pyproxy.upstream.retry import (
    CONNECT_FAILURE,
    INBOUND_DEFAULT,
    NO_RETRY,
    PER_TRY_TIMEOUT,
    RESET,
    compile_retry,
)
from tests.unit.fakes import Mesh, service


def vs(retries: str = "", timeout: str = "", host: str = "svc") -> str:
    lines = ["apiVersion: networking.istio.io/v1", "kind: VirtualService", f"metadata: {{name: {host}}}",
             "spec:", f"  hosts: [{host}]", "  http:", f"  - route: [{{destination: {{host: {host}}}}}]"]
    if retries:
        lines.append(f"    retries: {retries}")
    if timeout:
        lines.append(f"    timeout: {timeout}")
    return "\n".join(lines) + "\n"


def dr(pool: str, host: str = "svc") -> str:
    return (f"apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: {host}}}\n"
            f"spec:\n  host: {host}\n  trafficPolicy:\n    connectionPool: {pool}\n")


def mesh(*docs: str, ports: tuple[int, ...] = (1001, 1002), seed: int = 7, limits: Limits | None = None) -> Mesh:
    return Mesh("---\n".join([service("svc", list(ports)), *docs]), seed=seed, limits=limits)


# -- the policy ------------------------------------------------------------------


def test_no_retries_block_gets_istio_mesh_default_without_503() -> None:
    p = compile_retry(None)
    assert p.num_retries == 2
    assert p.per_try_timeout is None
    assert p.retries_failure(CONNECT_FAILURE)
    # refused-stream/cancelled/unavailable have no HTTP/1.1 counterpart; 503 is
    # no longer a default retriable status (Istio >= 1.24).
    assert not p.retries_failure(RESET)
    assert not p.retries_failure(PER_TRY_TIMEOUT)
    assert not any(p.retries_status(s) for s in (500, 502, 503, 504, 409))
    # unavailable/cancelled retry a grpc-status 14/1 response header, as Envoy
    # does even on HTTP/1.1; nothing else in a response is retried.
    assert p.any_response
    assert p.retries_response(200, [(b"content-type", b"application/grpc"), (b"grpc-status", b"14")])
    assert p.retries_response(200, [(b"grpc-status", b"1")])
    assert not p.retries_response(200, [(b"grpc-status", b"13")])
    assert not p.retries_response(503, [(b"content-type", b"text/plain")])
    assert p.avoid_previous_hosts


@pytest.mark.parametrize("attempts", [0, -1])
def test_attempts_zero_or_less_means_no_retry_policy(attempts: int) -> None:
    p = compile_retry(HTTPRetry(attempts=attempts, per_try_timeout=None))
    assert p is NO_RETRY
    assert p.num_retries == 0 and p.per_try_timeout is None and not p.flags


def test_attempts_without_retry_on_keeps_default_conditions() -> None:
    p = compile_retry(HTTPRetry(attempts=4, per_try_timeout=0.5))
    assert (p.num_retries, p.per_try_timeout) == (4, 0.5)
    assert p.retries_failure(CONNECT_FAILURE) and not p.retries_failure(RESET)
    assert not p.retries_status(503)


@pytest.mark.parametrize(
    ("retry_on", "outcome", "retried"),
    [
        ("5xx", 500, True), ("5xx", 503, True), ("5xx", 599, True), ("5xx", 404, False),
        ("5xx", CONNECT_FAILURE, True), ("5xx", RESET, True), ("5xx", PER_TRY_TIMEOUT, True),
        ("gateway-error", 502, True), ("gateway-error", 504, True), ("gateway-error", 500, False),
        ("gateway-error", CONNECT_FAILURE, True), ("gateway-error", RESET, True),
        ("gateway-error", PER_TRY_TIMEOUT, True),
        ("reset", CONNECT_FAILURE, True), ("reset", RESET, True), ("reset", PER_TRY_TIMEOUT, True),
        ("reset", 503, False),
        ("connect-failure", CONNECT_FAILURE, True), ("connect-failure", RESET, False),
        ("connect-failure", PER_TRY_TIMEOUT, False), ("connect-failure", 503, False),
        ("reset-before-request", CONNECT_FAILURE, True), ("reset-before-request", RESET, False),
        ("retriable-4xx", 409, True), ("retriable-4xx", 404, False), ("retriable-4xx", 503, False),
        ("retriable-status-codes", 503, False),  # no codes given: nothing
        ("503", 503, True), ("503", 502, False), ("503", PER_TRY_TIMEOUT, False),
        ("404,retriable-status-codes", 404, True),
        ("refused-stream", RESET, False), ("refused-stream", 503, False),
        ("retriable-headers", 503, False),
        ("unavailable,cancelled", 503, False), ("unavailable,cancelled", CONNECT_FAILURE, False),
    ],
)
def test_what_each_retry_on_condition_retries(retry_on: str, outcome: int | str, retried: bool) -> None:
    p = compile_retry(HTTPRetry(attempts=1, retry_on=retry_on))
    if isinstance(outcome, int):
        assert (p.any_response and p.retries_response(outcome, [])) is retried
    else:
        assert p.retries_failure(outcome) is retried


def test_bare_numbers_become_retriable_status_codes() -> None:
    p = compile_retry(HTTPRetry(attempts=2, retry_on="connect-failure, 503 ,429"))
    assert p.status_codes == frozenset({503, 429})
    assert p.retries_status(429) and p.retries_status(503) and not p.retries_status(500)
    assert p.retries_failure(CONNECT_FAILURE) and not p.retries_failure(RESET)


def test_rate_limited_responses_retried_only_under_envoy_ratelimited() -> None:
    limited = [(b"x-envoy-ratelimited", b"true")]
    assert not compile_retry(HTTPRetry(attempts=1, retry_on="5xx")).retries_response(503, limited)
    p = compile_retry(HTTPRetry(attempts=1, retry_on="envoy-ratelimited"))
    assert p.retries_response(429, limited)
    assert not p.retries_response(429, [])


def test_per_try_timeout_not_shorter_than_route_timeout_is_ignored() -> None:
    assert compile_retry(HTTPRetry(attempts=2, per_try_timeout=2.0), route_timeout=2.0).per_try_timeout is None
    assert compile_retry(HTTPRetry(attempts=2, per_try_timeout=2.0), route_timeout=3.0).per_try_timeout == 2.0
    assert compile_retry(HTTPRetry(attempts=2, per_try_timeout=2.0), route_timeout=None).per_try_timeout == 2.0


@pytest.mark.parametrize(("base", "cap"), [(None, 0.25), (0.1, 1.0)])
def test_backoff_is_full_jitter_within_envoy_bounds(base: float | None, cap: float) -> None:
    p = compile_retry(HTTPRetry(attempts=10, backoff=base))
    b = base or 0.025
    rng = random.Random(3)
    for n in range(1, 8):
        bound = min((2**n - 1) * b, cap)
        assert p.backoff_bound(n) == pytest.approx(bound)
        draws = [p.backoff(n, rng) for _ in range(2000)]
        assert all(0 <= d < bound for d in draws)
        # Full jitter: the whole range is used, not just its top.
        assert min(draws) < 0.05 * bound and max(draws) > 0.95 * bound
        assert sum(draws) / len(draws) == pytest.approx(bound / 2, rel=0.1)


def test_previous_hosts_predicate_off_for_consistent_hash_unless_asked() -> None:
    assert compile_retry(None).avoid_previous_hosts
    assert not compile_retry(None, consistent_hash=True).avoid_previous_hosts
    assert not compile_retry(HTTPRetry(attempts=2), consistent_hash=True).avoid_previous_hosts
    assert compile_retry(HTTPRetry(attempts=2, retry_ignore_previous_hosts=True),
                         consistent_hash=True).avoid_previous_hosts
    assert not compile_retry(HTTPRetry(attempts=2, retry_ignore_previous_hosts=False)).avoid_previous_hosts


def test_inbound_side_retries_only_what_never_reached_the_app() -> None:
    assert INBOUND_DEFAULT.num_retries == 2
    assert INBOUND_DEFAULT.retries_failure(CONNECT_FAILURE)
    assert not INBOUND_DEFAULT.retries_failure(RESET)
    assert not INBOUND_DEFAULT.retries_status(503)


def test_snapshot_compiles_route_retry_with_its_timeout_and_backoff() -> None:
    m = mesh(vs("{attempts: 3, perTryTimeout: 5s, retryOn: '5xx,409', backoff: 100ms}", timeout="5s"))
    route = m.snapshot.hosts.lookup(b"svc").routes[0]  # type: ignore[union-attr]
    assert route.retry.num_retries == 3
    assert route.retry.per_try_timeout is None  # >= the route timeout: Envoy ignores it
    assert route.retry.status_codes == frozenset({409})
    assert (route.retry.base_interval, route.retry.max_interval) == pytest.approx((0.1, 1.0))


# -- the retry state of an exchange ------------------------------------------------------


def test_retriable_status_is_retried_on_another_endpoint_after_backoff() -> None:
    m = mesh(vs("{attempts: 3, retryOn: '503'}"))
    stats = m.cluster("svc").stats
    ex, down = m.request("svc")
    first = m.loop.connect()
    assert first.header("x-envoy-attempt-count") == "1"
    first.respond(503, b"busy")
    assert down.status is None, "the retried response must not reach the client"
    assert first.transport.closing, "a discarded response's connection is closed, not reused"
    (timer,) = m.loop.pending_timers()
    assert 0 <= timer.at - m.loop.now < 0.025, "first back-off is within [0, 25ms)"
    m.loop.advance(0.025)
    second = m.loop.connect()
    assert second.header("x-envoy-attempt-count") == "2"
    assert second.conn.endpoint is not first.conn.endpoint, "retry prefers an endpoint not yet tried"
    second.respond(200, b"ok")
    assert down.status == 200 and down.body == b"ok"
    assert ex.flag_string == "-"
    assert (stats.upstream_rq_retry, stats.upstream_rq_retry_success, stats.upstream_rq_retry_limit_exceeded) == (1, 1, 0)
    assert m.cluster("svc").retries_active == 0
    assert (stats.upstream_rq_active, stats.upstream_rq_pending_active) == (0, 0)


def test_exhausted_retries_return_the_last_response_with_urx() -> None:
    m = mesh(vs("{attempts: 2, retryOn: 5xx}"))
    stats = m.cluster("svc").stats
    ex, down = m.request("svc")
    seen = []
    for i in range(3):
        up = m.loop.connect()
        seen.append(up.header("x-envoy-attempt-count"))
        up.respond(500 + i, f"fail {i}".encode())
        m.loop.advance(0.25)
    assert seen == ["1", "2", "3"]
    assert down.status == 502 and down.body == b"fail 2"
    assert "URX" in ex.flags
    assert (stats.upstream_rq_retry, stats.upstream_rq_retry_limit_exceeded) == (2, 1)
    assert m.cluster("svc").retries_active == 0
    assert not m.loop.connects and not m.loop.pending_timers()


def test_default_policy_retries_refused_connection_on_the_other_endpoint() -> None:
    m = mesh()
    _ex, down = m.request("svc")
    refused = m.loop.refuse()
    m.loop.advance(0.025)
    up = m.loop.connect()
    assert up.conn.endpoint is not refused
    assert up.header("x-envoy-attempt-count") == "2"
    up.respond(200)
    assert down.status == 200


def test_default_policy_does_not_retry_a_reset_after_the_request_went_out() -> None:
    m = mesh()
    ex, down = m.request("svc")
    m.loop.connect().reset()
    assert down.status == 503 and b"connection termination" in down.body
    assert ex.flags == ["UC"]
    assert m.cluster("svc").stats.upstream_rq_retry == 0


def test_refused_everywhere_ends_with_uf_and_urx() -> None:
    m = mesh()
    ex, down = m.request("svc")
    for _ in range(3):
        m.loop.refuse()
        m.loop.advance(0.25)
    # Envoy 1.40's body and flags for this case (flags in the order set).
    assert down.status == 503
    assert down.body.endswith(b"retried and the latest reset reason: remote connection failure")
    assert ex.flag_string == "URX,UF"


@pytest.mark.parametrize(
    ("retry_on", "retried"),
    [("5xx", True), ("gateway-error", True), ("reset", True), ("connect-failure", False), ("503", False)],
)
def test_per_try_timeout_is_retried_only_under_5xx_gateway_error_or_reset(retry_on: str, retried: bool) -> None:
    m = mesh(vs(f"{{attempts: 2, perTryTimeout: 1s, retryOn: '{retry_on}'}}"))
    stats = m.cluster("svc").stats
    ex, down = m.request("svc")
    up = m.loop.connect()
    assert up.header("x-envoy-expected-rq-timeout-ms") == "1000"
    m.loop.advance(0.999)
    assert down.status is None
    m.loop.advance(0.001)
    assert stats.upstream_rq_per_try_timeout == 1
    assert up.transport.closing
    if retried:
        assert down.status is None
        m.loop.advance(0.025)
        second = m.loop.connect()
        second.respond(200)
        assert down.status == 200
    else:
        assert down.status == 504 and down.body == b"upstream request timeout"
        assert ex.flags == ["UT"]
        assert not m.loop.connects


def test_route_timeout_spans_every_attempt_and_is_not_retried() -> None:
    m = mesh(vs("{attempts: 5, perTryTimeout: 400ms, retryOn: 5xx}", timeout="1s"))
    stats = m.cluster("svc").stats
    ex, down = m.request("svc")
    attempts = 0
    while down.status is None and attempts < 10:
        if m.loop.connects:
            m.loop.connect()
            attempts += 1
        m.loop.advance(0.01)
    assert down.status == 504 and down.body == b"upstream request timeout"
    assert m.loop.now - 1000.0 == pytest.approx(1.0, abs=0.011)
    assert "UT" in ex.flags
    assert attempts == 3  # 0 s, ~0.4 s, ~0.8 s (+ back-off); the route timeout cut the third
    assert stats.upstream_rq_timeout == 1 and stats.upstream_rq_per_try_timeout == 2
    m.loop.advance(1.0)
    assert not m.loop.connects, "nothing is retried after the route timeout"
    assert (stats.upstream_rq_active, m.cluster("svc").retries_active) == (0, 0)


def test_route_timeout_starts_when_the_request_body_is_complete() -> None:
    m = mesh(vs("{attempts: 0}", timeout="1s"))
    ex, down = m.request("svc", method=b"POST", body=b"part", complete=False)
    up = m.loop.connect()
    # The head and the first chunk went out while the client is still sending.
    assert up.sent.endswith(b"part")
    assert up.header("x-envoy-expected-rq-timeout-ms") == "1000"
    m.loop.advance(5.0)
    assert down.status is None, "no route timeout before the request is complete"
    ex.on_request_complete()
    m.loop.advance(0.99)
    assert down.status is None
    m.loop.advance(0.02)
    assert down.status == 504 and ex.flags == ["UT"]


def test_expected_timeout_header_is_what_is_left_of_the_route_timeout() -> None:
    m = mesh(vs("{attempts: 2, retryOn: '503'}", timeout="2s"))
    _ex, _down = m.request("svc")
    up = m.loop.connect()
    assert up.header("x-envoy-expected-rq-timeout-ms") == "2000"
    m.loop.advance(1.5)
    up.respond(503)
    m.loop.advance(0.025)
    second = m.loop.connect()
    assert 450 <= int(second.header("x-envoy-expected-rq-timeout-ms") or 0) <= 500
    second.respond(200)


def test_no_timeout_no_expected_timeout_header() -> None:
    m = mesh()
    _ex, _down = m.request("svc")
    assert m.loop.connect().header("x-envoy-expected-rq-timeout-ms") is None


def test_max_retries_bounds_concurrent_retries_per_cluster() -> None:
    m = mesh(vs("{attempts: 3, retryOn: '503'}"), dr("{http: {maxRetries: 1}}"))
    cluster = m.cluster("svc")
    ex1, down1 = m.request("svc")
    ex2, down2 = m.request("svc")
    up1, up2 = m.loop.connect(), m.loop.connect()
    up1.respond(503)
    assert cluster.retries_active == 1
    up2.respond(503, b"no retry for me")
    # Over the budget: the second request gets its 503 at once, flagged UO.
    assert down2.status == 503 and down2.body == b"no retry for me"
    assert "UO" in ex2.flags
    assert cluster.stats.upstream_rq_retry_overflow == 1
    m.loop.advance(0.025)
    m.loop.upstream_of(ex1).respond(200)
    assert down1.status == 200
    assert cluster.retries_active == 0, "the retry slot is released once the retry got its answer"
    # Budget free again: a new request may retry.
    ex3, down3 = m.request("svc")
    m.loop.upstream_of(ex3).respond(503)
    assert cluster.retries_active == 1
    m.loop.advance(0.025)
    m.loop.upstream_of(ex3).respond(200)
    assert down3.status == 200 and cluster.retries_active == 0


def test_retry_slot_released_when_the_client_leaves_during_backoff() -> None:
    m = mesh(vs("{attempts: 3, retryOn: '503'}"))
    cluster = m.cluster("svc")
    ex, _down = m.request("svc")
    m.loop.connect().respond(503)
    assert cluster.retries_active == 1 and m.loop.pending_timers()
    ex.on_downstream_closed()
    assert cluster.retries_active == 0
    assert not m.loop.pending_timers()
    m.loop.advance(1.0)
    assert not m.loop.connects
    assert "DC" in ex.flags


def test_request_body_over_the_replay_buffer_is_not_retried_and_counted() -> None:
    m = mesh(vs("{attempts: 3, retryOn: '503'}"), limits=Limits(retry_buffer=8))
    stats = m.cluster("svc").stats
    _ex, down = m.request("svc", method=b"POST", body=b"0123456789abcdef")
    up = m.loop.connect()
    assert up.sent.endswith(b"0123456789abcdef")
    up.respond(503)
    assert down.status == 503
    assert stats.retry_or_shadow_abandoned == 1
    assert stats.upstream_rq_retry == 0


def test_small_request_body_is_replayed_on_retry() -> None:
    m = mesh(vs("{attempts: 3, retryOn: '503'}"))
    _ex, down = m.request("svc", method=b"POST", body=b"payload")
    m.loop.connect().respond(503)
    m.loop.advance(0.025)
    second = m.loop.connect()
    assert second.sent.endswith(b"\r\n\r\npayload")
    assert second.header("content-length") == "7"
    second.respond(201)
    assert down.status == 201


def test_response_already_streaming_is_never_retried() -> None:
    m = mesh(vs("{attempts: 3, retryOn: 5xx}"))
    ex, down = m.request("svc")
    up = m.loop.connect()
    up.conn.data_received(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhalf")
    up.reset()
    assert down.status == 200
    assert down.done == [ex] and ex.close_after, "a truncated body can only be signalled by closing"
    assert m.cluster("svc").stats.upstream_rq_retry == 0


def test_connect_timeout_reply_names_the_timeout_as_envoy() -> None:
    """Envoy's body distinguishes a connect timeout ("connection timeout")
    from a refused connection ("remote connection failure")."""
    m = mesh(vs("{attempts: 0}"), ports=(1001,))
    ex, down = m.request("svc")
    endpoint = m.loop._next_connect(None)
    endpoint._connect_done(None, "connection timeout")
    m.loop.run_ready()
    assert down.status == 503 and ex.flag_string == "UF"
    assert down.body == b"upstream connect error or disconnect/reset before headers. reset reason: connection timeout"
