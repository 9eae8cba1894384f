"""The HTTP filter chain: the request's phases as one typed contract.

Envoy runs every HTTP request through a chain of filters that Istio orders
(``envoy.filters.http.*`` in the HTTP connection manager); the last one is the
router. pyproxy does the same in Python-sized form:

- A filter is an object with a ``phase`` and ``on_request(ex) -> bool``, and
  optionally ``on_response_headers(ex, headers) -> headers``. It is compiled
  once per snapshot from config (``route_filters`` in snapshot.py, called
  for every compiled route); the request path only calls it.
- A route's chain is the tuple ``CompiledRoute.filters``, sorted by phase and
  holding only filters that have something to do for that route: a route
  without CORS, fault or any later policy has ``()`` and the request path
  pays one truthiness test for the whole chain.
- The chain runs after the route lookup (Envoy's filters see the cached
  route too) and before the router (``Exchange._route_action``: redirect,
  direct response or forward).

``on_request`` returns False to continue with the next filter, True to stop
the chain. A filter stops either because it answered (``ex.send_local_reply``:
the exchange is then finished) or because it waits for something (a timer, a
rate-limit lookup): it then calls ``ex.resume_chain()`` when the decision is
in, and the chain goes on with the filter after it (``ex.finished`` tells a
late callback that the request already ended, e.g. the client left). A timer
taken with ``ex.pause_chain(delay, callback)`` is cancelled with the request.

A filter that must see the response registers itself for this request with
``ex.add_encoder(self)``; its ``on_response_headers`` then runs on the
response head (upstream or the router's local replies), after the route's
response header operations, in registration order.

docs/architecture.md has the phase table and a walk-through of adding a filter.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

# Phases in Istio's filter order (istiod's HTTP connection manager:
# istio.metadata_exchange, jwt_authn, rbac, local_ratelimit/ratelimit,
# fault, cors, istio.stats, router). Gaps leave room for filters in between.
METADATA_EXCHANGE = 10
AUTHN = 20  # JWT (RequestAuthentication)
AUTHZ = 30  # RBAC (AuthorizationPolicy)
RATE_LIMIT = 40  # local, then global
FAULT = 50
CORS = 60
STATS = 70


class WorkerView(Protocol):
    rng: random.Random


class FilterContext(Protocol):
    """What a filter may read and change of the request (the Exchange).

    Read: the parsed request (``method``, ``path``, ``authority``, ``host``,
    ``port``, ``hdict``: lower-case name -> value, repeated fields joined with
    ``,``), ``direction``, the matched ``route``, ``vhost`` and ``match_index``, and
    ``worker.rng`` (seeded in tests). Write: ``flags`` (Envoy response flags,
    appended), a local reply, the chain's pause/resume, response encoders.
    Anything else of the Exchange is the router's."""

    method: bytes
    path: bytes
    authority: bytes
    host: bytes
    port: int
    hdict: dict[bytes, bytes]
    direction: int
    # The matched CompiledRoute (typed loosely: routing/ imports this module),
    # and its VirtualHost (None on the inbound listener).
    route: Any
    vhost: Any
    match_index: int
    flags: list[str]
    finished: bool
    cors_origin: bytes | None  # the CORS filter's per-request state

    @property
    def worker(self) -> WorkerView: ...

    def send_local_reply(self, status: int, body: bytes, extra: tuple[tuple[bytes, bytes], ...] = (), flag: str | None = None,
                         content_type: bytes = b"text/plain", route_ops: bool = True) -> None: ...
    def pause_chain(self, delay: float, callback: Callable[[], None]) -> None: ...
    def resume_chain(self) -> None: ...
    def add_encoder(self, f: ResponseFilter) -> None: ...


# What a filter reads the request through: FilterContext for the route's
# chain; the security filters before the route lookup read more
# (authz/guard.py SecurityContext). Contravariant: a filter that needs less
# serves wherever more is offered, and mypy checks the Exchange against each.
Ctx_contra = TypeVar("Ctx_contra", contravariant=True)


class HttpFilter(Protocol[Ctx_contra]):
    phase: int

    def on_request(self, ex: Ctx_contra) -> bool:
        """The request head is parsed and routed. False: continue; True: the
        filter answered or will ``ex.resume_chain()`` later."""
        ...


class ResponseFilter(Protocol):
    """A filter that registered for this request's response (``ex.add_encoder``)."""

    def on_response_headers(self, ex: FilterContext, headers: list[tuple[bytes, bytes]]
                            ) -> list[tuple[bytes, bytes]]: ...


# A filter of a route's chain (CompiledRoute.filters).
RouteFilter = HttpFilter[FilterContext]
