#!/usr/bin/env python3
"""CPU per request of the HTTP/2 codec libraries on the server side, as
pyproxy's downstream codec uses them: ``h2`` and ``jh2`` (its fork with a
Rust core, same API), header validation/normalisation on and off, and
``h2`` with pyproxy's cache-friendly HPACK encoder (http/hpack_static.py).

    python load-tests/h2_codec_cost.py            # jh2 is measured when installed (pip install jh2)

One in-memory client and server connection per variant (no sockets); per
request the server takes a GET with 8 headers (``receive_data``), answers
10 response headers and a 100-byte body (``send_headers``, ``send_data``
with END_STREAM, ``data_to_send``); the client side is not timed. Variants
run interleaved in rounds, the median per-request time of each is reported
(process CPU time, so other load on the machine matters less than for wall
time; compare the ratios, not the absolute numbers).
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time
from pathlib import Path

REQUEST = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"reviews:9080"), (b":path", b"/reviews/0"),
           (b"user-agent", b"grpc-python/1.85"), (b"accept", b"*/*"), (b"x-request-id", b"8f2a-4c1d"),
           (b"x-b3-traceid", b"463ac35c9f6413ad")]
RESPONSE = [(b":status", b"200"), (b"content-type", b"text/plain"), (b"content-length", b"100"),
            (b"date", b"Fri, 04 Dec 2026 18:00:00 GMT"), (b"server", b"envoy"),
            (b"x-bench-config", b"1"), (b"cache-control", b"no-cache"), (b"vary", b"accept-encoding")]
BODY = b"x" * 100


class Variant:
    def __init__(self, lib: str, validate: bool, static: bool = False) -> None:
        self.name = f"{lib}, validation {'on' if validate else 'off'}" + (", StaticEncoder" if static else "")
        config = importlib.import_module(f"{lib}.config")
        connection = importlib.import_module(f"{lib}.connection")
        flags = {"validate_inbound_headers": validate, "normalize_inbound_headers": validate,
                     "validate_outbound_headers": validate, "normalize_outbound_headers": validate}
        self.client = connection.H2Connection(config.H2Configuration(client_side=True, header_encoding=None))
        self.server = connection.H2Connection(config.H2Configuration(client_side=False, header_encoding=None,
                                                                     **flags))
        if static:  # pyproxy's cache-friendly HPACK encoder (http/hpack_static.py)
            sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
            from pyproxy.http.hpack_static import StaticEncoder

            self.server.encoder = StaticEncoder()
        self.client.initiate_connection()
        self.server.initiate_connection()
        self._pump()
        self.events = importlib.import_module(f"{lib}.events")

    def _pump(self) -> None:
        self.server.receive_data(self.client.data_to_send())
        self.client.receive_data(self.server.data_to_send())

    def run(self, n: int) -> float:
        """CPU seconds the server side spent on ``n`` requests."""
        spent = 0.0
        client, server = self.client, self.server
        received = self.events.RequestReceived
        data_received = self.events.DataReceived
        for _ in range(n):
            sid = client.get_next_available_stream_id()
            client.send_headers(sid, REQUEST, end_stream=True)
            wire = client.data_to_send()
            t0 = time.process_time()
            for ev in server.receive_data(wire):
                if type(ev) is received:
                    # (a request id and a service time that change per request, as a proxy's do)
                    server.send_headers(ev.stream_id, [*RESPONSE, (b"x-request-id", b"%016x" % sid),
                                                       (b"x-envoy-upstream-service-time", b"%d" % (sid % 7))])
                    server.send_data(ev.stream_id, BODY, end_stream=True)
            out = server.data_to_send()
            spent += time.process_time() - t0
            for ev in client.receive_data(out):
                if type(ev) is data_received:
                    client.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            server.receive_data(client.data_to_send())  # the window updates (not timed)
        return spent


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=2000, help="requests per variant per round")
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args(argv)
    libs = ["h2"]
    try:
        importlib.import_module("jh2")
        libs.append("jh2")
    except ImportError:
        print("jh2 not installed (pip install jh2): measuring h2 only", file=sys.stderr)
    variants = [(lib, v, False) for lib in libs for v in (True, False)] + [("h2", False, True)]
    times: dict[str, list[float]] = {}
    versions = {lib: importlib.import_module(lib).__version__ for lib in libs}
    for _ in range(args.rounds):
        for lib, v, static in variants:
            var = Variant(lib, v, static)  # fresh connections: windows and stream ids do not run out
            times.setdefault(var.name, []).append(var.run(args.requests) / args.requests * 1e6)
    base = statistics.median(times["h2, validation on"])
    print(f"server-side codec CPU per request ({args.rounds} rounds x {args.requests}, median; "
          + ", ".join(f"{k} {v}" for k, v in versions.items()) + ")")
    for name, vals in times.items():
        med = statistics.median(vals)
        print(f"  {name:24s} {med:7.1f} us  ({med / base:.2f}x of h2 with validation)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
