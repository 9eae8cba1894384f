#!/usr/bin/env python3
"""A/B: pyproxy source trees (or flag sets) side by side, alternating rounds.

    # the tree at HEAD~1 vs this worktree, realistic config, telemetry as in bench.py
    git archive HEAD~1 | tar -x -C /tmp/before
    python load-tests/ab.py --variant before=/tmp/before --variant after=. --rounds 7

    # flags per variant: NAME=PATH::FLAGS (FLAGS split like a shell would)
    python load-tests/ab.py --variant off=. --variant log=.::"--access-log /tmp/a.log"

This is the tool behind the before/after numbers in load-tests/README.md
("What each optimisation bought"). It uses bench.py's upstream, config,
telemetry plan, pinning and measurement (``bench.measure``): every variant
runs at the same time on the proxy CPU, idle ones cost nothing, each round
measures each variant once (the order rotates), and the table shows medians.
The number to read is **proxy CPU µs per request** (and its inverse, req/s
per proxy core): it depends on what a request costs, not on how much of the
machine the proxy got. ``--hold`` leaves everything running (for py-spy).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench  # after the sys.path insert above: the driver next to this file


def start_variant(procs: bench.Procs, wd: Path, name: str, tree: Path, extra: list[str],
                  up: bench.Upstream, cpus: set[int] | None, tel: bench.Telemetry,
                  config: str) -> bench.Target:
    cfg = wd / f"{name}-config"
    cfg.mkdir()
    (cfg / "bench.yaml").write_text(config)
    ports = {k: bench.free_port() for k in ("outbound", "inbound", "admin", "stats")}
    cmd = [sys.executable, "-m", "pyproxy", "run", "--config", str(cfg),
           "--outbound", f"127.0.0.1:{ports['outbound']}", "--inbound", f"127.0.0.1:{ports['inbound']}",
           "--admin", f"127.0.0.1:{ports['admin']}", "--stats", f"127.0.0.1:{ports['stats']}",
           "--app", f"127.0.0.1:{up.ports[0]}", *tel.flags, "--access-log", "off", *extra]
    env = dict(os.environ)
    # `python -m` puts the working directory first on sys.path: run in the tree.
    env["PYTHONPATH"] = str(tree)
    env.update(tel.env)
    log_path = wd / f"{name}.log"
    proc = procs.start(cmd, log_path, cpus, env=env, cwd=tree)
    t = bench.Target(name, ports["outbound"], proc, cmd, log_path, ports["admin"], ports["stats"])
    bench.wait_until(lambda: bench.http_probe(ports["stats"], path="/healthz/ready")[0] == 200, 60,
                     name, proc, log_path)
    return t


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", action="append", required=True, metavar="NAME=PATH[::FLAGS]")
    p.add_argument("--duration", type=float, default=5.0, help="seconds per wrk -c50 run")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--c1", action="store_true", help="also wrk -c1 (added latency)")
    p.add_argument("--bare", action="store_true", help="registry-only config instead of the realistic one")
    p.add_argument("--trace-sampling", type=float, default=1.0)
    p.add_argument("--hold", action="store_true", help="start everything, print pids/ports, wait for Ctrl-C")
    args = p.parse_args(argv)

    variants: list[tuple[str, Path, list[str]]] = []
    for v in args.variant:
        name, _, rest = v.partition("=")
        path, _, flags = rest.partition("::")
        variants.append((name, Path(path).resolve(), shlex.split(flags)))

    tools = bench.find_tools(need_nginx=False, need_envoy=False, install=False)
    proxy_cpus, load_cpus, pin_desc = bench.plan_cpus("auto")
    tel = bench.plan_telemetry(bench.pyproxy_help(), args.trace_sampling)
    wd = Path(tempfile.mkdtemp(prefix="pyproxy-ab-"))
    (wd / "tmp").mkdir()
    os.chmod(wd, 0o755)
    os.chmod(wd / "tmp", 0o777)
    procs = bench.Procs()
    signal.signal(signal.SIGTERM, lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        if tel.tracing:
            bench.start_collector(procs, wd, load_cpus, tel)
        up = bench.start_upstream(procs, wd, tools, load_cpus, False)
        config = bench.istio_bare_config(up.subsets["v1"]) if args.bare else bench.istio_bench_config(up.subsets)
        targets = [start_variant(procs, wd, n, tree, extra, up, proxy_cpus, tel, config)
                   for n, tree, extra in variants]
        bench.log(f"{pin_desc}; telemetry {tel.chosen}")
        if args.hold:
            for t in targets:
                print(f"{t.name}: pid {t.proc.pid} port {t.port} admin {t.admin_port}", flush=True)
            print(f"upstream: ports {up.ports}", flush=True)
            while all(pr.poll() is None for pr in procs.procs):
                time.sleep(0.5)
            return 1
        for t in targets:
            bench.run_wrk(tools, t.port, 50, 2, load_cpus)  # warm-up
        rounds: dict[str, list[dict[str, Any]]] = {t.name: [] for t in targets}
        for r in range(args.rounds):
            order = targets[r % len(targets):] + targets[:r % len(targets)]
            for t in order:
                res = bench.measure(tools, t, up, args.duration, load_cpus, proxy_cpus=proxy_cpus,
                                    with_c1=args.c1)
                rounds[t.name].append(res)
                bench.log(f"round {r + 1} {t.name:10s} {res['cpu_us_per_req']:6.1f} us/req "
                          f"{res['rps_per_core']:8,.0f}/core {res['rps']:8,.0f} req/s p99 {res['p99_us'] / 1000:.2f} ms"
                          + (f" c1 p50 {res['c1_p50_us']:.0f} us one-cpu {res.get('c1_onecpu_p50_us', 0):.0f} us"
                             if args.c1 else "") + f" rss {res['rss_kb'] / 1024:.1f} MB")
        print()
        print("| variant | CPU µs/req (median) | min–max | req/s per core | req/s | p99 c50 (ms) |"
              + (" p50 c1 (µs) | p50 c1 one CPU (µs) |" if args.c1 else "") + " RSS (MB) |")
        print("|---|--:|--:|--:|--:|--:|" + ("--:|--:|" if args.c1 else "") + "--:|")
        for t in targets:
            rs = rounds[t.name]
            us = [x["cpu_us_per_req"] for x in rs]
            row = (f"| {t.name} | {statistics.median(us):.1f} | {min(us):.1f}–{max(us):.1f} | "
                   f"{statistics.median(x['rps_per_core'] for x in rs):,.0f} | "
                   f"{statistics.median(x['rps'] for x in rs):,.0f} | "
                   f"{statistics.median(x['p99_us'] for x in rs) / 1000:.2f} |")
            if args.c1:
                row += (f" {statistics.median(x['c1_p50_us'] for x in rs):.0f} |"
                        f" {statistics.median(x.get('c1_onecpu_p50_us') or 0 for x in rs):.0f} |")
            row += f" {max(x['rss_kb'] for x in rs) / 1024:.1f} |"
            print(row)
        if len(targets) > 1:
            # Paired: each round's ratio to the first variant measured in the
            # same round (minutes apart at most), which cancels slow drift.
            base = rounds[targets[0].name]
            print()
            for t in targets[1:]:
                ratios = [b["cpu_us_per_req"] / x["cpu_us_per_req"] for b, x in zip(base, rounds[t.name])]
                print(f"{t.name} vs {targets[0].name}: CPU per request ratio {targets[0].name}/{t.name} "
                      f"median {statistics.median(ratios):.3f} (rounds: {', '.join(f'{r:.2f}' for r in ratios)})")
        return 0
    except KeyboardInterrupt:
        return 130
    finally:
        procs.stop_all()
        shutil.rmtree(wd, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
