"""Istio's authorization tasks on the local Bookinfo mesh (``pyproxy demo
bookinfo``), end to end through the ingress: "Authorization on HTTP traffic"
(config/bookinfo/authz-*.yaml) and JWT at the ingress (jwt-ingress.yaml).
The files go to ``authz.yaml`` in the mesh config directory, next to the
routing scenario, as docs/bookinfo.md says."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import Iterator

import aiohttp
import pytest

from pyproxy.demo.apps import RATINGS_ERROR
from pyproxy.demo.templates import DETAILS_UNAVAILABLE, REVIEWS_UNAVAILABLE
from tests.e2e.test_bookinfo import POD_HOSTS, RELOAD_TIMEOUT, SCENARIOS, Demo, _start_demo

pytestmark = pytest.mark.slow

TOKEN = (SCENARIOS / "jwt-demo-token.txt").read_text().strip()


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    d = _start_demo(tmp_path_factory.mktemp("mesh-authz"))
    try:
        yield d
    finally:
        d.stop()


async def apply_authz(demo: Demo, scenario: str | None) -> None:
    """Copy a file over authz.yaml (None: remove it); wait for every proxy."""
    target = demo.config_dir / "authz.yaml"
    before = demo.config_versions()
    if scenario is None:
        target.unlink()
    else:
        tmp = demo.config_dir / ".authz.yaml.tmp"
        shutil.copyfile(SCENARIOS / scenario, tmp)
        os.replace(tmp, target)
    deadline = time.monotonic() + RELOAD_TIMEOUT
    while not all(v > before[p] for p, v in demo.config_versions().items()):
        assert time.monotonic() < deadline, demo.text()[-2000:]
        await asyncio.sleep(0.2)


async def page(demo: Demo, headers: dict[str, str] | None = None) -> tuple[int, str]:
    async with aiohttp.ClientSession() as s, s.get(demo.url + "/productpage", headers=headers) as r:
        return r.status, await r.text()


async def test_authz_http_task(demo: Demo) -> None:
    status, body = await page(demo)
    assert status == 200 and REVIEWS_UNAVAILABLE not in body

    # Step 1: allow-nothing in default. The ingress (istio-system) passes the
    # request on; productpage's sidecar refuses it.
    await apply_authz(demo, "authz-allow-nothing.yaml")
    assert await page(demo) == (403, "RBAC: access denied")

    # Step 2: GET on productpage from anyone: the page, without details and reviews.
    await apply_authz(demo, "authz-productpage-viewer.yaml")
    status, body = await page(demo)
    assert status == 200
    assert DETAILS_UNAVAILABLE in body and REVIEWS_UNAVAILABLE in body

    # Step 3: details/reviews allow productpage's mTLS identity (the demo's
    # sidecars talk mTLS): details and reviews are back; ratings is still
    # denied, so reviews v2/v3 show ratings unavailable (v1 calls no ratings).
    await apply_authz(demo, "authz-details-reviews-viewer.yaml")
    for _ in range(6):
        status, body = await page(demo)
        assert status == 200
        assert DETAILS_UNAVAILABLE not in body and REVIEWS_UNAVAILABLE not in body
        assert "glyphicon-star" not in body  # no ratings reach any page
    # Step 4: ratings allows reviews' identity: the whole page.
    await apply_authz(demo, "authz-ratings-viewer.yaml")
    stars = 0
    for _ in range(6):
        status, body = await page(demo)
        assert status == 200 and RATINGS_ERROR not in body and DETAILS_UNAVAILABLE not in body
        stars += "glyphicon-star" in body
    assert stars > 0  # reviews v2/v3 got their ratings

    await apply_authz(demo, None)
    status, body = await page(demo)
    assert status == 200 and DETAILS_UNAVAILABLE not in body and REVIEWS_UNAVAILABLE not in body
    assert set(POD_HOSTS) == set(demo.config_versions())


async def test_jwt_required_at_the_ingress(demo: Demo) -> None:
    await apply_authz(demo, "jwt-ingress.yaml")
    try:
        assert await page(demo) == (403, "RBAC: access denied")  # no token
        status, body = await page(demo, {"authorization": "Bearer not-a-token"})
        assert (status, body) == (401, "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections")
        forged = TOKEN[:-6] + ("AAAAAA" if not TOKEN.endswith("AAAAAA") else "BBBBBB")
        assert await page(demo, {"authorization": "Bearer " + forged}) == (401, "Jwt verification fails")
        status, body = await page(demo, {"authorization": "Bearer " + TOKEN})
        assert status == 200 and REVIEWS_UNAVAILABLE not in body
    finally:
        await apply_authz(demo, None)
