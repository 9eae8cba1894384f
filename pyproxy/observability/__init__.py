"""Telemetry: Istio metrics, tracing and the access log (see observer.py for the hooks)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..app import Worker


def build_observer(worker: Worker) -> Any:
    """The observer for a worker, or None when every telemetry feature is off
    (the request path then skips the hooks entirely)."""
    return None
