"""Shared fixtures. Integration helpers live in tests/harness.py."""

from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
