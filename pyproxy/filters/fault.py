"""Fault injection (VirtualService ``fault``), compiled once per route.

Evaluated after the route matched and before any upstream work, as Envoy's
fault filter (phase ``FAULT`` of the filter chain, filters/chain.py): the delay
is drawn first and applied (the chain pauses), then the abort is drawn.
A percentage that is absent means 0%. Draws use the worker's injectable RNG.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .. import errors
from ..config.model import HTTPFaultInjection
from .chain import FAULT

if TYPE_CHECKING:
    from .chain import FilterContext

# gRPC status names Istio accepts in ``abort.grpcStatus`` and their codes.
GRPC_CODES = {
    "OK": 0, "CANCELLED": 1, "UNKNOWN": 2, "INVALID_ARGUMENT": 3, "DEADLINE_EXCEEDED": 4,
    "NOT_FOUND": 5, "ALREADY_EXISTS": 6, "PERMISSION_DENIED": 7, "RESOURCE_EXHAUSTED": 8,
    "FAILED_PRECONDITION": 9, "ABORTED": 10, "OUT_OF_RANGE": 11, "UNIMPLEMENTED": 12,
    "INTERNAL": 13, "UNAVAILABLE": 14, "DATA_LOSS": 15, "UNAUTHENTICATED": 16,
}


@dataclass(frozen=True, slots=True)
class FaultPolicy:
    delay: float  # seconds, 0 = none
    delay_fraction: float  # 0..1
    abort_status: int  # 0 = none
    abort_fraction: float
    # grpcStatus aborts: Envoy replies HTTP 200; a gRPC request (content-type
    # application/grpc) gets these headers instead of the text body.
    abort_grpc: int | None = None
    grpc_headers: tuple[tuple[bytes, bytes], ...] = ()

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
    grpc: int | None = None
    grpc_headers: tuple[tuple[bytes, bytes], ...] = ()
    if fault.delay is not None:
        delay = fault.delay.fixed_delay
        fraction_d = fault.delay.percentage / 100.0
    if fault.abort is not None:
        if fault.abort.http_status:
            status = fault.abort.http_status
        elif fault.abort.grpc_status:
            grpc = GRPC_CODES.get(fault.abort.grpc_status.upper(), 2)
            status = 200
            grpc_headers = ((b"grpc-status", str(grpc).encode()), (b"grpc-message", b"fault filter abort"))
        fraction_a = fault.abort.percentage / 100.0
    if (delay <= 0 or fraction_d <= 0) and (not status or fraction_a <= 0):
        return None  # a fault that can never fire costs nothing on the request path
    return FaultPolicy(delay, fraction_d, status, fraction_a, grpc, grpc_headers)


class FaultFilter:
    """The route's fault policy as a chain filter."""

    __slots__ = ("policy",)
    phase = FAULT

    def __init__(self, policy: FaultPolicy) -> None:
        self.policy = policy

    def on_request(self, ex: FilterContext) -> bool:
        delay = self.policy.draw_delay(ex.worker.rng)
        if delay > 0:
            ex.flags.append(errors.DELAY_INJECTED)
            ex.pause_chain(delay, lambda: self._after_delay(ex))
            return True
        return self._abort(ex)

    def _after_delay(self, ex: FilterContext) -> None:
        if not self._abort(ex):
            ex.resume_chain()

    def _abort(self, ex: FilterContext) -> bool:
        fault = self.policy
        status = fault.draw_abort(ex.worker.rng)
        if not status:
            return False
        ex.flags.append(errors.FAULT_INJECTED)
        if fault.abort_grpc is not None:
            # Envoy answers a gRPC abort with HTTP 200; a gRPC client reads
            # the status from the (trailers-only) grpc-status header.
            ctype = ex.hdict.get(b"content-type", b"")
            if ctype.startswith(b"application/grpc"):
                ex.send_local_reply(200, b"", extra=fault.grpc_headers, content_type=ctype)
                return True
        ex.send_local_reply(status, errors.FI_BODY)
        return True
