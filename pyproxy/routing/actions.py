"""Route actions other than forwarding: URI/authority rewrite, redirect and
direct response, compiled once per route.

Istio turns each ``match[]`` entry of a rule into its own Envoy route, so the
"matched prefix" a rewrite replaces depends on which entry matched: the
exchange records the index of the matching entry and these actions take it.
"""

from __future__ import annotations

from typing import Any

import re2

from ..config.model import HTTPDirectResponse, HTTPMatchRequest, HTTPRedirect, HTTPRewrite
from .matchers import _re2_options


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


class Rewrite:
    __slots__ = ("uri", "authority", "prefix_lengths", "regex", "substitution")

    def __init__(self, rw: HTTPRewrite, matches: tuple[HTTPMatchRequest, ...]) -> None:
        self.uri = rw.uri.encode("utf-8") if rw.uri is not None else None
        self.authority = rw.authority.encode("utf-8") if rw.authority else None
        self.prefix_lengths = _matched_prefix_lengths(matches)
        self.regex = None
        self.substitution = b""
        if rw.uri_regex_rewrite is not None:
            self.regex = re2.compile(rw.uri_regex_rewrite.match.encode("utf-8"), _re2_options())
            # RE2 and Envoy write group references as \1; Python's sub wants the same.
            self.substitution = rw.uri_regex_rewrite.rewrite.encode("utf-8")

    def new_path(self, path: bytes, match_index: int) -> bytes | None:
        """The rewritten path (without query), or None if unchanged."""
        if self.regex is not None:
            return self.regex.sub(self.substitution, path)
        if self.uri is None:
            return None
        n = self.prefix_lengths[match_index] if match_index < len(self.prefix_lengths) else None
        if n is None:
            return self.uri
        # Plain concatenation, exactly as Envoy's prefix_rewrite: prefix "/foo"
        # rewritten to "/" turns "/foo/bar" into "//bar" (Istio's documented
        # gotcha; match "/foo/" instead). Not "fixed" here on purpose.
        return (self.uri + path[n:]) or b"/"


class Redirect:
    __slots__ = ("uri", "authority", "port", "derive_port", "scheme", "code", "prefix_rewrite", "prefix_lengths")

    def __init__(self, rd: HTTPRedirect, matches: tuple[HTTPMatchRequest, ...]) -> None:
        self.uri = rd.uri.encode("utf-8") if rd.uri is not None else None
        self.authority = rd.authority.encode("utf-8") if rd.authority else None
        self.port = rd.port
        self.derive_port = rd.derive_port
        self.scheme = rd.scheme.encode("ascii") if rd.scheme else None
        self.code = rd.redirect_code or 301
        self.prefix_rewrite = rd.prefix_rewrite.encode("utf-8") if rd.prefix_rewrite is not None else None
        self.prefix_lengths = _matched_prefix_lengths(matches)

    def location(self, ex: Any, match_index: int) -> bytes:
        scheme = self.scheme or ex.scheme
        authority = self.authority or ex.authority
        host, port = split_host_port(authority)
        if self.port:
            port = str(self.port).encode()
        elif self.derive_port == "FROM_PROTOCOL_DEFAULT":
            port = b""
        elif self.derive_port == "FROM_REQUEST_PORT":
            port = str(ex.port).encode() if ex.port else port
        if port and ((scheme == b"http" and port == b"80") or (scheme == b"https" and port == b"443")):
            port = b""
        path = ex.path
        query = ex.query
        if self.uri is not None:
            path = self.uri
            if b"?" in path:
                path, _, query = path.partition(b"?")
        elif self.prefix_rewrite is not None:
            n = self.prefix_lengths[match_index] if match_index < len(self.prefix_lengths) else None
            path = self.prefix_rewrite + (b"" if n is None else path[n:])
        out = scheme + b"://" + host + (b":" + port if port else b"") + path
        if query:
            out += b"?" + query
        return out


class DirectResponse:
    __slots__ = ("status", "body")

    def __init__(self, dr: HTTPDirectResponse) -> None:
        self.status = dr.status
        self.body = dr.body or b""


def split_host_port(authority: bytes) -> tuple[bytes, bytes]:
    """``host[:port]`` (IPv6 in brackets) → (host, port) without validation."""
    if authority.startswith(b"["):
        end = authority.find(b"]")
        if end != -1:
            rest = authority[end + 1:]
            return authority[: end + 1], rest[1:] if rest.startswith(b":") else b""
        return authority, b""
    host, sep, port = authority.rpartition(b":")
    if sep and port.isdigit():
        return host, port
    return authority, b""
