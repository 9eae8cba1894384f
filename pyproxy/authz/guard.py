"""The jwt_authn and RBAC steps of a request, in Istio's order (jwt_authn,
then RBAC, both before fault, CORS and the router), on the inbound side of a
sidecar and on every request of a gateway, never on a sidecar's outbound
side. A snapshot without an applicable AuthorizationPolicy or
RequestAuthentication has no guard: nothing here runs per request then.

Replies are Envoy's: 401 (403 for a disallowed audience) with the JWT
status string and a ``www-authenticate`` challenge; 403 ``RBAC: access
denied`` for a denied request. Neither sets a response flag.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from .jwt import Authenticator, JwtError, www_authenticate
from .policy import Engine, Request

if TYPE_CHECKING:
    from ..http.exchange import Exchange

log = logging.getLogger("pyproxy.authz")

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


def _preflight(ex: Exchange) -> bool:
    # Istio sets bypass_cors_preflight: OPTIONS with Origin and
    # Access-Control-Request-Method skips JWT checks.
    h = ex.hdict
    return ex.method == b"OPTIONS" and b"origin" in h and b"access-control-request-method" in h


class Guard:
    __slots__ = ("authn", "engine", "gateway", "stats")

    def __init__(self, engine: Engine | None, authn: Authenticator | None, gateway: bool,
                 stats: SecurityStats = STATS) -> None:
        self.engine = engine
        self.authn = authn
        self.gateway = gateway  # every request is checked (no inbound/outbound split)
        self.stats = stats

    def run(self, ex: Exchange) -> bool:
        """Authenticate and authorize; True when a reply was sent (refused)."""
        authn = self.authn
        if authn is not None:
            if _preflight(ex):
                self.stats.jwt["cors_preflight_bypassed"] += 1
            else:
                try:
                    outcome = authn.authenticate(ex.hdict, ex.query_params, ex.cookie)
                except JwtError as err:
                    self.stats.jwt["denied"] += 1
                    ex.send_local_reply(err.code, err.status.encode(), route_ops=False, extra=(
                        (b"www-authenticate", www_authenticate(ex.scheme, ex.authority, ex.path)),))
                    return True
                self.stats.jwt["allowed"] += 1
                ex.auth = outcome.identity
                if outcome.remove or outcome.add:
                    _rewrite(ex, outcome.remove, outcome.add)
        engine = self.engine
        if engine is None:
            return False
        decision = engine.check(self.request(ex))
        for policy, result in decision.shadow:
            self.stats.count(policy, result)
            log.debug("authz %s: %s %s %s", result, policy, ex.method, ex.path)
        ex.authz_policy = decision.effective_policy
        if decision.allowed:
            if decision.policy:
                self.stats.count(decision.policy, "allowed")
            return False
        self.stats.count(decision.effective_policy, "denied")
        ex.send_local_reply(403, RBAC_DENIED, route_ops=False)
        return True

    @staticmethod
    def request(ex: Exchange) -> Request:
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


def _rewrite(ex: Exchange, remove: tuple[bytes, ...], add: tuple[tuple[bytes, bytes], ...]) -> None:
    """Drop forwarded-token headers and set the payload/claim headers
    (overwriting any the client sent)."""
    drop = set(remove) | {name for name, _ in add}
    ex.headers[:] = [(n, v) for n, v in ex.headers if n not in drop]
    ex.headers.extend(add)
    for name in drop:
        ex.hdict.pop(name, None)
    for name, value in add:
        ex.hdict[name] = value
