"""Container health check: exit 0 when the proxy's /healthz/ready answers 200.

Used by the image's HEALTHCHECK (python's urllib, so the image needs no
curl). It asks the stats listener named by PYPROXY_STATS (default
0.0.0.0:15090), on loopback when that listener is a wildcard address.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping


def ready_url(env: Mapping[str, str]) -> str:
    value = (env.get("PYPROXY_STATS") or "0.0.0.0:15090").strip()
    if value.startswith("["):
        host, _, port = value[1:].partition("]:")
    elif ":" in value:
        host, _, port = value.rpartition(":")
    else:
        host, port = "", value
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/healthz/ready"


def main() -> int:
    url = ready_url(os.environ)
    # Never through a proxy from the environment: this is a local check.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=2) as resp:
            return 0 if resp.status == 200 else 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"{url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
