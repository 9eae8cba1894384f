"""The lint and the type check are part of the suite: ``ruff check .`` and
``mypy pyproxy`` (configured in pyproject.toml) must report nothing.

Both tools come with the ``test`` extra; without them these tests skip.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

# ruff and mypy over the tree (subprocesses): the full run only; landing runs it via tests/unit.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def _need(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed (pip install -e '.[test]')")


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, check=False)


def test_ruff_check_reports_nothing() -> None:
    _need("ruff")
    res = _run("ruff", "check", "--output-format", "concise", ".")
    assert res.returncode == 0, f"ruff check . (exit {res.returncode}):\n{res.stdout}{res.stderr}"


def test_mypy_reports_nothing() -> None:
    _need("mypy")
    res = _run("mypy", "pyproxy")
    assert res.returncode == 0, f"mypy pyproxy (exit {res.returncode}):\n{res.stdout}{res.stderr}"
