"""Retry policy, compiled once per route from a VirtualService ``retries`` block.

Semantics follow Envoy's router as Istio (>= 1.24) programs it:

- no ``retries`` block: the mesh default, 2 retries on
  ``connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes``
  with no retriable status code (Istio stopped adding 503 in 1.24:
  ``EXCLUDE_UNSAFE_503_FROM_DEFAULT_RETRY`` defaults to true);
- ``attempts`` omitted or <= 0: no retry policy at all (and so no per-try
  timeout either: Istio drops the whole Envoy retry policy);
- ``attempts`` set but no ``retryOn``: the default conditions above;
- a bare number in ``retryOn`` becomes a retriable status code (and turns on
  ``retriable-status-codes``);
- what each condition retries (Envoy ``x-envoy-retry-on``):

  ========================  =============================================
  ``5xx``                   any 5xx response, connect failure, reset, per-try timeout
  ``gateway-error``         502/503/504, connect failure, reset, per-try timeout
  ``reset``                 connect failure, reset, per-try timeout
  ``reset-before-request``  failures before any request byte was sent:
                            here, connect failures
  ``connect-failure``       connect failure (and connect timeout)
  ``retriable-4xx``         409
  ``retriable-status-codes`` the configured codes
  ``refused-stream``        an HTTP/2 upstream's REFUSED_STREAM (or a
                            stream above its GOAWAY's last stream id)
  ``retriable-headers``     response headers named by retriable_headers;
                            Istio has no field for them, so nothing
  gRPC conditions           a ``grpc-status`` response header with the
                            code: cancelled 1, deadline-exceeded 4,
                            resource-exhausted 8, internal 13,
                            unavailable 14 (Envoy reads it from the
                            headers, HTTP/1.1 included: checked
                            against Envoy 1.40)
  ========================  =============================================

  A response carrying ``x-envoy-ratelimited`` (from another Envoy) is
  retried only under ``envoy-ratelimited``, whatever its status;
- back-off: Envoy's jittered exponential back-off, "full jitter": retry N
  waits a uniform time in [0, (2^N - 1) x base), capped at 10 x base
  (base 25 ms unless ``retries.backoff`` sets it);
- a per-try timeout not shorter than the route timeout is ignored, as Envoy
  does;
- retries prefer endpoints not tried yet (Envoy's previous_hosts predicate,
  up to 5 re-picks), except with consistent hashing unless
  ``retryIgnorePreviousHosts`` asks for it (Istio leaves the predicate off
  there so a retry stays on the hashed endpoint).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ..config.model import HTTPRetry

RETRY_5XX = 1 << 0
RETRY_GATEWAY_ERROR = 1 << 1
RETRY_RESET = 1 << 2
RETRY_CONNECT_FAILURE = 1 << 3
RETRY_RETRIABLE_4XX = 1 << 4
RETRY_REFUSED_STREAM = 1 << 5
RETRY_RETRIABLE_STATUS_CODES = 1 << 6
RETRY_RETRIABLE_HEADERS = 1 << 7
RETRY_GRPC = 1 << 8  # cancelled, unavailable, ...: a grpc-status header with one of the codes
RETRY_RESET_BEFORE_REQUEST = 1 << 9
RETRY_ENVOY_RATELIMITED = 1 << 10

_NAMES = {
    "5xx": RETRY_5XX,
    "gateway-error": RETRY_GATEWAY_ERROR,
    "reset": RETRY_RESET,
    "reset-before-request": RETRY_RESET_BEFORE_REQUEST,
    "connect-failure": RETRY_CONNECT_FAILURE,
    "retriable-4xx": RETRY_RETRIABLE_4XX,
    "refused-stream": RETRY_REFUSED_STREAM,
    "retriable-status-codes": RETRY_RETRIABLE_STATUS_CODES,
    "retriable-headers": RETRY_RETRIABLE_HEADERS,
    "envoy-ratelimited": RETRY_ENVOY_RATELIMITED,
    "cancelled": RETRY_GRPC,
    "unavailable": RETRY_GRPC,
    "deadline-exceeded": RETRY_GRPC,
    "internal": RETRY_GRPC,
    "resource-exhausted": RETRY_GRPC,
    "http3-post-connect-failure": 0,
}
# gRPC retry conditions and the grpc-status code each one retries.
_GRPC_CODES = {"cancelled": 1, "deadline-exceeded": 4, "resource-exhausted": 8, "internal": 13, "unavailable": 14}

MESH_DEFAULT_RETRY_ON = "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"
MESH_DEFAULT_ATTEMPTS = 2
# Istio >= 1.24 gives inbound routes this policy (ENABLE_INBOUND_RETRY_POLICY).
INBOUND_RETRY_ON = "reset-before-request"

BASE_INTERVAL = 0.025  # Envoy's default base interval
MAX_INTERVAL_FACTOR = 10  # Envoy's default max interval: 10 x base

# Failure kinds an attempt can end with, besides a response status.
CONNECT_FAILURE = "connect_failure"
RESET = "reset"
PER_TRY_TIMEOUT = "per_try_timeout"
# An HTTP/2 upstream refused the stream (RST_STREAM REFUSED_STREAM, or above
# a GOAWAY's last stream id): not processed, safe to retry.
REFUSED_STREAM = "refused_stream"

_RESPONSE_LESS = RETRY_5XX | RETRY_GATEWAY_ERROR | RETRY_RESET
_CONNECT = _RESPONSE_LESS | RETRY_CONNECT_FAILURE | RETRY_RESET_BEFORE_REQUEST


def parse_retry_on(value: str) -> tuple[int, frozenset[int], list[str]]:
    """(flags, retriable status codes, unknown tokens)."""
    flags = 0
    codes: set[int] = set()
    unknown: list[str] = []
    for token in value.split(","):
        token = token.strip()
        if not token:
            continue
        if token.isdigit():
            codes.add(int(token))
            flags |= RETRY_RETRIABLE_STATUS_CODES
        elif token in _NAMES:
            flags |= _NAMES[token]
        else:
            unknown.append(token)
    return flags, frozenset(codes), unknown


def grpc_codes(value: str) -> frozenset[bytes]:
    """The grpc-status values (as sent) the gRPC conditions in ``value`` retry."""
    return frozenset(str(_GRPC_CODES[t.strip()]).encode() for t in value.split(",") if t.strip() in _GRPC_CODES)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    num_retries: int
    per_try_timeout: float | None
    flags: int
    status_codes: frozenset[int]
    base_interval: float = BASE_INTERVAL
    max_interval: float = BASE_INTERVAL * MAX_INTERVAL_FACTOR
    # Prefer endpoints not tried yet (Envoy's previous_hosts retry predicate).
    avoid_previous_hosts: bool = True
    # Can any response be retried at all? (False only when no condition
    # looks at responses: the request path then skips the check.)
    any_response: bool = False
    # grpc-status values retried by the gRPC conditions (as bytes).
    grpc_statuses: frozenset[bytes] = frozenset()
    # Only the gRPC conditions look at responses (Istio's default policy).
    grpc_only: bool = False

    def retries_status(self, status: int) -> bool:
        f = self.flags
        if f & RETRY_5XX and 500 <= status <= 599:
            return True
        if f & RETRY_GATEWAY_ERROR and status in (502, 503, 504):
            return True
        if f & RETRY_RETRIABLE_4XX and status == 409:
            return True
        return bool(f & RETRY_RETRIABLE_STATUS_CODES) and status in self.status_codes

    def retries_response(self, status: int, headers: list[tuple[bytes, bytes]],
                         hd: dict[bytes, bytes] | None = None) -> bool:
        """Would this response be retried (limits aside)? The header scan
        runs only when the status alone would retry, under envoy-ratelimited,
        or to find grpc-status for the gRPC conditions. ``hd``: the fields
        as a dict, when the caller has one (saves the scan when it holds no
        grpc-status)."""
        f = self.flags
        if not f:
            return False
        grpc = self.grpc_statuses
        if self.grpc_only:
            # Istio's default policy: only gRPC conditions look at responses
            # (the common case, so one plain scan for grpc-status, the first
            # one counting; none when the dict says there is none).
            if hd is not None and b"grpc-status" not in hd:
                return False
            for name, value in headers:
                if name == b"grpc-status":
                    return value.strip() in grpc
            return False
        by_status = self.retries_status(status)
        if by_status or f & RETRY_ENVOY_RATELIMITED or grpc:
            for name, value in headers:
                if name == b"x-envoy-ratelimited":
                    return bool(f & RETRY_ENVOY_RATELIMITED)
                if name == b"grpc-status" and value.strip() in grpc:
                    by_status = True
        return by_status

    def retries_failure(self, kind: str) -> bool:
        """Would an attempt that ended without a response be retried?"""
        if kind == CONNECT_FAILURE:
            return bool(self.flags & _CONNECT)
        if kind == REFUSED_STREAM:
            # Envoy's wouldRetryFromReset: reset, 5xx, gateway-error, or
            # refused-stream for RemoteRefusedStreamReset.
            return bool(self.flags & (_RESPONSE_LESS | RETRY_REFUSED_STREAM))
        # Resets after the request went out, and per-try timeouts.
        return bool(self.flags & _RESPONSE_LESS)

    def backoff_bound(self, retry_number: int) -> float:
        """Upper bound of the wait before retry ``retry_number`` (1-based)."""
        return min(((1 << min(retry_number, 30)) - 1) * self.base_interval, self.max_interval)

    def backoff(self, retry_number: int, rng: random.Random) -> float:
        """Full jitter: uniform in [0, bound)."""
        return rng.random() * self.backoff_bound(retry_number)


NO_RETRY = RetryPolicy(0, None, 0, frozenset())


def _policy(attempts: int, per_try: float | None, retry_on: str, backoff: float | None,
            avoid_previous_hosts: bool) -> RetryPolicy:
    flags, codes, _ = parse_retry_on(retry_on)
    base = backoff if backoff else BASE_INTERVAL
    grpc = grpc_codes(retry_on)
    by_status = bool(
        flags & (RETRY_5XX | RETRY_GATEWAY_ERROR | RETRY_RETRIABLE_4XX | RETRY_ENVOY_RATELIMITED)
        or (flags & RETRY_RETRIABLE_STATUS_CODES and codes)
    )
    return RetryPolicy(attempts, per_try, flags, codes, base, base * MAX_INTERVAL_FACTOR, avoid_previous_hosts,
                       by_status or bool(grpc), grpc, bool(grpc) and not by_status)


MESH_DEFAULT = _policy(MESH_DEFAULT_ATTEMPTS, None, MESH_DEFAULT_RETRY_ON, None, True)
INBOUND_DEFAULT = _policy(MESH_DEFAULT_ATTEMPTS, None, INBOUND_RETRY_ON, None, False)


def compile_retry(retries: HTTPRetry | None, route_timeout: float | None = None,
                  consistent_hash: bool = False) -> RetryPolicy:
    """The route's policy. ``consistent_hash``: the route's destination
    balances by consistent hash, where Istio omits the previous-hosts
    predicate unless ``retryIgnorePreviousHosts: true`` asks for it."""
    if retries is None:
        if consistent_hash:
            return _policy(MESH_DEFAULT_ATTEMPTS, None, MESH_DEFAULT_RETRY_ON, None, False)
        return MESH_DEFAULT
    if retries.attempts <= 0:
        return NO_RETRY
    per_try = retries.per_try_timeout
    if per_try and route_timeout and per_try >= route_timeout:
        per_try = None  # Envoy ignores a per-try timeout that cannot fire before the route's
    avoid = retries.retry_ignore_previous_hosts
    if avoid is None:
        avoid = not consistent_hash
    return _policy(retries.attempts, per_try, retries.retry_on or MESH_DEFAULT_RETRY_ON, retries.backoff, avoid)
