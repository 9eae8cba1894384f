"""The LICENSE file is the license pyproject.toml declares, unabridged."""

from __future__ import annotations

import hashlib
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# SHA-256 of the Apache License 2.0 text as the ASF publishes it
# (https://www.apache.org/licenses/LICENSE-2.0.txt, 11358 bytes).
APACHE_2_0_SHA256 = "cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30"


def test_license_file_is_the_declared_license_in_full() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"
    data = (ROOT / "LICENSE").read_bytes()
    assert hashlib.sha256(data).hexdigest() == APACHE_2_0_SHA256
    assert data.decode().split()[:4] == ["Apache", "License", "Version", "2.0,"]
