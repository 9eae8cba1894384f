"""What the observers (metrics, tracing, access log) may read of a request.

A module of its own, importing nothing at run time, so that every observer
and the hook contract (``observer.py``) can name it without a circle.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ..errors import LocalReply
    from ..http.grpc import GrpcCall
    from ..routing.table import RouteTarget
    from ..security.inbound import TLSPeer
    from ..upstream.cluster import Cluster, ClusterEndpoint
    from .peer import PeerInfo


class CertsView(Protocol):
    """Whether this worker has mesh certificates (mTLS on)."""

    @property
    def certs(self) -> object | None: ...


class ConnectionView(Protocol):
    """The downstream connection as the observers see it."""

    @property
    def tls_peer(self) -> TLSPeer | None: ...  # inbound mTLS: the verified client certificate
    @property
    def worker(self) -> CertsView: ...


class ExchangeView(Protocol):
    """What the observers (metrics, tracing, access log) may read of a
    request (the ``Exchange``; Envoy's StreamInfo): mypy checks the Exchange
    against it, so a field the telemetry starts to read is a visible change
    here. They write two slots of their own, ``peer`` (metadata exchange)
    and ``obs`` (the tracer's per-request state), and the tracer replaces
    ``headers`` without the incoming trace context. Annotations only: no
    cost at run time."""

    # the request
    @property
    def direction(self) -> int: ...  # 0 outbound, 1 inbound
    @property
    def conn(self) -> ConnectionView: ...
    @property
    def method(self) -> bytes: ...
    @property
    def authority(self) -> bytes: ...
    @property
    def host(self) -> bytes: ...  # lower-cased, without the port
    @property
    def path(self) -> bytes: ...
    @property
    def query(self) -> bytes: ...
    @property
    def version(self) -> str: ...
    # The tracer replaces it (incoming trace context stripped: it re-emits its own).
    headers: list[tuple[bytes, bytes]]
    @property
    def hdict(self) -> dict[bytes, bytes]: ...
    @property
    def request_id(self) -> bytes: ...
    @property
    def auth(self) -> Any: ...  # the verified JWT (authz/jwt.py), None without one
    @property
    def authz_policy(self) -> str: ...  # the AuthorizationPolicy that decided, "" none
    @property
    def grpc(self) -> GrpcCall | None: ...  # a gRPC call's status and message counts
    # routing and the upstream
    @property
    def target_choice(self) -> RouteTarget | None: ...
    @property
    def cluster(self) -> Cluster | None: ...
    @property
    def attempt(self) -> int: ...  # attempts made so far (1 = the first)
    @property
    def endpoint(self) -> ClusterEndpoint | None: ...  # the attempt in progress
    @property
    def attempt_started(self) -> float: ...
    @property
    def attempt_status(self) -> int: ...  # the current attempt's response status, 0 none
    @property
    def upstream_host(self) -> ClusterEndpoint | None: ...  # the last attempt's endpoint
    @property
    def last_failure(self) -> LocalReply | None: ...
    @property
    def upstream_latency(self) -> float: ...  # -1: no upstream response
    # the outcome
    @property
    def status(self) -> int: ...
    @property
    def flags(self) -> list[str]: ...  # Envoy response flags, in the order set
    @property
    def flag_string(self) -> str: ...  # "-" or the flags joined, each once
    @property
    def request_bytes(self) -> int: ...
    @property
    def response_bytes(self) -> int: ...
    @property
    def start_time(self) -> float: ...  # time.monotonic()
    @property
    def end_time(self) -> float: ...
    # the observers' own slots
    peer: PeerInfo | None
    obs: Any  # tracing.TraceState or None (typed loosely: tracing imports this module)
