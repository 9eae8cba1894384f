"""RequestAuthentication's token checks (pyproxy/authz/jwt.py) with tokens
these tests sign: Envoy's order of checks, its status strings, the key
selection that keeps an RSA public key from being used as an HMAC secret,
the 60 s clock skew, token locations and the verified-token cache."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import Any

import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from pyproxy.authz import jwt as J
from pyproxy.config.model import ClaimToHeader, JWTHeader, JWTRule

ISS = "https://issuer.example"
NOW = 1_800_000_000.0

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER_RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
ED_KEY = ed25519.Ed25519PrivateKey.generate()
HMAC_SECRET = b"s3cret-s3cret-s3cret-s3cret-s3cret!"


def _jwk(key: Any, kid: str, alg: str | None = None) -> dict:
    algo = pyjwt.get_algorithm_by_name(alg or "RS256")
    data = json.loads(algo.to_jwk(key))
    data["kid"] = kid
    if alg:
        data["alg"] = alg
    return data


RSA_JWKS = {"keys": [_jwk(RSA_KEY.public_key(), "rsa1")]}
ALL_JWKS = {"keys": [
    _jwk(RSA_KEY.public_key(), "rsa1"),
    _jwk(EC_KEY.public_key(), "ec1", "ES256"),
    _jwk(ED_KEY.public_key(), "ed1", "EdDSA"),
    {"kty": "oct", "kid": "hs1", "alg": "HS256", "k": base64.urlsafe_b64encode(HMAC_SECRET).rstrip(b"=").decode()},
]}


def sign(claims: dict | None = None, key: Any = RSA_KEY, alg: str = "RS256", kid: str | None = "rsa1",
         **overrides: Any) -> str:
    payload = {"iss": ISS, "sub": "alice", "exp": NOW + 3600, "iat": NOW, **(claims or {})}
    for k, v in overrides.items():
        if v is None:
            payload.pop(k, None)
        else:
            payload[k] = v
    headers = {"kid": kid} if kid else None
    return pyjwt.encode(payload, key, algorithm=alg, headers=headers)


def auth(rules: list[JWTRule] | None = None, jwks: dict = ALL_JWKS) -> J.Authenticator:
    rules = rules or [JWTRule(issuer=ISS, jwks=json.dumps(jwks))]
    return J.Authenticator(rules, store=J.JwksStore(), clock=lambda: NOW)


def run(a: J.Authenticator, headers: dict[str, str] | None = None, query: dict[str, str] | None = None,
        cookies: dict[str, str] | None = None) -> J.Outcome:
    h = {k.encode(): v.encode() for k, v in (headers or {}).items()}
    return a.authenticate(h, lambda: query or {}, lambda n: (cookies or {}).get(n))


def refused(a: J.Authenticator, token: str) -> tuple[int, str]:
    with pytest.raises(J.JwtError) as info:
        run(a, {"authorization": f"Bearer {token}"})
    return info.value.code, info.value.status


# -- valid tokens ----------------------------------------------------------------------


@pytest.mark.parametrize("key,alg,kid", [
    (RSA_KEY, "RS256", "rsa1"), (RSA_KEY, "RS384", "rsa1"), (RSA_KEY, "PS256", "rsa1"), (RSA_KEY, "PS512", "rsa1"),
    (EC_KEY, "ES256", "ec1"), (ED_KEY, "EdDSA", "ed1"), (HMAC_SECRET, "HS256", "hs1"),
    (RSA_KEY, "RS256", None),  # no kid: any key that fits the alg is tried
])
def test_valid_token_gives_identity_and_removes_the_header(key: Any, alg: str, kid: str | None) -> None:
    out = run(auth(), {"authorization": "Bearer " + sign(key=key, alg=alg, kid=kid, aud="web", azp="app")})
    assert out.identity is not None
    assert (out.identity.principal, out.identity.audiences, out.identity.presenter) == (f"{ISS}/alice", ("web",), "app")
    assert out.remove == (b"authorization",)  # forwardOriginalToken defaults to false


def test_no_token_passes_without_identity() -> None:
    assert run(auth(), {}).identity is None
    # Envoy does not extract a value without the prefix: no token, not an invalid one.
    assert run(auth(), {"authorization": "Basic dXNlcjpwYXNz"}).identity is None


def test_default_locations_include_access_token_param() -> None:
    out = run(auth(), query={"access_token": sign()})
    assert out.identity is not None and out.remove == ()


def test_custom_locations_replace_the_defaults() -> None:
    rule = JWTRule(issuer=ISS, jwks=json.dumps(RSA_JWKS), from_headers=(JWTHeader("x-jwt", "Tok "),),
                   from_params=("t",), from_cookies=("session",), forward_original_token=True)
    a = auth([rule])
    assert run(a, {"authorization": "Bearer garbage"}).identity is None  # not a location any more
    out = run(a, {"x-jwt": "Tok " + sign()})
    assert out.identity is not None and out.remove == ()  # forwarded
    assert run(a, query={"t": sign()}).identity is not None
    assert run(a, cookies={"session": sign()}).identity is not None


def test_output_payload_and_claims_to_headers() -> None:
    rule = JWTRule(issuer=ISS, jwks=json.dumps(RSA_JWKS), output_payload_to_header="x-payload",
                   output_claim_to_headers=(ClaimToHeader("x-sub", "sub"), ClaimToHeader("x-admin", "admin"),
                                            ClaimToHeader("x-level", "org.level"), ClaimToHeader("x-groups", "groups"),
                                            ClaimToHeader("x-missing", "nope")))
    token = sign({"admin": True, "org": {"level": 3}, "groups": ["a", "b"]})
    out = run(auth([rule]), {"authorization": "Bearer " + token})
    added = dict(out.add)
    payload = json.loads(base64.urlsafe_b64decode(added[b"x-payload"] + b"=="))
    assert payload["sub"] == "alice"
    # Strings, integers and booleans only; a list or a missing claim gives no header.
    assert {k: v for k, v in added.items() if k != b"x-payload"} == {
        b"x-sub": b"alice", b"x-admin": b"true", b"x-level": b"3"}


def test_scope_claims_are_split_on_spaces() -> None:
    out = run(auth(), {"authorization": "Bearer " + sign({"scope": "read write", "permission": "a b"})})
    assert out.identity is not None
    assert (out.identity.claims["scope"], out.identity.claims["permission"]) == (["read", "write"], ["a", "b"])


# -- refusals: Envoy's status strings and codes ----------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_expired_and_clock_skew() -> None:
    a = auth()
    assert run(a, {"authorization": "Bearer " + sign(exp=NOW - 10)}).identity is not None  # within 60 s
    assert refused(a, sign(exp=NOW - 120)) == (401, "Jwt is expired")


def test_not_yet_valid_and_clock_skew() -> None:
    a = auth()
    assert run(a, {"authorization": "Bearer " + sign(nbf=NOW + 30)}).identity is not None
    assert refused(a, sign(nbf=NOW + 120)) == (401, "Jwt not yet valid")


def test_wrong_issuer() -> None:
    assert refused(auth(), sign(iss="https://evil.example")) == (401, "Jwt issuer is not configured")


def test_wrong_audience_is_403() -> None:
    a = auth([JWTRule(issuer=ISS, jwks=json.dumps(RSA_JWKS), audiences=("bookstore",))])
    assert refused(a, sign(aud="other")) == (403, "Audiences in Jwt are not allowed")
    assert refused(a, sign(aud=None)) == (403, "Audiences in Jwt are not allowed")
    assert run(a, {"authorization": "Bearer " + sign(aud=["x", "bookstore"])}).identity is not None


def test_bad_signature() -> None:
    token = sign(key=OTHER_RSA_KEY)
    assert refused(auth(), token) == (401, "Jwt verification fails")
    head, _, sig = sign().split(".")
    tampered = _b64(json.dumps({"iss": ISS, "sub": "root", "exp": NOW + 60}).encode())
    assert refused(auth(), f"{head}.{tampered}.{sig}") == (401, "Jwt verification fails")


def test_alg_none_is_refused() -> None:
    head = _b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    body = _b64(json.dumps({"iss": ISS, "sub": "alice", "exp": NOW + 60}).encode())
    assert refused(auth(), f"{head}.{body}.") == (401, "Jwt header [alg] is not supported")


def test_hs256_signed_with_the_rsa_public_key_is_refused() -> None:
    """Key confusion: an attacker signs HS256 with the (public) RSA key's PEM
    or JWK bytes as the secret; an RSA key is never used for HMAC."""
    pem = RSA_KEY.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    head = _b64(json.dumps({"alg": "HS256", "kid": "rsa1", "typ": "JWT"}).encode())
    body = _b64(json.dumps({"iss": ISS, "sub": "admin", "exp": NOW + 60}).encode())
    import hashlib
    import hmac
    sig = _b64(hmac.new(pem, f"{head}.{body}".encode(), hashlib.sha256).digest())
    # Only RSA keys carry kid rsa1: none fits HS256.
    assert refused(auth(jwks=RSA_JWKS), f"{head}.{body}.{sig}") == (
        401, "Jwks doesn't have key to match kid or alg from Jwt")


def test_malformed_tokens() -> None:
    a = auth()
    bad_format = "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections"
    assert refused(a, "abc") == (401, bad_format)
    assert refused(a, "a.b.c.d") == (401, bad_format)
    assert refused(a, "a.e30.sig") == (401, "Jwt header is an invalid Base64url encoded")  # 1 char: no byte
    assert refused(a, _b64(b"not json") + ".e30.sig") == (401, "Jwt header is an invalid JSON")
    assert refused(a, _b64(b'{"kid": "x"}') + ".e30.sig") == (401, "Jwt header [alg] field is required and must be a string")
    head = _b64(b'{"alg": "RS256"}')
    assert refused(a, head + "." + _b64(b"[1]") + ".c2ln") == (401, "Jwt payload is an invalid JSON")
    assert refused(a, head + "." + _b64(b'{"iss": 5}') + ".c2ln") == (401, "Jwt payload [iss] field is not a string")
    assert refused(a, head + "." + _b64(json.dumps({"iss": ISS, "exp": "soon"}).encode()) + ".c2ln") == (
        401, "Jwt payload [exp] field is not an integer")


def test_oversized_token_is_checked_but_not_cached() -> None:
    a = auth()
    big = sign({"padding": "x" * 20_000})
    assert len(big) > J.MAX_CACHED_TOKEN
    assert run(a, {"authorization": "Bearer " + big}).identity is not None
    assert a.cache == {}
    assert refused(a, big[:-8] + "AAAAAAAA") == (401, "Jwt verification fails")


# -- cache --------------------------------------------------------------------------------


def test_repeated_token_is_a_cache_hit_and_still_expires() -> None:
    clock = [NOW]
    a = J.Authenticator([JWTRule(issuer=ISS, jwks=json.dumps(RSA_JWKS))], store=J.JwksStore(), clock=lambda: clock[0])
    token = sign(exp=NOW + 100)
    for _ in range(5):
        assert run(a, {"authorization": "Bearer " + token}).identity is not None
    assert a.verified == 1  # one signature check for five requests
    clock[0] = NOW + 200
    with pytest.raises(J.JwtError, match="Jwt is expired"):
        run(a, {"authorization": "Bearer " + token})


def test_cache_is_bounded() -> None:
    a = auth()
    for i in range(J.CACHE_SIZE + 50):
        run(a, {"authorization": "Bearer " + sign({"n": i})})
    assert len(a.cache) == J.CACHE_SIZE


# -- jwksUri ------------------------------------------------------------------------------


async def test_jwks_uri_fails_closed_until_fetched_and_keeps_the_last_good_set() -> None:
    state = {"up": False, "calls": 0}

    async def fetch(uri: str, timeout: float) -> bytes:
        state["calls"] += 1
        if not state["up"]:
            raise OSError("connection refused")
        return json.dumps(RSA_JWKS).encode()

    store = J.JwksStore(fetch)
    a = J.Authenticator([JWTRule(issuer=ISS, jwks_uri="https://keys.example/jwks")], store=store, clock=lambda: NOW)
    store.want(a.uris())
    token = sign()
    await asyncio.sleep(0)
    assert refused(a, token) == (401, "Jwt verification fails")  # never fetched: fail closed
    state["up"] = True
    deadline = time.monotonic() + 10
    while store.keys("https://keys.example/jwks") is None and time.monotonic() < deadline:
        await asyncio.sleep(0.05)  # the retry after a failure comes after 1 s
    assert run(a, {"authorization": "Bearer " + token}).identity is not None
    state["up"] = False
    assert run(a, {"authorization": "Bearer " + sign({"n": 2})}).identity is not None  # last good set kept
    store.close()


def test_jwks_loading_errors() -> None:
    with pytest.raises(ValueError, match="Jwks does not have \\[keys\\] field"):
        J.load_jwks("{}")
    with pytest.raises(ValueError, match="Jwks doesn't have any valid public key"):
        J.load_jwks('{"keys": []}')
    with pytest.raises(ValueError, match="key type 'XYZ'"):
        J.load_jwks('{"keys": [{"kty": "XYZ"}]}')


def test_www_authenticate_realm() -> None:
    assert J.www_authenticate(b"http", b"h:80", b"/p") == b'Bearer realm="http://h:80/p", error="invalid_token"'
    assert len(J.www_authenticate(b"http", b"h", b"/" + b"a" * 500)) == len(b'Bearer realm="", error="invalid_token"') + 256


def test_extraction_follows_envoys_extractor() -> None:
    a = auth()
    token = sign()
    # The prefix may appear anywhere; the token starts at the first base64url
    # character after it and runs to the end (as Envoy 1.40 does).
    assert run(a, {"authorization": "Foo Bearer " + token}).identity is not None
    assert run(a, {"authorization": "Bearer !!" + token}).identity is not None
    assert refused(a, token + ", other") == (401, "Jwt signature is an invalid Base64url encoded")
    assert run(a, {"authorization": "bearer " + token}).identity is None  # case-sensitive prefix: no token
    # Query parameters are percent-decoded.
    assert run(a, query={"access_token": token.replace(".", "%2E")}).identity is not None


def test_payload_and_claim_headers_are_removed_from_every_request() -> None:
    rule = JWTRule(issuer=ISS, jwks=json.dumps(RSA_JWKS), output_payload_to_header="x-payload",
                   output_claim_to_headers=(ClaimToHeader("x-sub", "sub"),))
    out = run(auth([rule]), {"x-sub": "admin", "x-payload": "forged", "x-other": "kept"})
    assert out.identity is None
    assert set(out.remove) == {b"x-sub", b"x-payload"} and out.add == ()
