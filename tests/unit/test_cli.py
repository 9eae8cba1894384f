"""Unit tests for ``pyproxy run`` option parsing (pyproxy.cli, pyproxy.options):
every flag, PYPROXY_* environment fallbacks, precedence and bad values."""

from __future__ import annotations

import pytest

from pyproxy.cli import build_parser, env_name, parse_run_options
from pyproxy.options import Address, Limits, RunOptions, parse_address, parse_gateway, parse_labels


def options(argv: list[str], env: dict[str, str] | None = None) -> RunOptions:
    parser, _ = build_parser()
    return parse_run_options(parser.parse_args(["run", *argv]), env or {})


def error(argv: list[str], env: dict[str, str] | None = None) -> str:
    with pytest.raises(ValueError) as exc:
        options(argv, env)
    return str(exc.value)


def test_defaults() -> None:
    o = options(["--config", "mesh/"])
    assert o == RunOptions(config=("mesh/",))  # the dataclass defaults are the documented ones
    assert (o.workload, o.namespace, o.labels, o.gateway) == ("", "default", (), "")
    assert o.inbound == Address("0.0.0.0", 15006)
    assert o.app == Address("127.0.0.1", 9080)
    assert o.outbound == Address("127.0.0.1", 15001)
    assert o.admin == Address("127.0.0.1", 15000)
    assert o.stats == Address("0.0.0.0", 15090)
    assert (o.workers, o.log_level, o.access_log, o.access_log_format) == (1, "info", "off", "text")
    assert (o.tracing, o.trace_sampling, o.drain_timeout) == ("on", 0.01, 5.0)
    assert o.limits == Limits() and o.seed is None and o.worker_index == 0
    assert o.workload_name == "unknown"
    # istiod sets stream_idle_timeout 0s on every HCM and leaves HTTP/1.0 off.
    assert (o.limits.stream_idle_timeout, o.limits.accept_http10) == (0.0, False)


def test_http10_and_stream_idle_timeout_flags() -> None:
    o = options(["--config", "c", "--http10", "on", "--stream-idle-timeout", "300"])
    assert (o.limits.accept_http10, o.limits.stream_idle_timeout) == (True, 300.0)
    assert options([], {"PYPROXY_CONFIG": "c", "PYPROXY_HTTP10": "ON"}).limits.accept_http10 is True


def test_every_flag_on_the_command_line() -> None:
    o = options([
        "--config", "a.yaml", "--config", "dir/", "--workload", "reviews-v2", "--namespace", "shop",
        "--labels", "app=reviews, version=v2", "--gateway", "ingress", "--inbound", "[::]:16006",
        "--app", ":8080", "--outbound", "127.0.0.2:16001", "--admin", "16000", "--stats", "10.0.0.1:16090",
        "--workers", "3", "--log-level", "DEBUG", "--access-log", "-", "--access-log-format", "json",
        "--tracing", "off", "--trace-sampling", "12.5", "--drain-timeout", "0.5", "--max-request-body", "1024",
        "--seed", "7",
    ])
    assert o.config == ("a.yaml", "dir/")
    assert (o.workload, o.namespace, o.labels) == ("reviews-v2", "shop", (("app", "reviews"), ("version", "v2")))
    assert o.gateway == "shop/ingress"  # an unqualified gateway is in the proxy's namespace
    assert o.inbound == Address("::", 16006)
    assert o.app == Address("127.0.0.1", 8080)  # no host: loopback for the app
    assert o.outbound == Address("127.0.0.2", 16001)
    assert o.admin == Address("127.0.0.1", 16000)
    assert o.stats == Address("10.0.0.1", 16090)
    assert (o.workers, o.log_level, o.access_log, o.access_log_format) == (3, "debug", "-", "json")
    assert (o.tracing, o.trace_sampling, o.drain_timeout) == ("off", 0.125, 0.5)
    assert o.limits.max_request_body == 1024 and o.seed == 7
    assert o.workload_name == "reviews-v2"


ENV = {
    "PYPROXY_CONFIG": " a.yaml, ,dir/ ,",
    "PYPROXY_WORKLOAD": "w",
    "PYPROXY_NAMESPACE": "prod",
    "PYPROXY_LABELS": "app=details,version=v1",
    "PYPROXY_GATEWAY": "istio-system/edge",
    "PYPROXY_INBOUND": "0.0.0.0:1",
    "PYPROXY_APP": "10.1.1.1:2",
    "PYPROXY_OUTBOUND": ":3",
    "PYPROXY_ADMIN": "127.0.0.1:4",
    "PYPROXY_STATS": "5",
    "PYPROXY_WORKERS": "2",
    "PYPROXY_LOG_LEVEL": "warn",
    "PYPROXY_ACCESS_LOG": "/tmp/access.log",
    "PYPROXY_ACCESS_LOG_FORMAT": "JSON",
    "PYPROXY_TRACING": "off",
    "PYPROXY_TRACE_SAMPLING": "50",
    "PYPROXY_DRAIN_TIMEOUT": "2",
    "PYPROXY_MAX_REQUEST_BODY": "10",
    "PYPROXY_WORKER_INDEX": "1",
}


def test_every_flag_from_the_environment() -> None:
    o = options([], ENV)
    assert o.config == ("a.yaml", "dir/")  # comma-separated, blanks dropped
    assert (o.workload, o.namespace, o.labels) == ("w", "prod", (("app", "details"), ("version", "v1")))
    assert o.gateway == "istio-system/edge"
    assert (o.inbound, o.app, o.outbound, o.admin, o.stats) == (
        Address("0.0.0.0", 1), Address("10.1.1.1", 2), Address("127.0.0.1", 3), Address("127.0.0.1", 4),
        Address("0.0.0.0", 5))
    assert (o.workers, o.log_level, o.access_log, o.access_log_format) == (2, "warning", "/tmp/access.log", "json")
    assert (o.tracing, o.trace_sampling, o.drain_timeout, o.limits.max_request_body) == ("off", 0.5, 2.0, 10)
    assert o.worker_index == 1


def test_command_line_beats_environment_for_every_flag() -> None:
    o = options([
        "--config", "cli.yaml", "--workload", "cli", "--namespace", "cli-ns", "--labels", "app=cli",
        "--gateway", "gw", "--inbound", ":11", "--app", ":12", "--outbound", ":13", "--admin", ":14",
        "--stats", ":15", "--workers", "4", "--log-level", "error", "--access-log", "off",
        "--access-log-format", "text", "--tracing", "on", "--trace-sampling", "1", "--drain-timeout", "9",
        "--max-request-body", "0",
    ], ENV)
    assert o.config == ("cli.yaml",)
    assert (o.workload, o.namespace, o.labels, o.gateway) == ("cli", "cli-ns", (("app", "cli"),), "cli-ns/gw")
    assert [a.port for a in (o.inbound, o.app, o.outbound, o.admin, o.stats)] == [11, 12, 13, 14, 15]
    assert (o.workers, o.log_level, o.access_log, o.access_log_format) == (4, "error", "off", "text")
    assert (o.tracing, o.trace_sampling, o.drain_timeout, o.limits.max_request_body) == ("on", 0.01, 9.0, 0)


def test_empty_environment_variables_count_as_unset() -> None:
    o = options([], {"PYPROXY_CONFIG": "c", "PYPROXY_WORKERS": "", "PYPROXY_NAMESPACE": " ", "PYPROXY_LOG_LEVEL": ""})
    assert (o.workers, o.namespace, o.log_level) == (1, "default", "info")


@pytest.mark.parametrize(("given", "level"), [("trace", "debug"), ("warn", "warning"), ("off", "critical"),
                                               ("Info", "info"), ("CRITICAL", "critical")])
def test_log_level_aliases(given: str, level: str) -> None:
    assert options(["--config", "c", "--log-level", given]).log_level == level


def test_workload_name_falls_back_to_labels() -> None:
    assert options(["--config", "c", "--labels", "app=ratings,version=v1"]).workload_name == "ratings-v1"
    assert options(["--config", "c", "--labels", "app=ratings"]).workload_name == "ratings"


def test_env_name() -> None:
    assert env_name("log-level") == "PYPROXY_LOG_LEVEL"
    assert env_name("--max-request-body") == "PYPROXY_MAX_REQUEST_BODY"


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--workers", "abc"], {}, "--workers: 'abc' is not an integer"),
        (["--workers", "0"], {}, "--workers: must be >= 1, got 0"),
        ([], {"PYPROXY_WORKERS": "two"}, "PYPROXY_WORKERS: 'two' is not an integer"),
        ([], {"PYPROXY_LOG_LEVEL": "loud"}, "PYPROXY_LOG_LEVEL: 'loud' is not one of trace, debug, info"),
        (["--log-level", "verbose"], {}, "--log-level: 'verbose' is not one of"),
        (["--access-log-format", "xml"], {}, "--access-log-format: 'xml' is not one of text, json"),
        ([], {"PYPROXY_TRACING": "yes"}, "PYPROXY_TRACING: 'yes' is not one of on, off"),
        (["--trace-sampling", "150"], {}, "--trace-sampling: must be within 0..100, got 150"),
        (["--trace-sampling", "nan"], {}, "--trace-sampling: must be within 0..100, got nan"),
        ([], {"PYPROXY_TRACE_SAMPLING": "half"}, "PYPROXY_TRACE_SAMPLING: 'half' is not a number"),
        (["--drain-timeout", "-1"], {}, "--drain-timeout: must be >= 0, got -1"),
        (["--max-request-body", "-5"], {}, "--max-request-body: must be >= 0, got -5"),
        (["--labels", "app"], {}, "--labels: invalid label 'app': expected key=value"),
        ([], {"PYPROXY_LABELS": "=v"}, "PYPROXY_LABELS: invalid label '=v': empty key"),
        (["--inbound", "0.0.0.0:http"], {}, "--inbound: invalid port in address '0.0.0.0:http'"),
        ([], {"PYPROXY_APP": "127.0.0.1:70000"}, "PYPROXY_APP: invalid port in address '127.0.0.1:70000'"),
        (["--outbound", "::1:15001"], {}, "--outbound: invalid address '::1:15001': write IPv6 addresses in brackets"),
        (["--admin", "[::1:15000"], {}, "--admin: invalid address '[::1:15000': expected [IPv6]:PORT"),
        (["--stats", "[foo]:1"], {}, "--stats: invalid address '[foo]:1': 'foo' is not an IPv6 address"),
        (["--stats", ""], {}, "--stats: invalid port in address ''"),
        (["--gateway", "a/b/c"], {}, "--gateway: invalid gateway 'a/b/c'"),
        ([], {"PYPROXY_GATEWAY": "mesh"}, "PYPROXY_GATEWAY: invalid gateway 'mesh'"),
    ],
)
def test_bad_values_name_their_source(argv: list[str], env: dict[str, str], message: str) -> None:
    assert message in error(argv, {"PYPROXY_CONFIG": "mesh/", **env})


@pytest.mark.parametrize("env", [{}, {"PYPROXY_CONFIG": " , "}])
def test_config_is_required(env: dict[str, str]) -> None:
    assert error([], env) == "at least one --config PATH is required (or PYPROXY_CONFIG=PATH,PATH)"




def test_cli_exits_with_usage_and_the_message_on_bad_values(capsys: pytest.CaptureFixture[str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from pyproxy.cli import main

    monkeypatch.setenv("PYPROXY_CONFIG", "mesh/")
    monkeypatch.setenv("PYPROXY_WORKERS", "many")
    with pytest.raises(SystemExit) as exc:
        main(["run"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: pyproxy run")
    assert err.rstrip().endswith("pyproxy run: error: PYPROXY_WORKERS: 'many' is not an integer")


# -- options helpers ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "default_host", "expected"),
    [
        ("1.2.3.4:80", "0.0.0.0", Address("1.2.3.4", 80)),
        (" 1.2.3.4:80 ", "0.0.0.0", Address("1.2.3.4", 80)),
        (":80", "127.0.0.1", Address("127.0.0.1", 80)),
        ("80", "0.0.0.0", Address("0.0.0.0", 80)),
        ("localhost:0", "0.0.0.0", Address("localhost", 0)),
        ("[::1]:15001", "0.0.0.0", Address("::1", 15001)),
        ("[::]:15006", "0.0.0.0", Address("::", 15006)),
    ],
)
def test_parse_address(value: str, default_host: str, expected: Address) -> None:
    assert parse_address(value, default_host) == expected


@pytest.mark.parametrize("value", ["", "host:", "host:-1", "host:65536", "host:8O", "::1", "[::1]", "[::1]80",
                                   "[x]:80", "a b:80", "host:١٢"])
def test_parse_address_rejects(value: str) -> None:
    with pytest.raises(ValueError):
        parse_address(value)


def test_address_str() -> None:
    assert str(Address("::1", 80)) == "[::1]:80"
    assert str(Address("10.0.0.1", 80)) == "10.0.0.1:80"


def test_parse_labels() -> None:
    assert parse_labels("") == ()
    assert parse_labels(" a = 1 ,b=2,, c=") == (("a", "1"), ("b", "2"), ("c", ""))
    assert parse_labels("k=v=w") == (("k", "v=w"),)


def test_parse_gateway() -> None:
    assert parse_gateway("", "ns") == ""
    assert parse_gateway("gw", "ns") == "ns/gw"
    assert parse_gateway("istio-system/gw", "ns") == "istio-system/gw"
