"""Where the tests find external reference data (Istio's sample files, the
Compose specification's schema): ``$PYPROXY_REFERENCE``, by default
``../shared/reference`` beside the repository. Tests that need it skip,
saying what is missing, when it is absent; they never fail for it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ENV = "PYPROXY_REFERENCE"
ROOT = Path(__file__).resolve().parents[1]
REFERENCE = Path(os.environ.get(ENV) or ROOT.parent / "shared" / "reference")


def reference(relative: str) -> Path:
    """A path under the reference directory (it may not exist)."""
    return REFERENCE / relative


def missing_reason(path: Path) -> str:
    return (f"reference data {path} is absent: set {ENV} to the directory holding it "
            f"(default: ../shared/reference beside the repository)")


def skip_unless_present(path: Path) -> pytest.MarkDecorator:
    """``@skip_unless_present(reference("istio"))``."""
    return pytest.mark.skipif(not path.exists(), reason=missing_reason(path))
