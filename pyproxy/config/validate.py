"""``pyproxy validate PATH...``: load configuration and report every problem."""

from __future__ import annotations

import sys

from .loader import load_paths


def main(paths: list[str]) -> int:
    """Load ``paths`` and report; returns 0 if there are no errors, else 1.

    Each warning is printed to stderr as ``warning: FILE#N: path: message``
    and each error as ``FILE#N: path: message`` (``str(Diagnostic)``). The
    summary line (``N files, M resources: OK`` or ``K errors``) goes to stdout.
    """
    config = load_paths(paths)
    for warning in config.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    for error in config.errors:
        print(error, file=sys.stderr)
    if config.errors:
        count = len(config.errors)
        print(f"{count} error{'' if count == 1 else 's'}")
        return 1
    print(f"{len(config.files)} files, {len(config.resources)} resources: OK")
    return 0
