"""Stand-ins for Istio's Bookinfo services: productpage, details, reviews (v1/v2/v3), ratings.

They reproduce the observable behaviour of the sample (JSON shapes, page markup,
timeouts, the reviews retry, header propagation) so Istio's Bookinfo tasks can be
followed against pyproxy locally. Each runs as its own process next to its own
sidecar::

    python -m pyproxy.demo.apps SERVICE --listen HOST:PORT [--version v1|v2|v3]

Calls to other services go to ``http://<service>:9080`` (see ``service_url``) with
one shared ``aiohttp.ClientSession(trust_env=True)``, so ``HTTP_PROXY`` points them
at the sidecar's outbound port: aiohttp then sends absolute-form requests
(``GET http://reviews:9080/reviews/0 HTTP/1.1``) to the proxy and never resolves
the service name itself. ``NO_PROXY``/``no_proxy`` work as for any urllib client.

Tests use ``build_app(service, version, **options)``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import hashlib
import hmac
import logging
import math
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from pyproxy.demo import templates

log = logging.getLogger("pyproxy.demo")

SERVICES = ("productpage", "details", "reviews", "ratings")
# Star colour per reviews version; v1 does not call ratings at all.
REVIEWS_STAR_COLOR: dict[str, str | None] = {"v1": None, "v2": "black", "v3": "red"}
# How long reviews waits for ratings: the original v2 allows 10 s, v3 only 2.5 s.
REVIEWS_RATINGS_TIMEOUT = {"v1": 10.0, "v2": 10.0, "v3": 2.5}

# Headers an application must copy from its incoming request to its outbound calls
# for traces to join up and for header-based routing (end-user) to work further
# down the call chain. The sidecar cannot do this: it does not know which
# outbound call belongs to which inbound request. Cookies are deliberately not
# forwarded: the session is productpage's business, end-user carries the user.
PROPAGATED_HEADERS = (
    "x-request-id",
    "traceparent",
    "tracestate",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
    "b3",
    "x-ot-span-context",
    "x-cloud-trace-context",
    "grpc-trace-bin",
    "sw8",
    "x-datadog-trace-id",
    "x-datadog-parent-id",
    "x-datadog-sampling-priority",
    "user-agent",
    "end-user",
)

SESSION_COOKIE = "session"
# Names go into the end-user header, so keep them to one line of visible ASCII.
_USERNAME_RE = re.compile(r"[\x20-\x7e]{1,64}")
_PRODUCT_ID_RE = re.compile(r"-?[0-9]{1,18}")

NUMERIC_ID_ERROR = {"error": "please provide numeric product id"}
RATINGS_ERROR = "Ratings service is currently unavailable"

PRODUCT: dict[str, Any] = {
    "id": 0,
    "title": "The Comedy of Errors",
    "descriptionHtml": (
        '<a href="https://en.wikipedia.org/wiki/The_Comedy_of_Errors">Wikipedia Summary</a>: '
        "an early <b>William Shakespeare</b> comedy. Two pairs of identical twins, parted "
        "in a shipwreck, end up in the same town on the same day, and a string of "
        "mistaken identities, wrongful arrests and slapstick follows."
    ),
}

REVIEWS = (
    ("Reviewer1", "An extremely entertaining play by Shakespeare. The slapstick humour is refreshing!"),
    (
        "Reviewer2",
        (
            "Absolutely fun and entertaining. The play lacks thematic depth when compared "
            "to other plays by Shakespeare."
        ),
    ),
)
RATINGS = {"Reviewer1": 5, "Reviewer2": 4}


# --------------------------------------------------------------------------- options


def service_url(name: str, env: Mapping[str, str] | None = None) -> URL:
    """Where ``name`` is reached: ``http://<name>:9080`` unless the environment says otherwise.

    Same variables as the original apps: ``<NAME>_HOSTNAME``, ``<NAME>_SERVICE_PORT``
    and ``SERVICES_DOMAIN`` (appended to the host name when set).
    """
    env = os.environ if env is None else env
    upper = name.upper()
    host = env.get(f"{upper}_HOSTNAME") or name
    if domain := env.get("SERVICES_DOMAIN"):
        host = f"{host}.{domain}"
    port = int(env.get(f"{upper}_SERVICE_PORT") or 9080)
    return URL.build(scheme="http", host=host, port=port)


def _as_url(value: str | URL) -> URL:
    return value if isinstance(value, URL) else URL(value)


@dataclass(frozen=True, slots=True)
class ProductpageOptions:
    details_url: str | URL = field(default_factory=lambda: service_url("details"))
    reviews_url: str | URL = field(default_factory=lambda: service_url("reviews"))
    ratings_url: str | URL = field(default_factory=lambda: service_url("ratings"))
    details_timeout: float = 3.0
    reviews_timeout: float = 3.0
    ratings_timeout: float = 3.0
    # The original productpage tries reviews twice (Istio's fault-injection task
    # relies on it: 3 s + one retry = 6 s) and details only once.
    details_attempts: int = 1
    reviews_attempts: int = 2
    ratings_attempts: int = 1
    # Signs the session cookie. A fixed default is fine for a demo and lets several
    # productpage processes accept each other's cookies.
    session_secret: str = field(
        default_factory=lambda: os.environ.get("PRODUCTPAGE_SESSION_SECRET", "pyproxy-bookinfo-demo")
    )


@dataclass(frozen=True, slots=True)
class ReviewsOptions:
    ratings_url: str | URL = field(default_factory=lambda: service_url("ratings"))
    ratings_timeout: float | None = None  # None: the version's default
    # Pod and cluster name as the original reports them (from HOSTNAME and
    # CLUSTER_NAME there); locally the version is the useful part.
    podname: str | None = None
    clustername: str = field(default_factory=lambda: os.environ.get("CLUSTER_NAME", "null"))


CLIENT_KEY = web.AppKey("client", aiohttp.ClientSession)
PRODUCTPAGE_KEY = web.AppKey("productpage_options", ProductpageOptions)
REVIEWS_KEY = web.AppKey("reviews_options", ReviewsOptions)
VERSION_KEY = web.AppKey("version", str)


# --------------------------------------------------------------------------- shared helpers


async def _client_session_ctx(app: web.Application) -> AsyncIterator[None]:
    # trust_env=True makes aiohttp honour HTTP_PROXY/NO_PROXY (looked up per request).
    # limit=0: queueing belongs to the sidecar; an app-side pool limit would hide
    # the proxy's circuit breaker in the demos.
    session = aiohttp.ClientSession(trust_env=True, connector=aiohttp.TCPConnector(limit=0))
    app[CLIENT_KEY] = session
    try:
        yield
    finally:
        await session.close()


def _parse_product_id(raw: str) -> int | None:
    return int(raw) if _PRODUCT_ID_RE.fullmatch(raw) else None


def propagated_headers(incoming: CIMultiDictProxy[str] | CIMultiDict[str]) -> CIMultiDict[str]:
    """The subset of ``incoming`` that must travel on with outbound calls."""
    out: CIMultiDict[str] = CIMultiDict()
    for name in PROPAGATED_HEADERS:
        for value in incoming.getall(name, ()):
            out.add(name, value)
    return out


@dataclass(frozen=True, slots=True)
class Fetched:
    status: int  # the last upstream status, or 500 when no response arrived
    body: Any  # parsed JSON when status is 200, else None

    @property
    def ok(self) -> bool:
        return self.status == 200


async def fetch_json(
    session: aiohttp.ClientSession,
    url: URL,
    *,
    headers: CIMultiDict[str],
    timeout: float,
    attempts: int = 1,
) -> Fetched:
    """GET ``url``; retry on any failure or non-200, up to ``attempts`` tries."""
    status = 500
    for attempt in range(1, max(1, attempts) + 1):
        try:
            async with session.get(
                url, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout)
            ) as resp:
                status = resp.status
                if status == 200:
                    return Fetched(200, await resp.json(content_type=None))
                log.warning("GET %s attempt %d: HTTP %d", url, attempt, status)
        # CancelledError is a BaseException, so a client hanging up still cancels us.
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            status = 500
            log.warning("GET %s attempt %d failed: %s", url, attempt, type(exc).__name__)
    return Fetched(status, None)


def _health_route(name: str) -> web.RouteDef:
    async def handler(request: web.Request) -> web.Response:
        return web.json_response({"status": f"{name} is healthy"})

    return web.get("/health", handler)


# --------------------------------------------------------------------------- details


def book_details(product_id: int) -> dict[str, Any]:
    return {
        "id": product_id,
        "author": "William Shakespeare",
        "year": 1595,
        "type": "paperback",
        "pages": 200,
        "publisher": "PublisherA",
        "language": "English",
        "ISBN-10": "1234567890",
        "ISBN-13": "123-1234567890",
    }


async def details_handler(request: web.Request) -> web.Response:
    product_id = _parse_product_id(request.match_info["id"])
    if product_id is None:
        return web.json_response(NUMERIC_ID_ERROR, status=400)
    return web.json_response(book_details(product_id))


def _build_details() -> web.Application:
    app = web.Application()
    app.add_routes([_health_route("Details"), web.get("/details/{id}", details_handler)])
    return app


# --------------------------------------------------------------------------- ratings


async def ratings_handler(request: web.Request) -> web.Response:
    product_id = _parse_product_id(request.match_info["id"])
    if product_id is None:
        return web.json_response(NUMERIC_ID_ERROR, status=400)
    return web.json_response({"id": product_id, "ratings": dict(RATINGS)})


def _build_ratings() -> web.Application:
    app = web.Application()
    app.add_routes([_health_route("Ratings"), web.get("/ratings/{id}", ratings_handler)])
    return app


# --------------------------------------------------------------------------- reviews


def ratings_timeout(version: str, options: ReviewsOptions) -> float:
    """Seconds reviews ``version`` waits for ratings: the option, else the version's default."""
    if options.ratings_timeout is not None:
        return options.ratings_timeout
    return REVIEWS_RATINGS_TIMEOUT[version]


async def _fetch_ratings(request: web.Request, product_id: str) -> dict[str, int] | None:
    """Reviewer → stars from the ratings service, or None when it is unavailable."""
    app = request.app
    opts = app[REVIEWS_KEY]
    fetched = await fetch_json(
        app[CLIENT_KEY],
        _as_url(opts.ratings_url) / "ratings" / product_id,
        headers=propagated_headers(request.headers),
        timeout=ratings_timeout(app[VERSION_KEY], opts),
    )
    ratings = fetched.body.get("ratings") if fetched.ok and isinstance(fetched.body, dict) else None
    if not isinstance(ratings, dict):
        return None
    return {k: v for k, v in ratings.items() if isinstance(v, int) and not isinstance(v, bool)}


async def reviews_handler(request: web.Request) -> web.Response:
    app = request.app
    product_id = request.match_info["id"]
    color = REVIEWS_STAR_COLOR[app[VERSION_KEY]]
    ratings = await _fetch_ratings(request, product_id) if color else None
    reviews: list[dict[str, Any]] = []
    for reviewer, text in REVIEWS:
        review: dict[str, Any] = {"reviewer": reviewer, "text": text}
        if color:
            # A reviewer without a rating is reported like an unreachable service.
            stars = ratings.get(reviewer) if ratings else None
            review["rating"] = (
                {"stars": stars, "color": color} if stars is not None else {"error": RATINGS_ERROR}
            )
        reviews.append(review)
    opts = app[REVIEWS_KEY]
    return web.json_response(
        {
            "id": product_id,
            "podname": opts.podname or f"reviews-{app[VERSION_KEY]}",
            "clustername": opts.clustername,
            "reviews": reviews,
        }
    )


def _build_reviews(version: str, options: ReviewsOptions) -> web.Application:
    app = web.Application()
    app[VERSION_KEY] = version
    app[REVIEWS_KEY] = options
    app.cleanup_ctx.append(_client_session_ctx)
    app.add_routes([_health_route("Reviews"), web.get("/reviews/{id}", reviews_handler)])
    return app


# --------------------------------------------------------------------------- productpage


def _sign(payload: str, secret: str) -> str:
    return hmac.new(secret.encode(), payload.encode(), hashlib.sha256).hexdigest()[:32]


def encode_session(user: str, secret: str) -> str:
    """``<base64url(user)>.<hmac>``: cookie-safe, and a forged name is ignored."""
    payload = base64.urlsafe_b64encode(user.encode()).decode().rstrip("=")
    return f"{payload}.{_sign(payload, secret)}"


def decode_session(value: str | None, secret: str) -> str | None:
    if not value or "." not in value:
        return None
    payload, signature = value.rsplit(".", 1)
    if not hmac.compare_digest(signature, _sign(payload, secret)):
        return None
    try:
        user = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None
    return user if _USERNAME_RE.fullmatch(user) else None


def _session_user(request: web.Request) -> str | None:
    return decode_session(request.cookies.get(SESSION_COOKIE), request.app[PRODUCTPAGE_KEY].session_secret)


def _outbound_headers(request: web.Request) -> CIMultiDict[str]:
    headers = propagated_headers(request.headers)
    # The signed-in user wins over any end-user header the client sent itself.
    if user := _session_user(request):
        headers["end-user"] = user
    return headers


async def _get_details(request: web.Request, product_id: str) -> Fetched:
    opts = request.app[PRODUCTPAGE_KEY]
    return await fetch_json(
        request.app[CLIENT_KEY],
        _as_url(opts.details_url) / "details" / product_id,
        headers=_outbound_headers(request),
        timeout=opts.details_timeout,
        attempts=opts.details_attempts,
    )


async def _get_reviews(request: web.Request, product_id: str) -> Fetched:
    opts = request.app[PRODUCTPAGE_KEY]
    return await fetch_json(
        request.app[CLIENT_KEY],
        _as_url(opts.reviews_url) / "reviews" / product_id,
        headers=_outbound_headers(request),
        timeout=opts.reviews_timeout,
        attempts=opts.reviews_attempts,
    )


async def _get_ratings(request: web.Request, product_id: str) -> Fetched:
    opts = request.app[PRODUCTPAGE_KEY]
    return await fetch_json(
        request.app[CLIENT_KEY],
        _as_url(opts.ratings_url) / "ratings" / product_id,
        headers=_outbound_headers(request),
        timeout=opts.ratings_timeout,
        attempts=opts.ratings_attempts,
    )


async def index_handler(request: web.Request) -> web.Response:
    return web.Response(text=templates.render_index(), content_type="text/html")


async def stylesheet_handler(request: web.Request) -> web.Response:
    return web.Response(text=templates.STYLESHEET, content_type="text/css")


async def productpage_handler(request: web.Request) -> web.Response:
    product_id = str(PRODUCT["id"])
    # Both calls at once: the page then takes as long as the slower one, and the
    # worst case with a hanging reviews is still its 2 × 3 s.
    details, reviews = await asyncio.gather(
        _get_details(request, product_id), _get_reviews(request, product_id)
    )
    html = templates.render_productpage(
        PRODUCT,
        details.body if details.ok and isinstance(details.body, dict) else None,
        reviews.body if reviews.ok and isinstance(reviews.body, dict) else None,
        _session_user(request),
    )
    return web.Response(text=html, content_type="text/html")


def _redirect_to_productpage() -> web.Response:
    return web.Response(status=302, headers={"Location": "/productpage"})


async def login_handler(request: web.Request) -> web.Response:
    form = await request.post()
    username = form.get("username")
    if not isinstance(username, str) or not username.strip():
        return _redirect_to_productpage()
    username = username.strip()
    if not _USERNAME_RE.fullmatch(username):
        return web.json_response({"error": "user name must be 1-64 printable ASCII characters"}, status=400)
    response = _redirect_to_productpage()
    secret = request.app[PRODUCTPAGE_KEY].session_secret
    response.set_cookie(
        SESSION_COOKIE, encode_session(username, secret), path="/", httponly=True, samesite="Lax"
    )
    return response


async def logout_handler(request: web.Request) -> web.Response:
    response = _redirect_to_productpage()
    response.del_cookie(SESSION_COOKIE, path="/")
    return response


async def products_handler(request: web.Request) -> web.Response:
    return web.json_response([PRODUCT])


def _passthrough(fetched: Fetched, error: str) -> web.Response:
    """Upstream JSON on success; otherwise the upstream status (or 500) and an error."""
    if fetched.ok:
        return web.json_response(fetched.body)
    return web.json_response({"error": error}, status=fetched.status)


async def product_details_handler(request: web.Request) -> web.Response:
    fetched = await _get_details(request, request.match_info["id"])
    return _passthrough(fetched, templates.DETAILS_UNAVAILABLE)


async def product_reviews_handler(request: web.Request) -> web.Response:
    fetched = await _get_reviews(request, request.match_info["id"])
    return _passthrough(fetched, templates.REVIEWS_UNAVAILABLE)


async def product_ratings_handler(request: web.Request) -> web.Response:
    fetched = await _get_ratings(request, request.match_info["id"])
    return _passthrough(fetched, templates.RATINGS_UNAVAILABLE)


def _build_productpage(options: ProductpageOptions) -> web.Application:
    app = web.Application()
    app[PRODUCTPAGE_KEY] = options
    app.cleanup_ctx.append(_client_session_ctx)
    app.add_routes(
        [
            _health_route("Productpage"),
            web.get("/", index_handler),
            web.get("/index.html", index_handler),
            web.get("/static/bookinfo.css", stylesheet_handler),
            web.get("/productpage", productpage_handler),
            web.post("/login", login_handler),
            web.get("/logout", logout_handler),
            web.get("/api/v1/products", products_handler),
            web.get("/api/v1/products/{id}", product_details_handler),
            web.get("/api/v1/products/{id}/reviews", product_reviews_handler),
            web.get("/api/v1/products/{id}/ratings", product_ratings_handler),
        ]
    )
    return app


# --------------------------------------------------------------------------- public API


def build_app(service: str, version: str = "v1", **options: Any) -> web.Application:
    """The aiohttp application for one Bookinfo service.

    Options (keyword arguments) per service; unknown ones raise TypeError:

    * productpage: ``details_url``, ``reviews_url``, ``ratings_url``, ``*_timeout``
      (seconds, default 3), ``*_attempts`` (reviews 2, others 1), ``session_secret``.
    * reviews: ``ratings_url``, ``ratings_timeout`` (default 10 s for v2, 2.5 s for
      v3), ``podname``, ``clustername``.
    * details, ratings: none.

    Service URLs default to ``service_url(name)``, read when the app is built.
    """
    if service == "reviews":
        if version not in REVIEWS_STAR_COLOR:
            raise ValueError(f"reviews version must be one of {sorted(REVIEWS_STAR_COLOR)}, not {version!r}")
        return _build_reviews(version, ReviewsOptions(**options))
    if service not in SERVICES:
        raise ValueError(f"unknown service {service!r}; expected one of {', '.join(SERVICES)}")
    # Only reviews has versions here (details v2 and ratings v2 need external
    # services in the original); refuse rather than silently run v1.
    if version != "v1":
        raise ValueError(f"{service} has only version v1 in this demo, not {version!r}")
    if service == "productpage":
        return _build_productpage(ProductpageOptions(**options))
    if options:
        raise TypeError(f"{service} takes no options, got {', '.join(sorted(options))}")
    return _build_details() if service == "details" else _build_ratings()


# --------------------------------------------------------------------------- a bad release


def add_faults(app: web.Application, fail_percent: float = 0.0, delay_ms: float = 0.0) -> web.Application:
    """Make ``app`` a bad release: answer ``fail_percent`` % of its requests
    with HTTP 500 and delay every request by ``delay_ms`` (``/health`` stays
    healthy, as a broken release's probe often does). Failures are spread
    evenly (request n fails when n * share reaches the next whole number; the
    first request fails), so the share shows in any window of a few requests,
    not only on average."""
    if not 0.0 <= fail_percent <= 100.0:
        raise ValueError(f"fail percent must be within 0..100, got {fail_percent:g}")
    if delay_ms < 0:
        raise ValueError(f"delay must be >= 0 ms, got {delay_ms:g}")
    if not fail_percent and not delay_ms:
        return app
    share = fail_percent / 100.0
    served = 0

    @web.middleware
    async def faults(request: web.Request, handler: Any) -> web.StreamResponse:
        nonlocal served
        if request.path == "/health":
            return await handler(request)
        served += 1
        if delay_ms:
            await asyncio.sleep(delay_ms / 1000.0)
        if math.ceil(served * share) != math.ceil((served - 1) * share):
            return web.json_response({"error": "injected failure (bad release)"}, status=500)
        return await handler(request)

    app.middlewares.append(faults)
    return app


# --------------------------------------------------------------------------- process entry point


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT`` → (host, port)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    number = int(port)
    if number > 65535:
        raise argparse.ArgumentTypeError(f"port out of range in {value!r}")
    return host, number


async def serve(app: web.Application, host: str, port: int, *, access_log: bool = True) -> None:
    """Run ``app`` on host:port until SIGTERM or SIGINT, then shut down cleanly."""
    runner = web.AppRunner(
        app,
        access_log=logging.getLogger("pyproxy.demo.access") if access_log else None,
        # The propagated headers show the trace and the user reaching each service.
        access_log_format='%a "%r" %s %b %Tfs x-request-id=%{x-request-id}i traceparent=%{traceparent}i '
        "end-user=%{end-user}i",
        # In-flight requests get a moment to finish; a demo should stop promptly.
        shutdown_timeout=2.0,
    )
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        # The bound address (port 0 picks one), for launchers and people alike.
        for address in runner.addresses:
            log.info("listening on %s:%s", address[0], address[1])
        await stop.wait()
        log.info("stopping")
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pyproxy.demo.apps", description=__doc__.splitlines()[0])
    parser.add_argument("service", choices=SERVICES)
    parser.add_argument("--listen", type=parse_listen, default=("127.0.0.1", 9080), metavar="HOST:PORT")
    parser.add_argument("--version", default="v1", help="v1 (all), v2 or v3 (reviews)")
    parser.add_argument("--quiet", action="store_true", help="no per-request log lines")
    parser.add_argument("--fail-percent", type=float, default=0.0, metavar="P",
                        help="a bad release: answer P%% of requests with HTTP 500 (default 0)")
    parser.add_argument("--delay", type=float, default=0.0, metavar="MS",
                        help="a slow release: delay every request by MS milliseconds (default 0)")
    args = parser.parse_args(argv)
    try:
        app = add_faults(build_app(args.service, args.version), args.fail_percent, args.delay)
    except (ValueError, TypeError) as exc:
        parser.error(str(exc))
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format=f"%(asctime)s {args.service}-{args.version} %(message)s",
    )
    host, port = args.listen
    try:
        asyncio.run(serve(app, host, port, access_log=not args.quiet))
    except OSError as exc:  # e.g. address in use: one line, not a traceback
        log.error("cannot listen on %s:%s: %s", host, port, exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
