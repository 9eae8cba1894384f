#!/usr/bin/env python3
"""Bounded soak: mixed traffic through one pyproxy for N minutes while its
config is rewritten every few seconds and the upstream misbehaves on
purpose; then checks that nothing leaked and no request was lost.

    python load-tests/soak.py --minutes 10          # the long run
    python load-tests/soak.py --seconds 25 --json   # what the test suite runs

The chaotic upstream (two endpoints) answers each request, at random with a
seeded RNG, with: 200 (Content-Length or chunked, 0-32 KiB), 500/503, a
stall (never answers: the route timeout gives 504 UT, or, on the route
without one, the stream idle timeout gives 504 SI), a reset before the
response head (503 UC, or retried), a reset in the middle of the body (the
head carries ``x-chaos: reset-mid``; the client must see the connection
close), a slow body in pieces. Clients keep connections alive, send GETs
and POSTs (Content-Length or chunked bodies), and some hang up mid-request
on purpose. Every few seconds the config is replaced (weights, timeouts,
retries, a subset split that replaces clusters) and the proxy reloads it.

Every request the client finished sending must end with a complete
response (any status), or with a response head followed by the connection
closing when the upstream broke it (``x-chaos: reset-mid``) or the proxy
reset the stream for a reason it logged (the route timeout fired during a
slow body: flag UT in the access log, matched by ``x-request-id``).
Anything else is *lost*. After the
traffic stops: the proxy's open file descriptors must come back to the
count before any traffic, and its RSS may grow by less than 5% between the
end of the warm-up (the first 30% of the run, at least 5 s) and the end.

Exit status 0 when every check passed; the summary (``--json``: one JSON
line) lists the counts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import socket
import struct
import sys
import textwrap
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.harness import http_get, start_proxy  # after the sys.path insert above

# -- the chaotic upstream -------------------------------------------------------------

BEHAVIOURS = [("ok", 62), ("error", 10), ("stall", 4), ("reset_head", 6), ("reset_mid", 6), ("slow_body", 7),
              ("chunked", 5)]


class ChaosUpstream:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.servers: list[asyncio.base_events.Server] = []
        self.ports: list[int] = []
        self.counts: Counter[str] = Counter()
        self.open = 0

    def pick(self) -> str:
        total = sum(w for _, w in BEHAVIOURS)
        r = self.rng.uniform(0, total)
        for name, w in BEHAVIOURS:
            r -= w
            if r <= 0:
                return name
        return "ok"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lower = head.lower()
                if b"transfer-encoding: chunked" in lower:
                    while True:
                        line = await reader.readuntil(b"\r\n")
                        size = int(line.split(b";")[0], 16)
                        await reader.readexactly(size + 2)
                        if size == 0:
                            break
                else:
                    for line in lower.split(b"\r\n"):
                        if line.startswith(b"content-length:"):
                            await reader.readexactly(int(line.split(b":")[1]))
                what = self.pick()
                self.counts[what] += 1
                body = os.urandom(self.rng.choice([0, 16, 512, 4096, 32768]))
                if what == "ok":
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(body) + body)
                elif what == "chunked":
                    writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
                                 + b"%x\r\n%b\r\n" % (len(body), body) + b"0\r\n\r\n" if body else
                                 b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n")
                elif what == "error":
                    status = self.rng.choice([b"500 Internal Server Error", b"503 Service Unavailable"])
                    writer.write(b"HTTP/1.1 " + status + b"\r\ncontent-length: 4\r\n\r\noops")
                elif what == "stall":
                    while await reader.read(65536):
                        pass
                    return
                elif what == "reset_head":
                    self._reset(writer)
                    return
                elif what == "reset_mid":
                    writer.write(b"HTTP/1.1 200 OK\r\nx-chaos: reset-mid\r\ncontent-length: %d\r\n\r\n"
                                 % (len(body) + 100) + body[: len(body) // 2])
                    await writer.drain()
                    self._reset(writer)
                    return
                elif what == "slow_body":
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(body))
                    for i in range(4):
                        await writer.drain()
                        await asyncio.sleep(0.1)
                        writer.write(body[i * len(body) // 4:(i + 1) * len(body) // 4])
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError, ValueError, RuntimeError):
            pass  # (RuntimeError: uvloop refuses writes once the proxy closed the connection)
        finally:
            self.open -= 1
            writer.close()

    @staticmethod
    def _reset(writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    async def start(self, n: int = 2) -> None:
        for _ in range(n):
            server = await asyncio.start_server(self.handle, "127.0.0.1", 0, limit=1 << 20)
            self.servers.append(server)
            self.ports.append(server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        for s in self.servers:
            s.close()


# -- config variants --------------------------------------------------------------------

def service_entry(ports: list[int]) -> str:
    eps = "\n".join(f"  - {{address: 127.0.0.1, ports: {{http: {p}}}, labels: {{version: v{i + 1}}}}}"
                    for i, p in enumerate(ports))
    return textwrap.dedent("""\
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {name: svc}
        spec:
          hosts: [svc]
          ports: [{number: 9080, name: http, protocol: HTTP}]
          resolution: STATIC
          endpoints:
        """) + eps + "\n"


def routing(variant: int) -> str:
    """A VirtualService + DestinationRule; every variant differs (weights,
    timeouts, retries, and every third one the subsets' labels, which
    replaces the clusters)."""
    w = [20, 50, 80][variant % 3]
    retry = "{attempts: 1, retryOn: 'reset,connect-failure', perTryTimeout: 0.8s}" if variant % 2 else "{attempts: 0}"
    swap = variant % 3 == 2
    v1, v2 = ("v2", "v1") if swap else ("v1", "v2")
    return textwrap.dedent(f"""\
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {{name: svc}}
        spec:
          host: svc
          trafficPolicy:
            connectionPool:
              http: {{idleTimeout: 2s}}
          subsets:
          - {{name: a, labels: {{version: {v1}}}}}
          - {{name: b, labels: {{version: {v2}}}}}
        ---
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {{name: svc}}
        spec:
          hosts: [svc]
          http:
          - match: [{{uri: {{prefix: /timeout}}}}]
            timeout: 1s
            retries: {retry}
            route:
            - {{destination: {{host: svc, subset: a}}, weight: {w}}}
            - {{destination: {{host: svc, subset: b}}, weight: {100 - w}}}
          - route:
            - {{destination: {{host: svc, subset: a}}, weight: {100 - w}}}
            - {{destination: {{host: svc, subset: b}}, weight: {w}}}
            retries: {retry}
        """)


# -- clients ------------------------------------------------------------------------------

@dataclass
class Tally:
    sent: int = 0
    complete: int = 0
    truncated_expected: int = 0
    abandoned: int = 0
    truncated_by_proxy: int = 0
    lost: int = 0
    truncated_ids: list[bytes] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    lost_examples: list[str] = field(default_factory=list)

    def lose(self, why: str) -> None:
        self.lost += 1
        if len(self.lost_examples) < 10:
            self.lost_examples.append(why)


async def read_one(reader: asyncio.StreamReader) -> tuple[int, bytes, bool, bool]:
    """(status, head, complete, keep_alive) for one response; raises on a
    connection closed before any response byte."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    lower = head.lower()
    keep_alive = b"\r\nconnection: close" not in lower
    try:
        if b"transfer-encoding: chunked" in lower:
            while True:
                line = await reader.readuntil(b"\r\n")
                size = int(line.split(b";")[0], 16)
                await reader.readexactly(size + 2)
                if size == 0:
                    break
        else:
            for line in lower.split(b"\r\n"):
                if line.startswith(b"content-length:"):
                    await reader.readexactly(int(line.split(b":")[1]))
    except (asyncio.IncompleteReadError, ConnectionError):
        return status, head, False, False
    return status, head, True, keep_alive


async def client(port: int, rng: random.Random, stop: asyncio.Event, tally: Tally, name: int) -> None:
    reader = writer = None
    n = 0
    while not stop.is_set():
        n += 1
        rid = b"soak-%d-%d" % (name, n)
        if writer is None:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
        path = rng.choice([b"/timeout/x", b"/plain/y", b"/post"])
        if path == b"/post":
            body = os.urandom(rng.choice([0, 100, 5000, 40000]))
            if rng.random() < 0.5:
                req = (b"POST /post HTTP/1.1\r\nHost: svc\r\nx-request-id: %b\r\ncontent-length: %d\r\n\r\n"
                       % (rid, len(body)) + body)
            else:
                req = (b"POST /post HTTP/1.1\r\nHost: svc\r\nx-request-id: " + rid
                       + b"\r\ntransfer-encoding: chunked\r\n\r\n"
                       + (b"%x\r\n%b\r\n" % (len(body), body) if body else b"") + b"0\r\n\r\n")
        else:
            req = b"GET " + path + b" HTTP/1.1\r\nHost: svc\r\nx-request-id: " + rid + b"\r\n\r\n"
        abandon = rng.random() < 0.03
        try:
            writer.write(req)
            await writer.drain()
        except ConnectionError as exc:
            # The proxy closed this connection after telling us (or on a
            # reset we saw): a write failure before any request byte counted
            # is not a lost request; reconnect.
            tally.lose(f"write failed on an open connection: {exc!r}")
            writer = None
            continue
        tally.sent += 1
        if abandon:
            await asyncio.sleep(rng.uniform(0, 0.2))
            writer.transport.abort()
            tally.abandoned += 1
            writer = None
            continue
        try:
            status, head, complete, keep_alive = await asyncio.wait_for(read_one(reader), 15)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            tally.lose(f"{path!r}: connection closed before any response: {exc!r}")
            writer.close()
            writer = None
            continue
        except TimeoutError:
            tally.lose(f"{path!r}: no response within 15 s")
            writer.close()
            writer = None
            continue
        tally.statuses[status] += 1
        if complete:
            tally.complete += 1
        elif b"x-chaos: reset-mid" in head.lower():
            tally.truncated_expected += 1
        else:
            tally.truncated_ids.append(rid)  # explained only by a flag in the access log
        if not keep_alive:
            writer.close()
            writer = None
    if writer is not None:
        writer.close()


# -- probes ----------------------------------------------------------------------------------

def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def stats(admin_url: str) -> dict[str, int]:
    status, body = http_get(admin_url + "/stats?format=json")
    return {s["name"]: s["value"] for s in json.loads(body)["stats"]} if status == 200 else {}


# -- the run ---------------------------------------------------------------------------------

async def soak(seconds: float, clients: int, reload_every: float, seed: int, log: bool = True) -> dict[str, Any]:
    up = ChaosUpstream(random.Random(seed + 1))
    await up.start(2)
    access_log = Path(os.environ.get("TMPDIR", "/tmp")) / f"pyproxy-soak-{os.getpid()}.log"
    px = start_proxy({"se.yaml": service_entry(up.ports), "routing.yaml": routing(0)},
                     args=["--stream-idle-timeout", "2", "--seed", str(seed), "--log-level", "warning",
                           "--access-log", str(access_log), "--access-log-format", "json"])
    result: dict[str, Any] = {"seconds": seconds, "clients": clients, "seed": seed}
    try:
        pid = px.process.pid
        await asyncio.sleep(0.5)
        fds_before = fds(pid)
        tally = Tally()
        stop = asyncio.Event()
        tasks = [asyncio.ensure_future(client(px.outbound, random.Random(seed * 100 + i), stop, tally, i))
                 for i in range(clients)]
        started = time.monotonic()
        warm_until = started + max(5.0, seconds * 0.3)
        rss_warm = 0
        rss_peak = 0
        reloads = 0
        next_reload = started + reload_every
        while time.monotonic() - started < seconds:
            await asyncio.sleep(0.25)
            now = time.monotonic()
            rss_peak = max(rss_peak, rss(pid))
            if not rss_warm and now >= warm_until:
                rss_warm = rss(pid)
            if now >= next_reload:
                reloads += 1
                px.write_config("routing.yaml", routing(reloads))
                next_reload = now + reload_every
            if not px.alive():
                break
            if log and int(now - started) % 10 == 0 and now - started > 1 and (now - started) % 10 < 0.25:
                print(f"  {now - started:5.0f}s sent {tally.sent} complete {tally.complete} lost {tally.lost} "
                      f"rss {rss(pid) / 1e6:.1f} MB fds {fds(pid)}", file=sys.stderr)
        stop.set()
        await asyncio.wait(tasks, timeout=20)
        for t in tasks:
            if not t.done():
                t.cancel()
                tally.lose("client still waiting at the end")
            elif t.exception() is not None:
                tally.lose(f"client crashed: {t.exception()!r}")
        alive = px.alive()
        rss_end = rss(pid) if alive else 0
        # Let idle upstream connections (idleTimeout 2s) and lingering
        # closes run out, then compare descriptors.
        fds_after = fds(pid) if alive else -1
        deadline = time.monotonic() + 15
        while alive and fds_after > fds_before and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            fds_after = fds(pid)
        st = stats(px.admin_url) if alive else {}
        # A body cut short by the proxy is an error response only if the
        # proxy said why (a reset flag on that request's log line).
        await asyncio.sleep(0.5)  # the access log writes in batches
        flags = {}
        cut_flags: Counter[str] = Counter()
        for line in access_log.read_text().splitlines() if access_log.exists() else []:
            with contextlib.suppress(ValueError):
                doc = json.loads(line)
                flags[doc.get("request_id")] = doc.get("response_flags")
        for rid in tally.truncated_ids:
            why = flags.get(rid.decode())
            if why and any(f in why.split(",") for f in ("UT", "UC", "UPE", "SI", "DC")):
                tally.truncated_by_proxy += 1
                cut_flags[why] += 1
            else:
                tally.lose(f"{rid!r}: truncated response without a logged cause (flags {why!r})")
        result.update({
            "alive": alive,
            "sent": tally.sent, "complete": tally.complete, "truncated_expected": tally.truncated_expected,
            "abandoned": tally.abandoned, "truncated_by_proxy": tally.truncated_by_proxy,
            "truncated_by_proxy_flags": dict(cut_flags),
            "lost": tally.lost, "lost_examples": tally.lost_examples,
            "statuses": dict(sorted(tally.statuses.items())),
            "upstream_behaviours": dict(up.counts),
            "reloads_written": reloads,
            "reloads_applied": st.get("pyproxy.config_reloads.success", 0),
            "reloads_failed": st.get("pyproxy.config_reloads.failure", 0),
            "fds_before": fds_before, "fds_after": fds_after,
            "rss_warm_mb": round(rss_warm / 1e6, 2), "rss_end_mb": round(rss_end / 1e6, 2),
            "rss_peak_mb": round(rss_peak / 1e6, 2),
            "rss_growth_pct": round(100.0 * (rss_end - rss_warm) / rss_warm, 2) if rss_warm else None,
            "downstream_cx_active": st.get("http.downstream_cx_active"),
            "proxy_errors_logged": px.log().count("Traceback"),
        })
    finally:
        px.stop()
        await up.stop()
        with contextlib.suppress(Exception):
            import shutil

            shutil.rmtree(px.config_dir, ignore_errors=True)
            access_log.unlink()
    failures = []
    if not result.get("alive"):
        failures.append("the proxy died")
    if result.get("lost"):
        failures.append(f"{result['lost']} request(s) lost")
    accounted = sum(result.get(k, 0) for k in ("complete", "truncated_expected", "abandoned", "truncated_by_proxy",
                                               "lost"))
    if accounted != result.get("sent"):
        failures.append(f"{result.get('sent')} sent but {accounted} accounted for")
    if result.get("fds_after", 0) > result.get("fds_before", 0):
        failures.append(f"file descriptors {result['fds_before']} -> {result['fds_after']}")
    growth = result.get("rss_growth_pct")
    if growth is None or growth >= 5.0:
        failures.append(f"RSS growth after warm-up {growth}%")
    if result.get("reloads_failed"):
        failures.append(f"{result['reloads_failed']} reload(s) rejected")
    if result.get("reloads_applied", 0) < max(1, result.get("reloads_written", 0) // 2):
        failures.append(f"only {result.get('reloads_applied')} of {result.get('reloads_written')} reloads applied")
    if result.get("proxy_errors_logged"):
        failures.append("tracebacks in the proxy log")
    if result.get("downstream_cx_active"):
        failures.append(f"{result['downstream_cx_active']} downstream connection(s) still open")
    result["failures"] = failures
    result["ok"] = not failures
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=None)
    ap.add_argument("--seconds", type=float, default=None)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--reload-every", type=float, default=3.0, metavar="SECONDS")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    a = ap.parse_args()
    seconds = a.seconds if a.seconds is not None else (a.minutes or 5.0) * 60
    if not 1 <= seconds <= 24 * 3600 or not 1 <= a.clients <= 1000:
        ap.error("--seconds/--minutes must be within 1 s..24 h and --clients within 1..1000")
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    result = asyncio.run(soak(seconds, a.clients, a.reload_every, a.seed, log=not a.json))
    if a.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:22s} {v}")
        print("PASS" if result["ok"] else "FAIL")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
