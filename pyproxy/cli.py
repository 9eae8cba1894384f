"""Command line: ``pyproxy run | validate | iptables | ca | demo``.

Every ``run`` flag can also come from the environment as ``PYPROXY_<FLAG>``
(upper case, dashes as underscores), which is how a container is configured;
a flag on the command line wins over the environment.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

from . import __version__
from .options import Limits, RunOptions, parse_address, parse_gateway, parse_labels

T = TypeVar("T")


ENV_PREFIX = "PYPROXY_"

# istio-agent's file-mounted credentials path (relative, as in Istio).
DEFAULT_CERTS_DIR = "./var/run/secrets/workload-spiffe-credentials"

LOG_LEVELS = ("trace", "debug", "info", "warning", "warn", "error", "critical", "off")


def env_name(flag: str) -> str:
    """``--log-level`` → ``PYPROXY_LOG_LEVEL``."""
    return ENV_PREFIX + flag.lstrip("-").upper().replace("-", "_")


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(env_name(name), default)


def _run_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    # Defaults are applied in parse_run_options (command line, else
    # PYPROXY_<FLAG>, else the default shown here), so that a bad value can be
    # reported with where it came from; argparse only collects strings.
    p = sub.add_parser("run", help="run the sidecar", description="Run the sidecar proxy.",
                       epilog="Every flag can also be set as PYPROXY_<FLAG> in the environment "
                              "(PYPROXY_CONFIG: comma-separated paths); the command line wins.")
    p.add_argument("--config", action="append", metavar="PATH",
                   help="config file or directory (*.yaml/*.yml, sorted); repeatable")
    p.add_argument("--workload", metavar="NAME", help="this proxy's workload name (default: app-version label)")
    p.add_argument("--namespace", metavar="NS", help="this proxy's namespace (default: default)")
    p.add_argument("--labels", metavar="k=v,k=v", help="this proxy's labels (sourceLabels match against them)")
    p.add_argument("--gateway", metavar="[NAMESPACE/]NAME",
                   help="run as this gateway: apply the VirtualServices bound to it (not those bound to "
                        "mesh); the --outbound listener is where clients connect")
    p.add_argument("--root-namespace", metavar="NS",
                   help="Istio's config root namespace: Sidecars, AuthorizationPolicies and "
                        "RequestAuthentications there apply mesh-wide (default: istio-system)")
    p.add_argument("--inbound", metavar="HOST:PORT", help="inbound listener (default: 0.0.0.0:15006)")
    p.add_argument("--app", metavar="HOST:PORT", help="where inbound traffic goes (default: 127.0.0.1:9080)")
    p.add_argument("--outbound", metavar="HOST:PORT", help="outbound listener (default: 127.0.0.1:15001)")
    p.add_argument("--admin", metavar="HOST:PORT", help="admin API (default: 127.0.0.1:15000)")
    p.add_argument("--stats", metavar="HOST:PORT",
                   help="/stats/prometheus and /healthz/ready (default: 0.0.0.0:15090)")
    p.add_argument("--workers", metavar="N", help="worker processes (default: 1)")
    p.add_argument("--log-level", metavar="LEVEL", help=f"one of {', '.join(LOG_LEVELS)} (default: info)")
    p.add_argument("--access-log", metavar="PATH|-|off", help="access log destination (default: off)")
    p.add_argument("--access-log-format", metavar="text|json", help="access log format (default: text)")
    p.add_argument("--tracing", metavar="on|off", help="OpenTelemetry tracing (default: on)")
    p.add_argument("--trace-sampling", metavar="PERCENT", help="sampling percentage for new traces (default: 1, Istio's default)")
    p.add_argument("--drain-timeout", metavar="SECONDS", help="graceful drain on SIGTERM (default: 5)")
    p.add_argument("--watch-interval", metavar="SECONDS",
                   help="how often the --config paths are checked for changes; 0 = never (SIGHUP and "
                        "POST /reload still reload) (default: 0.5)")
    p.add_argument("--drain-grace", metavar="SECONDS",
                   help="after SIGTERM, keep accepting connections this long (each gets Connection: close) "
                        "before closing the listeners (default: 1)")
    p.add_argument("--max-request-body", metavar="BYTES",
                   help="reject larger request bodies with 413 (default: 0 = no limit)")
    p.add_argument("--max-connections", metavar="N",
                   help="concurrent downstream connections per worker; more are refused (default: 100000)")
    p.add_argument("--request-header-timeout", metavar="SECONDS",
                   help="a request head must arrive within this time once it has begun, else 408 "
                        "(default: 10)")
    p.add_argument("--idle-timeout", metavar="SECONDS",
                   help="close a downstream connection with no request for this long (default: 3600)")
    p.add_argument("--stream-idle-timeout", metavar="SECONDS",
                   help="end a request when no byte moved either way for this long: 504 (408 while the "
                        "request is still arriving), flag SI; 0 = off (default: 0, as Istio sets it)")
    p.add_argument("--http10", metavar="on|off",
                   help="accept HTTP/1.0 requests (Istio's PILOT_HTTP10 / ISTIO_META_HTTP10); off: they get "
                        "426 Upgrade Required, as from an Istio sidecar (default: off)")
    p.add_argument("--path-normalization", metavar="MODE",
                   help="request path normalisation before routing, as mesh config's pathNormalization: "
                        "NONE, BASE (RFC 3986 dot segments, unreserved escapes decoded, \\ as /), "
                        "MERGE_SLASHES (BASE, then // as /) or DECODE_AND_MERGE_SLASHES (also %%2F and "
                        "%%5C decoded first) (default: BASE, Istio's default)")
    p.add_argument("--certs", metavar="DIR|off",
                   help="workload certificate directory (cert-chain.pem, key.pem, root-cert.pem: istio-agent's "
                        "file-mounted layout) for mutual TLS; watched for rotation (default: "
                        f"{DEFAULT_CERTS_DIR} when it exists, else no mTLS)")
    p.add_argument("--service-account", metavar="SA",
                   help="this workload's service account (default: from the certificate's URI SAN; "
                        "a different one refuses to start)")
    p.add_argument("--trust-domain", metavar="TD",
                   help="the mesh trust domain (default: from the certificate's URI SAN; a different one "
                        "refuses to start)")
    p.add_argument("--ratelimit-config", metavar="FILE|DIR", action="append",
                   help="the envoyproxy/ratelimit service's configuration (domain, descriptors: its "
                        "ratelimit-config ConfigMap), for global rate limits decided against Redis; "
                        "watched like --config; repeatable")
    p.add_argument("--ratelimit-redis", metavar="redis://HOST:PORT[/DB]",
                   help="the Redis global rate limits count in, with the ratelimit service's key scheme "
                        "(rediss:// for TLS; password in the URL or PYPROXY_RATELIMIT_REDIS_PASSWORD)")
    p.add_argument("--ratelimit-service", metavar="http://HOST:PORT",
                   help="instead of Redis: ask a running envoyproxy/ratelimit service (its HTTP port, "
                        "POST /json)")
    p.add_argument("--ratelimit-jitter", metavar="SECONDS",
                   help="random extra expiry for Redis counters, as the service's "
                        "EXPIRATION_JITTER_MAX_SECONDS (default: 300)")
    p.add_argument("--seed", type=int, default=None, help=argparse.SUPPRESS)
    return p


def parse_path_normalization(value: str) -> int:
    """A mesh config pathNormalization name (any case) → pyproxy.http.path mode."""
    from .http.path import MODES

    mode = MODES.get(value.strip().upper())
    if mode is None:
        raise ValueError(f"{value.strip()!r} is not one of {', '.join(MODES)}")
    return mode


class _Flags:
    """One ``run`` flag's value: the command line, else ``PYPROXY_<FLAG>``
    (an empty variable counts as unset), else the default. Errors name the
    flag or the variable the bad value came from."""

    def __init__(self, args: argparse.Namespace, environ: Mapping[str, str]) -> None:
        self.args = args
        self.environ = environ

    def raw(self, flag: str, default: str) -> tuple[str, str]:
        value = getattr(self.args, flag.replace("-", "_"), None)
        if value is not None:
            return value, f"--{flag}"
        name = env_name(flag)
        env = self.environ.get(name)
        if env is not None and env.strip():
            return env, name
        return default, f"--{flag}"

    def text(self, flag: str, default: str) -> str:
        return self.raw(flag, default)[0].strip()

    def integer(self, flag: str, default: str, lo: int) -> int:
        value, source = self.raw(flag, default)
        try:
            number = int(value.strip())
        except ValueError:
            raise ValueError(f"{source}: {value!r} is not an integer") from None
        if number < lo:
            raise ValueError(f"{source}: must be >= {lo}, got {number}")
        return number

    def number(self, flag: str, default: str, lo: float, hi: float | None = None) -> float:
        value, source = self.raw(flag, default)
        try:
            number = float(value.strip())
        except ValueError:
            raise ValueError(f"{source}: {value!r} is not a number") from None
        if not (lo <= number and (hi is None or number <= hi)) or math.isnan(number):
            bound = f"within {lo:g}..{hi:g}" if hi is not None else f">= {lo:g}"
            raise ValueError(f"{source}: must be {bound}, got {value.strip()}")
        return number

    def choice(self, flag: str, default: str, choices: Sequence[str]) -> str:
        value, source = self.raw(flag, default)
        lowered = value.strip().lower()
        if lowered not in choices:
            raise ValueError(f"{source}: {value!r} is not one of {', '.join(choices)}")
        return lowered

    def parsed(self, flag: str, default: str, parse: Callable[[str], T]) -> T:
        value, source = self.raw(flag, default)
        try:
            return parse(value)
        except ValueError as exc:
            raise ValueError(f"{source}: {exc}") from None


def parse_run_options(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> RunOptions:
    """Resolve every ``run`` flag; raises ValueError with a message naming
    the flag (or PYPROXY_ variable) for the first bad value."""
    env = os.environ if environ is None else environ
    f = _Flags(args, env)
    configs = [c.strip() for c in args.config or () if c.strip()]
    if not configs:
        configs = [c.strip() for c in env.get(env_name("config"), "").split(",") if c.strip()]
    if not configs:
        raise ValueError(f"at least one --config PATH is required (or {env_name('config')}=PATH,PATH)")
    namespace = f.text("namespace", "") or "default"
    namespace_set = bool(f.text("namespace", ""))
    certs = f.text("certs", "")
    if certs.lower() == "off":
        certs = ""
    elif not certs and os.path.isdir(DEFAULT_CERTS_DIR):
        certs = DEFAULT_CERTS_DIR
    rl_configs = [c.strip() for c in args.ratelimit_config or () if c.strip()]
    if not rl_configs:
        rl_configs = [c.strip() for c in env.get(env_name("ratelimit-config"), "").split(",") if c.strip()]
    rl_redis = f.text("ratelimit-redis", "")
    rl_service = f.text("ratelimit-service", "")
    if rl_redis:
        from .ratelimit.redis import parse_redis_url

        f.parsed("ratelimit-redis", "", parse_redis_url)
        if not rl_configs:
            raise ValueError("--ratelimit-redis needs --ratelimit-config (the ratelimit service's configuration)")
    if rl_service:
        if rl_redis:
            raise ValueError("--ratelimit-redis and --ratelimit-service are alternatives: give one")
        if not rl_service.startswith(("http://", "https://")):
            raise ValueError(f"--ratelimit-service: expected http://HOST:PORT, got {rl_service!r}")
    if rl_configs and not rl_redis:
        raise ValueError("--ratelimit-config is used with --ratelimit-redis (a ratelimit service reads "
                         "its own configuration)")
    log_level = f.choice("log-level", "info", LOG_LEVELS)
    log_level = {"warn": "warning", "trace": "debug", "off": "critical"}.get(log_level, log_level)
    return RunOptions(
        config=tuple(configs),
        workload=f.text("workload", ""),
        namespace=namespace,
        labels=f.parsed("labels", "", parse_labels),
        gateway=f.parsed("gateway", "", lambda v: parse_gateway(v, namespace)),
        root_namespace=f.text("root-namespace", "istio-system") or "istio-system",
        inbound=f.parsed("inbound", "0.0.0.0:15006", parse_address),
        app=f.parsed("app", "127.0.0.1:9080", lambda v: parse_address(v, "127.0.0.1")),
        outbound=f.parsed("outbound", "127.0.0.1:15001", lambda v: parse_address(v, "127.0.0.1")),
        admin=f.parsed("admin", "127.0.0.1:15000", lambda v: parse_address(v, "127.0.0.1")),
        stats=f.parsed("stats", "0.0.0.0:15090", parse_address),
        workers=f.integer("workers", "1", lo=1),
        log_level=log_level,
        access_log=f.text("access-log", "off") or "off",
        access_log_format=f.choice("access-log-format", "text", ("text", "json")),
        tracing=f.choice("tracing", "on", ("on", "off")),
        trace_sampling=f.number("trace-sampling", "1", 0.0, 100.0) / 100.0,
        drain_timeout=f.number("drain-timeout", "5", 0.0),
        drain_grace=f.number("drain-grace", "1", 0.0),
        watch_interval=f.number("watch-interval", "0.5", 0.0),
        limits=Limits(
            max_request_body=f.integer("max-request-body", "0", lo=0),
            max_connections=f.integer("max-connections", "100000", lo=1),
            header_timeout=f.number("request-header-timeout", "10", 0.001),
            idle_timeout=f.number("idle-timeout", "3600", 0.001),
            stream_idle_timeout=f.number("stream-idle-timeout", "0", 0.0),
            accept_http10=f.choice("http10", "off", ("on", "off")) == "on",
            path_normalization=f.parsed("path-normalization", "BASE", parse_path_normalization),
        ),
        worker_index=int(env.get("PYPROXY_WORKER_INDEX", "0") or 0),
        seed=args.seed,
        certs=certs,
        service_account=f.text("service-account", ""),
        trust_domain=f.text("trust-domain", ""),
        namespace_set=namespace_set,
        ratelimit_config=tuple(rl_configs),
        ratelimit_redis=rl_redis,
        ratelimit_service=rl_service,
        ratelimit_jitter=f.integer("ratelimit-jitter", "300", lo=0),
    )


def build_parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The ``pyproxy`` parser and its ``run`` subparser."""
    parser = argparse.ArgumentParser(prog="pyproxy", description="An Envoy-like sidecar proxy driven by Istio YAML.")
    parser.add_argument("--version", action="version", version=f"pyproxy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run_parser = _run_parser(sub)
    v = sub.add_parser("validate", help="validate Istio config files")
    v.add_argument("paths", nargs="+", metavar="PATH")
    ipt = sub.add_parser("iptables", help="print (or apply) the traffic-capture rules for a pod network namespace")
    from .iptables import add_arguments as add_iptables_args

    add_iptables_args(ipt)
    ca = sub.add_parser("ca", help="mesh CA: create one, issue workload certificates")
    from .security.cacli import add_arguments as add_ca_args

    add_ca_args(ca)
    demo = sub.add_parser("demo", help="run a demo mesh locally")
    demo.add_argument("name", choices=["bookinfo"])
    demo.add_argument("--config-dir", default=None,
                      help="mesh config directory, watched by every proxy (default: a fresh temp dir)")
    demo.add_argument("--ingress", default="127.0.0.1:9080", metavar="HOST:PORT",
                      help="where the ingress gateway listens (default 127.0.0.1:9080)")
    demo.add_argument("--pod-subnet", default="127.0.0.0/24", metavar="CIDR",
                      help="loopback network for the pods' addresses (.10 ingress, .11-.16 pods)")
    demo.add_argument("--log-level", default="warning", help="the proxies' log level")
    demo.add_argument("--mtls", choices=("on", "off"), default="on",
                      help="issue each sidecar a certificate from a fresh mesh CA (default: on)")
    from .canary.cli import add_arguments as add_canary_args

    add_canary_args(sub.add_parser("canary", help="progressive delivery: a Flagger Canary's analysis (run, status)"))
    return parser, run_parser


def _printing(command: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a command that prints to stdout. When the reader goes away first
    (``pyproxy canary status --json | head -1``), stop quietly as a CLI tool
    killed by SIGPIPE does (exit status 141), instead of a BrokenPipeError
    traceback. Not for ``run`` and ``demo``: their sockets keep Python's
    ignored SIGPIPE, and an error of theirs must not be silenced (nor
    ``canary run``'s)."""
    try:
        code = command(args)
        sys.stdout.flush()  # a pipe buffers: the write that fails may be this one
    except BrokenPipeError:
        # The interpreter flushes stdout again at exit: point it at /dev/null
        # so that flush has nowhere to fail.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 128 + 13  # SIGPIPE
    return code


def main(argv: list[str] | None = None) -> int:
    parser, run_parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "validate":
        from .config.validate import main as validate_main

        return _printing(lambda a: validate_main(a.paths), args)
    if args.command == "iptables":
        from .iptables import main as iptables_main

        return _printing(iptables_main, args)
    if args.command == "ca":
        from .security.cacli import main as ca_main

        return _printing(ca_main, args)
    if args.command == "demo":
        from .demo.launcher import main as demo_main

        return demo_main(args)
    if args.command == "canary":
        from .canary.cli import main as canary_main

        if args.canary_command == "status":
            return _printing(canary_main, args)
        return canary_main(args)  # the controller: a long-running process, like run
    try:
        options = parse_run_options(args)
    except ValueError as exc:
        run_parser.error(str(exc))  # usage + "pyproxy run: error: ...", exit status 2
    from .process import run

    return run(options)


if __name__ == "__main__":
    sys.exit(main())
