"""A small, bounded load generator for canary demos and tests.

    python -m pyproxy.canary.load URL [--rate 20] [--duration 60] [--proxy http://POD:15001]

Sends GET ``URL`` at a fixed rate (open loop: a slow answer does not slow
the schedule, at most ``--concurrency`` requests are in flight) for a fixed
time, then prints what came back: statuses and, for Bookinfo's reviews JSON
or product page, which reviews version answered. Bounded on purpose: it
stops by itself, so a forgotten terminal does not load a laptop forever.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp

MAX_DURATION = 3600.0
MAX_RATE = 1000.0


@dataclass(frozen=True, slots=True)
class Response:
    t: float  # time.time() when the answer arrived
    status: int  # 0: no answer (connection error, timeout)
    version: str  # "v1", "v3", ... when the body says so, else ""
    note: str = ""  # the start of the body of a non-200 answer, or the client error


_PODNAME = re.compile(r'"podname":\s*"[^"]*-(v[0-9]+)"')
_STARS = re.compile(r'<font color="(black|red)">')


def version_of(body: str) -> str:
    """Which reviews version produced ``body`` (reviews JSON or a product page)."""
    m = _PODNAME.search(body)
    if m:
        return m.group(1)
    m = _STARS.search(body)
    if m:
        return {"black": "v2", "red": "v3"}[m.group(1)]
    if "Reviewer1" in body:
        return "v1"
    return ""


async def generate(url: str, rate: float, duration: float, *, proxy: str | None = None, concurrency: int = 32,
                   timeout: float = 10.0, on_response: Callable[[Response], None] | None = None,
                   stop: asyncio.Event | None = None) -> list[Response]:
    if not 0 < rate <= MAX_RATE:
        raise ValueError(f"rate must be within 0..{MAX_RATE:g} requests per second")
    if not 0 < duration <= MAX_DURATION:
        raise ValueError(f"duration must be within 0..{MAX_DURATION:g} seconds")
    results: list[Response] = []
    gate = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)) as session:

        async def one() -> None:
            try:
                async with session.get(url, proxy=proxy) as resp:
                    body = await resp.text(errors="replace")
                    r = Response(time.time(), resp.status, version_of(body),
                                 "" if resp.status == 200 else body[:120])
            except (aiohttp.ClientError, TimeoutError) as exc:
                r = Response(time.time(), 0, "", f"{type(exc).__name__}: {exc}"[:120])
            finally:
                gate.release()
            results.append(r)
            if on_response is not None:
                on_response(r)

        tasks = set()
        start = time.monotonic()
        n = 0
        while True:
            due = start + n / rate
            if due - start >= duration or (stop is not None and stop.is_set()):
                break
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            await gate.acquire()
            task = asyncio.create_task(one())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            n += 1
        if tasks:
            await asyncio.gather(*tasks)
    return results


def summary(results: list[Response]) -> str:
    statuses = collections.Counter(r.status for r in results)
    versions = collections.Counter(r.version or "?" for r in results if r.status == 200)
    return json.dumps({"requests": len(results), "status": {str(k): v for k, v in sorted(statuses.items())},
                       "versions_of_200s": dict(sorted(versions.items()))})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pyproxy.canary.load", description=__doc__.splitlines()[0])
    p.add_argument("url")
    p.add_argument("--rate", type=float, default=20.0, help="requests per second (default 20)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds (default 60, at most 3600)")
    p.add_argument("--concurrency", type=int, default=32, help="requests in flight at most (default 32)")
    p.add_argument("--proxy", help="send through this HTTP proxy, e.g. a sidecar's outbound listener")
    p.add_argument("--every", type=float, default=5.0, help="print a line every N seconds (default 5; 0: never)")
    args = p.parse_args(argv)
    window: list[Response] = []
    last = [time.time()]

    def progress(r: Response) -> None:
        window.append(r)
        if args.every and r.t - last[0] >= args.every:
            print(time.strftime("%H:%M:%S"), summary(window), flush=True)
            window.clear()
            last[0] = r.t

    try:
        results = asyncio.run(generate(args.url, args.rate, args.duration, proxy=args.proxy,
                                       concurrency=args.concurrency, on_response=progress))
    except ValueError as exc:
        p.error(str(exc))
    except KeyboardInterrupt:
        return 130
    print("total", summary(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
