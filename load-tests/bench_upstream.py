#!/usr/bin/env python3
"""A small fast HTTP/1.1 upstream for the benchmark when nginx is not installed.

    python load-tests/bench_upstream.py [--tls CERTS_DIR] PORT [PORT ...]

Answers every request on every port with the same 200 response (a fixed
100-byte body, ``X-Upstream-Port`` naming the port), keep-alive,
pipelining-safe. Like the nginx upstream bench.py configures, it echoes
which request-id/trace headers arrived (``x-seen-request-id``,
``x-seen-traceparent``, ``x-seen-b3``). It is a ``asyncio.Protocol`` on
uvloop with the httptools parser, so one process serves well above what one
proxy worker can push on a small machine. Request bodies are read and
discarded (httptools frames them). Exits on SIGTERM/SIGINT.

``--tls CERTS_DIR`` serves mutual TLS with the workload certificate in
CERTS_DIR (istio-agent's layout, ``pyproxy ca issue``), as an mTLS sidecar's
inbound would: the mTLS benchmark targets originate ISTIO_MUTUAL to it.
"""

from __future__ import annotations

import asyncio
import functools
import signal
import sys
from pathlib import Path

import httptools

BODY = b"x" * 99 + b"\n"  # 100 bytes, like the nginx upstream
SEEN = {b"x-request-id": b"x-seen-request-id", b"traceparent": b"x-seen-traceparent",
        b"x-b3-traceid": b"x-seen-b3"}


class UpstreamProtocol(asyncio.Protocol):
    __slots__ = ("head", "out", "parser", "seen", "transport")

    def __init__(self, port: int) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.out: list[bytes] = []
        self.head = (b"HTTP/1.1 200 OK\r\nServer: bench-upstream\r\nContent-Type: text/plain\r\n"
                     b"X-Upstream-Port: %d\r\nContent-Length: %d\r\n" % (port, len(BODY)))
        self.seen: list[bytes] = []

    def on_header(self, name: bytes, value: bytes) -> None:
        echo = SEEN.get(name.lower())
        if echo is not None:
            self.seen.append(echo + b": " + value + b"\r\n")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                self.transport.close()
            return
        # one write for everything answered from this read (pipelined batches)
        if self.out and self.transport is not None:
            self.transport.write(b"".join(self.out))
            self.out.clear()

    def on_message_complete(self) -> None:
        keep = self.parser.should_keep_alive()
        self.out.append(self.head + b"".join(self.seen) + (b"\r\n" if keep else b"Connection: close\r\n\r\n")
                        + BODY)
        self.seen.clear()
        if not keep and self.transport is not None:
            self.transport.write(b"".join(self.out))
            self.out.clear()
            self.transport.close()


async def serve(ports: list[int], tls_dir: str | None = None) -> None:
    loop = asyncio.get_running_loop()
    ctx = None
    if tls_dir is not None:
        # A mesh workload's inbound mTLS (pyproxy's own server context: the
        # certificate in tls_dir, client certificates required).
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from pyproxy.security.certs import server_context

        d = Path(tls_dir)
        ctx = server_context(str(d / "cert-chain.pem"), str(d / "key.pem"), str(d / "root-cert.pem"))
    servers = [
        await loop.create_server(functools.partial(UpstreamProtocol, p), "127.0.0.1", p,
                                 reuse_address=True, backlog=4096, ssl=ctx)
        for p in ports
    ]
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    await stop.wait()
    for s in servers:
        s.close()


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    tls_dir = None
    if argv[0] == "--tls":
        tls_dir, argv = argv[1], argv[2:]
    asyncio.run(serve([int(a) for a in argv], tls_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
