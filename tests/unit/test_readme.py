"""The README's install-and-test command is exactly the one CI runs (.ci/run)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _test_commands(path: Path) -> list[str]:
    """Lines that start with `pip install` and run pytest (a leading `$ ` or surrounding backticks aside)."""
    commands = []
    for line in path.read_text(encoding="utf-8").splitlines():
        text = line.strip()
        text = text.removeprefix("$ ").strip("`").strip()
        if text.startswith("pip install") and "pytest" in text:
            commands.append(text)
    return commands


def test_readme_test_command_is_what_ci_runs() -> None:
    readme = REPO / "README.md"
    assert readme.is_file(), "README.md is missing"
    ci = _test_commands(REPO / ".ci" / "run")
    assert len(ci) == 1, f".ci/run must run exactly one `pip install ... pytest` line, found {ci}"
    documented = _test_commands(readme)
    assert documented, "README.md has no line starting with `pip install` that runs pytest"
    assert set(documented) == set(ci), f"README.md says {documented}, .ci/run runs {ci}"
