"""``pyproxy canary run`` and ``pyproxy canary status``.

``add_arguments`` runs for every ``pyproxy`` command (it builds the parser),
so this module imports only the standard library at the top; the controller
and its dependencies load when a canary command actually runs."""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..options import Address
    from .controller import Check, State
    from .resource import Canary, CanaryFile

log = logging.getLogger("pyproxy.canary")


def add_arguments(canary: argparse.ArgumentParser) -> None:
    sub = canary.add_subparsers(dest="canary_command", required=True)
    run = sub.add_parser("run", help="run a Flagger Canary's analysis against the mesh",
                         description="Run a Flagger Canary (flagger.app/v1beta1): check the canary subset's "
                                     "metrics every interval and move traffic by rewriting one VirtualService "
                                     "in the config directory.")
    run.add_argument("--config", required=True, metavar="DIR", help="the mesh config directory the sidecars watch")
    run.add_argument("--canary", required=True, metavar="FILE", help="Canary (and MetricTemplate) YAML")
    run.add_argument("--name", metavar="NAME", help="which Canary of the file (when it holds several)")
    source = run.add_mutually_exclusive_group(required=True)
    source.add_argument("--prometheus", metavar="URL", help="query this Prometheus (HTTP API) with Flagger's PromQL")
    source.add_argument("--scrape", metavar="HOST:PORT[,HOST:PORT...]",
                        help="scrape these sidecars' /stats/prometheus directly (the canary subset's sidecars)")
    run.add_argument("--metrics", metavar="HOST:PORT",
                     help="serve pyproxy_canary_* metrics on this address (default: off)")
    run.add_argument("--min-interval", type=float, default=10.0, metavar="SECONDS",
                     help="raise shorter analysis intervals to this (default 10, as Flagger does); lower it "
                          "for demos and tests")
    run.add_argument("--restart", action="store_true",
                     help="forget the saved state and start a new analysis (default: resume)")
    run.add_argument("--log-level", default="info", metavar="LEVEL")
    status = sub.add_parser("status", help="show a canary's phase, weight, checks and history")
    status.add_argument("--config", required=True, metavar="DIR")
    status.add_argument("name", nargs="?", metavar="NAME", help="canary name (or NAMESPACE.NAME); default: all")
    status.add_argument("--json", action="store_true", help="the raw state as JSON")
    status.add_argument("--history", type=int, default=15, metavar="N", help="history lines shown (default 15)")


def main(args: argparse.Namespace) -> int:
    if args.canary_command == "status":
        return status_main(args)
    return run_main(args)


# -------------------------------------------------------------------------- run


def _pick(cf: CanaryFile, name: str | None, file: str) -> Canary:
    if name:
        found = [c for c in cf.canaries if name in (c.name, c.key, f"{c.namespace}/{c.name}")]
        if not found:
            raise SystemExit(f"pyproxy canary: no Canary {name!r} in {file}")
        return found[0]
    if len(cf.canaries) != 1:
        names = ", ".join(c.key for c in cf.canaries) or "none"
        raise SystemExit(f"pyproxy canary: {file} holds {len(cf.canaries)} Canaries ({names}); pick one with --name")
    return cf.canaries[0]


class Exporter:
    """pyproxy_canary_* on the controller's own metrics port."""

    def __init__(self, address: str, canary: Canary) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

        addr = _address(address)
        assert addr is not None  # checked by run_main
        self.registry = CollectorRegistry()
        labels = ("name", "namespace")
        self.values = (canary.name, canary.namespace)
        self.weight = Gauge("pyproxy_canary_weight", "Canary traffic weight (percent)", labels,
                            registry=self.registry)
        self.status = Gauge("pyproxy_canary_status", "Last canary analysis result (Flagger's flagger_canary_status: "
                                                     "0 running, 1 successful, 2 failed)", labels,
                            registry=self.registry)
        self.checks = Counter("pyproxy_canary_checks", "Canary analysis checks by result (pass, fail, no_data)",
                              (*labels, "result"), registry=self.registry)
        self.failed = Gauge("pyproxy_canary_failed_checks", "Failed checks counted towards the threshold", labels,
                            registry=self.registry)
        self.steps = Gauge("pyproxy_canary_steps", "VirtualService swaps written by the controller", labels,
                           registry=self.registry)
        for result in ("pass", "fail", "no_data"):
            self.checks.labels(*self.values, result)
        self.server, self.thread = start_http_server(addr.port, addr.host, registry=self.registry)
        self.port = self.server.server_port

    def observe(self, state: State, checks: list[Check]) -> None:
        from .controller import status_value

        self.weight.labels(*self.values).set(state.weight)
        self.status.labels(*self.values).set(status_value(state.phase))
        self.failed.labels(*self.values).set(state.failed_checks)
        self.steps.labels(*self.values).set(state.steps)
        for check in checks:
            if not check.name.startswith("webhook "):
                self.checks.labels(*self.values, check.result).inc()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _address(value: str) -> Address | None:
    """``HOST:PORT`` (IPv6 in brackets) with both parts, by the proxy's own
    address parser (options.parse_address); None when it is not one."""
    from ..options import parse_address

    if ":" not in value:
        return None  # a bare port: this command wants the host too
    try:
        addr = parse_address(value, default_host="")
    except ValueError:
        return None
    return addr if addr.host and addr.port > 0 else None


def run_main(args: argparse.Namespace) -> int:
    from .controller import FAILED, SUCCEEDED, Controller, LockedError, StateStore
    from .mesh import Mesh
    from .metrics import (
        MetricError,
        MetricSource,
        PrometheusSource,
        ScrapeSource,
        render,
        selector_for,
        template_model,
    )
    from .resource import check_references, interval_seconds, load_file
    from .webhooks import call_webhook

    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    cf = load_file(args.canary)
    for d in cf.warnings:
        print(f"warning: {d}", file=sys.stderr)
    if cf.errors:
        for d in cf.errors:
            print(f"error: {d}", file=sys.stderr)
        print(f"pyproxy canary: {args.canary}: {len(cf.errors)} error(s); nothing done", file=sys.stderr)
        return 2
    canary = _pick(cf, args.name, args.canary)
    problems = check_references(cf, canary, prometheus=bool(args.prometheus))
    if not os.path.isdir(args.config):
        problems.append(f"--config {args.config}: not a directory")
    mesh = Mesh(args.config, canary)
    source: MetricSource | None = None
    if not problems:
        try:
            config = mesh.load_others()
            mesh.subset_labels(canary.primary_subset, config)
            selector = selector_for(canary, mesh.subset_labels(canary.canary_subset, config))
            for m in canary.analysis.metrics:
                if m.template is not None and (t := cf.template(*m.template)) is not None:
                    render(t.query, template_model(canary, m.interval_text), dict(m.template_variables))
        except (LookupError, ValueError, MetricError) as exc:
            problems.append(str(exc))
        else:
            if args.prometheus:
                source = PrometheusSource(args.prometheus, selector, cf.templates)
            else:
                targets = [t.strip() for t in args.scrape.split(",") if t.strip()]
                bad = [t for t in targets if _address(t) is None]
                if not targets or bad:
                    problems.append(f"--scrape: expected HOST:PORT[,HOST:PORT...], got {args.scrape!r}")
                source = ScrapeSource(targets, selector)
    if problems or source is None:
        for p in problems:
            print(f"pyproxy canary: {p}", file=sys.stderr)
        return 2
    store = StateStore(args.config, canary.namespace, canary.name)
    try:
        store.acquire()
    except LockedError as exc:
        print(f"pyproxy canary: {exc}", file=sys.stderr)
        return 1
    exporter = None
    try:
        if args.metrics:
            if _address(args.metrics) is None:
                print(f"pyproxy canary: --metrics: expected HOST:PORT, got {args.metrics!r}", file=sys.stderr)
                return 2
            try:
                exporter = Exporter(args.metrics, canary)
            except OSError as exc:
                print(f"pyproxy canary: --metrics {args.metrics}: {exc.strerror or exc}", file=sys.stderr)
                return 2
            log.info("metrics on http://%s/metrics", args.metrics)
        controller = Controller(canary, mesh, source, call_webhook, store,
                                observer=exporter.observe if exporter else None, restart=args.restart)
        stop = threading.Event()

        def on_signal(signum: int, frame: object) -> None:
            stop.set()

        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, on_signal)
        interval = interval_seconds(canary, args.min_interval)
        if canary.analysis.interval < interval:
            log.warning("%s: analysis interval %gs raised to %gs (--min-interval)", canary.key,
                        canary.analysis.interval, interval)
        log.info("%s: %s analysis every %gs, %s %s -> %s, state %s", canary.key, canary.analysis.strategy,
                 interval, canary.host, canary.primary_subset, canary.canary_subset, store.path)
        phase = controller.run(stop.wait, interval, stop.is_set)
    finally:
        if exporter is not None:
            exporter.close()
        store.release()
    if phase == SUCCEEDED:
        print(f"{canary.key}: Succeeded, {canary.canary_subset} promoted")
        return 0
    if phase == FAILED:
        print(f"{canary.key}: Failed, rolled back to {canary.primary_subset}: {controller.state.message}")
        return 1
    print(f"{canary.key}: stopped in phase {phase} (weight {controller.state.weight}); run again to resume")
    return 0


# -------------------------------------------------------------------------- status


def _states(config_dir: str, name: str | None) -> list[tuple[str, State]]:
    from .controller import read_state

    out = []
    for path in sorted(glob.glob(os.path.join(glob.escape(config_dir), ".canary-*.json"))):
        state = read_state(path)
        if state is None:
            continue
        if name and name not in (state.name, f"{state.namespace}.{state.name}", f"{state.namespace}/{state.name}"):
            continue
        out.append((path, state))
    return out


def _clock(t: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(t))


def format_state(state: State, history: int = 15, now: float | None = None) -> str:
    now = time.time() if now is None else now
    lines = [
        f"{state.namespace}.{state.name}: {state.phase}",
        (f"  weight {state.weight}%   failed checks {state.failed_checks}   iterations {state.iterations}   "
         f"steps {state.steps}"),
        (f"  updated {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(state.updated))} "
         f"({max(0.0, now - state.updated):.0f}s ago)"),
        f"  {state.message}",
    ]
    if state.checks:
        lines.append("  last checks:")
        for check in state.checks:
            value = "" if check.get("value") is None else f"{check['value']:.2f}"
            lines.append(f"    {check['name']:<24} {check['result']:<8} {value:>9}  {check['message']}")
    if state.history and history > 0:
        lines.append(f"  history (last {min(history, len(state.history))} of {len(state.history)}):")
        for event in state.history[-history:]:
            lines.append(f"    {_clock(event['t'])} {event['phase']:<16} {event['weight']:>3}%  "
                         f"failed {event['failed_checks']}  {event['message']}")
    return "\n".join(lines)


def status_main(args: argparse.Namespace) -> int:
    try:
        states = _states(args.config, args.name)
    except ValueError as exc:
        print(f"pyproxy canary: {exc}", file=sys.stderr)
        return 2
    if not states:
        what = f"canary {args.name!r}" if args.name else "canaries"
        print(f"pyproxy canary: no {what} in {args.config} (no .canary-*.json state file)", file=sys.stderr)
        return 1
    if args.json:
        from dataclasses import asdict

        data: Any = [asdict(s) for _, s in states]
        print(json.dumps(data if len(data) > 1 else data[0], indent=1))
        return 0
    print("\n\n".join(format_state(s, args.history) for _, s in states))
    return 0
