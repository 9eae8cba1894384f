#!/usr/bin/env python3
"""Bootstrap for the two README quick-start commands.

    python3 make.py demo [args...]   install into .venv, then run `pyproxy demo ...`
    python3 make.py test [args...]   install into .venv (with test extras), then run pytest: everything
    python3 make.py test --fast      the fast tier: unit + core integration, nothing slow or netns

Only the standard library is used here, so this works on a fresh machine with
nothing but Python >= 3.11. The virtual environment is reused; it is
reinstalled only when pyproject.toml changes (a stamp file records its hash).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("PYPROXY_VENV", ROOT / ".venv"))
STAMP = VENV / ".pyproxy-install-stamp"


def venv_python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def ensure_env(extras: str) -> Path:
    if sys.version_info < (3, 11):  # noqa: UP036 - must run on older Pythons to say why it stops
        sys.exit(f"pyproxy needs Python >= 3.11, this is {sys.version.split()[0]}")
    py = venv_python()
    if not py.exists():
        print(f"[make] creating virtual environment in {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True, clear=True).create(VENV)
    # The stamp records pyproject.toml's hash and the extras installed with it:
    # nothing is reinstalled unless pyproject.toml changed or an extra is missing.
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    wanted = {e for e in extras.split(",") if e}
    have: set[str] = set()
    if STAMP.exists():
        recorded_digest, _, recorded_extras = STAMP.read_text().strip().partition(" ")
        if recorded_digest == digest:
            have = {e for e in recorded_extras.split(",") if e}
    if not STAMP.exists() or not have or not wanted <= have:
        extras = ",".join(sorted(wanted | have))
        print(f"[make] installing pyproxy-sidecar[{extras}] into {VENV}", flush=True)
        subprocess.check_call([str(py), "-m", "pip", "install", "--quiet", "--upgrade", "pip"])
        spec = f"{ROOT}[{extras}]" if extras else str(ROOT)
        subprocess.check_call([str(py), "-m", "pip", "install", "--quiet", "-e", spec])
        STAMP.write_text(f"{digest} {extras}")
    return py


# System tools some tests need (Debian package names), as .ci/run installs them.
FULL_RUN_TOOLS = (("iptables", "iptables"), ("ip", "iproute2"), ("nginx", "nginx-light"), ("wrk", "wrk"),
                  ("prometheus", "prometheus"), ("redis-server", "redis-server"))


def full_run_notes() -> list[str]:
    """What this machine lacks for the tests that otherwise skip."""
    notes = []
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        notes.append("root (the transparent-capture tests build network namespaces with iptables rules)")
    missing = [(tool, pkg) for tool, pkg in FULL_RUN_TOOLS if shutil.which(tool) is None]
    if missing:
        notes.append(f"{', '.join(t for t, _ in missing)} (apt-get install {' '.join(p for _, p in missing)})")
    reference = Path(os.environ.get("PYPROXY_REFERENCE") or ROOT.parent / "shared" / "reference")
    if not reference.is_dir():
        notes.append(f"the reference data (Istio samples, the Compose schema) at {reference}: "
                     "set PYPROXY_REFERENCE to where it is")
    return notes


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in {"demo", "test", "bench", "shell"}:
        print(__doc__)
        return 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "test":
        # The load extra too: the benchmark and locust smoke tests need it.
        py = ensure_env("test,load")
        if "--fast" in rest:
            # The fast tier (CONTRIBUTING.md): the unit tests and the core
            # integration tests, without anything marked slow (fuzz, soak, bench
            # smoke, lint, end to end) or netns. Without --fast: everything, as CI
            # runs it.
            rest = [a for a in rest if a != "--fast"]
            rest = ["-m", "(unit or core) and not slow and not netns", *rest]
        code = subprocess.call([str(py), "-m", "pytest", *rest], cwd=ROOT)
        notes = full_run_notes()
        if notes:
            print("\n[make] some tests skip on this machine; the full run (what CI runs) also needs:")
            for note in notes:
                print(f"[make]   - {note}")
            print("[make] as root on Debian/Ubuntu, `bash .ci/run` installs the packages and runs the whole suite.")
        return code
    if cmd == "bench":
        py = ensure_env("test,load")
        return subprocess.call([str(py), str(ROOT / "load-tests" / "bench.py"), *rest], cwd=ROOT)
    if cmd == "shell":
        py = ensure_env("test,load")
        print(f"activate with: source {VENV}/bin/activate")
        return 0
    py = ensure_env("test")
    # The user's working directory, so the paths the demo prints can be typed as shown.
    proc = subprocess.Popen([str(py), "-m", "pyproxy", "demo", "bookinfo", *rest])
    while True:
        try:
            return proc.wait()
        except KeyboardInterrupt:
            # The demo got the same Ctrl-C and is stopping what it started:
            # wait for it rather than killing it half-way.
            continue


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
