"""Shared test configuration. Integration helpers live in tests/harness.py,
no-socket fakes for unit tests in tests/unit/fakes.py (CONTRIBUTING.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parent / "unit"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The fast tier selects by marker: everything under tests/unit is "unit".
    for item in items:
        if UNIT in item.path.parents:
            item.add_marker(pytest.mark.unit)
