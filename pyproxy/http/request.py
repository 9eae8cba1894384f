"""What the code around the request lifecycle may read of a request.

Route matchers (``routing/matchers.py``), redirects (``routing/actions.py``),
``VirtualHost.match`` and the balancers' hash keys (``upstream/lb.py``) are
handed the ``Exchange``; these Protocols say which of its fields they may
use, so mypy checks both sides and a new field they read is a visible change
here. The Protocols cost nothing at run time (annotations only) and import
nothing: every layer may name them.
"""

from __future__ import annotations

from typing import Any, Protocol


class PeerView(Protocol):
    @property
    def peer_ip(self) -> str: ...


class RequestView(Protocol):
    """The parsed request as matchers and redirects see it."""

    method: bytes
    scheme: bytes  # b"http", or x-forwarded-proto from a trusted hop
    authority: bytes  # as received (host[:port])
    path: bytes  # without the query
    query: bytes
    port: int  # the service port addressed (0: none)
    hdict: dict[bytes, bytes]  # lower-case name -> value; repeated fields joined with ","
    repeated: dict[bytes, list[bytes]] | None  # each value of a repeated field
    auth: Any  # the verified JWT (authz/jwt.py), None without one
    match_index: int  # written by VirtualHost.match: the first matching match[] entry

    @property
    def conn(self) -> PeerView: ...

    def query_params(self) -> dict[str, str]: ...
    def cookie(self, name: str) -> str | None: ...


class HashContext(RequestView, Protocol):
    """What a consistent-hash key reads (Envoy's LoadBalancerContext); a
    generated cookie is set on the response by the exchange."""

    def new_hash_cookie(self, name: str) -> str: ...
