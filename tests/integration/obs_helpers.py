"""Helpers shared by the observability integration tests (reload, admin,
metrics, tracing, access log, workers)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.harness import Proxy, http_get


def scrape(px: Proxy, port: int | None = None) -> dict[str, Any]:
    """/stats/prometheus from the stats port, parsed with prometheus-client's parser."""
    status, body = http_get(f"http://127.0.0.1:{port or px.stats}/stats/prometheus")
    assert status == 200, body[:300]
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def samples(families: dict[str, Any], sample_name: str, **labels: str) -> list[Any]:
    """Samples named ``sample_name`` whose labels include ``labels``."""
    family = sample_name
    for suffix in ("_total", "_bucket", "_sum", "_count"):
        if sample_name.endswith(suffix) and sample_name[: -len(suffix)] in families:
            family = sample_name[: -len(suffix)]
            break
    fam = families.get(family)
    if fam is None:
        return []
    return [
        s
        for s in fam.samples
        if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items())
    ]


def value(families: dict[str, Any], sample_name: str, **labels: str) -> float:
    found = samples(families, sample_name, **labels)
    return sum(s.value for s in found)


async def wait_for(
    predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.1, what: str = "condition"
) -> Any:
    """Poll ``predicate`` (sync or async) until it returns something truthy."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")
