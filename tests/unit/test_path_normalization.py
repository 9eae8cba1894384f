"""pyproxy.http.path: Istio's pathNormalization modes as Envoy applies them
(normalize_path = Chromium's path canonicaliser, merge_slashes,
UNESCAPE_AND_FORWARD for escaped slashes). The expected values follow
Istio's documented normalisation table and the behaviour of Envoy's
vendored Chromium canonicaliser."""

from __future__ import annotations

import pytest

from pyproxy.http.path import (
    BASE,
    DECODE_AND_MERGE_SLASHES,
    MERGE_SLASHES,
    MODES,
    NONE,
    needs_work,
    normalize,
)

# (input, BASE, MERGE_SLASHES, DECODE_AND_MERGE_SLASHES); None = 400.
TABLE: list[tuple[bytes, bytes | None, bytes | None, bytes | None]] = [
    (b"/", b"/", b"/", b"/"),
    (b"/svc/v1/items", b"/svc/v1/items", b"/svc/v1/items", b"/svc/v1/items"),
    (b"/svc/", b"/svc/", b"/svc/", b"/svc/"),
    # dot segments, also written %2e / %2E
    (b"/public/../admin/secret", b"/admin/secret", b"/admin/secret", b"/admin/secret"),
    (b"/./admin/secret", b"/admin/secret", b"/admin/secret", b"/admin/secret"),
    (b"/public/%2e%2e/admin/secret", b"/admin/secret", b"/admin/secret", b"/admin/secret"),
    (b"/public/%2E./admin", b"/admin", b"/admin", b"/admin"),
    (b"/a/%2E%2e/b", b"/b", b"/b", b"/b"),
    (b"/bar/../foo", b"/foo", b"/foo", b"/foo"),
    (b"/foo/..", b"/", b"/", b"/"),
    (b"/foo/.", b"/foo/", b"/foo/", b"/foo/"),
    (b"/a/%2e", b"/a/", b"/a/", b"/a/"),
    (b"/..", b"/", b"/", b"/"),
    (b"/../../etc", b"/etc", b"/etc", b"/etc"),
    (b"/x//../y", b"/x/y", b"/x/y", b"/x/y"),  # ".." removes the empty segment
    (b"/x//../../y", b"/y", b"/y", b"/y"),
    # dots that are names, not segments
    (b"/.../admin", b"/.../admin", b"/.../admin", b"/.../admin"),
    (b"/..;/admin", b"/..;/admin", b"/..;/admin", b"/..;/admin"),
    (b"/v1.2/a.b", b"/v1.2/a.b", b"/v1.2/a.b", b"/v1.2/a.b"),
    (b"/n%30..//m", b"/n0..//m", b"/n0../m", b"/n0../m"),
    (b"/%c0%2e%c0%2e/admin", b"/%c0.%c0./admin", b"/%c0.%c0./admin", b"/%c0.%c0./admin"),
    # unreserved escapes are decoded, others kept as written
    (b"/%61dmin/secret", b"/admin/secret", b"/admin/secret", b"/admin/secret"),
    (b"/f%6Fo", b"/foo", b"/foo", b"/foo"),
    (b"/%7e%7Euser%2D%5F", b"/~~user-_", b"/~~user-_", b"/~~user-_"),
    (b"/a%20b%25c%3f", b"/a%20b%25c%3f", b"/a%20b%25c%3f", b"/a%20b%25c%3f"),
    (b"/%252e%252e/admin", b"/%252e%252e/admin", b"/%252e%252e/admin", b"/%252e%252e/admin"),  # decoded once only
    # malformed escapes pass through; a '%' that would form one with what follows becomes %25
    (b"/a%zz", b"/a%zz", b"/a%zz", b"/a%zz"),
    (b"/a%", b"/a%", b"/a%", b"/a%"),
    (b"/a%4", b"/a%4", b"/a%4", b"/a%4"),
    (b"/%%300", b"/%2500", b"/%2500", b"/%2500"),
    (b"/%3%30", b"/%2530", b"/%2530", b"/%2530"),
    # backslash is a slash; escaped slashes only decoded by DECODE_AND_MERGE_SLASHES
    (b"/app\\admin", b"/app/admin", b"/app/admin", b"/app/admin"),
    (b"/app/\\/\\/\\admin", b"/app//////admin", b"/app/admin", b"/app/admin"),
    (b"/a/..\\b", b"/b", b"/b", b"/b"),
    (b"/app/%2f", b"/app/%2f", b"/app/%2f", b"/app/"),
    (b"/%2Fapp%5cadmin%5Cabc", b"/%2Fapp%5cadmin%5Cabc", b"/%2Fapp%5cadmin%5Cabc", b"/app/admin/abc"),
    (b"/%5Cx%2f%5c%2F%2e%2e%2fadmin%5c\\abc", b"/%5Cx%2f%5c%2F..%2fadmin%5c/abc",
     b"/%5Cx%2f%5c%2F..%2fadmin%5c/abc", b"/x/admin/abc"),
    (b"/public%2f..%2fadmin", b"/public%2f..%2fadmin", b"/public%2f..%2fadmin", b"/admin"),
    # slashes
    (b"/app//", b"/app//", b"/app/", b"/app/"),
    (b"//admin", b"//admin", b"/admin", b"/admin"),
    # characters that must not be raw are percent-encoded
    (b'/a"b<c>^`{|}', b"/a%22b%3Cc%3E%5E%60%7B%7C%7D", b"/a%22b%3Cc%3E%5E%60%7B%7C%7D",
     b"/a%22b%3Cc%3E%5E%60%7B%7C%7D"),
    # '#' is left for the request checks (a fragment is refused with 400)
    (b"/a/../b#x", b"/b#x", b"/b#x", b"/b#x"),
    # an escaped NUL is refused
    (b"/admin%00", None, None, None),
    (b"/a%00/../b", None, None, None),
]


@pytest.mark.parametrize("raw,base,merge,decode", TABLE, ids=[r[0].decode("latin-1") for r in TABLE])
def test_modes(raw: bytes, base: bytes | None, merge: bytes | None, decode: bytes | None) -> None:
    assert normalize(raw, NONE) == raw
    assert normalize(raw, BASE) == base
    assert normalize(raw, MERGE_SLASHES) == merge
    assert normalize(raw, DECODE_AND_MERGE_SLASHES) == decode


@pytest.mark.parametrize("mode", [BASE, MERGE_SLASHES, DECODE_AND_MERGE_SLASHES])
def test_fast_check_never_skips_a_path_that_would_change(mode: int) -> None:
    for raw, *_ in TABLE:
        if not needs_work(raw, mode):
            assert normalize(raw, mode) == raw, raw
    assert not needs_work(b"/productpage/api/v1/products/0/reviews", mode)
    assert not needs_work(b"/a.b/c.d", mode)


def test_every_single_escape_as_istio_documents_it() -> None:
    """/admin%XX for every byte under DECODE_AND_MERGE_SLASHES: unreserved
    characters and slashes decoded (a backslash is a slash), the rest kept
    as written, %00 refused."""
    unreserved = set(b"-._~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
    for value in range(256):
        for spelled in {b"%%%02x" % value, b"%%%02X" % value}:
            raw = b"/admin" + spelled
            got = normalize(raw, DECODE_AND_MERGE_SLASHES)
            if value == 0:
                assert got is None
            elif value in (0x2F, 0x5C):
                assert got == b"/admin/", raw
            elif value in unreserved:
                assert got == b"/admin" + bytes([value]), raw
            else:
                assert got == raw, raw


def test_mesh_config_names() -> None:
    assert MODES == {"NONE": NONE, "BASE": BASE, "MERGE_SLASHES": MERGE_SLASHES,
                     "DECODE_AND_MERGE_SLASHES": DECODE_AND_MERGE_SLASHES}
