"""Flagger's webhooks: an HTTP POST of Flagger's JSON payload; a 200-202
answer is success, anything else (or a timeout) is failure
(pkg/controller/webhook.go: ``r.StatusCode > 202`` is an error whose message
is the response body)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Protocol

from .resource import Canary, Webhook


class WebhookCaller(Protocol):
    def __call__(self, canary: Canary, hook: Webhook, phase: str) -> str | None:
        """None on success, else why it failed."""


def payload(canary: Canary, hook: Webhook, phase: str) -> dict:
    """Flagger's CanaryWebhookPayload: name, namespace, phase, checksum, type, metadata."""
    body: dict = {"name": canary.name, "namespace": canary.namespace, "phase": phase,
                  "checksum": canary.checksum, "type": hook.type}
    if hook.metadata:
        body["metadata"] = dict(hook.metadata)
    return body


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # Go's client would follow a redirect with a GET; a gate must answer itself.
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


def call_webhook(canary: Canary, hook: Webhook, phase: str) -> str | None:
    data = json.dumps(payload(canary, hook, phase)).encode()
    req = urllib.request.Request(hook.url, data=data, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with _OPENER.open(req, timeout=hook.timeout) as resp:
            status = resp.status
            body = resp.read(4096)
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read(4096)
    except (OSError, ValueError) as exc:
        return f"{hook.url}: {exc}"
    if 200 <= status <= 202:
        return None
    text = body.decode(errors="replace").strip()[:300]
    return f"{hook.url}: HTTP {status}" + (f": {text}" if text else "")
