"""ruff on the whole tree and mypy --strict on pushd/ are part of the suite, so CI runs them too."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *argv], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          check=False)


def test_ruff_is_clean():
    trees = [name for name in ("pushd", "tests", "bench", "twisted", "docs") if (ROOT / name).is_dir()]
    result = run("ruff", "check", *trees)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_is_clean():
    result = run("mypy", "pushd")
    assert result.returncode == 0, result.stdout + result.stderr
