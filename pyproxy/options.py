"""Run options: the ``pyproxy run`` flags, parsed once into a frozen object."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(value: str, default_host: str = "0.0.0.0") -> Address:
    """``HOST:PORT``, ``:PORT``, ``PORT`` or ``[v6]:PORT``."""
    value = value.strip()
    if value.startswith("["):
        end = value.find("]")
        if end == -1 or value[end + 1:end + 2] != ":":
            raise ValueError(f"invalid address {value!r}: expected [IPv6]:PORT")
        host, port = value[1:end], value[end + 2:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"invalid address {value!r}: {host!r} is not an IPv6 address") from None
    elif ":" in value:
        host, _, port = value.rpartition(":")
        if ":" in host:
            raise ValueError(f"invalid address {value!r}: write IPv6 addresses in brackets, [::1]:PORT")
    else:
        host, port = "", value
    if not port.isascii() or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"invalid port in address {value!r}: expected HOST:PORT with PORT in 0..65535")
    if any(c.isspace() for c in host):
        raise ValueError(f"invalid address {value!r}: the host contains whitespace")
    return Address(host or default_host, int(port))


def parse_gateway(value: str, namespace: str) -> str:
    """``NAME`` or ``NAMESPACE/NAME`` → ``namespace/name`` ("" stays "")."""
    value = value.strip()
    if not value:
        return ""
    ns, sep, name = value.rpartition("/")
    if not sep:
        ns = namespace
    if not name or not ns or "/" in ns or name == "mesh":
        raise ValueError(f"invalid gateway {value!r}: expected NAME or NAMESPACE/NAME (and not 'mesh')")
    return f"{ns}/{name}"


def parse_labels(value: str) -> tuple[tuple[str, str], ...]:
    """``k=v,k=v`` → pairs, in order."""
    out: list[tuple[str, str]] = []
    for part in value.split(","):
        part = part.strip()
        if not part:
            continue
        if "=" not in part:
            raise ValueError(f"invalid label {part!r}: expected key=value")
        k, _, v = part.partition("=")
        if not k.strip():
            raise ValueError(f"invalid label {part!r}: empty key")
        out.append((k.strip(), v.strip()))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on what one request or connection may hold (see README SECURITY)."""

    retry_buffer: int = 1 << 20  # request body kept for retries (Envoy's 1 MiB buffer limit)
    body_buffer: int = 1 << 20  # request body buffered before the upstream is ready
    max_url: int = 8 << 10
    max_header_bytes: int = 60 << 10  # Envoy's max_request_headers_kb default
    max_headers: int = 100
    max_request_body: int = 0  # 0 = unlimited (--max-request-body)
    header_timeout: float = 10.0  # --request-header-timeout
    idle_timeout: float = 3600.0  # downstream idle timeout, Envoy's 1 h (--idle-timeout)
    # Istio sets Envoy's stream_idle_timeout to 0 (off) on every HCM it
    # builds, sidecar and gateway (listener_builder.go buildHTTPConnectionManager).
    stream_idle_timeout: float = 0.0  # 0 = off (--stream-idle-timeout)
    # Istio leaves Envoy's accept_http_10 off unless PILOT_HTTP10 or the
    # proxy's ISTIO_META_HTTP10 turns it on: HTTP/1.0 gets 426 (--http10).
    accept_http10: bool = False
    max_connections: int = 100_000  # per worker (--max-connections)
    # Mesh config pathNormalization (pyproxy.http.path): 1 = BASE, Istio's default.
    path_normalization: int = 1


@dataclass(frozen=True, slots=True)
class RunOptions:
    config: tuple[str, ...]
    workload: str = ""
    namespace: str = "default"
    labels: tuple[tuple[str, str], ...] = ()
    # "namespace/name" of the Gateway this proxy serves (--gateway); "" = sidecar.
    gateway: str = ""
    # Istio's config root namespace: policies there apply mesh-wide (--root-namespace).
    root_namespace: str = "istio-system"
    inbound: Address = Address("0.0.0.0", 15006)
    app: Address = Address("127.0.0.1", 9080)
    outbound: Address = Address("127.0.0.1", 15001)
    admin: Address = Address("127.0.0.1", 15000)
    stats: Address = Address("0.0.0.0", 15090)
    workers: int = 1
    log_level: str = "info"
    access_log: str = "off"
    access_log_format: str = "text"
    tracing: str = "on"
    trace_sampling: float = 0.01  # Istio's default sampling: 1%
    drain_timeout: float = 5.0
    drain_grace: float = 1.0  # listeners keep accepting this long after SIGTERM
    watch_interval: float = 0.5  # config file polling period; 0 = no watching
    limits: Limits = field(default_factory=Limits)
    worker_index: int = 0
    seed: int | None = None
    # Workload credentials (security/certs.py): the directory with
    # cert-chain.pem, key.pem and root-cert.pem; "" = no mTLS.
    certs: str = ""
    # Expected identity; "" = whatever the certificate says.
    service_account: str = ""
    trust_domain: str = ""
    # --namespace was given (else the certificate's namespace is used).
    namespace_set: bool = False
    # Global rate limits (ratelimit/): the ratelimit service's own config
    # files, and where decisions come from: Redis (with that config) or a
    # running ratelimit service's HTTP /json endpoint.
    ratelimit_config: tuple[str, ...] = ()
    ratelimit_redis: str = ""
    ratelimit_service: str = ""
    ratelimit_jitter: int = 300  # the service's EXPIRATION_JITTER_MAX_SECONDS

    @property
    def workload_name(self) -> str:
        if self.workload:
            return self.workload
        labels = dict(self.labels)
        app = labels.get("app")
        if app:
            version = labels.get("version")
            return f"{app}-{version}" if version else app
        return "unknown"
