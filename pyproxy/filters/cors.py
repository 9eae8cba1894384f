"""CORS (VirtualService ``corsPolicy``), compiled once per route.

Semantics are those of Envoy's CORS filter as Istio configures it
(``TranslateCORSPolicy``):

- Only requests with a non-empty ``Origin`` are CORS requests. The origin is
  allowed when one ``allowOrigins`` StringMatch matches it, or when one of
  them matches the literal ``*`` (Envoy's rule: ``exact: "*"`` or
  ``regex: ".*"`` allow every origin).
- A preflight is ``OPTIONS`` with ``Origin`` and a non-empty
  ``Access-Control-Request-Method``. With an allowed origin it is answered
  locally: 200, no body, ``access-control-allow-origin`` echoing the origin,
  ``-allow-credentials: true`` (only when ``allowCredentials`` is true),
  ``-allow-methods`` / ``-allow-headers`` (the lists joined with ",", or the
  request's own values when the list is ``*``), ``-max-age`` (whole seconds)
  and ``-expose-headers``. The route's response header operations are not
  applied (the filter answers before the router).
- A preflight whose origin is not allowed goes upstream under
  ``unmatchedPreflights: FORWARD`` (the default); under ``IGNORE`` it is
  answered locally with 200 and the same headers except
  ``access-control-allow-origin`` (so the browser refuses it).
- Any other request with an allowed origin gets ``access-control-allow-origin``
  (the request's origin), ``-allow-credentials`` and ``-expose-headers`` set on
  its response, replacing values the upstream sent; local replies too.

``CorsFilter`` runs it in phase ``CORS`` of the filter chain (filters/chain.py):
after fault, before the router.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..config.model import CorsPolicy
from ..routing.matchers import ValueMatch, compile_string_match
from .chain import CORS

if TYPE_CHECKING:
    from .chain import FilterContext

ALLOW_ORIGIN = b"access-control-allow-origin"
ALLOW_CREDENTIALS = b"access-control-allow-credentials"
ALLOW_METHODS = b"access-control-allow-methods"
ALLOW_HEADERS = b"access-control-allow-headers"
MAX_AGE = b"access-control-max-age"
EXPOSE_HEADERS = b"access-control-expose-headers"
REQUEST_METHOD = b"access-control-request-method"
REQUEST_HEADERS = b"access-control-request-headers"


class CompiledCors:
    __slots__ = (
        "actual_drop",
        "actual_headers",
        "allow_any",
        "allow_credentials",
        "allow_headers",
        "allow_methods",
        "forward_unmatched",
        "max_age",
        "origins",
    )

    def __init__(self, policy: CorsPolicy) -> None:
        self.origins: tuple[ValueMatch, ...] = tuple(compile_string_match(sm) for sm in policy.allow_origins)
        self.allow_any = any(m(b"*") for m in self.origins)
        self.allow_methods = ",".join(policy.allow_methods).encode("latin-1")
        self.allow_headers = ",".join(policy.allow_headers).encode("latin-1")
        expose = ",".join(policy.expose_headers).encode("latin-1")
        self.max_age = str(int(policy.max_age)).encode() if policy.max_age is not None else b""
        self.allow_credentials = policy.allow_credentials is True
        self.forward_unmatched = policy.unmatched_preflights != "IGNORE"
        # What an allowed origin adds to every response (after allow-origin).
        actual: list[tuple[bytes, bytes]] = []
        if self.allow_credentials:
            actual.append((ALLOW_CREDENTIALS, b"true"))
        if expose:
            actual.append((EXPOSE_HEADERS, expose))
        self.actual_headers = tuple(actual)
        self.actual_drop = frozenset([ALLOW_ORIGIN, *(name for name, _ in actual)])

    def origin_allowed(self, origin: bytes) -> bool:
        if self.allow_any:
            return True
        for match in self.origins:
            if match(origin):
                return True
        return False

    def preflight_headers(self, hdict: dict[bytes, bytes], origin: bytes | None) -> tuple[tuple[bytes, bytes], ...]:
        """Headers of the local preflight answer; ``origin`` None when the
        origin is not allowed (``unmatchedPreflights: IGNORE``)."""
        out: list[tuple[bytes, bytes]] = []
        if origin is not None:
            out.append((ALLOW_ORIGIN, origin))
        if self.allow_credentials:
            out.append((ALLOW_CREDENTIALS, b"true"))
        methods = self.allow_methods
        if methods:
            out.append((ALLOW_METHODS, hdict.get(REQUEST_METHOD, b"") if methods == b"*" else methods))
        allow_headers = self.allow_headers
        if allow_headers:
            out.append((ALLOW_HEADERS, hdict.get(REQUEST_HEADERS, b"") if allow_headers == b"*"
                        else allow_headers))
        if self.max_age:
            out.append((MAX_AGE, self.max_age))
        if origin is not None:
            # The filter's own encode step runs on its local answer too.
            out.extend(h for h in self.actual_headers if h[0] != ALLOW_CREDENTIALS)
        return tuple(out)

    def decorate(self, headers: list[tuple[bytes, bytes]], origin: bytes) -> list[tuple[bytes, bytes]]:
        """Response headers of an actual request from an allowed origin."""
        drop = self.actual_drop
        out = [h for h in headers if h[0] not in drop]
        out.append((ALLOW_ORIGIN, origin))
        out.extend(self.actual_headers)
        return out


def compile_cors(policy: CorsPolicy | None) -> CompiledCors | None:
    return CompiledCors(policy) if policy is not None else None


class CorsFilter:
    """Envoy's CORS filter for one route: remembers an allowed origin for the
    response (``ex.cors_origin``) and answers a preflight locally."""

    __slots__ = ("policy",)
    phase = CORS

    def __init__(self, policy: CompiledCors) -> None:
        self.policy = policy

    def on_request(self, ex: FilterContext) -> bool:
        hdict = ex.hdict
        origin = hdict.get(b"origin")
        if not origin:
            return False
        cors = self.policy
        allowed = cors.origin_allowed(origin)
        if ex.method != b"OPTIONS" or not hdict.get(REQUEST_METHOD):
            if allowed:
                ex.cors_origin = origin
                ex.add_encoder(self)
            return False
        if not allowed and cors.forward_unmatched:
            return False
        # The preflight answer carries its own CORS headers (no encoder).
        ex.send_local_reply(200, b"", extra=cors.preflight_headers(hdict, origin if allowed else None),
                            route_ops=False)
        return True

    def on_response_headers(self, ex: FilterContext, headers: list[tuple[bytes, bytes]]
                            ) -> list[tuple[bytes, bytes]]:
        origin = ex.cors_origin
        return self.policy.decorate(headers, origin) if origin is not None else headers
