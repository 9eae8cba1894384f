"""Envoy's token bucket for the local rate limit, in-process or shared by
the worker processes of one sidecar.

Envoy (>= 1.31, envoyproxy/envoy#35207) refills continuously: tokens accrue
at ``tokens_per_fill / fill_interval`` per second up to ``max_tokens``, and
the bucket starts full. Its ``AtomicTokenBucketImpl`` keeps one number per
bucket, the time at which the bucket was (or would have been) empty; tokens
now = ``min(max_tokens, (now - t) * rate)``. Consuming one token moves ``t``
forward by ``1 / rate``. That single float is what makes sharing across
processes cheap: one 8-byte slot per bucket.

With ``--workers N`` Envoy's bucket is shared by its worker threads, so the
limit holds for the whole proxy. pyproxy's workers are processes: their
buckets live in one file under /dev/shm (``SharedBuckets``), each slot
updated under a POSIX byte-range lock (``lockf``) on that slot, so N workers
enforce one limit, not N times it. A single worker keeps its buckets in
process memory and takes no lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import math
import mmap
import os
import struct
import tempfile
import time
from collections.abc import Callable

log = logging.getLogger("pyproxy.ratelimit")

Clock = Callable[[], float]


class TokenBucket:
    """One bucket in this process. ``clock`` is monotonic seconds (injected in tests).
    ``empty_at``: when the bucket was (or would have been) empty; the rate-limit
    filter's fast path has a copy of ``consume`` (ratelimit/filter.py)."""

    __slots__ = ("clock", "empty_at", "max_tokens", "rate", "reset_seconds")

    def __init__(self, max_tokens: int, tokens_per_fill: int, fill_interval: float,
                 clock: Clock = time.monotonic) -> None:
        self.max_tokens = float(max_tokens)
        self.rate = tokens_per_fill / fill_interval
        self.clock = clock
        # Envoy's x-ratelimit-reset: the time one token takes to accrue, in
        # whole seconds rounded up (verified on Envoy 1.40: 30 for 2 per 60 s).
        self.reset_seconds = max(1, math.ceil(1.0 / self.rate))
        self.empty_at = clock() - self.max_tokens / self.rate  # starts full

    def consume(self) -> float:
        """Take one token: the tokens left after it, or -1.0 when none was available."""
        now = self.clock()
        tokens = (now - self.empty_at) * self.rate
        if tokens > self.max_tokens:  # noqa: PLR1730 - per request: a comparison costs less than a call to min()
            tokens = self.max_tokens
        if tokens < 1.0:
            return -1.0
        tokens -= 1.0
        self.empty_at = now - tokens / self.rate
        return tokens

    def remaining(self) -> float:
        tokens = (self.clock() - self.empty_at) * self.rate
        return min(tokens, self.max_tokens)


class SharedBuckets:
    """Bucket slots in a file every worker of one sidecar maps.

    Layout: a directory of ``CAPACITY`` entries of 32 bytes: a 16-byte key
    digest (all zero = free) and the bucket's "empty at" time (float64,
    ``time.monotonic()``, the same clock for every process on the host; 0.0
    reads as a full bucket). A bucket's key is its identity in the config
    (where it is defined and its parameters), so every worker, building its
    snapshot on its own, finds the same slot, and a changed bucket gets a new
    slot (it starts full, as a new Envoy bucket does)."""

    CAPACITY = 4096
    ENTRY = 32
    _TIME = struct.Struct("d")

    def __init__(self, path: str, clock: Clock = time.monotonic) -> None:
        self.path = path
        self.clock = clock
        size = self.CAPACITY * self.ENTRY
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(self.fd).st_size < size:
                os.ftruncate(self.fd, size)
            self.map = mmap.mmap(self.fd, size)
        except OSError:
            os.close(self.fd)
            raise
        self.slots: dict[bytes, int] = {}

    @classmethod
    def for_sidecar(cls, workers: int, worker_index: int) -> SharedBuckets | None:
        """The shared file of this sidecar's workers, or None with one worker.
        Secondary workers are children of the primary, so the primary's pid
        names the file for all of them."""
        if workers <= 1:
            return None
        primary = os.getpid() if worker_index == 0 else os.getppid()
        directory = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
        path = os.path.join(directory, f"pyproxy-ratelimit-{os.getuid()}-{primary}")
        try:
            return cls(path)
        except OSError as exc:
            log.error("cannot share local rate-limit buckets across workers (%s): %s; each worker "
                      "keeps its own buckets", path, exc)
            return None

    def slot(self, key: str) -> int | None:
        """The slot of the bucket named ``key`` (found or claimed), or None when full."""
        digest = hashlib.blake2b(key.encode(), digest_size=16).digest()
        cached = self.slots.get(digest)
        if cached is not None:
            return cached
        start = int.from_bytes(digest[:4], "little") % self.CAPACITY
        free = b"\0" * 16
        size = self.CAPACITY * self.ENTRY
        with self._locked(0, size):
            for i in range(self.CAPACITY):
                index = (start + i) % self.CAPACITY
                offset = index * self.ENTRY
                have = self.map[offset:offset + 16]
                if have == digest:
                    break
                if have == free:
                    self.map[offset:offset + 16] = digest
                    self._TIME.pack_into(self.map, offset + 16, 0.0)
                    break
            else:
                return None
        self.slots[digest] = index
        return index

    @contextlib.contextmanager
    def _locked(self, offset: int, length: int):  # type: ignore[no-untyped-def]
        fcntl.lockf(self.fd, fcntl.LOCK_EX, length, offset)
        try:
            yield
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN, length, offset)

    def bucket(self, key: str, max_tokens: int, tokens_per_fill: int, fill_interval: float
               ) -> TokenBucket | SharedTokenBucket:
        slot = self.slot(key)
        if slot is None:
            log.error("shared rate-limit bucket table is full (%d buckets): bucket %s is per worker",
                      self.CAPACITY, key)
            return TokenBucket(max_tokens, tokens_per_fill, fill_interval, self.clock)
        return SharedTokenBucket(self, slot, max_tokens, tokens_per_fill, fill_interval)

    def close(self, unlink: bool = False) -> None:
        with contextlib.suppress(BufferError, ValueError):
            self.map.close()
        with contextlib.suppress(OSError):
            os.close(self.fd)
        if unlink:
            with contextlib.suppress(OSError):
                os.unlink(self.path)


class SharedTokenBucket:
    """A :class:`TokenBucket` whose state is a slot of :class:`SharedBuckets`."""

    __slots__ = ("clock", "fd", "map", "max_tokens", "offset", "rate", "reset_seconds")

    def __init__(self, shared: SharedBuckets, slot: int, max_tokens: int, tokens_per_fill: int,
                 fill_interval: float) -> None:
        self.map = shared.map
        self.fd = shared.fd
        self.clock = shared.clock
        self.offset = slot * SharedBuckets.ENTRY + 16
        self.max_tokens = float(max_tokens)
        self.rate = tokens_per_fill / fill_interval
        self.reset_seconds = max(1, math.ceil(1.0 / self.rate))

    def consume(self) -> float:
        fd, offset = self.fd, self.offset
        # Lock only this slot's 8 bytes: other buckets do not contend.
        fcntl.lockf(fd, fcntl.LOCK_EX, 8, offset)
        try:
            now = self.clock()
            (empty_at,) = _TIME_UNPACK(self.map, offset)
            tokens = (now - empty_at) * self.rate
            if tokens > self.max_tokens:  # noqa: PLR1730 - per request, as above
                tokens = self.max_tokens
            if tokens < 1.0:
                return -1.0
            tokens -= 1.0
            _TIME_PACK(self.map, offset, now - tokens / self.rate)
            return tokens
        finally:
            fcntl.lockf(fd, fcntl.LOCK_UN, 8, offset)

    def remaining(self) -> float:
        (empty_at,) = _TIME_UNPACK(self.map, self.offset)
        tokens = (self.clock() - empty_at) * self.rate
        return min(tokens, self.max_tokens)


_TIME_UNPACK = SharedBuckets._TIME.unpack_from
_TIME_PACK = SharedBuckets._TIME.pack_into
