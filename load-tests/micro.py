#!/usr/bin/env python3
"""In-process CPU cost of one proxied request, without sockets.

    python load-tests/micro.py                       # realistic config, telemetry on, 1% sampling
    python load-tests/micro.py --access-log /tmp/a.log --n 100000
    python load-tests/micro.py --profile             # cProfile of the same loop, top functions
    PYTHONPATH=/tmp/before python load-tests/micro.py   # another source tree

The real worker, snapshot, observer (metrics, tracing with a span processor
that drops spans, access log when asked), ``DownstreamConnection``,
``Exchange``, pools and ``UpstreamConnection`` (with their httptools
parsers) run on a real uvloop loop; only the two transports are fakes that
keep what is written. Each request is the bytes wrk sends (``GET /`` with
``Host: bench``), fed to the downstream connection; the upstream connection
the request was written to is then fed an nginx response like the
benchmark's (100-byte body). What is left out is exactly the kernel: the
syscalls and the event loop's polling, which ``bench.py``/``ab.py`` measure.

Prints µs of CPU (process time, all threads) per request, as the median of
``--repeat`` runs; the number is much steadier than a wrk run on a shared
machine, which makes it the tool for the Python side of the hot path.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench  # after the sys.path insert above: the configs

REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"


def response(port: int) -> bytes:
    return (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Sat, 21 Nov 2026 01:03:53 GMT\r\n"
            b"Content-Type: text/plain\r\nContent-Length: 100\r\nConnection: keep-alive\r\n"
            b"X-Upstream-Port: %d\r\n\r\n" % port + bench.BODY)


class FakeTransport:
    """What uvloop's TCPTransport offers the protocols, writing into a list."""

    def __init__(self, sink: list) -> None:
        self.sink = sink
        self.closed = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def write(self, data: bytes) -> None:
        self.sink.append(data)

    def writelines(self, data: Any) -> None:
        self.sink.append(b"".join(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    abort = close

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def write_eof(self) -> None:
        pass


class DropSpans:
    """A span processor that drops what it gets (the export thread is not measured here)."""

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        pass

    def on_end(self, span: Any) -> None:
        pass

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 0) -> bool:
        return True


async def run(args: argparse.Namespace) -> list[float]:
    from pyproxy.cli import build_parser, parse_run_options
    from pyproxy.http.downstream import DownstreamConnection
    from pyproxy.observability import build_observer
    from pyproxy.upstream.connection import UpstreamConnection
    from pyproxy.worker import Worker

    ports = {"v1": [20001, 20002], "v2": [20003, 20004]}
    wd = Path(tempfile.mkdtemp(prefix="pyproxy-micro-"))
    (wd / "bench.yaml").write_text(bench.istio_bare_config(ports["v1"]) if args.bare
                                   else bench.istio_bench_config(ports))
    _, run_parser = build_parser()
    flags = ["--config", str(wd), "--outbound", "127.0.0.1:0", "--inbound", "127.0.0.1:0",
             "--tracing", "off" if args.bare or args.no_tracing else "on", "--trace-sampling", str(args.sampling),
             "--watch-interval", "0", "--access-log", args.access_log or "off"]
    opts = parse_run_options(run_parser.parse_args(flags), {})
    loop = asyncio.get_running_loop()
    worker = Worker(opts, loop, rng=random.Random(1),
                    observer_factory=lambda w: build_observer(w, processor=None if args.export else DropSpans()))
    await worker.start()
    try:
        listener = worker.listeners[0]
        down_out: list[bytes] = []
        conn = DownstreamConnection(listener)
        conn.connection_made(FakeTransport(down_out))
        # One idle pooled connection per endpoint, each with its own sink.
        ups: list[tuple[UpstreamConnection, list[bytes], bytes]] = []
        for cluster in worker.snapshot.all_clusters():
            for ep in cluster.endpoints:
                sink: list[bytes] = []
                up = UpstreamConnection(ep)
                up.created = loop.time()
                up.connection_made(FakeTransport(sink))
                ep.connections += 1
                cluster.stats.upstream_cx_active += 1
                ep.idle.append(up)
                up.idle_since = loop.time()
                ups.append((up, sink, response(ep.port)))
        n = args.n

        def once() -> None:
            conn.data_received(REQUEST)
            for up, sink, resp in ups:
                if sink:
                    sink.clear()
                    up.data_received(resp)
                    break
            else:
                raise RuntimeError(f"no upstream write; downstream got {b''.join(down_out)[:300]!r}")
            if not down_out:
                raise RuntimeError("no response downstream")
            down_out.clear()

        for _ in range(2000):  # warm-up (caches, metric series)
            once()
        results = []
        if args.profile:
            import cProfile
            import pstats

            prof = cProfile.Profile()
            prof.enable()
            for _ in range(n):
                once()
            prof.disable()
            pstats.Stats(prof).sort_stats(args.sort).print_stats(args.top)
            return []
        for _ in range(args.repeat):
            t0 = time.process_time()
            for _ in range(n):
                once()
            results.append((time.process_time() - t0) / n * 1e6)
            await asyncio.sleep(0)  # let the loop run what the requests scheduled
        return results
    finally:
        await worker.stop()


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=30000, help="requests per run")
    p.add_argument("--repeat", type=int, default=7, help="runs; the median is reported")
    p.add_argument("--sampling", type=float, default=1.0, help="trace sampling percent")
    p.add_argument("--access-log", default="", help="access log path (default off)")
    p.add_argument("--bare", action="store_true", help="registry-only config, tracing off")
    p.add_argument("--no-tracing", action="store_true", help="realistic config, tracing off")
    p.add_argument("--export", action="store_true",
                   help="export spans as configured by OTEL_* variables (default: a processor that drops them)")
    p.add_argument("--profile", action="store_true", help="cProfile instead of timing")
    p.add_argument("--sort", default="tottime")
    p.add_argument("--top", type=int, default=40)
    args = p.parse_args(argv)
    import uvloop

    res = uvloop.run(run(args))
    if res:
        import pyproxy

        print(f"{statistics.median(res):.2f} µs/request (median of {len(res)} x {args.n}; "
              f"min {min(res):.2f}, max {max(res):.2f}) [{os.path.dirname(pyproxy.__file__)}]")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
