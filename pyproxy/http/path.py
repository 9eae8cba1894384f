"""Request path normalisation as Istio configures Envoy (mesh config
``pathNormalization``; issue 12 item 3).

Istio's modes and the Envoy settings istiod generates for them:

- ``NONE``: nothing (``normalize_path: false``);
- ``BASE`` (Istio's default): ``normalize_path: true``, i.e. Envoy's
  ``PathUtil::canonicalPath``, Chromium's URL path canonicaliser: RFC 3986
  dot segments (``.``/``..``, also spelled ``%2e``), ``\\`` is a slash,
  percent-escapes of unreserved characters (``-`` ``.`` ``0-9`` ``A-Z``
  ``_`` ``a-z`` ``~``) are decoded, other escapes (``%2F``, ``%5C``,
  ``%25``...) are kept with their case, ``%00`` fails (400), and characters
  that must not appear raw in a path (``"`` ``<`` ``>`` ``^`` `````
  ``{`` ``|`` ``}``, controls, bytes over 0x7E) are percent-encoded;
- ``MERGE_SLASHES``: BASE, then ``merge_slashes``;
- ``DECODE_AND_MERGE_SLASHES``: ``%2F``/``%5C`` decoded first
  (``path_with_escaped_slashes_action: UNESCAPE_AND_FORWARD``), then as
  MERGE_SLASHES.

The query is never touched. Pure functions; ``needs_work`` is the cheap
test the request path runs first: an ordinary path has no ``/.`` and no
byte outside ``PLAIN`` (no ``%``, no ``\\``, nothing to encode), so BASE
costs one substring test and one ``bytes.translate``.
"""

from __future__ import annotations

NONE = 0
BASE = 1
MERGE_SLASHES = 2
DECODE_AND_MERGE_SLASHES = 3

# Mesh config's names (MeshConfig.ProxyPathNormalization.NormalizationType).
MODES = {"NONE": NONE, "BASE": BASE, "MERGE_SLASHES": MERGE_SLASHES,
         "DECODE_AND_MERGE_SLASHES": DECODE_AND_MERGE_SLASHES}

_SLASH = 0x2F
_BACKSLASH = 0x5C
_DOT = 0x2E
_PERCENT = 0x25

# Decoded when percent-escaped (RFC 3986 unreserved; '.' is a dot, below).
_UNESCAPE = frozenset(b"-0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz~")
# Percent-encoded when raw (Chromium's kPathCharLookup ESCAPE entries).
# Not '?' (the query was split off) nor '#': a fragment is refused with 400
# by the request checks, which must still see it.
_ESCAPE = frozenset(list(range(0x01, 0x21)) + list(b'"<>^`{|}') + list(range(0x7F, 0x100)))
_HEX = {c: int(chr(c), 16) for c in b"0123456789abcdefABCDEF"}
_SPECIAL = _ESCAPE | {_DOT, _PERCENT, _BACKSLASH, 0}
# Bytes the canonicaliser copies unchanged wherever they are ('.' too: it
# only matters after a slash, which needs_work tests as "/.").
PLAIN = bytes(c for c in range(256) if c not in _SPECIAL or c == _DOT)


def needs_work(path: bytes, mode: int) -> bool:
    """False when ``normalize`` would return ``path`` unchanged, decided
    cheaply (two C-level scans) for the common case; True means "run it"
    (it may still change nothing). The request path inlines this."""
    if b"/." in path or path.translate(None, PLAIN):
        return True
    return mode >= MERGE_SLASHES and b"//" in path


def normalize(path: bytes, mode: int) -> bytes | None:
    """The path (no query) as Envoy would forward it under ``mode``, or
    None when Envoy refuses the request (400: an escaped NUL)."""
    if mode == NONE:
        return path
    if mode == DECODE_AND_MERGE_SLASHES and b"%" in path:
        path = unescape_slashes(path)
    out = canonicalize(path)
    if out is None:
        return None
    if mode >= MERGE_SLASHES:
        out = merge_slashes(out)
    return out


def unescape_slashes(path: bytes) -> bytes:
    """``%2F``/``%2f`` → ``/``, ``%5C``/``%5c`` → ``\\`` (Envoy's
    UNESCAPE_AND_FORWARD; nothing else is decoded here)."""
    for escaped, raw in ((b"%2F", b"/"), (b"%2f", b"/"), (b"%5C", b"\\"), (b"%5c", b"\\")):
        if escaped in path:
            path = path.replace(escaped, raw)
    return path


def merge_slashes(path: bytes) -> bytes:
    """Envoy's ``PathTransformer::mergeSlashes``: runs of ``/`` become one
    (a leading and a trailing slash are kept)."""
    if b"//" not in path:
        return path
    prefix = b"/" if path[:1] == b"/" else b""
    suffix = b"/" if path[-1:] == b"/" else b""
    return prefix + b"/".join(s for s in path.split(b"/") if s) + suffix


def _is_dot(p: bytes, i: int, n: int) -> int:
    """Length of a dot at ``i`` (``.`` = 1, ``%2e``/``%2E`` = 3), else 0."""
    c = p[i]
    if c == _DOT:
        return 1
    if c == _PERCENT and i + 3 <= n and p[i + 1] == 0x32 and p[i + 2] in (0x65, 0x45):
        return 3
    return 0


def _decode(p: bytes | bytearray, i: int, n: int) -> int:
    """The byte a ``%XX`` at ``i`` stands for, or -1 if it is not one."""
    if i + 3 > n:
        return -1
    hi = _HEX.get(p[i + 1])
    lo = _HEX.get(p[i + 2])
    if hi is None or lo is None:
        return -1
    return hi << 4 | lo


def _up(out: bytearray) -> None:
    """``..``: drop the last segment; the output ends with ``/`` and never
    goes above the root."""
    j = len(out) - 1
    if j == 0:
        return
    j -= 1
    while out[j] != _SLASH and j > 0:
        j -= 1
    del out[j + 1:]


def canonicalize(path: bytes) -> bytes | None:
    """Chromium's ``CanonicalizePath`` as vendored by Envoy (see the module
    docstring); None when it fails (an escaped or raw NUL)."""
    n = len(path)
    if n == 0:
        return b"/"
    out = bytearray()
    if path[0] not in (_SLASH, _BACKSLASH):
        out.append(_SLASH)
    ok = True
    last_bad_percent = -10  # output index of a '%' that began no valid escape
    i = 0
    while i < n:
        c = path[i]
        if c not in _SPECIAL:
            out.append(c)
            i += 1
            continue
        dot = _is_dot(path, i, n)
        if dot:
            if out and out[-1] == _SLASH:
                after = i + dot
                if after == n:  # "/." at the end
                    i = after
                elif path[after] in (_SLASH, _BACKSLASH):  # "/./"
                    i = after + 1
                else:
                    dot2 = _is_dot(path, after, n)
                    after2 = after + dot2
                    if dot2 and after2 == n:  # "/.." at the end
                        _up(out)
                        i = after2
                    elif dot2 and path[after2] in (_SLASH, _BACKSLASH):  # "/../"
                        _up(out)
                        i = after2 + 1
                    else:  # ".x", "...": part of a name
                        out.append(_DOT)
                        i = after
            else:
                out.append(_DOT)
                i += dot
        elif c == _BACKSLASH:
            out.append(_SLASH)
            i += 1
        elif c == _PERCENT:
            value = _decode(path, i, n)
            if value < 0:
                last_bad_percent = len(out)
                out.append(_PERCENT)
                i += 1
            elif value in _UNESCAPE:
                out.append(value)
                i += 3
                if last_bad_percent >= len(out) - 3:
                    _nested_escape(path, i, n, last_bad_percent, out)
            else:
                out += path[i:i + 3]  # kept as written (hex case too)
                if value == 0:
                    ok = False
                i += 3
        elif c == 0:
            out += b"%00"
            ok = False
            i += 1
        else:  # must not appear raw
            out += b"%%%02X" % c
            i += 1
    return bytes(out) if ok else None


def _nested_escape(path: bytes, nxt: int, n: int, bad: int, out: bytearray) -> None:
    """Chromium's CheckForNestedEscapes: a '%' that began no escape, followed
    by a character just decoded, must not form a new escape ("%%30" + "0"
    would read "%00"): that '%' becomes "%25"."""
    length = len(out)
    last = out[-1]
    append_next = bad == length - 2
    if append_next:
        if nxt == n or path[nxt] >= 0x80:
            return
        out.append(path[nxt])
    if _decode(out, bad, len(out)) >= 0:
        if not append_next:
            out.append(out[bad + 1])
        out[bad + 1] = 0x32
        out[bad + 2] = 0x35
        out.append(last)
    elif append_next:
        del out[length:]
