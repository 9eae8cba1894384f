"""Gateway parsing and validation (internal to the loader).

Field lists follow istio/api networking/v1/gateway.proto. A proxy started
with ``pyproxy run --gateway NAME`` uses the Gateway NAME to narrow the hosts
of the VirtualServices bound to it. pyproxy serves plaintext HTTP/1.1 only:
servers of other protocols are accepted with a warning and ignored, TLS
settings are ignored, and listeners come from the command line, not from
``servers[].port`` (see the README's Bookinfo section).
"""

from __future__ import annotations

import re

from . import _common as c
from ._reader import Node, is_dns1123_label, message
from .model import Gateway, GatewayServer, Meta

GATEWAY = message("Gateway", "servers selector")
SERVER = message("Server", "port hosts name", ignored="bind tls defaultEndpoint", tls=c.SERVER_TLS)
PORT = message("Port", "number protocol name targetPort")

# Istio's protocol names (case-insensitive); only HTTP is served by pyproxy.
PROTOCOLS = ("HTTP", "HTTPS", "GRPC", "GRPC-WEB", "HTTP2", "MONGO", "TCP", "TLS")

# A host name, optionally with a leading "*." wildcard label; or "*".
_HOST = re.compile(r"\*|(\*\.)?([a-z0-9]([-a-z0-9]*[a-z0-9])?)(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def parse_gateway(meta: Meta, spec: Node) -> Gateway:
    selector = spec.string_map("selector")
    servers = []
    nodes = spec.children("servers", SERVER)
    if not nodes:
        spec.rep.error(spec.at("servers"), "a gateway must have at least one server")
    port_names: dict[str, str] = {}
    for node in nodes:
        server = _server(node, port_names)
        if server is not None:
            servers.append(server)
    return Gateway(meta=meta, selector=selector, servers=tuple(servers))


def _server(node: Node, port_names: dict[str, str]) -> GatewayServer | None:
    port = node.child("port", PORT, required=True)
    hosts = node.strings("hosts")
    if not hosts:
        node.error("hosts", "at least one host is required")
    for i, host in enumerate(hosts):
        problem = host_problem(host)
        if problem:
            node.rep.error(f"{node.at('hosts')}[{i}]", problem)
    if port is None:
        return None
    number = port.integer("number", lo=1, hi=65535, required=True)
    protocol = port.string("protocol", required=True)
    name = port.string("name") or ""
    if port.has("targetPort"):
        port.warn("targetPort", "deprecated in Istio and not used by pyproxy (the listener is --outbound)")
    if name:
        if name in port_names:
            port.error("name", f"port name {name!r} is already used by {port_names[name]}")
        else:
            port_names[name] = port.at("name")
    if protocol is not None and protocol.upper() not in PROTOCOLS:
        port.error("protocol", f"must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
        return None
    if number is None or protocol is None:
        return None
    protocol = protocol.upper()
    if protocol != "HTTP":
        port.warn("protocol", f"{protocol} servers are not served by pyproxy (plaintext HTTP/1.1 only); ignored")
        return None
    return GatewayServer(
        port_number=number, port_name=name, protocol=protocol, hosts=hosts, name=node.string("name") or ""
    )


def host_problem(value: str) -> str | None:
    """Istio's ``[namespace/]host`` form: namespace is ``*``, ``.`` or a DNS label."""
    namespace, sep, host = value.rpartition("/")
    if sep:
        if "/" in namespace:
            return f"invalid host {value!r}: at most one '/' (namespace/host)"
        if namespace not in ("*", ".") and not is_dns1123_label(namespace):
            return f"invalid host {value!r}: namespace must be '*', '.' or a DNS label"
    if not host:
        return f"invalid host {value!r}: empty host name"
    if not _HOST.fullmatch(host.lower()):
        return f"invalid host {value!r}: expected a DNS name, '*.' followed by a DNS name, or '*'"
    return None
