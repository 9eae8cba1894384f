"""Fault injection (VirtualService ``fault``), compiled once per route.

Evaluated after the route matched and before any upstream work, as Envoy's
fault filter: the delay is drawn first and applied, then the abort is drawn.
A percentage that is absent means 0%. Draws use the worker's injectable RNG.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ..config.model import HTTPFaultInjection

# gRPC status names Istio accepts in ``abort.grpcStatus``, mapped to the HTTP
# status Envoy would use for a non-gRPC HTTP/1.1 request.
GRPC_TO_HTTP = {
    "OK": 200, "CANCELLED": 499, "UNKNOWN": 500, "INVALID_ARGUMENT": 400, "DEADLINE_EXCEEDED": 504,
    "NOT_FOUND": 404, "ALREADY_EXISTS": 409, "PERMISSION_DENIED": 403, "RESOURCE_EXHAUSTED": 429,
    "FAILED_PRECONDITION": 400, "ABORTED": 409, "OUT_OF_RANGE": 400, "UNIMPLEMENTED": 501,
    "INTERNAL": 500, "UNAVAILABLE": 503, "DATA_LOSS": 500, "UNAUTHENTICATED": 401,
}


@dataclass(frozen=True, slots=True)
class FaultPolicy:
    delay: float  # seconds, 0 = none
    delay_fraction: float  # 0..1
    abort_status: int  # 0 = none
    abort_fraction: float

    def draw_delay(self, rng: random.Random) -> float:
        if self.delay > 0 and self.delay_fraction > 0 and (
            self.delay_fraction >= 1 or rng.random() < self.delay_fraction
        ):
            return self.delay
        return 0.0

    def draw_abort(self, rng: random.Random) -> int:
        if self.abort_status and self.abort_fraction > 0 and (
            self.abort_fraction >= 1 or rng.random() < self.abort_fraction
        ):
            return self.abort_status
        return 0


def compile_fault(fault: HTTPFaultInjection | None) -> FaultPolicy | None:
    if fault is None:
        return None
    delay = fraction_d = 0.0
    status = 0
    fraction_a = 0.0
    if fault.delay is not None:
        delay = fault.delay.fixed_delay
        fraction_d = fault.delay.percentage / 100.0
    if fault.abort is not None:
        if fault.abort.http_status:
            status = fault.abort.http_status
        elif fault.abort.grpc_status:
            status = GRPC_TO_HTTP.get(fault.abort.grpc_status.upper(), 500)
        fraction_a = fault.abort.percentage / 100.0
    if (delay <= 0 or fraction_d <= 0) and (not status or fraction_a <= 0):
        return None  # a fault that can never fire costs nothing on the request path
    return FaultPolicy(delay, fraction_d, status, fraction_a)
