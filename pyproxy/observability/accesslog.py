"""Access log: one line per request, Envoy's default format or JSON.

Text (``--access-log-format text``) is Envoy's default format string::

    [%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%"
    %RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION%
    %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% "%REQ(X-FORWARDED-FOR)%" "%REQ(USER-AGENT)%"
    "%REQ(X-REQUEST-ID)%" "%REQ(:AUTHORITY)%" "%UPSTREAM_HOST%"

(one line), e.g.::

    [2024-05-01T12:00:00.123Z] "GET /reviews/0 HTTP/1.1" 200 - 0 295 4 3 "-" "curl/8.5.0"
    "5b4c...-..." "reviews:9080" "127.0.0.1:9081"

JSON (``--access-log-format json``) has the same fields under Istio's JSON
access-log keys. A missing value is ``-`` in text and ``null`` in JSON.

Safety: request data never reaches a line unescaped. In text lines every
byte outside printable ASCII, and ``"`` and ``\\``, is written as ``\\xHH``
/ ``\\"`` / ``\\\\`` (Envoy writes header bytes raw), so a header cannot
end a line early, forge a second line or break the quoting. JSON escapes
control characters itself.

Writing never blocks the event loop: lines are appended to a list, and a
timer (every 250 ms, or when 1024 lines are waiting) hands the joined batch
to a dedicated writer thread. If the writer falls more than 8 MiB behind
(a stalled pipe or disk), further lines are dropped and counted
(``pyproxy_access_log_dropped_total``) instead of growing memory.
``SIGUSR1`` reopens the file (log rotation), as with Envoy.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    from .view import ExchangeView

log = logging.getLogger("pyproxy.accesslog")

FLUSH_INTERVAL = 0.25
FLUSH_LINES = 1024
MAX_PENDING_BYTES = 8 << 20
PIPE_BUF = 4096  # POSIX minimum; Linux's value

_UNSAFE = re.compile(rb"[^\x20\x21\x23-\x5b\x5d-\x7e]")
# The bytes _UNSAFE does not match: deleting them from a value leaves
# nothing when the value needs no escaping (one C-level translate).
_SAFE = bytes(b for b in range(256) if _UNSAFE.match(bytes((b,))) is None)


def _sub(m: re.Match) -> bytes:
    c = m.group()[0]
    if c == 0x22:
        return b'\\"'
    if c == 0x5C:
        return b"\\\\"
    return b"\\x%02x" % c


def escape(value: bytes | None) -> str:
    """A request value for a text log line: ``-`` when absent, escaped."""
    if not value:
        return "-"
    if _UNSAFE.search(value) is None:
        return value.decode("ascii")
    return _UNSAFE.sub(_sub, value).decode("ascii")


class WallClock:
    """Loop time → Envoy's START_TIME (``2024-05-01T12:00:00.123Z``), with the
    per-second prefix formatted once."""

    __slots__ = ("offset", "checked", "second", "prefix")

    def __init__(self) -> None:
        self.offset = 0.0
        self.checked = -1e9
        self.second = -1
        self.prefix = ""

    def iso(self, mono: float) -> str:
        """Wall-clock ISO 8601 for a time.monotonic() reading."""
        if mono - self.checked > 1.0:
            # Re-anchor monotonic time to the wall clock once a second.
            self.offset = time.time() - time.monotonic()
            self.checked = mono
        wall = mono + self.offset
        sec = int(wall)
        if sec != self.second:
            self.second = sec
            self.prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        return "%s.%03dZ" % (self.prefix, int((wall - sec) * 1000))


def original_path(ex: ExchangeView) -> bytes:
    p = ex.hdict.get(b"x-envoy-original-path")
    if p is not None:
        return p
    return ex.path + b"?" + ex.query if ex.query else ex.path


class AccessLog:
    def __init__(self, target: str, fmt: str, loop: asyncio.AbstractEventLoop) -> None:
        self.target = target
        self.loop = loop
        self.clock = WallClock()
        self.format = self.format_json if fmt == "json" else self.format_text
        self.lines: list[str] = []
        self.pending = 0  # bytes handed to the writer, not yet written
        self.dropped = 0
        self.written = 0
        self.closed = False
        self.fh: IO[bytes] = self._open()
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="pyproxy-accesslog")
        self.timer: asyncio.TimerHandle | None = None

    def _open(self) -> IO[bytes]:
        if self.target == "-":
            return sys.stdout.buffer
        return open(self.target, "ab")

    def reopen(self) -> None:
        """Log rotation (SIGUSR1): finish what is queued, then reopen the path."""
        if self.target == "-":
            return
        self.flush()

        def swap() -> None:
            old = self.fh
            self.fh = self._open()
            old.close()

        self.executor.submit(swap)

    # -- request path ---------------------------------------------------------

    def log(self, ex: ExchangeView) -> None:
        lines = self.lines
        lines.append(self.format(ex))
        if len(lines) >= FLUSH_LINES:
            self.flush()
        elif self.timer is None:
            self.timer = self.loop.call_later(FLUSH_INTERVAL, self._on_timer)

    def format_text(self, ex: ExchangeView) -> str:
        hd = ex.hdict
        ust = ex.upstream_latency
        up = ex.upstream_host
        method = ex.method
        path = hd.get(b"x-envoy-original-path") or (ex.path + b"?" + ex.query if ex.query else ex.path)
        xff = hd.get(b"x-forwarded-for")
        ua = hd.get(b"user-agent")
        rid = ex.request_id
        authority = ex.authority
        if b"".join((method, path, xff or b"", ua or b"", rid, authority)).translate(None, _SAFE):
            # Some value has a byte to escape: the general path.
            fields = [escape(method), escape(path), escape(xff), escape(ua), escape(rid), escape(authority)]
        else:  # (the common case: plain ASCII, decoded as is)
            fields = [method.decode("ascii") or "-", path.decode("ascii") or "-",
                      xff.decode("ascii") if xff else "-", ua.decode("ascii") if ua else "-",
                      rid.decode("ascii") or "-", authority.decode("ascii") or "-"]
        return '[%s] "%s %s HTTP/%s" %d %s %d %d %d %s "%s" "%s" "%s" "%s" "%s"\n' % (
            self.clock.iso(ex.start_time),
            fields[0],
            fields[1],
            ex.version,
            ex.status,
            ex.flag_string if ex.flags else "-",
            ex.request_bytes,
            ex.response_bytes,
            int(((ex.end_time or ex.start_time) - ex.start_time) * 1000),
            int(ust * 1000) if ust >= 0 else "-",
            fields[2],
            fields[3],
            fields[4],
            fields[5],
            up.address if up is not None else "-",
        )

    def format_json(self, ex: ExchangeView) -> str:
        hd = ex.hdict
        ust = ex.upstream_latency
        up = ex.upstream_host

        def text(v: bytes | None) -> str | None:
            # UTF-8 where valid; other bytes as \xNN (json.dumps escapes the rest).
            return v.decode("utf-8", "backslashreplace") if v else None

        doc = {
            "start_time": self.clock.iso(ex.start_time),
            "method": text(ex.method),
            "path": text(original_path(ex)),
            "protocol": "HTTP/" + ex.version,
            "response_code": ex.status,
            "response_flags": ex.flag_string,
            "bytes_received": ex.request_bytes,
            "bytes_sent": ex.response_bytes,
            "duration": int(((ex.end_time or ex.start_time) - ex.start_time) * 1000),
            "upstream_service_time": int(ust * 1000) if ust >= 0 else None,
            "x_forwarded_for": text(hd.get(b"x-forwarded-for")),
            "user_agent": text(hd.get(b"user-agent")),
            "request_id": text(ex.request_id),
            "authority": text(ex.authority),
            "upstream_host": up.address if up is not None else None,
            "upstream_cluster": ex.cluster.name if ex.cluster is not None else None,
            # AuthorizationPolicy that decided ("none": no ALLOW policy matched), and the JWT identity.
            "rbac_policy": ex.authz_policy or None,
            "request_auth_principal": ex.auth.principal if ex.auth is not None else None,
            # Envoy's %DOWNSTREAM_PEER_URI_SAN% / %UPSTREAM_PEER_URI_SAN%: the mTLS peers' SPIFFE IDs.
            "downstream_peer_uri_san": _downstream_peer(ex),
            "upstream_peer_uri_san": up.tls_principal or None if up is not None and up.tls is not None else None,
        }
        return json.dumps(doc, ensure_ascii=True, separators=(",", ":")) + "\n"

    # -- writing (off the event loop) ----------------------------------------

    def _on_timer(self) -> None:
        self.timer = None
        self.flush()

    def flush(self) -> None:
        lines = self.lines
        if not lines or self.closed:
            return
        self.lines = []
        data = "".join(lines).encode("utf-8")
        if self.pending + len(data) > MAX_PENDING_BYTES:
            self.dropped += len(lines)
            if self.dropped == len(lines) or self.dropped % 10000 < len(lines):
                log.warning("access log writer is behind; %d line(s) dropped so far", self.dropped)
            return
        self.pending += len(data)
        fut = self.loop.run_in_executor(self.executor, self._write, data)
        fut.add_done_callback(functools.partial(self._written, n=len(data), k=len(lines)))

    def _write(self, data: bytes) -> None:
        fh = self.fh
        if self.target != "-" or len(data) <= PIPE_BUF:
            # A regular file opened for append: one write() lands whole, even
            # with several worker processes appending to the same file.
            fh.write(data)
            fh.flush()
            return
        # stdout is usually a pipe shared by every worker process: only
        # writes up to PIPE_BUF are atomic there, so cut at line boundaries.
        fh.flush()
        fd = fh.fileno()
        start = 0
        while start < len(data):
            end = data.rfind(b"\n", start, start + PIPE_BUF) + 1
            if end <= start:  # a single line longer than PIPE_BUF
                end = data.find(b"\n", start) + 1 or len(data)
            view = memoryview(data)[start:end]
            while view:
                view = view[os.write(fd, view) :]
            start = end

    def _written(self, fut: asyncio.Future, *, n: int, k: int) -> None:
        self.pending -= n
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is not None:
            self.dropped += k
            log.error("access log write failed: %s", exc)
        else:
            self.written += k

    def close(self) -> None:
        """Write everything still queued (blocking: shutdown only)."""
        if self.closed:
            return
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        rest = "".join(self.lines).encode("utf-8")
        self.lines = []
        self.closed = True
        self.executor.shutdown(wait=True)
        try:
            if rest:
                self._write(rest)
            if self.target != "-":
                self.fh.close()
        except OSError as exc:
            log.error("access log: final write failed: %s", exc)


def open_access_log(target: str, fmt: str, loop: asyncio.AbstractEventLoop) -> AccessLog | None:
    """``off`` → None; ``-`` → stdout; else a file path (created, appended).
    Raises OSError when the file cannot be opened (refuse to start)."""
    if target in ("off", "", "none"):
        return None
    if target != "-":
        parent = os.path.dirname(os.path.abspath(target))
        if not os.path.isdir(parent):
            raise OSError(f"access log directory {parent} does not exist")
    return AccessLog(target, fmt, loop)


def _downstream_peer(ex: ExchangeView) -> str | None:
    peer = getattr(ex.conn, "tls_peer", None)  # inbound mTLS (security/inbound.py TLSPeer)
    return peer.uri if peer is not None else None
