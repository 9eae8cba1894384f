"""Shared test configuration. Integration helpers live in tests/harness.py,
no-socket fakes for unit tests in tests/unit/fakes.py (CONTRIBUTING.md)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

UNIT = Path(__file__).resolve().parent / "unit"

# Hypothesis profiles, chosen with HYPOTHESIS_PROFILE (.ci/run sets "ci").
# A fuzz test states its budget as a multiple of the profile's max_examples
# (``settings.default.max_examples``, read when the test module is imported,
# after this file): "ci" runs the full budget, derandomised so that a failure
# in CI replays the same examples anywhere; "dev", the default, a quarter of
# it, for a quick local run.
settings.register_profile("ci", max_examples=100, derandomize=True, print_blob=True)
settings.register_profile("dev", max_examples=25)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The fast tier selects by marker: everything under tests/unit is "unit".
    for item in items:
        if UNIT in item.path.parents:
            item.add_marker(pytest.mark.unit)
