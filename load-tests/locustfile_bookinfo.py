"""Bookinfo user journeys, through the ingress, as browsers would make them.

* ``Reader`` (3 of 4 users): anonymous browsing: the product page, now and
  then the JSON API.
* ``Jason`` (1 of 4): signs in as ``jason`` (``POST /login``, session
  cookie), reads a few pages, signs out; then again.

Every product page is checked (HTTP 200 and the book's title) and classified
by what its reviews show: no stars (reviews v1), black stars (v2), red stars
(v3), "ratings unavailable" or "reviews unavailable". Each classification is
reported to locust as a zero-time request of type ``REVIEWS`` named after it,
so the statistics table shows the traffic split live while scenarios are
switched (e.g. 50/50 between v1 and v3). The error pages count as failures.

Target: ``--host`` (or ``BOOKINFO_URL``); default the local demo's ingress::

    locust -f load-tests/locustfile_bookinfo.py --host http://127.0.0.1:9080      # pyproxy demo bookinfo
    locust -f load-tests/locustfile_bookinfo.py --host http://localhost:8080      # docker compose

Think time between pages: ``BOOKINFO_WAIT`` seconds as ``MIN-MAX`` (default
``1-3``, like a person); ``0`` for back-to-back requests.
"""

from __future__ import annotations

import os
import re
import time
from typing import Any

from locust import HttpUser, SequentialTaskSet, between, constant, task

TITLE = "The Comedy of Errors"
REVIEWS_UNAVAILABLE = "Sorry, product reviews are currently unavailable for this book."
RATINGS_UNAVAILABLE = "Ratings service is currently unavailable"
_FONT = re.compile(r'<font color="([a-z]+)">')


def _wait_time() -> Any:
    spec = os.environ.get("BOOKINFO_WAIT", "1-3").strip()
    low, _, high = spec.partition("-")
    lo, hi = float(low or 0), float(high or low or 0)
    return constant(lo) if hi <= lo else between(lo, hi)


def classify(html: str) -> str:
    """What the page's reviews show (see the module docstring)."""
    if REVIEWS_UNAVAILABLE in html:
        return "reviews unavailable"
    if RATINGS_UNAVAILABLE in html:
        return "ratings unavailable"
    colors = set(_FONT.findall(html))
    if not colors:
        return "no stars (v1)"
    if colors == {"black"}:
        return "black stars (v2)"
    if colors == {"red"}:
        return "red stars (v3)"
    return "stars: " + ",".join(sorted(colors))


class _Bookinfo(HttpUser):
    abstract = True
    host = os.environ.get("BOOKINFO_URL", "http://127.0.0.1:9080")
    wait_time = _wait_time()

    def product_page(self, expect_user: str | None = None) -> None:
        start = time.perf_counter()
        with self.client.get("/productpage", name="/productpage", catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"status {resp.status_code}")
                return
            html = resp.text or ""
            if TITLE not in html:
                resp.failure("not the product page")
                return
            if expect_user and expect_user not in html:
                resp.failure(f"not signed in as {expect_user}")
                return
        kind = classify(html)
        self.environment.events.request.fire(
            request_type="REVIEWS", name=kind, response_time=(time.perf_counter() - start) * 1000,
            response_length=0, context={},
            exception=Exception(kind) if "unavailable" in kind else None,
        )


class Reader(_Bookinfo):
    weight = 3

    @task(8)
    def browse(self) -> None:
        self.product_page()

    @task(1)
    def api_products(self) -> None:
        self.client.get("/api/v1/products", name="/api/v1/products")

    @task(1)
    def api_reviews(self) -> None:
        self.client.get("/api/v1/products/0/reviews", name="/api/v1/products/[id]/reviews")


class JasonSession(SequentialTaskSet):
    """Sign in, read three pages, sign out: one visit."""

    @task
    def login(self) -> None:
        with self.client.post("/login", data={"username": "jason", "passwd": "jason"},
                              name="/login", catch_response=True) as resp:
            # Redirected back to the product page, now signed in.
            if resp.status_code != 200 or "jason" not in (resp.text or ""):
                resp.failure(f"sign-in failed (status {resp.status_code})")

    @task
    def read_1(self) -> None:
        self.user.product_page(expect_user="jason")

    @task
    def read_2(self) -> None:
        self.user.product_page(expect_user="jason")

    @task
    def read_3(self) -> None:
        self.user.product_page(expect_user="jason")

    @task
    def logout(self) -> None:
        self.client.get("/logout", name="/logout")


class Jason(_Bookinfo):
    weight = 1
    tasks = [JasonSession]  # noqa: RUF012 - locust's API: the class-level list it schedules from
