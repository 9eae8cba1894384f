"""The jwt_authn and RBAC filters (filters/chain.py phases AUTHN and AUTHZ),
on the inbound side of a sidecar and on every request of a gateway, never on
a sidecar's outbound side. A snapshot without an applicable
AuthorizationPolicy or RequestAuthentication has none: nothing here runs per
request then.

They run before the route lookup, not in the route's chain: in Envoy the
RBAC filter answers before the router can (an unknown host gets 403, not
404 NR, when a policy denies), and at a gateway Istio makes the route be
chosen again after jwt_authn (``clearRouteCache``), so claim-based routes
see the verified token. Neither depends on the route, so running them first
is the same order as Istio's chain (jwt_authn, RBAC, then fault, CORS, router).

Replies are Envoy's: 401 (403 for a disallowed audience) with the JWT
status string and a ``www-authenticate`` challenge; 403 ``RBAC: access
denied`` for a denied request. Neither sets a response flag.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Protocol

from ..filters.chain import AUTHN, AUTHZ, FilterContext, HttpFilter
from .jwt import Authenticator, JwtError, www_authenticate
from .policy import Engine, Request

if TYPE_CHECKING:
    import asyncio

log = logging.getLogger("pyproxy.authz")


class _Identity(Protocol):
    @property
    def app_port(self) -> int: ...


class _Snapshot(Protocol):
    @property
    def identity(self) -> _Identity: ...


class SecurityConnection(Protocol):
    """The downstream connection as a policy sees it (its source and
    destination; an mTLS connection adds ``peer_principal`` and ``sni``)."""

    @property
    def peer_ip(self) -> str: ...
    @property
    def original_dst(self) -> tuple[str, int] | None: ...
    @property
    def transport(self) -> asyncio.BaseTransport | None: ...
    @property
    def listen_port(self) -> int: ...


class SecurityContext(FilterContext, Protocol):
    """What jwt_authn and RBAC read of a request beyond a route filter's
    ``FilterContext``: the scheme, query and cookies (token locations), the
    connection's addresses, the workload port; and what they write: the
    verified identity (``auth``), the deciding policy (``authz_policy``),
    the request headers (forwarded-token and claim headers, in place)."""

    @property
    def scheme(self) -> bytes: ...
    @property
    def headers(self) -> list[tuple[bytes, bytes]]: ...
    @property
    def conn(self) -> SecurityConnection: ...
    @property
    def snapshot(self) -> _Snapshot: ...
    auth: Any  # the verified JWT identity (authz/jwt.py), None without one
    authz_policy: str

    def query_params(self) -> dict[str, str]: ...
    def cookie(self, name: str) -> str | None: ...

RBAC_DENIED = b"RBAC: access denied"


class SecurityStats:
    """Counters for /stats: Envoy's jwt_authn ones and RBAC results per
    policy ("ns/name" or "none" when no ALLOW policy matched)."""

    __slots__ = ("jwt", "rbac")

    def __init__(self) -> None:
        self.jwt = {"allowed": 0, "denied": 0, "cors_preflight_bypassed": 0}
        self.rbac: dict[tuple[str, str], int] = {}

    def count(self, policy: str, result: str) -> None:
        key = (policy, result)
        self.rbac[key] = self.rbac.get(key, 0) + 1

    def as_dict(self) -> dict[str, Any]:
        return {"jwt": dict(self.jwt), "rbac": {f"{p}|{r}": n for (p, r), n in self.rbac.items()}}


STATS = SecurityStats()  # one per worker process


def _preflight(ex: SecurityContext) -> bool:
    # Istio sets bypass_cors_preflight: OPTIONS with Origin and
    # Access-Control-Request-Method skips JWT checks.
    h = ex.hdict
    return ex.method == b"OPTIONS" and b"origin" in h and b"access-control-request-method" in h


class JwtAuthnFilter:
    """Envoy's jwt_authn as Istio configures it (phase AUTHN)."""

    phase = AUTHN
    __slots__ = ("authn", "stats")

    def __init__(self, authn: Authenticator, stats: SecurityStats = STATS) -> None:
        self.authn = authn
        self.stats = stats

    def on_request(self, ex: SecurityContext) -> bool:
        if _preflight(ex):
            self.stats.jwt["cors_preflight_bypassed"] += 1
            return False
        try:
            outcome = self.authn.authenticate(ex.hdict, ex.query_params, ex.cookie)
        except JwtError as err:
            self.stats.jwt["denied"] += 1
            _refuse(ex, err.code, err.status.encode(),
                    ((b"www-authenticate", www_authenticate(ex.scheme, ex.authority, ex.path)),))
            return True
        self.stats.jwt["allowed"] += 1
        ex.auth = outcome.identity
        if outcome.remove or outcome.add:
            _rewrite(ex, outcome.remove, outcome.add)
        return False


class RbacFilter:
    """Envoy's RBAC filters (AUDIT, DENY, ALLOW and their shadow rules) as
    istiod builds them (phase AUTHZ)."""

    phase = AUTHZ
    __slots__ = ("engine", "stats")

    def __init__(self, engine: Engine, stats: SecurityStats = STATS) -> None:
        self.engine = engine
        self.stats = stats

    def on_request(self, ex: SecurityContext) -> bool:
        decision = self.engine.check(request_of(ex))
        for policy, result in decision.shadow:
            self.stats.count(policy, result)
            log.debug("authz %s: %s %s %s", result, policy, ex.method, ex.path)
        ex.authz_policy = decision.effective_policy
        if decision.allowed:
            if decision.policy:
                self.stats.count(decision.policy, "allowed")
            return False
        self.stats.count(decision.effective_policy, "denied")
        _refuse(ex, 403, RBAC_DENIED)
        return True


def _refuse(ex: SecurityContext, status: int, body: bytes, extra: tuple[tuple[bytes, bytes], ...] = ()) -> None:
    # A gRPC request's refusal becomes Envoy's gRPC local reply (HTTP 200,
    # grpc-status 7 for 403, 16 for 401) in send_local_reply.
    ex.send_local_reply(status, body, extra=extra, route_ops=False)


# The pre-routing chain of one direction.
SecurityFilters = tuple[HttpFilter[SecurityContext], ...]


def security_filters(engine: Engine | None, authn: Authenticator | None,
                     gateway: bool) -> tuple[SecurityFilters, SecurityFilters]:
    """The pre-routing filters by direction (OUTBOUND, INBOUND): on a sidecar
    only inbound; at a gateway every request. ``()`` when nothing applies."""
    chain: list[HttpFilter[SecurityContext]] = []
    if authn is not None:
        chain.append(JwtAuthnFilter(authn))
    if engine is not None:
        chain.append(RbacFilter(engine))
    filters = tuple(chain)
    return (filters if gateway else (), filters)


def request_of(ex: SecurityContext) -> Request:
    """What a policy sees of the request."""
    conn = ex.conn
    peer = conn.peer_ip
    dst = conn.original_dst
    if dst is not None:
        dst_ip, dst_port = dst
    else:
        sock = conn.transport.get_extra_info("sockname") if conn.transport is not None else None
        dst_ip = sock[0] if sock else ""
        dst_port = conn.listen_port
    if ex.direction == 1:  # inbound: the workload port (the app's unless redirected)
        dst_port = dst[1] if dst is not None else ex.snapshot.identity.app_port
    return Request(
        method=ex.method.decode("latin-1"),
        path=ex.path.decode("latin-1"),
        host=ex.authority.decode("latin-1"),
        port=dst_port,
        headers=ex.hdict,
        source_ip=peer,
        remote_ip=peer,
        destination_ip=dst_ip,
        principal=getattr(conn, "peer_principal", "") or "",
        sni=getattr(conn, "sni", "") or "",
        jwt=ex.auth,
    )


def _rewrite(ex: SecurityContext, remove: tuple[bytes, ...], add: tuple[tuple[bytes, bytes], ...]) -> None:
    """Drop forwarded-token headers and set the payload/claim headers
    (overwriting any the client sent)."""
    drop = set(remove) | {name for name, _ in add}
    ex.headers[:] = [(n, v) for n, v in ex.headers if n not in drop]
    ex.headers.extend(add)
    for name in drop:
        ex.hdict.pop(name, None)
    for name, value in add:
        ex.hdict[name] = value
