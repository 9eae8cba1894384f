"""Keep CPython's cyclic garbage collector from stalling the event loop
because of a large config.

A config of a few thousand resources is hundreds of thousands of objects
that live until the next reload. CPython's collector re-scans all of them in
every full (generation 2) collection, which it starts whenever the objects
that survived younger collections since the last full one reach a quarter of
the long-lived heap: a reload (which allocates a new snapshot) triggers one,
and with 1,000 VirtualServices one full collection took 0.3-0.6 s with the
event loop stopped.

So the config's objects are moved out of the collector's way
(``gc.freeze()``, the "permanent generation") once a snapshot is in force,
and the collector is paused while a reload allocates the next one (the
reload is short; young garbage is still freed by reference counting).
Frozen objects are still freed when their last reference goes; only
*cyclic* garbage among them waits for a full collection. In a snapshot that
is the clusters (a cluster, its endpoints, pools and outlier detector refer
to each other; routes, host tables and the parsed config are acyclic), and a
reload retires only the clusters whose settings or endpoints changed. So
:meth:`HeapPolicy.settle` runs a full collection once the clusters retired
since the last one reach half of the clusters in force (at least
``min_retired``): retired garbage stays bounded, and that one collection
(which stalls the loop like CPython's own would) comes after a large share of
the config was replaced, not on every reload. Counting the frozen objects
instead would itself walk all of them (~50 ms for 500,000).
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger("pyproxy.config")


class HeapPolicy:
    def __init__(self, reclaim_share: float = 0.5, min_retired: int = 200) -> None:
        self.reclaim_share = reclaim_share
        self.min_retired = min_retired
        self.retired = -1  # clusters retired since the last full collection; -1: none yet
        self.reclaims = 0
        self.last_reclaim_ms = 0.0

    @contextmanager
    def paused(self) -> Iterator[None]:
        """No automatic collection inside (a reload's allocations would
        otherwise start collections that scan the whole new snapshot)."""
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            yield
        finally:
            if was_enabled:
                gc.enable()

    def settle(self, retired_clusters: int, live_clusters: int) -> bool:
        """After a snapshot went into service (and the previous one's changed
        clusters were retired): freeze what is alive now; first, run a full
        collection when enough retired garbage may have piled up (and on the
        first call: startup garbage). Returns True when it collected."""
        if self.retired >= 0:
            self.retired += retired_clusters
            if self.retired < max(self.min_retired, live_clusters * self.reclaim_share):
                gc.freeze()
                return False
        started = time.perf_counter()
        gc.unfreeze()
        gc.collect()
        gc.freeze()
        self.retired = 0
        self.reclaims += 1
        self.last_reclaim_ms = (time.perf_counter() - started) * 1000
        log.info("heap: full garbage collection in %.1f ms", self.last_reclaim_ms)
        return True

    def stats(self) -> dict[str, float]:
        return {"full_collections": self.reclaims, "last_full_collection_ms": round(self.last_reclaim_ms, 3),
                "retired_clusters_since": max(self.retired, 0)}


# One per process: the collector is process-wide.
HEAP = HeapPolicy()
