"""RequestAuthentication: Envoy's jwt_authn filter as Istio configures it.

Istio turns every applicable ``jwtRules`` entry into an Envoy JWT provider
and requires, for every provider, "valid or missing"
(``istio: pilot/pkg/security/authn/policy_applier.go``). So:

- no token at any configured location: the request passes, with no identity;
- a token that fails any check: 401 with Envoy's status string as the body
  and ``www-authenticate: Bearer realm="<url>", error="invalid_token"``
  (403 for a disallowed audience);
- a valid token: its ``iss/sub`` becomes ``request.auth.principal`` and its
  claims are available to AuthorizationPolicy.

Checks run in Envoy's order (``envoy: source/extensions/filters/http/jwt_authn/
authenticator.cc``): format, issuer, time (60 s clock skew, Envoy's default,
which Istio does not change), audience, then the signature. Signatures are
checked by PyJWT on ``cryptography``; pyproxy only chooses which key may
verify which algorithm (a key's type must fit the token's ``alg``, so an
RSA public key is never used as an HMAC secret).

Verified tokens are cached (bounded, per provider set) so a repeated token
costs a dictionary lookup and a time check, not a signature check.

Keys from ``jwksUri`` are fetched off the request path by :class:`JwksStore`
(every 20 min, Istio's PILOT_JWT_PUB_KEY_REFRESH_INTERVAL; after a failure
from 1 s doubling, as istiod retries); the last good set is kept when a
fetch fails, and an issuer whose keys were never fetched fails closed (every
token rejected), as istiod does by inlining a key nobody can sign with.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from ..config.model import JWTHeader, JWTRule

log = logging.getLogger("pyproxy.jwt")

CLOCK_SKEW = 60.0  # Envoy's clock_skew_seconds default
REFRESH_INTERVAL = 20 * 60.0  # istiod's PILOT_JWT_PUB_KEY_REFRESH_INTERVAL
RETRY_FIRST = 1.0  # istiod's refresh interval on failure, doubled up to REFRESH_INTERVAL
FETCH_TIMEOUT = 5.0  # JWTRule.timeout default
MAX_JWKS_BYTES = 1 << 20
CACHE_SIZE = 1000  # verified tokens kept per provider set
MAX_CACHED_TOKEN = 4096  # Envoy's jwt_max_token_size default for its token cache
DEFAULT_SPACE_DELIMITED = ("scope", "permission")  # Istio always normalises these

# Envoy's status strings (envoy: source/common/jwt/status.cc).
BAD_FORMAT = "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections"
HEADER_BAD_BASE64 = "Jwt header is an invalid Base64url encoded"
HEADER_BAD_JSON = "Jwt header is an invalid JSON"
HEADER_BAD_ALG = "Jwt header [alg] field is required and must be a string"
HEADER_ALG_NOT_IMPLEMENTED = "Jwt header [alg] is not supported"
HEADER_BAD_KID = "Jwt header [kid] field is not a string"
PAYLOAD_BAD_BASE64 = "Jwt payload is an invalid Base64url encoded"
PAYLOAD_BAD_JSON = "Jwt payload is an invalid JSON"
ISS_NOT_STRING = "Jwt payload [iss] field is not a string"
SUB_NOT_STRING = "Jwt payload [sub] field is not a string"
EXP_NOT_INTEGER = "Jwt payload [exp] field is not an integer"
NBF_NOT_INTEGER = "Jwt payload [nbf] field is not an integer"
SIGNATURE_BAD_BASE64 = "Jwt signature is an invalid Base64url encoded"
UNKNOWN_ISSUER = "Jwt issuer is not configured"
AUDIENCE_NOT_ALLOWED = "Audiences in Jwt are not allowed"
VERIFICATION_FAILS = "Jwt verification fails"
EXPIRED = "Jwt is expired"
NOT_YET_VALID = "Jwt not yet valid"
NO_MATCHING_KEY = "Jwks doesn't have key to match kid or alg from Jwt"

# Algorithms Envoy's jwt_authn verifies, and the key type each needs.
_TOKEN_CHAR = re.compile(r"[A-Za-z0-9\-_.]")

ALGORITHMS: dict[str, tuple[str, str | None]] = {
    **{f"RS{n}": ("RSA", None) for n in (256, 384, 512)},
    **{f"PS{n}": ("RSA", None) for n in (256, 384, 512)},
    "ES256": ("EC", "P-256"), "ES384": ("EC", "P-384"), "ES512": ("EC", "P-521"),
    **{f"HS{n}": ("oct", None) for n in (256, 384, 512)},
    "EdDSA": ("OKP", "Ed25519"),
}



def _pyjwt() -> Any:
    """PyJWT (and with it cryptography), imported when the first key is
    loaded: a proxy without RequestAuthentication never loads them."""
    import jwt

    return jwt


class JwtError(Exception):
    """A token was found and refused: ``status`` is Envoy's string."""

    def __init__(self, status: str, code: int = 401) -> None:
        super().__init__(status)
        self.status = status
        self.code = code


# -- keys ---------------------------------------------------------------------------


@dataclass(slots=True)
class Jwk:
    kid: str | None
    alg: str | None
    kty: str
    crv: str | None
    data: dict
    # PyJWT key objects by algorithm, built on first use.
    built: dict[str, Any] = field(default_factory=dict)

    def key_for(self, alg: str) -> Any:
        key = self.built.get(alg)
        if key is None:
            key = self.built[alg] = _pyjwt().PyJWK(self.data, algorithm=alg).key
        return key

    def fits(self, alg: str, kid: str | None) -> bool:
        """Envoy's key selection: a kid on both sides must agree, an alg on
        the key must be the token's, and the key type must suit the alg."""
        if kid and self.kid and kid != self.kid:
            return False
        if self.alg and self.alg != alg:
            return False
        kty, crv = ALGORITHMS[alg]
        return self.kty == kty and (crv is None or self.crv == crv)


def load_jwks(text: str | bytes) -> tuple[Jwk, ...]:
    """Parse a JSON Web Key Set; ValueError names the first unusable key."""
    try:
        data = json.loads(text)
    except ValueError:
        raise ValueError("Jwks is an invalid JSON") from None
    if not isinstance(data, dict) or "keys" not in data:
        raise ValueError("Jwks does not have [keys] field")
    keys = data["keys"]
    if not isinstance(keys, list):
        raise ValueError("[keys] in Jwks is not an array")  # noqa: TRY004 - a config value error
    out = []
    for i, key in enumerate(keys):
        if not isinstance(key, dict) or not isinstance(key.get("kty"), str):
            raise ValueError(f"keys[{i}]: not a JSON Web Key (no kty)")  # noqa: TRY004 - a config value error
        kty = key["kty"]
        alg = key.get("alg")
        kid = key.get("kid")
        if alg is not None and alg not in ALGORITHMS:
            raise ValueError(f"keys[{i}]: alg {alg!r} is not supported")
        probe = alg or next((a for a, (t, crv) in ALGORITHMS.items()
                             if t == kty and (crv is None or crv == key.get("crv"))), None)
        if probe is None:
            raise ValueError(f"keys[{i}]: key type {kty!r} (crv {key.get('crv')!r}) is not supported")
        jwk = Jwk(kid if isinstance(kid, str) else None, alg, kty, key.get("crv"), key)
        try:
            jwk.key_for(probe)
        except (_pyjwt().PyJWTError, ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"keys[{i}]: not a valid {kty} key: {exc}") from None
        out.append(jwk)
    if not out:
        raise ValueError("Jwks doesn't have any valid public key")
    return tuple(out)


class JwksStore:
    """Key sets fetched from ``jwksUri`` in the background, shared by every
    snapshot of a worker. ``keys(uri)`` never blocks: it returns the last
    good set, or None when none was ever fetched."""

    def __init__(self, fetch: Callable[[str, float], Any] | None = None) -> None:
        self._sets: dict[str, tuple[int, tuple[Jwk, ...]]] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self._timeouts: dict[str, float] = {}
        self._fetch = fetch or _http_get
        self.fetches = 0
        self.failures = 0

    def keys(self, uri: str) -> tuple[int, tuple[Jwk, ...]] | None:
        return self._sets.get(uri)

    def want(self, uris: Mapping[str, float]) -> None:
        """Keep these URIs (with their fetch timeouts) refreshed; stop the rest."""
        for uri in list(self._tasks):
            if uri not in uris:
                self._tasks.pop(uri).cancel()
                self._sets.pop(uri, None)
        self._timeouts = dict(uris)
        if not uris:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (a unit test building a snapshot): nothing is fetched
        for uri in uris:
            if uri not in self._tasks:
                self._tasks[uri] = loop.create_task(self._refresh(uri))

    def close(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        self._tasks.clear()

    async def _refresh(self, uri: str) -> None:
        retry = RETRY_FIRST
        while True:
            try:
                body = await asyncio.wait_for(self._fetch(uri, self._timeouts.get(uri, FETCH_TIMEOUT)),
                                              self._timeouts.get(uri, FETCH_TIMEOUT))
                keys = load_jwks(body)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure keeps the last good set
                self.failures += 1
                kept = "keeping the last good key set" if uri in self._sets else "its tokens are refused"
                log.warning("jwksUri %s: fetch failed (%s: %s); %s; retrying in %gs",
                            uri, type(exc).__name__, exc, kept, retry)
                await asyncio.sleep(retry)
                retry = min(retry * 2, REFRESH_INTERVAL)
                continue
            self.fetches += 1
            previous = self._sets.get(uri)
            version = previous[0] + 1 if previous else 1
            self._sets[uri] = (version, keys)
            retry = RETRY_FIRST
            await asyncio.sleep(REFRESH_INTERVAL)


async def _http_get(uri: str, timeout: float) -> bytes:
    import aiohttp

    client_timeout = aiohttp.ClientTimeout(total=timeout)
    async with aiohttp.ClientSession(timeout=client_timeout) as session, session.get(uri) as resp:
        if resp.status != 200:
            raise OSError(f"HTTP {resp.status}")
        body = await resp.content.read(MAX_JWKS_BYTES + 1)
        if len(body) > MAX_JWKS_BYTES:
            raise OSError("JWKS larger than 1 MiB")
        return body


JWKS = JwksStore()  # the worker's store (one per process)


# -- providers --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Identity:
    """A verified token: what AuthorizationPolicy and the access log see."""

    issuer: str
    subject: str
    audiences: tuple[str, ...]
    presenter: str
    claims: Mapping[str, Any]
    payload_segment: str  # base64url JSON payload, as in the token
    expires: float | None
    not_before: float | None

    @property
    def principal(self) -> str:
        return f"{self.issuer}/{self.subject}"


class Provider:
    """One jwtRules entry, compiled."""

    __slots__ = ("audiences", "claim_headers", "forward", "headers", "inline", "issuer", "params",
                 "cookies", "payload_header", "rule", "space_claims", "store", "uri")

    def __init__(self, rule: JWTRule, store: JwksStore) -> None:
        self.rule = rule
        self.issuer = rule.issuer
        self.audiences = frozenset(rule.audiences)
        default = not (rule.from_headers or rule.from_params or rule.from_cookies)
        headers = rule.from_headers or ((JWTHeader("authorization", "Bearer "),) if default else ())
        self.headers = tuple((h.name.lower().encode("latin-1"), h.prefix) for h in headers)
        self.params = rule.from_params or (("access_token",) if default else ())
        self.cookies = rule.from_cookies
        self.forward = rule.forward_original_token
        self.payload_header = rule.output_payload_to_header.encode("latin-1")
        self.claim_headers = tuple((c.header.encode("latin-1"), tuple(c.claim.split("."))) for c in
                                   rule.output_claim_to_headers)
        self.space_claims = frozenset(DEFAULT_SPACE_DELIMITED + rule.space_delimited_claims)
        # Inline keys are istiod's normal shape (it inlines what it fetched);
        # when both are set Istio uses the inline set.
        self.inline = load_jwks(rule.jwks) if rule.jwks else None
        self.uri = rule.jwks_uri if not rule.jwks else ""
        self.store = store

    def keys(self) -> tuple[int, tuple[Jwk, ...]] | None:
        if self.inline is not None:
            return 0, self.inline
        return self.store.keys(self.uri)


@dataclass(slots=True)
class Located:
    token: str
    header: bytes | None  # the header it came from (removed unless forwarded), None for a param/cookie


@dataclass(slots=True)
class Outcome:
    identity: Identity | None
    remove: tuple[bytes, ...]  # header names to remove before the app
    add: tuple[tuple[bytes, bytes], ...]  # headers to set (payload, claims)


class Authenticator:
    """The jwtRules of every RequestAuthentication that applies to this
    proxy, compiled once per snapshot."""

    def __init__(self, rules: Iterable[JWTRule], store: JwksStore | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        store = store if store is not None else JWKS
        # Istio merges the rules of all applicable policies, sorted by issuer.
        self.providers = tuple(Provider(r, store) for r in sorted(rules, key=lambda r: r.issuer))
        self.by_issuer = {p.issuer: p for p in self.providers}
        self.header_names = frozenset(name for p in self.providers for name, _ in p.headers)
        self.params = frozenset(name for p in self.providers for name in p.params)
        self.cookies = frozenset(name for p in self.providers for name in p.cookies)
        self.sanitize = tuple(dict.fromkeys(
            name for p in self.providers
            for name in ((p.payload_header,) if p.payload_header else ()) + tuple(h for h, _ in p.claim_headers)))
        self.clock = clock
        # token -> (provider, keys version, identity)
        self.cache: dict[str, tuple[Provider, int, Identity]] = {}
        self.verified = 0  # signature checks done (cache misses that got that far)

    def uris(self) -> dict[str, float]:
        return {p.uri: p.rule.timeout or FETCH_TIMEOUT for p in self.providers if p.uri}

    # -- extraction -------------------------------------------------------------

    def locate(self, headers: Mapping[bytes, bytes], query: Callable[[], Mapping[str, str]],
               cookie: Callable[[str], str | None]) -> list[Located]:
        found: list[Located] = []
        seen: set[str] = set()
        for p in self.providers:
            for name, prefix in p.headers:
                raw = headers.get(name)
                if raw is None:
                    continue
                token = raw.decode("latin-1")
                if prefix:
                    # Envoy's extractor (checked against Envoy 1.40): the
                    # prefix may be anywhere in the value (case-sensitive);
                    # without it the request counts as having no token. The
                    # token starts at the first base64url character or dot
                    # after it and runs to the end of the value.
                    pos = token.find(prefix)
                    if pos < 0:
                        continue
                    first = _TOKEN_CHAR.search(token, pos + len(prefix))
                    if first is not None:
                        token = token[first.start():]
                if token and token not in seen:
                    seen.add(token)
                    found.append(Located(token, name))
            if p.params:
                qp = query()
                for param in p.params:
                    found_value = qp.get(param)
                    if found_value and "%" in found_value:
                        found_value = unquote(found_value)  # Envoy decodes query parameters
                    if found_value and found_value not in seen:
                        seen.add(found_value)
                        found.append(Located(found_value, None))
            for cookie_name in p.cookies:
                from_cookie = cookie(cookie_name)
                if from_cookie and from_cookie not in seen:
                    seen.add(from_cookie)
                    found.append(Located(from_cookie, None))
        return found

    # -- the filter -------------------------------------------------------------

    def authenticate(self, headers: Mapping[bytes, bytes], query: Callable[[], Mapping[str, str]],
                     cookie: Callable[[str], str | None]) -> Outcome:
        """Raises JwtError for a refused token; no token is not an error."""
        identity = None
        # Envoy sanitizes the payload and claim headers on every request, so
        # a client cannot send its own (even without a token).
        remove: list[bytes] = [name for name in self.sanitize if name in headers]
        add: list[tuple[bytes, bytes]] = []
        for located in self.locate(headers, query, cookie):
            provider, ident = self.verify(located.token)
            if identity is None:
                identity = ident
            if located.header is not None and not provider.forward:
                remove.append(located.header)
            if provider.payload_header:
                add.append((provider.payload_header, ident.payload_segment.encode("ascii")))
            for header, path in provider.claim_headers:
                value = claim_header_value(ident.claims, path)
                if value is not None:
                    add.append((header, value.encode("utf-8")))
        return Outcome(identity, tuple(remove), tuple(add))

    def verify(self, token: str) -> tuple[Provider, Identity]:
        now = self.clock()
        hit = self.cache.get(token)
        if hit is not None:
            provider, version, ident = hit
            keys = provider.keys()
            if keys is not None and keys[0] == version:
                _check_time(ident.expires, ident.not_before, now)
                return provider, ident
            del self.cache[token]
        provider, ident, version = self._verify(token, now)
        if len(token) <= MAX_CACHED_TOKEN:
            if len(self.cache) >= CACHE_SIZE:
                self.cache.pop(next(iter(self.cache)))  # oldest first (insertion order)
            self.cache[token] = (provider, version, ident)
        return provider, ident

    def _verify(self, token: str, now: float) -> tuple[Provider, Identity, int]:
        if token.count(".") != 2:
            raise JwtError(BAD_FORMAT)
        head_b64, payload_b64, sig_b64 = token.split(".")
        header = _json_segment(head_b64, HEADER_BAD_BASE64, HEADER_BAD_JSON)
        alg = header.get("alg")
        if not isinstance(alg, str):
            raise JwtError(HEADER_BAD_ALG)
        if alg not in ALGORITHMS:
            raise JwtError(HEADER_ALG_NOT_IMPLEMENTED)  # includes "none"
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise JwtError(HEADER_BAD_KID)
        payload = _json_segment(payload_b64, PAYLOAD_BAD_BASE64, PAYLOAD_BAD_JSON)
        iss = payload.get("iss", "")
        if not isinstance(iss, str):
            raise JwtError(ISS_NOT_STRING)
        sub = payload.get("sub", "")
        if not isinstance(sub, str):
            raise JwtError(SUB_NOT_STRING)
        try:
            _b64decode(sig_b64)
        except ValueError:
            raise JwtError(SIGNATURE_BAD_BASE64) from None
        provider = self.by_issuer.get(iss)
        if provider is None:
            raise JwtError(UNKNOWN_ISSUER)
        exp = _numeric(payload, "exp", EXP_NOT_INTEGER)
        nbf = _numeric(payload, "nbf", NBF_NOT_INTEGER)
        _check_time(exp, nbf, now)
        aud = payload.get("aud")
        audiences = tuple(a for a in (aud if isinstance(aud, list) else [aud]) if isinstance(a, str))
        if provider.audiences and not provider.audiences.intersection(audiences):
            raise JwtError(AUDIENCE_NOT_ALLOWED, 403)
        keys = provider.keys()
        if keys is None:
            # Never fetched: fail closed (istiod inlines a key nobody can sign with).
            raise JwtError(VERIFICATION_FAILS)
        version, jwks = keys
        candidates = [k for k in jwks if k.fits(alg, kid)]
        if not candidates:
            raise JwtError(NO_MATCHING_KEY)
        self.verified += 1
        pyjwt = _pyjwt()
        for key in candidates:
            try:
                pyjwt.PyJWS().decode_complete(token, key.key_for(alg), algorithms=[alg])
            except (pyjwt.PyJWTError, ValueError, TypeError):
                continue
            break
        else:
            raise JwtError(VERIFICATION_FAILS)
        claims = _normalise(payload, provider.space_claims)
        azp = payload.get("azp")
        ident = Identity(iss, sub, audiences, azp if isinstance(azp, str) else "", claims, payload_b64,
                         exp, nbf)
        return provider, ident, version


def _b64decode(segment: str) -> bytes:
    try:
        # validate=True: a character outside the base64url alphabet is an
        # error, not silently skipped.
        return base64.b64decode(segment + "=" * (-len(segment) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(segment) from None


def _json_segment(segment: str, bad_base64: str, bad_json: str) -> dict:
    try:
        raw = _b64decode(segment)
    except ValueError:
        raise JwtError(bad_base64) from None
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise JwtError(bad_json) from None
    if not isinstance(value, dict):
        raise JwtError(bad_json)
    return value


def _numeric(payload: dict, name: str, status: str) -> float | None:
    value = payload.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise JwtError(status)
    return float(value)


def _check_time(exp: float | None, nbf: float | None, now: float) -> None:
    if nbf is not None and now + CLOCK_SKEW < nbf:
        raise JwtError(NOT_YET_VALID)
    if exp is not None and now - CLOCK_SKEW > exp:
        raise JwtError(EXPIRED)


def _normalise(payload: dict, space_claims: frozenset[str]) -> dict:
    """Envoy's normalize_payload_in_metadata: space-delimited claims become lists."""
    claims = dict(payload)
    for name in space_claims:
        value = claims.get(name)
        if isinstance(value, str):
            claims[name] = value.split()
    return claims


def claim_value(claims: Mapping[str, Any], path: Iterable[str]) -> Any:
    value: Any = claims
    for part in path:
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def claim_header_value(claims: Mapping[str, Any], path: Iterable[str]) -> str | None:
    """outputClaimToHeaders: string, integer and boolean claims only."""
    value = claim_value(claims, path)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, str)):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return None


def claim_strings(claims: Mapping[str, Any], path: Iterable[str]) -> tuple[str, ...]:
    """A claim as the strings a policy or route compares: a string, or the
    elements of a list (any may match); numbers and booleans as Envoy prints them."""
    value = claim_value(claims, path)
    if value is None:
        return ()
    items = value if isinstance(value, list) else [value]
    out = []
    for item in items:
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, bool):
            out.append("true" if item else "false")
        elif isinstance(item, (int, float)):
            out.append(str(int(item)) if float(item).is_integer() else str(item))
    return tuple(out)


def www_authenticate(scheme: bytes, authority: bytes, path: bytes) -> bytes:
    """Envoy's challenge: the realm is the request URL (without the query),
    cut to 256 characters."""
    realm = (scheme + b"://" + authority + path)[:256]
    return b'Bearer realm="' + realm + b'", error="invalid_token"'
