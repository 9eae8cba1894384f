#!/usr/bin/env python3
"""What a new mTLS connection costs pyproxy's upstream side, and what a warm
one adds per exchange (docs/mtls.md "Cost").

    python load-tests/mtls_connection_cost.py [--connections 300] [--exchanges 3000]

Both ends run in this one uvloop process with the contexts pyproxy builds
(security/certs.py: the workload certificate, ISTIO_MUTUAL client ALPN,
server requiring a client certificate), so the figures are the CPU of a
client and a server together. asyncio has no client-side TLS session
resumption (create_connection takes no session), so every new upstream
connection is a full handshake; keep-alive pooling is what amortizes it.
CPU time (process_time) is reported, not wall time, to be less sensitive to a
busy machine; still, read it as an order of magnitude.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pyproxy.security.ca import init_ca, issue_to_dir
from pyproxy.security.certs import load_credentials


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[attr-defined]


class Client(asyncio.Protocol):
    def __init__(self) -> None:
        self.waiter: asyncio.Future[bytes] | None = None

    def data_received(self, data: bytes) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(data)


async def run(connections: int, exchanges: int, key: str) -> None:
    loop = asyncio.get_running_loop()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        init_ca(d / "ca", key_type=key)
        issue_to_dir(d / "ca", d / "server", "default", "server", key_type=key)
        issue_to_dir(d / "ca", d / "client", "default", "client", key_type=key)
        server_creds = load_credentials(str(d / "server"))
        client_creds = load_credentials(str(d / "client"))
    results: dict[str, float] = {}
    for name, server_ctx, client_ctx in (("plaintext", None, None),
                                          ("mTLS", server_creds.server_context, client_creds.client_context)):
        server = await loop.create_server(Echo, "127.0.0.1", 0, ssl=server_ctx)
        port = server.sockets[0].getsockname()[1]
        kwargs = {"ssl": client_ctx, "server_hostname": "outbound_.9080_._.x"} if client_ctx else {}
        # New connections: connect (+ handshake), one 1-byte exchange, close.
        per_conn = []
        for _ in range(connections):
            c0 = time.process_time()
            transport, proto = await loop.create_connection(Client, "127.0.0.1", port, **kwargs)
            proto.waiter = loop.create_future()
            transport.write(b"x")
            await proto.waiter
            transport.close()
            per_conn.append(time.process_time() - c0)
        # Warm connection: 1 KiB request/response exchanges.
        transport, proto = await loop.create_connection(Client, "127.0.0.1", port, **kwargs)
        payload = b"a" * 1024
        c0 = time.process_time()
        for _ in range(exchanges):
            proto.waiter = loop.create_future()
            transport.write(payload)
            got = 0
            while got < len(payload):
                got += len(await proto.waiter)
                if got < len(payload):
                    proto.waiter = loop.create_future()
        warm = (time.process_time() - c0) / exchanges
        transport.close()
        server.close()
        results[name] = warm
        print(f"{name:9s} new connection + 1-byte echo: median {statistics.median(per_conn) * 1e3:.2f} ms CPU "
              f"(p90 {sorted(per_conn)[int(len(per_conn) * 0.9)] * 1e3:.2f} ms, {connections} connections); "
              f"warm 1 KiB exchange: {warm * 1e6:.1f} us CPU")
    print(f"TLS adds {(results['mTLS'] - results['plaintext']) * 1e6:.1f} us CPU per warm 1 KiB exchange "
          f"(both ends); key type {key}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--connections", type=int, default=300)
    p.add_argument("--exchanges", type=int, default=3000)
    p.add_argument("--key", choices=("ec", "rsa"), default="ec")
    args = p.parse_args()
    import uvloop

    uvloop.run(run(args.connections, args.exchanges, args.key))


if __name__ == "__main__":
    main()
