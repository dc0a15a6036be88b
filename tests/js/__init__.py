"""The JavaScript clients the suite runs against real nodes (centrifuge, ws), installed from package-lock.json.

`node_modules()` runs `npm ci` here once per checkout (again when the lock file changes). Without Node.js the tests
that need it are skipped on a developer's machine and fail with CI=true, where a missing client is a defect.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
STAMP = HERE / "node_modules" / ".pushd-lock-sha256"


def missing(what: str, install: str) -> None:
    """Skip (or, with CI=true, fail) a test whose client is not installed, naming the command that installs it."""
    message = f"{what} is not installed: {install}"
    if os.environ.get("CI") == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def node() -> str:
    """Path of the `node` binary."""
    path = shutil.which("node")
    if path is None or shutil.which("npm") is None:
        missing("Node.js (node and npm)", "apt-get install -y nodejs npm")
    assert path is not None
    return path


def node_modules() -> Path:
    """tests/js/node_modules, installed exactly as package-lock.json pins it."""
    node()
    lock = hashlib.sha256((HERE / "package-lock.json").read_bytes()).hexdigest()
    if not STAMP.exists() or STAMP.read_text() != lock:
        result = subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], check=False, cwd=HERE,
                                capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            pytest.fail(f"npm ci in {HERE} failed:\n{result.stderr[-2000:]}", pytrace=False)
        STAMP.write_text(lock)
    return HERE / "node_modules"
