"""The lint and the type check are part of the suite: ``ruff check .`` and
``mypy pyproxy`` (configured in pyproject.toml) must report nothing.

Both tools come with the ``test`` extra; without them these tests skip.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Files with findings whose owners are mid-change (hot-path and reload work);
# they fix them there. Findings only in these files make the test xfail;
# a finding anywhere else fails it. Remove entries as the files get clean:
# the test then passes without further edits.
PENDING = frozenset({
    "pyproxy/http/downstream.py",
    "pyproxy/http/exchange.py",
    "pyproxy/observability/accesslog.py",
    "pyproxy/upstream/cluster.py",
    "pyproxy/upstream/connection.py",
    "pyproxy/upstream/dns.py",
    "pyproxy/upstream/outlier.py",
    "pyproxy/upstream/retry.py",
    "pyproxy/workers.py",
})

MYPY_ERROR = re.compile(r"^(?P<path>[^:\s]+\.pyi?):\d+(?::\d+)?: error:", re.MULTILINE)


def _need(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed (pip install -e '.[test]')")


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, check=False)


def _judge(tool: str, paths: set[str], output: str) -> None:
    """Fail on any finding outside PENDING; xfail if all are inside it."""
    elsewhere = paths - PENDING
    assert not elsewhere, f"{tool} findings in {sorted(elsewhere)}:\n{output}"
    pytest.xfail(f"{tool}: findings left only in files being changed by their owners: "
                 f"{sorted(paths)}\n{output}")


def test_ruff_check_reports_nothing() -> None:
    _need("ruff")
    res = _run("ruff", "check", "--output-format", "json", ".")
    if res.returncode == 0:
        return
    try:
        findings = json.loads(res.stdout)
    except ValueError:
        pytest.fail(f"ruff failed (exit {res.returncode}):\n{res.stdout}{res.stderr}")
    assert findings, f"ruff failed (exit {res.returncode}) without findings:\n{res.stderr}"
    paths = {Path(f["filename"]).resolve().relative_to(ROOT).as_posix() for f in findings}
    text = _run("ruff", "check", "--output-format", "concise", ".").stdout
    _judge("ruff", paths, text)


def test_mypy_reports_nothing() -> None:
    _need("mypy")
    res = _run("mypy", "pyproxy")
    if res.returncode == 0:
        return
    paths = {m["path"] for m in MYPY_ERROR.finditer(res.stdout)}
    assert paths, f"mypy failed (exit {res.returncode}):\n{res.stdout}{res.stderr}"
    _judge("mypy", paths, res.stdout)
