"""The request as the proxy reads it: parsing and validation as pure
functions, and the views the code around the request lifecycle may read.

Parsing and validation (the ``Exchange`` calls these; unit-tested without a
socket in ``tests/unit/test_request_parsing.py``):

- ``split_authority``: the one authority splitter (``host[:port]``, IPv6 in
  brackets), used by the exchange, redirects and the mirror's shadow host;
- ``split_absolute_target``: an absolute-form target (``http://host/path``);
- ``index_headers``: the header map when a field repeats;
- ``normalize_request_path``: Istio's ``pathNormalization`` entry point;
- ``validate``: the RFC 9112 checks llhttp leaves to us, returning a
  ``RefusedRequest`` (or None).

The cheap common cases stay inline in the ``Exchange`` (an origin-form
target, no repeated field, a path or authority seen before): these
functions run on a cache miss or an unusual request only, so moving them
here costs the request path nothing.

Views: route matchers (``routing/matchers.py``), redirects
(``routing/actions.py``), ``VirtualHost.match`` and the balancers' hash keys
(``upstream/lb.py``) are handed the ``Exchange``; the Protocols below say
which of its fields they may use, so mypy checks both sides and a new field
they read is a visible change here. The Protocols cost nothing at run time
(annotations only) and import nothing: every layer may name them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Protocol

from ..errors import DOWNSTREAM_PROTOCOL_ERROR
from .path import PLAIN as PATH_PLAIN
from .path import normalize as normalize_path

# ----------------------------------------------------------------------
# authority


def split_authority(authority: bytes) -> tuple[bytes, bytes | None]:
    """``host[:port]`` -> (host, port) as written (not lower-cased).

    An IPv6 literal keeps its brackets (``[::1]:80`` -> ``[::1]``, ``80``).
    A trailing dot stays on the host: ``reviews.default.svc.cluster.local.``
    is the absolute form of the name, which the route lookup matches as
    istiod's absolute-FQDN domains (Istio >= 1.27, ``HostIndex.lookup``).
    ``port`` is the digits after the colon, ``b""`` when there is none (or
    nothing after the colon: RFC 3986 allows an empty port), and None when
    the authority has no well-formed port: a colon followed by anything but
    digits (a second colon outside brackets included), or anything but
    ``:port`` after ``]``. ``host`` is then the part before that colon (the
    bracketed literal), which is what a refused request is logged with; a
    caller that must use the authority anyway (Envoy's parseAuthority
    fallback: the mirror's shadow host) takes the whole authority."""
    if authority[:1] == b"[":
        end = authority.find(b"]")
        if end < 0:
            return authority, None
        host, rest = authority[:end + 1], authority[end + 1:]
        if not rest:
            return host, b""
        port = rest[1:]
        if rest[:1] == b":" and (not port or port.isdigit()):
            return host, port
        return host, None
    host, _, port = authority.partition(b":")
    if not port or port.isdigit():
        return host, port
    return host, None


# Authority -> (lower-cased host, port): 0 none, -1 malformed (refused by
# validate). A bounded memo: one dict lookup per request instead of a split.
HOST_PORTS: dict[bytes, tuple[bytes, int]] = {}


def host_and_port(authority: bytes) -> tuple[bytes, int]:
    """What the exchange routes on: the lower-cased host and the port
    number (0: none, -1: malformed; a port over 65535 is refused by
    ``validate``)."""
    hp = HOST_PORTS.get(authority)
    if hp is None:
        host, port = split_authority(authority)
        # Digits only: int() would also take "+80", " 80" and "8_0".
        hp = (host.lower(), -1 if port is None else int(port) if port else 0)
        if len(HOST_PORTS) >= 4096:
            HOST_PORTS.clear()
        HOST_PORTS[authority] = hp
    return hp


# RFC 3986 authority characters (what Envoy's authority check admits); a
# Host with anything else (space, "/", "?", "#", quotes, ...) is refused.
# Userinfo ("user@host") is refused too (RFC 9110 4.2.4).
_BAD_AUTHORITY = re.compile(rb"[^A-Za-z0-9\-._~!$&'()*+,;=:%\[\]]").search
# Authorities already found valid: a set lookup instead of a regex search
# per request (bounded: cleared when full).
GOOD_AUTHORITIES: set[bytes] = set()


def authority_ok(authority: bytes) -> bool:
    """Only RFC 3986 authority characters (remembered when true)."""
    if _BAD_AUTHORITY(authority) is not None:
        return False
    if len(GOOD_AUTHORITIES) >= 4096:
        GOOD_AUTHORITIES.clear()
    GOOD_AUTHORITIES.add(authority)
    return True


# ----------------------------------------------------------------------
# target, headers, path


def split_absolute_target(target: bytes) -> tuple[bytes, bytes, bytes]:
    """An absolute-form target (``http://host[:port][/path][?query]``, the
    scheme already checked) -> (authority, path, query). "http://host?q"
    has no path: the empty path is left for ``validate`` (Envoy's codec
    refuses it with 404, absolute_path_rejected); "http://host" is "/"."""
    rest = target[7:]
    slash = rest.find(b"/")
    qmark = rest.find(b"?")
    cut = min(x for x in (slash, qmark, len(rest)) if x >= 0)
    path, _, query = (rest[cut:] or b"/").partition(b"?")
    return rest[:cut], path, query


def index_headers(headers: list[tuple[bytes, bytes]]
                  ) -> tuple[dict[bytes, bytes], dict[bytes, list[bytes]], bytes | None]:
    """The header map of a request where a field repeats: (map with the
    values of a repeated field joined with ",", each value of the repeated
    fields, a defect or None). Route matchers see each value on its own
    (Envoy's header matcher, match_headers_individually in 1.40); hashing,
    CORS and the framing checks read the joined value. Several Host fields
    are a defect (RFC 9112 3.2: 400)."""
    hdict: dict[bytes, bytes] = {}
    repeated: dict[bytes, list[bytes]] = {}
    for name, value in headers:
        prev = hdict.get(name)
        if prev is None:
            hdict[name] = value
        else:
            hdict[name] = prev + b"," + value
            values = repeated.get(name)
            if values is None:
                repeated[name] = [prev, value]
            else:
                values.append(value)
    malformed = b"multiple host headers" if b"host" in repeated else None
    return hdict, repeated, malformed


# Paths already found to need no normalisation under this process's
# --path-normalization (fixed for its life): the exchange tests membership
# inline, one set lookup instead of two scans per request (bounded: short
# paths only, cleared when full).
PLAIN_PATHS: set[bytes] = set()


def normalize_request_path(path: bytes, mode: int) -> bytes | None:
    """Istio's pathNormalization (``mode``, not 0) of a path not in
    ``PLAIN_PATHS``, before routing (as Envoy's connection manager does it):
    the path the matchers, the upstream, the access log and
    x-envoy-original-path all see. None: it cannot be normalised (``%00``:
    400, as Envoy)."""
    if b"/." in path or path.translate(None, PATH_PLAIN) or (mode > 1 and b"//" in path):
        return normalize_path(path, mode)  # (path.needs_work, inlined)
    if len(path) <= 256:
        if len(PLAIN_PATHS) >= 4096:
            PLAIN_PATHS.clear()
        PLAIN_PATHS.add(path)
    return path


# ----------------------------------------------------------------------
# validation


@dataclass(frozen=True, slots=True)
class RefusedRequest:
    """What validation refuses a request with: the local reply's status and
    body, its Envoy response flag (DPE for a codec-level refusal; Envoy's
    413 for a body over the limit and its 404 for an absolute URL without a
    path have none), and which rule refused it (for tests and debug logs)."""

    status: int
    body: bytes
    flag: str | None
    reason: str


def refusal_flag(status: int) -> str | None:
    """The response flag of a refused request's local reply."""
    return None if status in (413, 404) else DOWNSTREAM_PROTOCOL_ERROR


def _refused(status: int, body: bytes, reason: str) -> RefusedRequest:
    return RefusedRequest(status, body, refusal_flag(status), reason)


# "2": a stream of an HTTP/2 connection (http/h2downstream.py), forwarded as HTTP/1.1.
_VERSIONS = frozenset({"1.0", "1.1", "2"})
BAD_VERSION = _refused(400, b"unsupported HTTP version", "http_version")
# Istio leaves Envoy's accept_http_10 off (PILOT_HTTP10): its codec answers
# 426, flag DPE, before looking at anything else.
HTTP10_REFUSED = _refused(426, b"Upgrade Required", "http10_not_accepted")
BAD_CONTENT_LENGTH = _refused(400, b"invalid content-length", "invalid_content_length")
CL_AND_TE = _refused(400, b"both content-length and transfer-encoding", "content_length_and_chunked")
BAD_TE = _refused(400, b"unsupported transfer-encoding", "invalid_transfer_encoding")
# RFC 9112 6.1: framing of an HTTP/1.0 message with Transfer-Encoding is faulty.
TE_IN_HTTP10 = _refused(400, b"transfer-encoding in an HTTP/1.0 request", "transfer_encoding_in_http10")
BODY_TOO_LARGE = _refused(413, b"Payload Too Large", "request_body_too_large")
CONNECT_REFUSED = _refused(501, b"CONNECT is not supported", "connect_not_supported")
MISSING_HOST = _refused(400, b"missing host", "missing_host_header")
BAD_PORT = _refused(400, b"invalid port in authority", "invalid_port")
BAD_HOST = _refused(400, b"invalid host", "invalid_authority")
BAD_TARGET = _refused(400, b"invalid request target", "invalid_target")
FRAGMENT = _refused(400, b"fragment in request target", "fragment_in_target")
NO_PATH = _refused(404, b"", "absolute_path_rejected")


class ParsedRequest(Protocol):
    """What ``validate`` reads: the request as parsed (the Exchange)."""

    @property
    def malformed(self) -> bytes | None: ...  # a defect found while parsing
    @property
    def version(self) -> str: ...
    @property
    def method(self) -> bytes: ...
    @property
    def target(self) -> bytes: ...
    @property
    def path(self) -> bytes: ...
    @property
    def authority(self) -> bytes: ...
    @property
    def port(self) -> int: ...
    @property
    def content_length(self) -> int: ...  # -1 none, -2 not a number
    @property
    def chunked_in(self) -> bool: ...
    @property
    def hdict(self) -> dict[bytes, bytes]: ...


class ValidationLimits(Protocol):
    @property
    def accept_http10(self) -> bool: ...
    @property
    def max_request_body(self) -> int: ...  # 0: unlimited


def validate(req: ParsedRequest, limits: ValidationLimits) -> RefusedRequest | None:
    """RFC 9112 checks llhttp leaves to us (it already refuses bad syntax,
    CL + TE, several CLs, bad chunking), in Envoy's order: the refusal, or
    None for a request that may be routed."""
    malformed = req.malformed
    if malformed is not None:
        return _refused(400, malformed, "malformed")
    version = req.version
    if version not in _VERSIONS:
        return BAD_VERSION
    if version == "1.0" and not limits.accept_http10:
        return HTTP10_REFUSED
    content_length = req.content_length
    if content_length == -2:
        return BAD_CONTENT_LENGTH
    if req.chunked_in:
        if content_length != -1:
            return CL_AND_TE
        if req.hdict[b"transfer-encoding"].strip().lower() != b"chunked":
            return BAD_TE
        if version == "1.0":
            return TE_IN_HTTP10
    limit = limits.max_request_body
    if limit and content_length > limit:
        return BODY_TOO_LARGE
    if req.method == b"CONNECT":
        return CONNECT_REFUSED
    authority = req.authority
    if version != "1.0" and not authority:
        return MISSING_HOST
    port = req.port
    if port < 0 or port > 65535:
        return BAD_PORT
    if authority not in GOOD_AUTHORITIES and not authority_ok(authority):
        return BAD_HOST
    target = req.target
    if target[:1] != b"/" and target[:7].lower() != b"http://" \
            and not (target == b"*" and req.method == b"OPTIONS"):
        return BAD_TARGET
    if b"#" in target:
        return FRAGMENT
    if not req.path:
        return NO_PATH
    return None


# ----------------------------------------------------------------------
# views


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
