"""`twistd pushd` is discoverable after `pip install .` and after `pip install -e .`.

Twisted finds plugins by scanning every sys.path entry for a twisted/plugins
directory (twisted.plugin.pluginPackagePaths), so the plugin module must either be
copied into site-packages/twisted/plugins (regular install) or the project root
must be a real sys.path entry (editable install; see package_dir in setup.cfg).

Each case installs a copy of this source tree into a throwaway virtualenv, with
`--no-deps --no-build-isolation`: the dependencies and the build backend come from
the environment running these tests, nothing is downloaded.  The copy keeps the
build's side effects (build/, *.egg-info) out of the working tree and gives the
installation under test paths of its own, so the checks below can tell it apart
from a pushd that the test-running environment itself may have installed.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 120  # seconds, for every single subprocess call

PLUGINS_CMD = (
    "from twisted.plugin import getPlugins; "
    "from twisted.application.service import IServiceMaker; "
    "print(sorted(p.tapname for p in getPlugins(IServiceMaker)))"
)

# Where did pushd and its plugin come from, and does Twisted see the plugin?
PROVENANCE_CMD = """
import json
from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
makers = {p.tapname: p for p in getPlugins(IServiceMaker)}
import pushd
import twisted.plugins.pushd_plugin as plugin
print(json.dumps({
    "pushd": pushd.__file__,
    "plugin": plugin.__file__,
    "maker_module": type(makers["pushd"]).__module__ if "pushd" in makers else None,
}))
"""

RECORD_CMD = "from importlib.metadata import files; print('\\n'.join(str(f) for f in files('pushd')))"

COPY_IGNORE = shutil.ignore_patterns(
    ".git",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    ".*_cache",
    ".hypothesis",
    ".venv",
    "venv",
    "node_modules",
    "dropin.cache",
    "*.pid",
    "*.log",
)


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"timed out after {TIMEOUT}s: {cmd}\nstdout: {e.stdout!r}\nstderr: {e.stderr!r}")


def _ok(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    proc = _run(cmd, cwd, env)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc.stdout


def _require_build_backend() -> None:
    """The build runs without isolation, so the backend must be here already: fail, never skip."""
    from packaging.requirements import Requirement  # a dependency of pytest itself

    with open(REPO / "pyproject.toml", "rb") as f:
        requires = tomllib.load(f)["build-system"]["requires"]
    problems = []
    for spec in requires:
        req = Requirement(spec)
        try:
            have = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            problems.append(f"{spec}: not installed")
            continue
        if not req.specifier.contains(have, prereleases=True):
            problems.append(f"{spec}: {have} is installed")
    try:
        metadata.version("pip")
    except metadata.PackageNotFoundError:
        problems.append("pip: not installed")
    if problems:
        pytest.fail(
            f"the packaging tests build pushd with --no-build-isolation, so {sys.executable} needs the build "
            f"backend of pyproject.toml: {'; '.join(problems)}. Install the test extra: pip install -e '.[test]'"
        )


def _require_no_installed_plugin() -> None:
    """A regular install of pushd in the test-running environment would shadow the copy under test.

    Its plugin module sits in Twisted's own twisted/plugins directory, which comes first on
    twisted.plugins.__path__ in every environment that borrows this one's packages.  An editable
    install (a .pth pointing at a source tree) does no harm: the throwaway venv's own entries come first.
    """
    for d in site.getsitepackages():
        plugin = Path(d, "twisted", "plugins", "pushd_plugin.py")
        if plugin.exists():
            pytest.fail(
                f"{plugin} (a regular, non-editable install of pushd in {sys.executable}'s environment) would "
                "shadow the pushd under test: pip uninstall pushd, or install it with pip install -e '.[test]'"
            )


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "PIP_"))}
    env.update(
        PYTHONNOUSERSITE="1",
        PIP_DISABLE_PIP_VERSION_CHECK="1",
        PIP_NO_INPUT="1",
        PIP_NO_INDEX="1",  # --no-deps --no-build-isolation: nothing may be downloaded
    )
    return env


def _make_venv(path: Path, env: dict[str, str]) -> tuple[Path, Path]:
    """A venv that borrows every package of the interpreter running the tests; returns its python and purelib.

    `python -m venv --system-site-packages` run from inside a virtualenv links the *base* interpreter's
    site-packages, not the virtualenv's, so when the tests run in a virtualenv its site-packages
    directories are added by a .pth file as plain paths: that way its own .pth files (such as an
    editable pushd's) are not processed in the new venv.
    """
    _ok([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(path)], path.parent, env)
    python = path / "bin" / "python"
    purelib = Path(
        _ok([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], path.parent, env).strip()
    )
    if sys.prefix != sys.base_prefix:
        dirs = [p for p in site.getsitepackages() if os.path.isdir(p)]
        # "zzz": processed after the .pth files of whatever gets installed into this venv.
        (purelib / "zzz_pushd_test_runner_site.pth").write_text("".join(f"{d}\n" for d in dirs))
    if not (path / "bin" / "twistd").exists():
        # twisted comes from the borrowed site-packages, so its scripts are not in this venv: write the
        # console script pip would have written.
        (ep,) = metadata.entry_points(group="console_scripts", name="twistd")
        script = path / "bin" / "twistd"
        script.write_text(f"#!{python}\nimport sys\nfrom {ep.module} import {ep.attr}\nsys.exit({ep.attr}())\n")
        script.chmod(0o755)
    return python, purelib


def _set_version(setup_cfg: Path, suffix: str) -> str:
    """Append `suffix` to the version in `setup_cfg`; returns the new version."""
    lines = setup_cfg.read_text(encoding="utf-8").splitlines(keepends=True)
    (index,) = [i for i, line in enumerate(lines) if line.startswith("version = ")]
    version = lines[index].removeprefix("version = ").strip() + suffix
    lines[index] = f"version = {version}\n"
    setup_cfg.write_text("".join(lines), encoding="utf-8")
    return version


def _within(path: str, root: Path) -> bool:
    return Path(path).resolve().is_relative_to(root.resolve())


@pytest.mark.timeout(240)
@pytest.mark.parametrize("editable", [False, True], ids=["regular", "editable"])
def test_twistd_finds_pushd_plugin(tmp_path: Path, editable: bool) -> None:
    _require_build_backend()
    _require_no_installed_plugin()
    env = _clean_env()

    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=COPY_IGNORE)
    assert not (src / "twisted" / "__init__.py").exists(), "twisted/ must stay a namespace-style directory"
    assert not (src / "twisted" / "plugins" / "__init__.py").exists(), "twisted/plugins/ must have no __init__.py"
    # As left by running twistd from a checkout: it must not end up in the wheel.
    (src / "twisted" / "plugins" / "dropin.cache").write_bytes(b"stale")
    # A version of the copy's own, so `pushctl --version` shows where it reads the version from.
    version = _set_version(src / "setup.cfg", ".post7")

    venv = tmp_path / "venv"
    python, purelib = _make_venv(venv, env)
    pip = [str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--ignore-installed"]
    _ok([*pip, *(["-e"] if editable else []), str(src)], tmp_path, env)

    expected_root = src if editable else purelib

    # Run from a neutral directory: neither the repository nor the copy is the cwd.
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()

    tapnames = _ok([str(python), "-c", PLUGINS_CMD], cwd, env)
    assert "'pushd'" in tapnames, tapnames

    where = json.loads(_ok([str(python), "-c", PROVENANCE_CMD], cwd, env).strip().splitlines()[-1])
    assert where["maker_module"] == "twisted.plugins.pushd_plugin", where
    assert _within(where["pushd"], expected_root), f"pushd imported from outside {expected_root}: {where}"
    assert _within(where["plugin"], expected_root), f"plugin imported from outside {expected_root}: {where}"

    proc = _run([str(venv / "bin" / "twistd"), "pushd", "--help"], cwd, env)
    assert proc.returncode == 0, f"twistd pushd --help exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "--redis" in proc.stdout and "--listen" in proc.stdout, proc.stdout

    # The command line tool is `pushctl` (bash and zsh run their `pushd` builtin instead of any `pushd` program),
    # and `python -m pushd`; both print the installed distribution's version.
    assert not (venv / "bin" / "pushd").exists(), "no console script may be called pushd"
    shell_env = {**env, "PATH": f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"}
    assert _ok(["bash", "-c", "type -t pushctl"], cwd, shell_env) == "file\n"
    assert _ok(["bash", "-c", "pushctl --version"], cwd, shell_env) == f"pushctl (pushd) {version}\n"
    assert _ok([str(python), "-m", "pushd", "--version"], cwd, env) == f"pushctl (pushd) {version}\n"

    if not editable:
        installed = _ok([str(python), "-c", RECORD_CMD], cwd, env).split()
        assert "twisted/plugins/pushd_plugin.py" in installed, installed
        assert not [f for f in installed if f.endswith("dropin.cache")], installed
        assert not [
            f
            for f in installed
            if f.split("/")[0] in {"tests", "bench", "docs", "certs", "twisted"}
            and not f.startswith("twisted/plugins/")
        ], installed
        assert not (purelib / "twisted" / "__init__.py").exists(), "the wheel must not ship twisted/__init__.py"
