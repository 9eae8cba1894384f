"""Compiled request matchers (VirtualService ``http[].match[]``).

Everything is compiled when config loads into small callables over the
request's raw bytes: no decoding, no dict walking, no regex compilation on
the request path.

Regexes use RE2 semantics (Istio's). Python's ``re`` runs instead of RE2 when
it provably behaves the same: the pattern is in a conservative ASCII subset
both engines read identically and the subject is ASCII (one C call,
``bytes.isascii``). Anything else runs on the RE2 binding.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import re2

from ..config.model import HTTPMatchRequest, StringMatch

if TYPE_CHECKING:
    from ..http.request import RequestView

Check = Callable[["RequestView"], bool]
ValueMatch = Callable[[bytes], bool]

# Constructs whose meaning is the same in RE2 and Python's re for ASCII input.
# Anything outside (\p classes, POSIX [[:x:]], \Q..\E, flags other than (?i),
# \b, \A, \z ...) goes to RE2 only.
# \s/\S are left out: Python's includes \v, RE2's does not. Braces must form a
# counted repetition ({n}, {n,}, {n,m}): Python reads "a{,3}" as {0,3}, RE2 as
# the literal text.
_SAFE_REGEX = re.compile(r"(?:[A-Za-z0-9 _\-/.*+?|()\[\]{}^$,:;=!@#%&~<>'\"`]|\\[dDwW.\-/*+?|()\[\]{}^$\\])*")
_ODD_BRACE = re.compile(r"\{(?!\d+(?:,\d*)?\})")


def _re2_options() -> Any:
    opts = re2.Options()
    opts.log_errors = False  # errors are reported by us, with a config path
    return opts


class RegexMatch:
    """Full-match regex with RE2 semantics."""

    __slots__ = ("ignore_case", "pattern", "rx2", "rxpy")

    def __init__(self, pattern: str, ignore_case: bool = False) -> None:
        self.pattern = pattern
        self.ignore_case = ignore_case
        self.rx2 = re2.compile(("(?i)" if ignore_case else "") + pattern, _re2_options())
        self.rxpy: re.Pattern[bytes] | None = None
        inline_i = pattern.startswith("(?i)")
        core = pattern[4:] if inline_i else pattern
        flags = re.IGNORECASE if ignore_case or inline_i else re.NOFLAG
        if (core.isascii() and _SAFE_REGEX.fullmatch(core) and "(?" not in core.replace("(?:", "")
                and not _ODD_BRACE.search(core)):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("error")
                    self.rxpy = re.compile(core.encode("ascii"), flags)
            except (re.error, FutureWarning, DeprecationWarning):
                self.rxpy = None

    def __call__(self, value: bytes) -> bool:
        rxpy = self.rxpy
        if rxpy is not None and value.isascii():
            return rxpy.fullmatch(value) is not None
        return self.rx2.fullmatch(value) is not None


def compile_regex(pattern: str) -> RegexMatch:
    """Raises ValueError with RE2's message for a pattern RE2 rejects."""
    try:
        return RegexMatch(pattern)
    except re2.error as exc:
        msg = exc.args[0] if exc.args else str(exc)
        if isinstance(msg, bytes):
            msg = msg.decode("utf-8", "replace")
        raise ValueError(f"invalid RE2 regex {pattern!r}: {msg}") from None


def compile_string_match(sm: StringMatch, ignore_case: bool = False) -> ValueMatch:
    if sm.kind == "present":
        return lambda v: True
    if sm.kind == "regex":
        return compile_regex(sm.value)
    value = sm.value.encode("utf-8")
    if ignore_case:
        low = value.lower()
        if sm.kind == "exact":
            return lambda v: v.lower() == low
        return lambda v: v.lower().startswith(low)
    if sm.kind == "exact":
        return lambda v: v == value
    return lambda v: v.startswith(value)


def parse_query(query: bytes | None) -> dict[str, str]:
    """First occurrence wins, values not percent-decoded (as Envoy's route
    matcher sees them)."""
    params: dict[str, str] = {}
    if not query:
        return params
    for part in query.split(b"&"):
        if not part:
            continue
        name, _, value = part.partition(b"=")
        key = name.decode("latin-1")
        if key not in params:
            params[key] = value.decode("latin-1")
    return params


def _header_check(name: str, sm: StringMatch) -> Check:
    """Envoy matches each value of a repeated header on its own and the
    header matches when one does (1.40: ``match_headers_individually``);
    one line holding "a, b" is one value."""
    key = name.lower().encode("latin-1")
    match = compile_string_match(sm)

    def check(ex: RequestView) -> bool:
        repeated = ex.repeated
        if repeated is not None:
            values = repeated.get(key)
            if values is not None:
                for v in values:
                    if match(v):
                        return True
                return False
        value = ex.hdict.get(key)
        return value is not None and match(value)

    return check


def _without_header_check(name: str, sm: StringMatch) -> Check:
    """Istio's ``withoutHeaders``: Envoy's inverted header matcher with
    ``treat_missing_header_as_empty`` (except for the presence matcher, where
    Istio cannot set it). So a missing header is matched against "": it
    satisfies ``{exact: foo}`` but not ``{regex: ".*"}`` or ``{exact: ""}``.
    A repeated header satisfies it only when none of its values matches."""
    key = name.lower().encode("latin-1")
    if sm.kind == "present":
        return lambda ex: key not in ex.hdict
    match = compile_string_match(sm)

    def check(ex: RequestView) -> bool:
        repeated = ex.repeated
        if repeated is not None:
            values = repeated.get(key)
            if values is not None:
                for v in values:
                    if match(v):
                        return False
                return True
        return not match(ex.hdict.get(key, b""))

    return check


def _query_check(name: str, sm: StringMatch) -> Check:
    """Envoy's query parameter matcher as Istio programs it: ``{}`` is
    present_match; ``exact: ""`` is an exact match of the empty value, so it
    matches ``?name`` and ``?name=`` only (Envoy v2's "empty value means
    present" is gone in v3). The first occurrence of the name counts; values
    are compared undecoded."""
    match = compile_string_match(sm)

    def check(ex: RequestView) -> bool:
        value = ex.query_params().get(name)
        return value is not None and match(value.encode("latin-1"))

    return check


# Istio ignores these pseudo-header names inside ``headers``.
_IGNORED_HEADER_KEYS = {"uri", "scheme", "method", "authority"}


# One factory per request attribute: each check closes over its own matcher
# (a loop variable shared by several lambdas would bind the last one).
def _method_check(f: ValueMatch) -> Check:
    return lambda ex: f(ex.method)


def _path_check(f: ValueMatch) -> Check:
    return lambda ex: f(ex.path)


def _scheme_check(f: ValueMatch) -> Check:
    return lambda ex: f(ex.scheme)


def _authority_check(f: ValueMatch) -> Check:
    return lambda ex: f(ex.authority)


def _port_check(port: int) -> Check:
    return lambda ex: ex.port == port


def _claim_values(ex: RequestView, path: tuple[str, ...]) -> list[bytes]:
    """The verified JWT's claim as Envoy's metadata matcher sees it: a string,
    or the strings of a list (any may match); nothing without a token."""
    auth = ex.auth
    if auth is None:
        return []
    value: Any = auth.claims
    for part in path:
        if not isinstance(value, dict):
            return []
        value = value.get(part)
    if isinstance(value, str):
        return [value.encode("utf-8")]
    if isinstance(value, list):
        return [v.encode("utf-8") for v in value if isinstance(v, str)]
    return []


def _claim_check(path: tuple[str, ...], sm: StringMatch) -> Check:
    match = compile_string_match(sm)
    return lambda ex: any(match(v) for v in _claim_values(ex, path))


def _without_claim_check(path: tuple[str, ...], sm: StringMatch) -> Check:
    # Envoy's inverted metadata matcher: a missing claim (or no token) satisfies it.
    match = compile_string_match(sm)
    return lambda ex: not any(match(v) for v in _claim_values(ex, path))


def _never(ex: RequestView) -> bool:
    return False


def compile_match(m: HTTPMatchRequest, *, jwt_routing: bool = False) -> tuple[Check, ...]:
    """The AND-ed checks of one ``match[]`` entry, cheapest first.

    ``jwt_routing``: claim matches see the verified token (a gateway, where
    jwt_authn runs before the route is chosen). Without it (a sidecar:
    Istio clears no route cache there, so the route is chosen before any
    token is verified) a claim match finds no claim: ``headers`` claims never
    match and ``withoutHeaders`` claims always do."""
    checks: list[Check] = []
    if m.claims and not jwt_routing:
        return (_never,)
    if m.port is not None:
        checks.append(_port_check(m.port))
    if m.method is not None:
        checks.append(_method_check(compile_string_match(m.method)))
    if m.uri is not None:
        # ignoreUriCase is Envoy's case_sensitive=false: exact and prefix only.
        ignore_case = m.ignore_uri_case and m.uri.kind != "regex"
        checks.append(_path_check(compile_string_match(m.uri, ignore_case=ignore_case)))
    if m.scheme is not None:
        checks.append(_scheme_check(compile_string_match(m.scheme)))
    if m.authority is not None:
        checks.append(_authority_check(compile_string_match(m.authority)))
    for name, sm in m.headers:
        if name.lower() not in _IGNORED_HEADER_KEYS:
            checks.append(_header_check(name, sm))
    for name, sm in m.without_headers:
        if name.lower() not in _IGNORED_HEADER_KEYS:
            checks.append(_without_header_check(name, sm))
    for name, sm in m.query_params:
        checks.append(_query_check(name, sm))
    if jwt_routing:
        for path, sm in m.claims:
            checks.append(_claim_check(path, sm))
        for path, sm in m.without_claims:
            checks.append(_without_claim_check(path, sm))
    return tuple(checks)
