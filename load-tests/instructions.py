#!/usr/bin/env python3
"""Instructions per proxied request, counted by valgrind (callgrind).

    python load-tests/instructions.py                          # this tree, realistic config
    python load-tests/instructions.py --tree /tmp/before --tree .
    python load-tests/instructions.py -- --tracing off         # pyproxy flags after --
    python load-tests/instructions.py --mtls                   # the TLS path: ISTIO_MUTUAL to mTLS upstreams
    python load-tests/instructions.py --h2                     # HTTP/2 clients (h2c, 10 streams per connection)

Why: on a shared or virtualised 2-CPU machine, wrk rounds of the same
build differ by ±15% (see load-tests/README.md), which hides most single
optimisations. callgrind counts the instructions the proxy process executes
(all its threads, user space; the kernel's share is not counted), and that
count is the same from run to run whatever else the machine does.

How: the real ``pyproxy run`` (realistic bench config, telemetry as
``bench.py`` sets it, access log off) runs under callgrind in front of four
uvloop upstreams (``bench_upstream.py``); a client sends N requests over 20
keep-alive connections. Two runs per tree, with N and 5N requests; the
difference divided by 4N is the per-request count, free of start-up cost.
Each run takes about half a minute (valgrind slows Python ~50×).
With ``--mtls`` each run first sends 50 requests per connection, so the
upstream pool has grown, and counts from there; OpenSSL's handshakes
(``SSL_do_handshake``, read from the profile) are not counted: they are a
per-connection cost, and how many fall in a run depends on timing
(``mtls_connection_cost.py`` measures them).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench  # the config and the port helper

CONNS = 20
ADDR = "127.0.0.1"
WARMUP_PER_CONN = 50  # --mtls: requests per connection before counting starts


async def _client(port: int, conns: int, per_conn: int) -> None:
    async def one() -> None:
        reader, writer = await asyncio.open_connection(ADDR, port)
        try:
            for _ in range(per_conn):
                writer.write(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
                head = await reader.readuntil(b"\r\n\r\n")
                m = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
                if not head.startswith(b"HTTP/1.1 200") or m is None:
                    raise RuntimeError(f"unexpected response: {head[:200]!r}")
                await reader.readexactly(int(m.group(1)))
        finally:
            writer.close()

    await asyncio.gather(*(one() for _ in range(conns)))


async def _h2_client(port: int, conns: int, per_conn: int, streams: int = 10) -> None:
    """The same GETs over HTTP/2 (h2c prior knowledge, the ``h2`` library):
    each connection keeps ``streams`` requests in flight."""
    import h2.config
    import h2.connection
    import h2.events

    async def one() -> None:
        reader, writer = await asyncio.open_connection(ADDR, port)
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        conn.initiate_connection()
        headers = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"bench"), (b":path", b"/")]
        sent = done = 0
        try:
            while done < per_conn:
                while sent < per_conn and sent - done < streams:
                    conn.send_headers(conn.get_next_available_stream_id(), headers, end_stream=True)
                    sent += 1
                writer.write(conn.data_to_send())
                data = await reader.read(65536)
                if not data:
                    raise RuntimeError("connection closed")
                for ev in conn.receive_data(data):
                    kind = type(ev)
                    if kind is h2.events.ResponseReceived and dict(ev.headers)[b":status"] != b"200":
                        raise RuntimeError(f"unexpected response: {ev.headers}")
                    if kind is h2.events.DataReceived:
                        conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                    elif kind is h2.events.StreamEnded:
                        done += 1
                    elif kind is h2.events.StreamReset:
                        raise RuntimeError(f"stream reset: {ev}")
        finally:
            writer.close()

    await asyncio.gather(*(one() for _ in range(conns)))


def count(tree: Path, requests: int, flags: list[str], wd: Path, mtls: bool = False,
          ratelimit: str = "none", http2: bool = False) -> int:
    """Instructions the proxy process executed for start-up + ``requests``.
    ``mtls``: the upstreams serve mutual TLS and the proxy reaches them by
    ISTIO_MUTUAL (auto mTLS), as bench.py's pyproxy-mtls target.
    ``ratelimit`` local/global adds bench.py's never-triggering rate limit
    (global: against a redis-server started here, not counted)."""
    ports = {"v1": [bench.free_port(), bench.free_port()], "v2": [bench.free_port(), bench.free_port()]}
    cfg = wd / "config"
    cfg.mkdir(exist_ok=True)
    certs = bench.make_mesh_certs(wd) if mtls else None
    (cfg / "bench.yaml").write_text(bench.istio_bench_config(ports, mtls=certs))
    upstream_tls = ["--tls", str(certs.server)] if certs is not None else []
    if certs is not None:
        flags = [*flags, "--certs", str(certs.client)]
    procs: list[subprocess.Popen] = []
    flags = list(flags)
    try:
        if ratelimit != "none":
            files = bench.ratelimit_files(ratelimit)
            (cfg / "ratelimit.yaml").write_text(files["ratelimit.yaml"])
        if ratelimit == "global":
            rls = wd / "rls"
            rls.mkdir(exist_ok=True)
            (rls / "config.yaml").write_text(files["rls/config.yaml"])
            redis_port = bench.free_port()
            procs.append(subprocess.Popen(["redis-server", "--port", str(redis_port), "--bind", ADDR, "--save", "",
                                           "--appendonly", "no", "--dir", str(wd)], stdout=subprocess.DEVNULL))
            bench.wait_until(lambda: bench._answers_redis(redis_port), 10, "redis-server")
            flags += ["--ratelimit-config", str(rls), "--ratelimit-redis", f"redis://{ADDR}:{redis_port}"]
        for p in ports["v1"] + ports["v2"]:
            procs.append(subprocess.Popen([sys.executable, str(HERE / "bench_upstream.py"), *upstream_tls, str(p)],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        out = bench.free_port()
        log = wd / "proxy.log"
        # A fixed hash seed: string hashes (attribute and key lookups) collide
        # the same way in every run, which makes the count repeat more closely.
        env = dict(os.environ, PYTHONPATH=str(tree), PYTHONHASHSEED=os.environ.get("PYTHONHASHSEED", "0"))
        # --mtls keeps callgrind's profile: the handshakes' cost is read from it.
        profile = wd / "callgrind.out"
        profile.unlink(missing_ok=True)
        cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={profile if mtls else '/dev/null'}",
               sys.executable, "-m", "pyproxy", "run", "--config", str(cfg),
               "--outbound", f"{ADDR}:{out}", "--inbound", f"{ADDR}:{bench.free_port()}",
               "--admin", f"{ADDR}:{bench.free_port()}", "--stats", f"{ADDR}:{bench.free_port()}",
               "--app", f"{ADDR}:{ports['v1'][0]}", "--access-log", "off", *flags]
        with open(log, "wb") as logf:
            proxy = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=wd)
        procs.append(proxy)
        bench.wait_until(lambda: bench.http_probe(out)[0] == 200, 300,
                         "pyproxy under valgrind", proxy, log)
        client = _h2_client if http2 else _client
        if mtls:
            # How many connections the upstream pool opens while it grows
            # depends on timing (±10 between two runs): it is grown first,
            # and callgrind's counters are zeroed after it ("Collected" then
            # counts from there).
            asyncio.run(client(out, CONNS, WARMUP_PER_CONN))
            subprocess.run(["callgrind_control", "-z", str(proxy.pid)], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        asyncio.run(client(out, CONNS, max(1, requests // CONNS)))
        proxy.send_signal(2)
        proxy.wait(timeout=300)
        m = re.search(r"Collected : (\d+)", log.read_text())
        if m is None:
            raise RuntimeError(f"no callgrind total in {log}:\n{log.read_text()[-2000:]}")
        if mtls:
            # OpenSSL's handshakes (SSL_do_handshake, ~10 M instructions each
            # under callgrind) are left out: they are per connection, and how
            # many fall in a run still depends on timing (±2 after the
            # warm-up, ±5,000 per request). mtls_connection_cost.py measures them.
            return int(m.group(1)) - _inclusive(profile, "SSL_do_handshake")
        return int(m.group(1))
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


def _inclusive(profile: Path, function: str) -> int:
    """The instructions spent in ``function`` and what it called: the sum of
    the costs of its call sites in a callgrind profile (it is not recursive)."""
    names: dict[str, str] = {}
    total = 0
    target = False
    lines = profile.read_text().splitlines()
    for i, line in enumerate(lines):
        if line.startswith("cfn="):
            m = re.match(r"cfn=\((\d+)\)(?: (.*))?", line)
            if m is None:
                target = line[4:] == function
                continue
            if m.group(2) is not None:
                names[m.group(1)] = m.group(2)
            target = names.get(m.group(1)) == function
        elif line.startswith("fn="):
            m = re.match(r"fn=\((\d+)\)(?: (.*))?", line)
            if m is not None and m.group(2) is not None:
                names[m.group(1)] = m.group(2)
        elif line.startswith("calls=") and target:
            total += int(lines[i + 1].split()[1])  # the call's inclusive cost
            target = False
    return total


def main(argv: list[str]) -> int:
    if "--" in argv:
        i = argv.index("--")
        argv, flags = argv[:i], argv[i + 1:]
    else:
        flags = []
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tree", action="append", type=Path,
                   help="a pyproxy source tree (repeatable; default: this checkout)")
    p.add_argument("--requests", type=int, default=1000, help="N: the runs send N and 5N requests")
    p.add_argument("--mtls", action="store_true",
                   help="the upstreams serve mutual TLS, the proxy originates ISTIO_MUTUAL (the TLS path)")
    p.add_argument("--h2", action="store_true",
                   help="HTTP/2 clients (h2c prior knowledge, 10 streams in flight per connection)")
    p.add_argument("--ratelimit", choices=("none", "local", "global"), default="none",
                   help="add a rate limit that never triggers (bench.py's pyproxy-localrl/-globalrl config)")
    p.add_argument("--trace-sampling", default="0",
                   help="percent (default 0: tracing on, nothing sampled, so runs are repeatable; "
                        "1%% adds the cost of exporting ~1%% of requests as spans, at random)")
    args = p.parse_args(argv)
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (apt-get install valgrind)", file=sys.stderr)
        return 2
    tel = bench.plan_telemetry(bench.pyproxy_help(), float(args.trace_sampling))
    flags = tel.flags + flags
    trees = args.tree or [HERE.parent]
    for tree in trees:
        wd = Path(tempfile.mkdtemp(prefix="pyproxy-instr-"))
        try:
            t0 = time.monotonic()
            small = count(tree.resolve(), args.requests, flags, wd, args.mtls, args.ratelimit, args.h2)
            large = count(tree.resolve(), args.requests * 5, flags, wd, args.mtls, args.ratelimit, args.h2)
            per = (large - small) / (args.requests * 4)
            limit = f"; rate limit: {args.ratelimit}" if args.ratelimit != "none" else ""
            print(f"{tree}: {per:,.0f} instructions per request{' (mTLS upstreams)' if args.mtls else ''}"
                  f"{' (HTTP/2 clients)' if args.h2 else ''} "
                  f"(flags: {' '.join(flags) or '-'}{limit}; {time.monotonic() - t0:.0f} s)", flush=True)
        finally:
            shutil.rmtree(wd, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
