"""Command line: ``pyproxy run | validate | iptables | demo``.

Every ``run`` flag can also come from the environment as ``PYPROXY_<FLAG>``
(upper case, dashes as underscores), which is how a container is configured;
a flag on the command line wins over the environment.
"""

from __future__ import annotations

import argparse
import os
import sys

from . import __version__
from .options import Limits, RunOptions, parse_address, parse_gateway, parse_labels


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get("PYPROXY_" + name.upper().replace("-", "_"), default)


def _run_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run the sidecar", description="Run the sidecar proxy.")
    p.add_argument("--config", action="append", metavar="PATH",
                   help="config file or directory (*.yaml/*.yml, sorted); repeatable "
                        "[env PYPROXY_CONFIG, comma-separated]")
    p.add_argument("--workload", default=_env("workload", ""), help="this proxy's workload name")
    p.add_argument("--namespace", default=_env("namespace", "default"), help="this proxy's namespace")
    p.add_argument("--labels", default=_env("labels", ""), metavar="k=v,k=v",
                   help="this proxy's labels (sourceLabels match against them)")
    p.add_argument("--gateway", default=_env("gateway", ""), metavar="[NAMESPACE/]NAME",
                   help="run as this gateway: apply the VirtualServices bound to it (not those bound to "
                        "mesh); the --outbound listener is where clients connect")
    p.add_argument("--inbound", default=_env("inbound", "0.0.0.0:15006"), metavar="HOST:PORT")
    p.add_argument("--app", default=_env("app", "127.0.0.1:9080"), metavar="HOST:PORT",
                   help="where inbound traffic goes")
    p.add_argument("--outbound", default=_env("outbound", "127.0.0.1:15001"), metavar="HOST:PORT")
    p.add_argument("--admin", default=_env("admin", "127.0.0.1:15000"), metavar="HOST:PORT")
    p.add_argument("--stats", default=_env("stats", "0.0.0.0:15090"), metavar="HOST:PORT",
                   help="/stats/prometheus and /healthz/ready")
    p.add_argument("--workers", type=int, default=int(_env("workers", "1") or 1))
    p.add_argument("--log-level", default=_env("log_level", "info"),
                   choices=["trace", "debug", "info", "warning", "warn", "error", "critical", "off"])
    p.add_argument("--access-log", default=_env("access_log", "off"), metavar="PATH|-|off")
    p.add_argument("--access-log-format", default=_env("access_log_format", "text"), choices=["text", "json"])
    p.add_argument("--tracing", default=_env("tracing", "on"), choices=["on", "off"])
    p.add_argument("--trace-sampling", type=float, default=float(_env("trace_sampling", "100") or 100),
                   metavar="PERCENT", help="sampling percentage for new traces (default 100)")
    p.add_argument("--drain-timeout", type=float, default=float(_env("drain_timeout", "5") or 5),
                   metavar="SECONDS")
    p.add_argument("--max-request-body", type=int, default=int(_env("max_request_body", "0") or 0),
                   metavar="BYTES", help="reject larger request bodies with 413 (0 = no limit)")
    p.add_argument("--seed", type=int, default=None, help=argparse.SUPPRESS)


def parse_run_options(args: argparse.Namespace) -> RunOptions:
    configs = args.config
    if not configs:
        env = _env("config")
        configs = [c for c in (env or "").split(",") if c]
    if not configs:
        raise ValueError("at least one --config PATH is required (or PYPROXY_CONFIG)")
    level = {"warn": "warning", "trace": "debug", "off": "critical"}.get(args.log_level, args.log_level)
    if args.workers < 1:
        raise ValueError("--workers must be >= 1")
    if not 0 <= args.trace_sampling <= 100:
        raise ValueError("--trace-sampling must be within 0..100")
    return RunOptions(
        config=tuple(configs),
        workload=args.workload,
        namespace=args.namespace or "default",
        labels=parse_labels(args.labels or ""),
        gateway=parse_gateway(args.gateway or "", args.namespace or "default"),
        inbound=parse_address(args.inbound),
        app=parse_address(args.app, "127.0.0.1"),
        outbound=parse_address(args.outbound, "127.0.0.1"),
        admin=parse_address(args.admin, "127.0.0.1"),
        stats=parse_address(args.stats),
        workers=args.workers,
        log_level=level,
        access_log=args.access_log,
        access_log_format=args.access_log_format,
        tracing=args.tracing,
        trace_sampling=args.trace_sampling / 100.0,
        drain_timeout=args.drain_timeout,
        limits=Limits(max_request_body=args.max_request_body),
        worker_index=int(os.environ.get("PYPROXY_WORKER_INDEX", "0")),
        seed=args.seed,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pyproxy", description="An Envoy-like sidecar proxy driven by Istio YAML.")
    parser.add_argument("--version", action="version", version=f"pyproxy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _run_parser(sub)
    v = sub.add_parser("validate", help="validate Istio config files")
    v.add_argument("paths", nargs="+", metavar="PATH")
    ipt = sub.add_parser("iptables", help="print (or apply) the traffic-capture rules for a pod network namespace")
    from .iptables import add_arguments as add_iptables_args

    add_iptables_args(ipt)
    demo = sub.add_parser("demo", help="run a demo mesh locally")
    demo.add_argument("name", choices=["bookinfo"])
    demo.add_argument("--config-dir", default=None, help="mesh config directory (default: a fresh temp dir)")
    demo.add_argument("--ingress", default="127.0.0.1:9080", metavar="HOST:PORT")
    demo.add_argument("--log-level", default="warning")

    args = parser.parse_args(argv)
    if args.command == "validate":
        from .config.validate import main as validate_main

        return validate_main(args.paths)
    if args.command == "iptables":
        from .iptables import main as iptables_main

        return iptables_main(args)
    if args.command == "demo":
        from .demo.launcher import main as demo_main

        return demo_main(args)
    try:
        options = parse_run_options(args)
    except ValueError as exc:
        parser.error(str(exc))
    from .app import run

    return run(options)


if __name__ == "__main__":
    sys.exit(main())
