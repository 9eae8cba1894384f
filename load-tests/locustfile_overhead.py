"""Raw proxy overhead: one small GET to one upstream, direct and through pyproxy.

The targets come from the environment, so the same file drives any setup
(see load-tests/README.md for the commands):

    OVERHEAD_DIRECT        base URL of the upstream itself           e.g. http://127.0.0.12:9080
    OVERHEAD_PROXY         base URL of a pyproxy listener in front   e.g. http://127.0.0.11:15001
    OVERHEAD_HOST_HEADER   Host header sent through the proxy: the service it routes, e.g. details
                           (default: none, the URL's own host:port)
    OVERHEAD_PATH          request path, default /
    OVERHEAD_RATE          requests/s per user (locust's constant_throughput); 0 = no pause (default 0)

With both URLs set, locust runs as many "direct" users as "pyproxy" users
(weights 1:1) at the same per-user rate, and its statistics show the two
request names side by side: the difference in their percentiles is the
proxy's added latency at that rate. With only one set, only that user class
runs. With neither set, the single class ``Overhead`` uses ``--host`` (and
OVERHEAD_HOST_HEADER), which is what "target chosen by --host" means.

Locust is for latency at a fixed, modest rate here: one FastHttpUser process
generates about 10k requests/s on a 2-core machine, below what a proxy
worker can serve. Capacity (requests/s, CPU per request) is measured with
wrk by load-tests/bench.py.
"""

from __future__ import annotations

import os
from typing import ClassVar

from locust import FastHttpUser, constant, constant_throughput, task

DIRECT = os.environ.get("OVERHEAD_DIRECT", "").rstrip("/")
PROXY = os.environ.get("OVERHEAD_PROXY", "").rstrip("/")
HOST_HEADER = os.environ.get("OVERHEAD_HOST_HEADER", "")
PATH = os.environ.get("OVERHEAD_PATH", "/") or "/"
RATE = float(os.environ.get("OVERHEAD_RATE", "0") or 0)


def _wait():  # type: ignore[no-untyped-def]
    return constant_throughput(RATE) if RATE > 0 else constant(0)


class _OverheadBase(FastHttpUser):
    abstract = True
    wait_time = _wait()
    label = "target"
    headers: ClassVar[dict[str, str]] = {}

    @task
    def get(self) -> None:
        # Counts as a failure unless the answer is 200: a proxy that answers
        # fast with 503s must not look good.
        with self.client.get(PATH, headers=self.headers, name=f"{self.label} GET {PATH}",
                             catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"status {resp.status_code}")


class Direct(_OverheadBase):
    """Straight to the upstream (OVERHEAD_DIRECT)."""

    abstract = not DIRECT
    host = DIRECT or None
    label = "direct"


class ThroughPyproxy(_OverheadBase):
    """The same request through a pyproxy listener (OVERHEAD_PROXY), with
    the Host header naming the service it routes."""

    abstract = not PROXY
    host = PROXY or None
    label = "pyproxy"
    headers: ClassVar[dict[str, str]] = {"Host": HOST_HEADER} if HOST_HEADER else {}


class Overhead(_OverheadBase):
    """Neither OVERHEAD_DIRECT nor OVERHEAD_PROXY set: one target from --host."""

    abstract = bool(DIRECT or PROXY)
    label = "target"
    headers: ClassVar[dict[str, str]] = {"Host": HOST_HEADER} if HOST_HEADER else {}
