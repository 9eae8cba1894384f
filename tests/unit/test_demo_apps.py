"""The Bookinfo stand-ins, over real sockets on 127.0.0.1 ephemeral ports.

Services talk to each other directly here (URLs passed to ``build_app``), except in
the proxy tests, where a tiny recording HTTP proxy stands in for the sidecar.
Timeouts are injected small, so the failure paths run in fractions of a second.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any, Self

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict
from yarl import URL

from pyproxy.demo.apps import (
    CLIENT_KEY,
    REVIEWS,
    ReviewsOptions,
    add_faults,
    build_app,
    decode_session,
    encode_session,
    main,
    parse_listen,
    ratings_timeout,
    service_url,
)

RATINGS_ERROR = "Ratings service is currently unavailable"

# Environment that would change where the apps send their calls.
ROUTING_ENV = (
    "HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy",
    "NO_PROXY", "no_proxy", "REQUEST_METHOD", "SERVICES_DOMAIN", "CLUSTER_NAME",
    "DETAILS_HOSTNAME", "DETAILS_SERVICE_PORT", "REVIEWS_HOSTNAME", "REVIEWS_SERVICE_PORT",
    "RATINGS_HOSTNAME", "RATINGS_SERVICE_PORT",
)  # fmt: skip


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # trust_env=True would otherwise send test traffic through a proxy set on the machine.
    for name in ROUTING_ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
async def stack() -> AsyncIterator[AsyncExitStack]:
    async with AsyncExitStack() as s:
        yield s


Start = Callable[[web.Application], Awaitable[URL]]


@pytest.fixture
def start(stack: AsyncExitStack) -> Start:
    """Serve an app on 127.0.0.1:<ephemeral>; closed when the test ends."""

    async def _start(app: web.Application) -> URL:
        server = TestServer(app, host="127.0.0.1")
        # A short grace period: stalled stub handlers must not hold up teardown.
        await server.start_server(shutdown_timeout=0.2)
        stack.push_async_callback(server.close)
        return server.make_url("")

    return _start


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    # unsafe=True: keep cookies for an IP-address host (needed for the login flow).
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        yield session


def record_requests(app: web.Application) -> list[CIMultiDict[str]]:
    """Headers of every request ``app`` receives (a middleware, so the app is unchanged)."""
    seen: list[CIMultiDict[str]] = []

    @web.middleware
    async def recorder(request: web.Request, handler: Any) -> web.StreamResponse:
        seen.append(CIMultiDict(request.headers))
        response: web.StreamResponse = await handler(request)
        return response

    app.middlewares.append(recorder)
    return seen


class Stub:
    """A scripted upstream: call n gets ``script[n]`` (the last entry repeats).

    Entries: an int status (JSON error body), a dict (200 JSON), or "stall"
    (never answers; the client's timeout ends it).
    """

    def __init__(self, *script: int | dict[str, Any] | str) -> None:
        self.script = script
        self.requests: list[CIMultiDict[str]] = []
        self.app = web.Application()
        self.app.router.add_route("*", "/{tail:.*}", self.handle)

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append(CIMultiDict(request.headers))
        step = self.script[min(len(self.requests), len(self.script)) - 1]
        if step == "stall":
            await asyncio.sleep(30)  # cancelled when the client gives up and disconnects
        if isinstance(step, dict):
            return web.json_response(step)
        assert isinstance(step, int)
        return web.json_response({"error": "stub failure"}, status=step)


def reviews_body(color: str | None = None) -> dict[str, Any]:
    reviews: list[dict[str, Any]] = [{"reviewer": r, "text": t} for r, t in REVIEWS]
    if color:
        for review, stars in zip(reviews, (5, 4)):
            review["rating"] = {"stars": stars, "color": color}
    return {"id": "0", "podname": "stub", "clustername": "null", "reviews": reviews}


RATINGS_BODY = {"id": 0, "ratings": {"Reviewer1": 5, "Reviewer2": 4}}


async def unused_url() -> URL:
    """A loopback URL where nothing listens (connection refused)."""
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    return URL(f"http://127.0.0.1:{port}")


async def get_json(client: aiohttp.ClientSession, url: URL, **kw: Any) -> tuple[int, Any]:
    async with client.get(url, **kw) as resp:
        return resp.status, await resp.json()


async def get_text(client: aiohttp.ClientSession, url: URL, **kw: Any) -> str:
    async with client.get(url, **kw) as resp:
        assert resp.status == 200
        assert resp.content_type == "text/html"
        return await resp.text()


def star_groups(html: str) -> list[tuple[str, int, int]]:
    """(font colour, full stars, empty stars) for each ``<font>`` block, as Bookinfo scripts count them."""
    return [
        (
            color,
            len(re.findall(r'class="glyphicon glyphicon-star"', inner)),
            len(re.findall(r'class="glyphicon glyphicon-star-empty"', inner)),
        )
        for color, inner in re.findall(r'<font color="([^"]*)">(.*?)</font>', html, re.DOTALL)
    ]


# --------------------------------------------------------------------------- details, ratings, health


async def test_details_returns_the_book_for_a_numeric_id(start: Start, client: aiohttp.ClientSession) -> None:
    url = await start(build_app("details"))
    status, body = await get_json(client, url / "details" / "7")
    assert status == 200
    assert body == {
        "id": 7,
        "author": "William Shakespeare",
        "year": 1595,
        "type": "paperback",
        "pages": 200,
        "publisher": "PublisherA",
        "language": "English",
        "ISBN-10": "1234567890",
        "ISBN-13": "123-1234567890",
    }


@pytest.mark.parametrize("service", ["details", "ratings"])
@pytest.mark.parametrize("bad_id", ["abc", "1.5", "0x10"])
async def test_non_numeric_product_id_is_a_400(
    start: Start, client: aiohttp.ClientSession, service: str, bad_id: str
) -> None:
    url = await start(build_app(service))
    status, body = await get_json(client, url / service / bad_id)
    assert (status, body) == (400, {"error": "please provide numeric product id"})


async def test_ratings_returns_both_reviewers(start: Start, client: aiohttp.ClientSession) -> None:
    url = await start(build_app("ratings"))
    assert await get_json(client, url / "ratings" / "3") == (
        200,
        {"id": 3, "ratings": {"Reviewer1": 5, "Reviewer2": 4}},
    )


@pytest.mark.parametrize(
    ("service", "version", "status"),
    [
        ("productpage", "v1", "Productpage is healthy"),
        ("details", "v1", "Details is healthy"),
        ("reviews", "v3", "Reviews is healthy"),
        ("ratings", "v1", "Ratings is healthy"),
    ],
)
async def test_health(
    start: Start, client: aiohttp.ClientSession, service: str, version: str, status: str
) -> None:
    url = await start(build_app(service, version))
    assert await get_json(client, url / "health") == (200, {"status": status})


# --------------------------------------------------------------------------- reviews


async def test_reviews_v1_has_no_ratings_and_does_not_call_ratings(
    start: Start, client: aiohttp.ClientSession
) -> None:
    ratings = Stub(RATINGS_BODY)
    ratings_url = await start(ratings.app)
    url = await start(build_app("reviews", "v1", ratings_url=ratings_url))
    status, body = await get_json(client, url / "reviews" / "0")
    assert status == 200
    assert body == {
        "id": "0",
        "podname": "reviews-v1",
        "clustername": "null",
        "reviews": [
            {
                "reviewer": "Reviewer1",
                "text": "An extremely entertaining play by Shakespeare. The slapstick humour is refreshing!",
            },
            {
                "reviewer": "Reviewer2",
                "text": "Absolutely fun and entertaining. The play lacks thematic depth when compared "
                "to other plays by Shakespeare.",
            },
        ],
    }
    assert ratings.requests == []


@pytest.mark.parametrize(("version", "color"), [("v2", "black"), ("v3", "red")])
async def test_reviews_v2_v3_add_stars_from_the_ratings_service(
    start: Start, client: aiohttp.ClientSession, version: str, color: str
) -> None:
    ratings_url = await start(build_app("ratings"))
    url = await start(build_app("reviews", version, ratings_url=ratings_url, podname="pod-x"))
    status, body = await get_json(client, url / "reviews" / "0")
    assert status == 200
    assert body["id"] == "0" and body["podname"] == "pod-x"
    assert [r["rating"] for r in body["reviews"]] == [
        {"stars": 5, "color": color},
        {"stars": 4, "color": color},
    ]


@pytest.mark.parametrize("version", ["v2", "v3"])
@pytest.mark.parametrize("failure", ["refused", "http-503"])
async def test_reviews_report_ratings_unavailable(
    start: Start, client: aiohttp.ClientSession, version: str, failure: str
) -> None:
    ratings_url = await unused_url() if failure == "refused" else await start(Stub(503).app)
    url = await start(build_app("reviews", version, ratings_url=ratings_url))
    status, body = await get_json(client, url / "reviews" / "0")
    assert status == 200  # reviews itself is fine; only the stars are missing
    assert [r["rating"] for r in body["reviews"]] == [{"error": RATINGS_ERROR}] * 2
    assert [r["text"] for r in body["reviews"]] == [t for _, t in REVIEWS]


async def test_reviews_v3_gives_up_on_a_stalled_ratings_after_its_timeout(
    start: Start, client: aiohttp.ClientSession
) -> None:
    ratings = Stub("stall")
    ratings_url = await start(ratings.app)
    url = await start(build_app("reviews", "v3", ratings_url=ratings_url, ratings_timeout=0.2))
    began = time.monotonic()
    status, body = await get_json(client, url / "reviews" / "0")
    assert time.monotonic() - began < 5  # generous: the point is that it did not wait 30 s
    assert status == 200
    assert [r["rating"] for r in body["reviews"]] == [{"error": RATINGS_ERROR}] * 2
    assert len(ratings.requests) == 1  # reviews does not retry ratings


def test_reviews_default_ratings_timeouts_match_the_original() -> None:
    assert ratings_timeout("v2", ReviewsOptions()) == 10.0
    assert ratings_timeout("v3", ReviewsOptions()) == 2.5
    assert ratings_timeout("v3", ReviewsOptions(ratings_timeout=0.1)) == 0.1


# --------------------------------------------------------------------------- productpage: page markup


async def start_mesh(start: Start, reviews_version: str, **productpage_options: Any) -> URL:
    """details + ratings + reviews<version> + productpage, wired directly."""
    details_url = await start(build_app("details"))
    ratings_url = await start(build_app("ratings"))
    reviews_url = await start(build_app("reviews", reviews_version, ratings_url=ratings_url))
    return await start(
        build_app(
            "productpage",
            details_url=details_url,
            reviews_url=reviews_url,
            ratings_url=ratings_url,
            **productpage_options,
        )
    )


@pytest.mark.parametrize(
    ("version", "expected"),
    [
        ("v1", []),
        ("v2", [("black", 5, 0), ("black", 4, 1)]),
        ("v3", [("red", 5, 0), ("red", 4, 1)]),
    ],
)
async def test_productpage_stars_per_reviews_version(
    start: Start, client: aiohttp.ClientSession, version: str, expected: list[tuple[str, int, int]]
) -> None:
    url = await start_mesh(start, version)
    html = await get_text(client, url / "productpage")
    assert "<title>Simple Bookstore App</title>" in html
    assert "The Comedy of Errors" in html
    assert "PublisherA" in html and "123-1234567890" in html
    assert all(text in html for _, text in REVIEWS)
    assert star_groups(html) == expected
    if version == "v1":
        assert "glyphicon" not in html
    assert "Error fetching" not in html


async def test_productpage_shows_ratings_unavailable_per_review(
    start: Start, client: aiohttp.ClientSession
) -> None:
    details_url = await start(build_app("details"))
    reviews_url = await start(build_app("reviews", "v2", ratings_url=await unused_url()))
    url = await start(build_app("productpage", details_url=details_url, reviews_url=reviews_url))
    html = await get_text(client, url / "productpage")
    assert html.count(RATINGS_ERROR) == 2
    assert star_groups(html) == []
    assert "Error fetching product reviews" not in html


async def test_productpage_details_failure_is_not_retried(
    start: Start, client: aiohttp.ClientSession
) -> None:
    details = Stub(555)  # what Istio's fault-injection-details-v1 abort produces
    details_url = await start(details.app)
    reviews_url = await start(build_app("reviews", "v1"))
    url = await start(build_app("productpage", details_url=details_url, reviews_url=reviews_url))
    html = await get_text(client, url / "productpage")
    assert "Error fetching product details" in html
    assert "Sorry, product details are currently unavailable for this book." in html
    assert "Book Reviews" in html and "Error fetching product reviews" not in html
    assert len(details.requests) == 1


async def test_productpage_retries_reviews_once_and_recovers(
    start: Start, client: aiohttp.ClientSession
) -> None:
    reviews = Stub(503, reviews_body("black"))
    reviews_url = await start(reviews.app)
    details_url = await start(build_app("details"))
    url = await start(build_app("productpage", details_url=details_url, reviews_url=reviews_url))
    html = await get_text(client, url / "productpage")
    assert "Error fetching product reviews" not in html
    assert star_groups(html) == [("black", 5, 0), ("black", 4, 1)]
    assert len(reviews.requests) == 2


async def test_productpage_gives_up_on_stalled_reviews_after_two_attempts(
    start: Start, client: aiohttp.ClientSession
) -> None:
    reviews = Stub("stall")
    reviews_url = await start(reviews.app)
    details_url = await start(build_app("details"))
    url = await start(
        build_app("productpage", details_url=details_url, reviews_url=reviews_url, reviews_timeout=0.2)
    )
    began = time.monotonic()
    html = await get_text(client, url / "productpage")
    assert time.monotonic() - began < 5  # 2 × 0.2 s, generously
    assert "Error fetching product reviews" in html
    assert "Sorry, product reviews are currently unavailable for this book." in html
    assert "PublisherA" in html  # details are unaffected
    assert len(reviews.requests) == 2


# --------------------------------------------------------------------------- productpage: login, headers


async def test_login_forwards_end_user_to_reviews_and_ratings_until_logout(
    start: Start, client: aiohttp.ClientSession
) -> None:
    ratings = Stub(RATINGS_BODY)
    ratings_url = await start(ratings.app)
    reviews_app = build_app("reviews", "v2", ratings_url=ratings_url)
    at_reviews = record_requests(reviews_app)
    reviews_url = await start(reviews_app)
    details_url = await start(build_app("details"))
    url = await start(build_app("productpage", details_url=details_url, reviews_url=reviews_url))

    async with client.post(
        url / "login", data={"username": "jason", "passwd": "x"}, allow_redirects=False
    ) as resp:
        assert resp.status == 302
        assert resp.headers["Location"] == "/productpage"
        assert "session" in resp.cookies

    html = await get_text(client, url / "productpage")
    assert "Signed in as: <b>jason</b>" in html
    assert 'href="/logout"' in html
    assert at_reviews[-1].get("end-user") == "jason"
    assert ratings.requests[-1].get("end-user") == "jason"
    # The session cookie stays between the browser and productpage.
    assert "cookie" not in at_reviews[-1] and "cookie" not in ratings.requests[-1]

    async with client.get(url / "logout", allow_redirects=False) as resp:
        assert resp.status == 302
        assert resp.headers["Location"] == "/productpage"

    html = await get_text(client, url / "productpage")
    assert "Signed in as" not in html
    assert 'action="/login"' in html and 'name="username"' in html and 'name="passwd"' in html
    assert "end-user" not in at_reviews[-1] and "end-user" not in ratings.requests[-1]


async def test_forged_session_cookie_is_ignored(start: Start, client: aiohttp.ClientSession) -> None:
    reviews = Stub(reviews_body())
    reviews_url = await start(reviews.app)
    url = await start(build_app("productpage", details_url=await unused_url(), reviews_url=reviews_url))
    forged = encode_session("jason", "not-the-secret")
    html = await get_text(client, url / "productpage", headers={"Cookie": f"session={forged}"})
    assert "Signed in as" not in html
    assert "end-user" not in reviews.requests[-1]


async def test_tracing_and_routing_headers_travel_productpage_reviews_ratings(
    start: Start, client: aiohttp.ClientSession
) -> None:
    details = Stub(RATINGS_BODY)  # any JSON will do for the header check
    ratings = Stub(RATINGS_BODY)
    reviews_app = build_app("reviews", "v3", ratings_url=await start(ratings.app))
    at_reviews = record_requests(reviews_app)
    url = await start(
        build_app("productpage", details_url=await start(details.app), reviews_url=await start(reviews_app))
    )
    propagated = {
        "x-request-id": "5b1d9e4e-0d5c-4b6e-9d7e-2c1f4a0b9e11",
        "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "tracestate": "vendor=abc",
        "x-b3-traceid": "80f198ee56343ba864fe8b2a57d3eff7",
        "x-b3-spanid": "e457b5a2e4d86bd1",
        "x-b3-parentspanid": "05e3ac9a4f6e3b90",
        "x-b3-sampled": "1",
        "b3": "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1",
        "user-agent": "bookinfo-test/1.0",
        "end-user": "someone",
    }
    not_propagated = {"x-private": "secret", "cookie": "other=1"}
    await get_text(client, url / "productpage", headers={**propagated, **not_propagated})

    for hop, seen in (("details", details.requests), ("reviews", at_reviews), ("ratings", ratings.requests)):
        assert len(seen) == 1, hop
        assert {name: seen[0].get(name) for name in propagated} == propagated, hop
        assert not any(name in seen[0] for name in not_propagated), hop


# --------------------------------------------------------------------------- productpage: JSON API


async def test_products_api(start: Start, client: aiohttp.ClientSession) -> None:
    url = await start_mesh(start, "v2")
    status, products = await get_json(client, url / "api/v1/products")
    assert status == 200
    assert [(p["id"], p["title"]) for p in products] == [(0, "The Comedy of Errors")]
    assert "Shakespeare" in products[0]["descriptionHtml"]

    status, details = await get_json(client, url / "api/v1/products/0")
    assert (status, details["id"], details["ISBN-10"]) == (200, 0, "1234567890")
    status, reviews = await get_json(client, url / "api/v1/products/0/reviews")
    assert status == 200 and reviews["reviews"][0]["rating"] == {"stars": 5, "color": "black"}
    assert await get_json(client, url / "api/v1/products/0/ratings") == (200, RATINGS_BODY)


async def test_products_api_passes_upstream_status_through(
    start: Start, client: aiohttp.ClientSession
) -> None:
    url = await start(
        build_app(
            "productpage",
            details_url=await start(Stub(555).app),
            reviews_url=await start(Stub(503).app),
            ratings_url=await start(build_app("ratings")),
        )
    )
    assert await get_json(client, url / "api/v1/products/0") == (
        555,
        {"error": "Sorry, product details are currently unavailable for this book."},
    )
    assert await get_json(client, url / "api/v1/products/0/reviews") == (
        503,
        {"error": "Sorry, product reviews are currently unavailable for this book."},
    )
    assert await get_json(client, url / "api/v1/products/0/ratings") == (200, RATINGS_BODY)


async def test_index_links_to_productpage(start: Start, client: aiohttp.ClientSession) -> None:
    url = await start(build_app("productpage"))  # serving the index calls nothing
    assert 'href="/productpage"' in await get_text(client, url)


# --------------------------------------------------------------------------- outbound through a proxy


class RecordingProxy:
    """A minimal HTTP proxy stand-in: records each request head, answers ``body`` itself."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.heads: list[list[str]] = []
        self.server: asyncio.Server | None = None
        self.url = ""

    async def __aenter__(self) -> Self:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            self.heads.append(head.decode("latin-1").split("\r\n")[:-2])
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(self.body), self.body)
            )
            await writer.drain()
        finally:
            writer.close()
            await writer.wait_closed()

    @property
    def request_lines(self) -> list[str]:
        return [head[0] for head in self.heads]


@pytest.mark.parametrize(
    ("env", "authority"),
    [
        ({}, "details:9080"),
        ({"DETAILS_HOSTNAME": "bookdetails", "DETAILS_SERVICE_PORT": "9999"}, "bookdetails:9999"),
        ({"SERVICES_DOMAIN": "default.svc.cluster.local"}, "details.default.svc.cluster.local:9080"),
    ],
)
async def test_productpage_calls_details_in_absolute_form_through_http_proxy(
    start: Start,
    client: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
    env: dict[str, str],
    authority: str,
) -> None:
    async with RecordingProxy(b'{"id": 0, "via": "proxy"}') as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        url = await start(build_app("productpage"))  # default service URLs, read from the env
        assert await get_json(client, url / "api/v1/products/0") == (200, {"id": 0, "via": "proxy"})
        # "details" resolves nowhere: getting here shows the client left resolution to the proxy.
        assert proxy.request_lines == [f"GET http://{authority}/details/0 HTTP/1.1"]
        assert f"Host: {authority}" in proxy.heads[0]


async def test_reviews_calls_ratings_through_http_proxy(
    start: Start, client: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with RecordingProxy(b'{"id": 0, "ratings": {"Reviewer1": 1, "Reviewer2": 2}}') as proxy:
        monkeypatch.setenv("http_proxy", proxy.url)
        url = await start(build_app("reviews", "v2"))
        status, body = await get_json(client, url / "reviews" / "0")
        assert status == 200
        assert [r["rating"]["stars"] for r in body["reviews"]] == [1, 2]
        assert proxy.request_lines == ["GET http://ratings:9080/ratings/0 HTTP/1.1"]


@pytest.mark.parametrize("no_proxy_var", ["NO_PROXY", "no_proxy"])
async def test_no_proxy_bypasses_the_proxy(
    start: Start, client: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch, no_proxy_var: str
) -> None:
    details_url = await start(build_app("details"))
    async with RecordingProxy(b'{"via": "proxy"}') as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        monkeypatch.setenv(no_proxy_var, "localhost,127.0.0.1")
        url = await start(build_app("productpage", details_url=details_url, reviews_url=await unused_url()))
        status, body = await get_json(client, url / "api/v1/products/0")
        assert (status, body["publisher"]) == (200, "PublisherA")
        assert proxy.request_lines == []


# --------------------------------------------------------------------------- lifecycle, process, helpers


async def test_client_session_is_closed_on_shutdown() -> None:
    app = build_app("reviews", "v2")
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    session = app[CLIENT_KEY]
    assert not session.closed
    await server.close()
    assert session.closed


async def test_process_serves_logs_and_exits_cleanly_on_sigterm(client: aiohttp.ClientSession) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pyproxy.demo.apps", "ratings", "--listen", "127.0.0.1:0",
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert proc.stderr is not None
    try:
        line = (await asyncio.wait_for(proc.stderr.readline(), 20)).decode()
        match = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
        assert match, line
        port = int(match.group(1))
        assert await get_json(client, URL(f"http://127.0.0.1:{port}/ratings/1")) == (200, {
            "id": 1, "ratings": {"Reviewer1": 5, "Reviewer2": 4}
        })  # fmt: skip
        traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        async with client.get(f"http://127.0.0.1:{port}/ratings/2", headers={"traceparent": traceparent}) as r:
            assert r.status == 200
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
        rest = (await proc.stderr.read()).decode()
        assert '"GET /ratings/1 HTTP/1.1" 200' in rest
        # The access log shows the propagated headers (the e2e trace test reads them).
        assert '"GET /ratings/2 HTTP/1.1" 200' in rest and f"traceparent={traceparent}" in rest
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@pytest.mark.parametrize(
    "argv",
    [
        ["details", "--version", "v2"],
        ["reviews", "--version", "v4"],
        ["nosuch"],
        ["details", "--listen", "x"],
    ],
)
def test_cli_rejects_bad_arguments(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err


def test_build_app_rejects_unknown_options() -> None:
    with pytest.raises(TypeError):
        build_app("productpage", reviews_timout=1.0)
    with pytest.raises(TypeError):
        build_app("details", podname="x")


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.5:9080") == ("127.0.0.5", 9080)
    assert parse_listen("[::1]:15001") == ("::1", 15001)


def test_service_url_from_env() -> None:
    assert service_url("reviews", {}) == URL("http://reviews:9080")
    assert service_url("reviews", {"REVIEWS_HOSTNAME": "127.0.0.3", "REVIEWS_SERVICE_PORT": "9081"}) == URL(
        "http://127.0.0.3:9081"
    )


def test_session_cookie_round_trip_and_tampering() -> None:
    value = encode_session("jason", "s3cret")
    assert decode_session(value, "s3cret") == "jason"
    assert decode_session(value, "other") is None
    other_payload = encode_session("admin", "s3cret").split(".")[0]
    assert decode_session(f"{other_payload}.{value.split('.')[1]}", "s3cret") is None
    assert decode_session("jason", "s3cret") is None


async def test_a_bad_release_fails_its_share_of_requests_evenly_and_stays_healthy(
    start: Start, client: aiohttp.ClientSession
) -> None:
    url = await start(add_faults(build_app("details"), fail_percent=30))
    statuses = [(await get_json(client, url / "details" / "1"))[0] for _ in range(20)]
    assert statuses.count(500) == 6, statuses  # exactly 30 %
    assert statuses[0] == 500  # the first request already shows it
    assert all(statuses[i:i + 4].count(500) >= 1 for i in range(16)), statuses  # spread, not bunched
    assert (await get_json(client, url / "health"))[0] == 200
    with pytest.raises(ValueError, match="0..100"):
        add_faults(build_app("details"), fail_percent=120)


async def test_a_slow_release_waits_before_every_request_but_health(
    start: Start, client: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pyproxy.demo.apps as apps_module

    waited: list[float] = []
    real_sleep = asyncio.sleep

    async def recording_sleep(seconds: float) -> None:
        waited.append(seconds)
        await real_sleep(0)

    monkeypatch.setattr(apps_module.asyncio, "sleep", recording_sleep)
    url = await start(add_faults(build_app("ratings"), delay_ms=250))
    assert (await get_json(client, url / "ratings" / "1"))[0] == 200
    assert (await get_json(client, url / "health"))[0] == 200
    assert waited == [0.25]
    with pytest.raises(ValueError, match=">= 0 ms"):
        add_faults(build_app("ratings"), delay_ms=-1)
