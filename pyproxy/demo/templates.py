"""HTML for the Bookinfo productpage stand-in.

Plain functions returning strings: the page is small and a template engine would
be one more dependency. Everything that comes from a request or an upstream
service goes through ``html.escape``; only the constant product description is
trusted HTML.

Markup contract (existing Bookinfo test scripts depend on it, so keep it stable):

* ``<title>Simple Bookstore App</title>`` — Istio's docs grep for it.
* Each star is ``<span class="glyphicon glyphicon-star"></span>`` (full) or
  ``<span class="glyphicon glyphicon-star-empty"></span>`` (empty), five per
  rated review, inside ``<font color="COLOR">`` with the colour reviews sent.
  No other ``<font`` element and no other ``glyphicon`` text appears on the page
  (the CSS that draws the stars is served separately for that reason).
* Failure texts match the original productpage word for word.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

MAX_STARS = 5

DETAILS_ERROR_HEADING = "Error fetching product details!"
REVIEWS_ERROR_HEADING = "Error fetching product reviews!"
DETAILS_UNAVAILABLE = "Sorry, product details are currently unavailable for this book."
REVIEWS_UNAVAILABLE = "Sorry, product reviews are currently unavailable for this book."
RATINGS_UNAVAILABLE = "Sorry, product ratings are currently unavailable for this book."

# Served at /static/bookinfo.css. The star glyphs are drawn with CSS so the page
# works offline (no Bootstrap fonts) while keeping the classic class names.
STYLESHEET = """\
body { font-family: Georgia, serif; margin: 0; background: #fafafa; color: #222; }
nav.topbar { display: flex; justify-content: space-between; align-items: center;
             background: #333; color: #eee; padding: 0.5em 1em; }
nav.topbar a { color: #fff; }
nav.topbar form { display: inline; }
main { max-width: 60em; margin: 1em auto; padding: 0 1em; }
.columns { display: flex; gap: 2em; flex-wrap: wrap; }
.columns > section { flex: 1 1 20em; }
blockquote { border-left: 4px solid #ccc; margin: 1em 0; padding: 0.25em 1em; }
blockquote small { display: block; color: #666; }
.error { color: #a00; }
.glyphicon::before { font-style: normal; font-size: 1.2em; }
.glyphicon-star::before { content: "\\2605"; }
.glyphicon-star-empty::before { content: "\\2606"; }
"""


def _page(body: str) -> str:
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        "<title>Simple Bookstore App</title>\n"
        '<link rel="stylesheet" href="/static/bookinfo.css">\n'
        f"</head>\n<body>\n{body}</body>\n</html>\n"
    )


def render_index() -> str:
    return _page(
        "<main>\n<h1>Bookinfo</h1>\n"
        "<p>A local stand-in for Istio's Bookinfo sample, each service behind a pyproxy sidecar.</p>\n"
        '<p><a href="/productpage">Open the product page</a></p>\n'
        "</main>\n"
    )


def _user_bar(user: str | None) -> str:
    if user:
        account = f'<span>Signed in as: <b>{escape(user)}</b> <a href="/logout">Sign out</a></span>'
    else:
        # passwd is accepted and ignored, like the original demo's login form.
        account = (
            '<form method="post" action="/login">'
            '<input type="text" name="username" placeholder="User Name" required> '
            '<input type="password" name="passwd" placeholder="Password"> '
            '<button type="submit">Sign in</button></form>'
        )
    return f'<nav class="topbar"><a href="/productpage">BookInfo Sample</a>{account}</nav>\n'


def _details_section(details: Mapping[str, Any] | None) -> str:
    if details is None:
        return f'<h4 class="error">{DETAILS_ERROR_HEADING}</h4>\n<p>{DETAILS_UNAVAILABLE}</p>\n'
    rows = [
        ("Author", "author"),
        ("Year", "year"),
        ("Type", "type"),
        ("Pages", "pages"),
        ("Publisher", "publisher"),
        ("Language", "language"),
        ("ISBN-10", "ISBN-10"),
        ("ISBN-13", "ISBN-13"),
    ]
    items = "".join(
        f"<dt>{label}:</dt><dd>{escape(str(details[key]))}</dd>\n" for label, key in rows if key in details
    )
    return f"<h4>Book Details</h4>\n<dl>\n{items}</dl>\n"


def _stars(rating: Mapping[str, Any]) -> str:
    stars = rating.get("stars")
    if not isinstance(stars, int) or isinstance(stars, bool):
        return ""
    full = max(0, min(MAX_STARS, stars))
    color = escape(str(rating.get("color", "black")))
    glyphs = '<span class="glyphicon glyphicon-star"></span>\n' * full
    glyphs += '<span class="glyphicon glyphicon-star-empty"></span>\n' * (MAX_STARS - full)
    return f'<font color="{color}">\n{glyphs}</font>\n'


def _review(review: Mapping[str, Any]) -> str:
    text = escape(str(review.get("text", "")))
    reviewer = escape(str(review.get("reviewer", "")))
    out = f"<blockquote>\n<p>{text}</p>\n<small>{reviewer}</small>\n"
    rating = review.get("rating")
    if isinstance(rating, Mapping):
        if "error" in rating:
            out += f'<p class="error"><i>{escape(str(rating["error"]))}</i></p>\n'
        else:
            out += _stars(rating)
    return out + "</blockquote>\n"


def _reviews_section(reviews: Mapping[str, Any] | None) -> str:
    if reviews is None:
        return f'<h4 class="error">{REVIEWS_ERROR_HEADING}</h4>\n<p>{REVIEWS_UNAVAILABLE}</p>\n'
    entries = reviews.get("reviews")
    items = [r for r in entries if isinstance(r, Mapping)] if isinstance(entries, Sequence) else []
    out = "<h4>Book Reviews</h4>\n" + "".join(_review(r) for r in items)
    # Showing which pod answered makes traffic shifting visible on the page.
    served_by = reviews.get("podname")
    if served_by:
        out += f"<p><small>Reviews served by: <u>{escape(str(served_by))}</u>"
        cluster = reviews.get("clustername")
        if cluster and cluster != "null":
            out += f" on cluster <u>{escape(str(cluster))}</u>"
        out += "</small></p>\n"
    return out


def render_productpage(
    product: Mapping[str, Any],
    details: Mapping[str, Any] | None,
    reviews: Mapping[str, Any] | None,
    user: str | None,
) -> str:
    """The product page; ``details``/``reviews`` are None when that call failed."""
    body = (
        _user_bar(user)
        + "<main>\n"
        + f'<section class="product">\n<h1>{escape(str(product["title"]))}</h1>\n'
        + f"<p>{product['descriptionHtml']}</p>\n</section>\n"
        + '<div class="columns">\n'
        + f'<section class="details">\n{_details_section(details)}</section>\n'
        + f'<section class="reviews">\n{_reviews_section(reviews)}</section>\n'
        + "</div>\n</main>\n"
    )
    return _page(body)
