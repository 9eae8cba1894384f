#!/usr/bin/env python3
"""CPU per rate-limit check: pyproxy's Redis transport vs redis-py's asyncio client.

    python load-tests/redis_client_cost.py [--checks 20000]

A check is what a global rate limit costs per request: one pipeline of
``INCRBY key 1`` + ``EXPIRE key 60`` (the ratelimit service's fixed window).
Both clients run on uvloop against a throw-away ``redis-server`` on loopback
(no persistence), sequentially (one check at a time) and with 50 checks in
flight (a proxy under load). The figure is this process's CPU time (user +
system, ``time.process_time``) divided by the number of checks, so the
Redis server's own work is not counted. Printed as a Markdown table; the
reading that justified writing the transport is kept in
load-tests/results/ratelimit-redis-client.md.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def pyproxy_client(port: int, checks: int, inflight: int) -> float:
    from pyproxy.ratelimit.redis import RedisClient, RedisURL

    loop = asyncio.get_running_loop()
    client = RedisClient(RedisURL("127.0.0.1", port), loop)
    client.ensure_connecting()
    while not client.ready:
        await asyncio.sleep(0.01)

    async def one(i: int) -> None:
        key = b"bench_%d" % (i % 1000)
        futures = client.pipeline(((b"INCRBY", key, 1), (b"EXPIRE", key, 60)))
        await futures[-1]
        futures[0].result()

    cpu = await _run(one, checks, inflight)
    await client.close()
    return cpu


async def redis_py_client(port: int, checks: int, inflight: int) -> float:
    import redis.asyncio as aioredis

    client = aioredis.Redis(host="127.0.0.1", port=port, max_connections=inflight)
    await client.ping()

    async def one(i: int) -> None:
        key = b"bench_%d" % (i % 1000)
        async with client.pipeline(transaction=False) as pipe:
            pipe.incrby(key, 1)
            pipe.expire(key, 60)
            await pipe.execute()

    cpu = await _run(one, checks, inflight)
    await client.aclose()
    return cpu


async def _run(one, checks: int, inflight: int) -> float:  # type: ignore[no-untyped-def]
    for i in range(min(500, checks)):  # warm up
        await one(i)
    start = time.process_time()
    if inflight == 1:
        for i in range(checks):
            await one(i)
    else:
        sem = asyncio.Semaphore(inflight)

        async def guarded(i: int) -> None:
            async with sem:
                await one(i)

        await asyncio.gather(*(guarded(i) for i in range(checks)))
    return (time.process_time() - start) / checks * 1e6


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checks", type=int, default=20000)
    args = p.parse_args()
    server = shutil.which("redis-server")
    if server is None:
        print("redis-server is not installed", file=sys.stderr)
        return 2
    import uvloop

    port = free_port()
    workdir = tempfile.mkdtemp()
    proc = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                             "no", "--dir", workdir], stdout=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        rows = []
        for name, fn in (("pyproxy transport (hiredis parser)", pyproxy_client), ("redis-py asyncio", redis_py_client)):
            for inflight in (1, 50):
                cpu = uvloop.run(fn(port, args.checks, inflight))
                rows.append((name, inflight, cpu))
        print("| client | checks in flight | client CPU per check (µs) |")
        print("|---|---|---|")
        for name, inflight, cpu in rows:
            print(f"| {name} | {inflight} | {cpu:.1f} |")
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
