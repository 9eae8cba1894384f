"""``pyproxy demo bookinfo`` failure paths, with real processes: a taken port,
a child that crashes while starting, invalid config. Each must end with a clear
message, a non-zero status and no process left behind."""

from __future__ import annotations

import os
import random
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.harness import ROOT


def run_demo(*args: str, timeout: float = 90.0) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(
        [sys.executable, "-m", "pyproxy", "demo", "bookinfo", *args],
        capture_output=True, text=True, timeout=timeout, cwd=str(ROOT), check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    # On failure the demo keeps its logs for the user; the tests read them from stderr.
    kept = re.search(r"logs kept in (\S+)", res.stderr)
    if kept:
        shutil.rmtree(Path(kept.group(1)).parent, ignore_errors=True)
    return res


def random_prefix() -> str:
    return f"127.{random.randint(100, 250)}.{random.randint(1, 250)}."


def processes_mentioning(text: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{entry.name}: {cmdline}")
    return found


def test_a_taken_port_is_reported_before_anything_starts(tmp_path: Path) -> None:
    prefix = random_prefix()
    with socket.socket() as taken:
        taken.bind((f"{prefix}13", 15001))  # reviews-v1's outbound port
        taken.listen()
        res = run_demo("--config-dir", str(tmp_path), "--pod-subnet", f"{prefix}0/24",
                       "--ingress", f"{prefix}10:8080", timeout=30)
    assert res.returncode == 1, res
    assert f"{prefix}13:15001 is already in use" in res.stderr
    assert "starting" not in res.stdout
    assert processes_mentioning(prefix) == []


def test_a_child_crashing_at_start_stops_everything_it_started(tmp_path: Path) -> None:
    prefix = random_prefix()
    # Every proxy refuses this log level at argument parsing: the first one exits with status 2.
    res = run_demo("--config-dir", str(tmp_path), "--pod-subnet", f"{prefix}0/24",
                   "--ingress", f"{prefix}10:8080", "--log-level", "chatty")
    assert res.returncode == 1, res
    assert "exited with status 2 while starting" in res.stderr
    assert "'chatty'" in res.stderr  # the tail of the child's log: its error
    assert "logs kept in" in res.stderr
    deadline = time.monotonic() + 5
    while (left := processes_mentioning(prefix)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert left == []


def test_invalid_config_in_the_config_dir_is_refused_with_its_errors(tmp_path: Path) -> None:
    (tmp_path / "routing.yaml").write_text(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: reviews}\n"
        "spec: {host: reviews, subsets: [{name: v1}, {name: v1}]}\n"
    )
    prefix = random_prefix()
    res = run_demo("--config-dir", str(tmp_path), "--pod-subnet", f"{prefix}0/24",
                   "--ingress", f"{prefix}10:8080", timeout=30)
    assert res.returncode == 1, res
    assert "routing.yaml#0: spec.subsets[1].name: duplicate subset name 'v1'" in res.stderr
    assert (tmp_path / "routing.yaml").exists()  # the user's file is left alone
    assert processes_mentioning(prefix) == []
