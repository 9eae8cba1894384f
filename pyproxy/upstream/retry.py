"""Retry policy, compiled from a VirtualService ``retries`` block.

Semantics (Envoy's router, as Istio programs it, Istio >= 1.24):
- no ``retries`` block: the mesh default, 2 retries on
  ``connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes``
  with no retriable status code (503 is no longer included);
- ``attempts`` omitted or <= 0: no retries;
- a bare number in ``retryOn`` becomes a retriable status code;
- ``5xx`` and ``gateway-error`` also retry connect failures, resets and
  per-try timeouts; ``reset`` retries resets, connect failures and per-try
  timeouts; a per-try timeout is retried only under ``5xx``, ``gateway-error``
  or ``reset``;
- back-off: full jitter, 25 ms base, 250 ms cap (Envoy's defaults);
- retries prefer an endpoint not yet tried (previous_hosts predicate).
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
RETRY_GRPC = 1 << 8  # cancelled, unavailable, ...: gRPC statuses, never seen on HTTP/1.1 here

_NAMES = {
    "5xx": RETRY_5XX,
    "gateway-error": RETRY_GATEWAY_ERROR,
    "reset": RETRY_RESET,
    "reset-before-request": RETRY_RESET,
    "connect-failure": RETRY_CONNECT_FAILURE,
    "retriable-4xx": RETRY_RETRIABLE_4XX,
    "refused-stream": RETRY_REFUSED_STREAM,
    "retriable-status-codes": RETRY_RETRIABLE_STATUS_CODES,
    "retriable-headers": RETRY_RETRIABLE_HEADERS,
    "cancelled": RETRY_GRPC,
    "unavailable": RETRY_GRPC,
    "deadline-exceeded": RETRY_GRPC,
    "internal": RETRY_GRPC,
    "resource-exhausted": RETRY_GRPC,
    "envoy-ratelimited": 0,
    "http3-post-connect-failure": 0,
}

MESH_DEFAULT_RETRY_ON = "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"
MESH_DEFAULT_ATTEMPTS = 2

BASE_INTERVAL = 0.025
MAX_INTERVAL = 0.250

# Failure kinds an attempt can end with, besides a response status.
CONNECT_FAILURE = "connect_failure"
RESET = "reset"
PER_TRY_TIMEOUT = "per_try_timeout"


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


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    num_retries: int
    per_try_timeout: float | None
    flags: int
    status_codes: frozenset[int]
    base_interval: float = BASE_INTERVAL
    max_interval: float = MAX_INTERVAL

    def retries_status(self, status: int) -> bool:
        f = self.flags
        if f & RETRY_5XX and status >= 500:
            return True
        if f & RETRY_GATEWAY_ERROR and status in (502, 503, 504):
            return True
        if f & RETRY_RETRIABLE_4XX and status == 409:
            return True
        if f & RETRY_RETRIABLE_STATUS_CODES and status in self.status_codes:
            return True
        return False

    def retries_failure(self, kind: str) -> bool:
        f = self.flags
        if kind == CONNECT_FAILURE:
            return bool(f & (RETRY_CONNECT_FAILURE | RETRY_5XX | RETRY_GATEWAY_ERROR | RETRY_RESET))
        # resets and per-try timeouts
        return bool(f & (RETRY_5XX | RETRY_GATEWAY_ERROR | RETRY_RESET))

    def backoff(self, retry_number: int, rng: random.Random) -> float:
        """Full jitter: uniform in [0, (2^n - 1) x base], capped."""
        upper = ((1 << min(retry_number, 16)) - 1) * self.base_interval
        return min(rng.random() * upper, self.max_interval)


NO_RETRY = RetryPolicy(0, None, 0, frozenset())


def compile_retry(retries: HTTPRetry | None) -> RetryPolicy:
    if retries is None:
        flags, codes, _ = parse_retry_on(MESH_DEFAULT_RETRY_ON)
        return RetryPolicy(MESH_DEFAULT_ATTEMPTS, None, flags, codes)
    if retries.attempts <= 0:
        # Istio: attempts 0 disables retries, but a perTryTimeout still bounds the single attempt.
        return RetryPolicy(0, retries.per_try_timeout, 0, frozenset())
    flags, codes, _ = parse_retry_on(retries.retry_on or MESH_DEFAULT_RETRY_ON)
    return RetryPolicy(retries.attempts, retries.per_try_timeout, flags, codes)
