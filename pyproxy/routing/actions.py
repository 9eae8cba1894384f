"""Route actions other than forwarding: URI/authority rewrite, redirect and
direct response, compiled once per route.

Istio turns each ``match[]`` entry of a rule into its own Envoy route, so the
"matched prefix" a rewrite replaces depends on which entry matched: the
exchange records the index of the matching entry and these actions take it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import re2

from ..config.model import HTTPDirectResponse, HTTPMatchRequest, HTTPRedirect, HTTPRewrite
from ..http.request import split_authority
from .matchers import _re2_options

if TYPE_CHECKING:
    from ..http.request import RequestView


def _matched_prefix_lengths(matches: tuple[HTTPMatchRequest, ...]) -> tuple[int | None, ...]:
    """Per match entry: how many leading path bytes the rewrite replaces.
    ``None`` means the whole path (exact or regex URI match). No URI match is
    Envoy's prefix "/" (Istio generates that), so 1 byte: the leading slash."""
    if not matches:
        return (1,)
    out: list[int | None] = []
    for m in matches:
        if m.uri is None or m.uri.kind == "present":
            out.append(1)
        elif m.uri.kind == "prefix":
            out.append(len(m.uri.value.encode("utf-8")))
        else:
            out.append(None)
    return tuple(out)


def re2_substitution(rewrite: str) -> bytes:
    """An RE2 rewrite string (``\\1``..``\\9`` group references, ``\\\\`` a
    backslash; what Envoy's regex_rewrite takes) as a template for the re2
    module's ``sub``, which would also read Python-only escapes."""
    out = []
    i = 0
    while i < len(rewrite):
        c = rewrite[i]
        if c == "\\" and i + 1 < len(rewrite):
            nxt = rewrite[i + 1]
            if nxt.isdigit():
                out.append(f"\\g<{nxt}>")
                i += 2
                continue
            if nxt == "\\":
                out.append("\\\\")
                i += 2
                continue
        out.append("\\\\" if c == "\\" else c)
        i += 1
    return "".join(out).encode("utf-8")


class Rewrite:
    __slots__ = ("authority", "prefix_lengths", "regex", "rewrites_path", "substitution", "uri")

    def __init__(self, rw: HTTPRewrite, matches: tuple[HTTPMatchRequest, ...]) -> None:
        self.uri = rw.uri.encode("utf-8") if rw.uri else None  # Istio ignores uri: ""
        self.authority = rw.authority.encode("utf-8") if rw.authority else None
        self.prefix_lengths = _matched_prefix_lengths(matches)
        self.regex = None
        self.substitution = b""
        if rw.uri_regex_rewrite is not None:
            self.regex = re2.compile(rw.uri_regex_rewrite.match.encode("utf-8"), _re2_options())
            self.substitution = re2_substitution(rw.uri_regex_rewrite.rewrite)
        # Envoy sets x-envoy-original-path whenever a path rewrite is
        # configured, even when it leaves the path unchanged.
        self.rewrites_path = self.regex is not None or self.uri is not None

    def new_path(self, path: bytes, match_index: int) -> bytes | None:
        """The rewritten path (without query), or None without a path rewrite."""
        if self.regex is not None:
            # RE2 GlobalReplace over the path without the query, as Envoy.
            rewritten: bytes = self.regex.sub(self.substitution, path)
            return rewritten
        if self.uri is None:
            return None
        n = self.prefix_lengths[match_index] if match_index < len(self.prefix_lengths) else None
        if n is None:
            return self.uri
        # Plain concatenation, exactly as Envoy's prefix_rewrite: prefix "/foo"
        # rewritten to "/" turns "/foo/bar" into "//bar" (Istio's documented
        # gotcha; match "/foo/" instead). Not "fixed" here on purpose.
        return self.uri + path[n:]


class Redirect:
    """Envoy's RedirectAction as Istio programs it (``Utility::newUri``):

    - scheme: ``scheme``, else the request's;
    - host: ``authority`` replaces the request's host *and port*; otherwise
      the request's Host is kept, its port removed when a port is set, or when
      the scheme changes and the port is the default of the request's
      protocol (``http://a:80`` to ``https`` gives ``https://a``);
    - port: ``port`` (or ``derivePort: FROM_REQUEST_PORT``: the service port
      the request addressed) appended as ``:N``, except 80 with http and 443
      with https (Istio drops those); ``FROM_PROTOCOL_DEFAULT`` sets no port,
      which is Envoy's default handling above;
    - path: ``uri`` (its own query replaces the request's, else the request's
      query is kept), or the matched prefix replaced by ``prefixRewrite``
      (pyproxy extension), else the request path and query unchanged.
    """

    __slots__ = (
        "authority",
        "code",
        "port",
        "port_from_request",
        "prefix_lengths",
        "prefix_rewrite",
        "scheme",
        "scheme_for_port",
        "uri",
        "uri_has_query",
    )

    def __init__(self, rd: HTTPRedirect, matches: tuple[HTTPMatchRequest, ...]) -> None:
        self.uri = rd.uri.encode("utf-8") if rd.uri else None
        self.uri_has_query = self.uri is not None and b"?" in self.uri
        self.authority = rd.authority.encode("utf-8") if rd.authority else None
        self.scheme = rd.scheme.encode("ascii") if rd.scheme else None
        # Istio drops the default port using the configured scheme, or http
        # on a sidecar listener (no TLS), not the request's scheme.
        self.scheme_for_port = self.scheme or b"http"
        self.port_from_request = rd.derive_port == "FROM_REQUEST_PORT" and not rd.port
        port = rd.port or 0
        if self._default_port(port):
            port = 0
        self.port = b":%d" % port if port else b""
        self.code = rd.redirect_code or 301
        self.prefix_rewrite = rd.prefix_rewrite.encode("utf-8") if rd.prefix_rewrite is not None else None
        self.prefix_lengths = _matched_prefix_lengths(matches)

    def _default_port(self, port: int) -> bool:
        return (port == 80 and self.scheme_for_port == b"http") or (port == 443 and self.scheme_for_port == b"https")

    def location(self, ex: RequestView, match_index: int) -> bytes:
        scheme = self.scheme or ex.scheme
        port = self.port
        if self.port_from_request:
            port = b"" if self._default_port(ex.port) else b":%d" % ex.port
        if self.authority is not None:
            host = self.authority
        else:
            host = ex.authority
            name, req_port = split_authority(host)
            if req_port:
                # Envoy compares with x-forwarded-proto, which its connection
                # manager sets to the connection's scheme when absent.
                proto = ex.hdict.get(b"x-forwarded-proto") or ex.scheme
                if port or (scheme != proto and ((proto == b"https" and req_port == b"443")
                                                 or (proto == b"http" and req_port == b"80"))):
                    host = name
        if self.uri is not None:
            path = self.uri
            if not self.uri_has_query and ex.query:
                path += b"?" + ex.query
        else:
            path = ex.path
            if self.prefix_rewrite is not None:
                n = self.prefix_lengths[match_index] if match_index < len(self.prefix_lengths) else None
                path = self.prefix_rewrite + (b"" if n is None else path[n:])
            if ex.query:
                path += b"?" + ex.query
        if path[:1] != b"/":
            path = b"/" + path
        return scheme + b"://" + host + port + path


class DirectResponse:
    __slots__ = ("body", "status")

    def __init__(self, dr: HTTPDirectResponse) -> None:
        self.status = dr.status
        self.body = dr.body or b""
