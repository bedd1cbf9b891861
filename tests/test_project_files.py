"""The project's own promises about itself: the Python floor, the metadata, the Makefile."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
import venv
from importlib.metadata import metadata
from pathlib import Path

import pytest

from tests.support import ROOT

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def floor(specifier: str) -> tuple[int, ...]:
    """The lower bound of a Requires-Python specifier such as '>=3.11, <4.0'."""
    match = re.search(r">=\s*(\d+)\.(\d+)", specifier)
    assert match, specifier
    return int(match.group(1)), int(match.group(2))


def test_python_floor_is_the_sdks_and_said_everywhere():
    """requires-python is the installed Langfuse SDK's floor, and ruff's target and the
    README say the same version."""
    ours = floor(PYPROJECT["project"]["requires-python"])
    assert ours == floor(metadata("langfuse")["Requires-Python"])
    assert PYPROJECT["tool"]["ruff"]["target-version"] == f"py{ours[0]}{ours[1]}"
    assert f"Python {ours[0]}.{ours[1]}+" in (ROOT / "README.md").read_text()


def test_metadata_is_publishing_ready():
    """An SPDX license string with its file, classifiers, keywords and project URLs, built
    by a setuptools that understands them."""
    project = PYPROJECT["project"]
    assert project["license"] == "MIT" and (ROOT / "LICENSE").is_file()
    assert project["license-files"] == ["LICENSE"]
    assert not [c for c in project["classifiers"] if c.startswith("License ::")]  # SPDX only
    assert project["keywords"] and {"Homepage", "Source", "Issues"} <= set(project["urls"])
    assert "setuptools>=77" in PYPROJECT["build-system"]["requires"]
    assert {"build>=1.2", "twine>=6.1"} <= set(project["optional-dependencies"]["dev"])


def make_dry_run(venv_dir: Path, python: str) -> str:
    """What `make install` would run for ``venv_dir`` and ``python`` (make -n: nothing runs)."""
    out = subprocess.run(["make", "-n", "-C", str(ROOT), "install", f"VENV={venv_dir}",
                          f"PYTHON={python}"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def other_interpreter() -> str | None:
    """A Python 3.11+ whose installation differs from the one running the tests, if any."""
    here = Path(sys.base_prefix).resolve()
    candidates = sorted(Path.home().glob(".pyenv/versions/3.1[1-9]*/bin/python3"))
    for candidate in [*candidates, Path("/usr/bin/python3")]:
        if not candidate.exists():
            continue
        out = subprocess.run([str(candidate), "-c", "import sys; print(sys.base_prefix); "
                              "print(sys.version_info >= (3, 11))"],
                             capture_output=True, text=True, timeout=30)
        prefix, new_enough = [*out.stdout.split(), "", ""][:2]
        if out.returncode == 0 and new_enough == "True" and Path(prefix).resolve() != here:
            return str(candidate)
    return None


@pytest.mark.skipif(os.system("command -v make >/dev/null") != 0, reason="no make here")
def test_make_recreates_a_venv_of_another_interpreter(tmp_path: Path):
    """`make` keeps a .venv made by the interpreter asked for, and makes it anew when PYTHON
    names another one (instead of failing until `make clean`)."""
    other = other_interpreter()
    if other is None:
        pytest.skip("no second Python 3.11+ installation on this machine")
    venv_dir = tmp_path / ".venv"
    venv.create(venv_dir, with_pip=False)
    (venv_dir / ".installed").touch()  # newer than pyproject.toml: installed and current
    kept = make_dry_run(venv_dir, sys.executable)
    assert "rm -rf" not in kept and "-m venv" not in kept, kept
    remade = make_dry_run(venv_dir, other)
    assert f"rm -rf {venv_dir}" in remade and f"{other} -m venv {venv_dir}" in remade, remade


def test_make_refuses_an_interpreter_that_does_not_run_and_keeps_the_venv(tmp_path: Path):
    """PYTHON naming nothing runnable stops `make install` with a message naming it, and the
    existing .venv is left alone."""
    venv_dir = tmp_path / ".venv"
    venv.create(venv_dir, with_pip=False)
    out = subprocess.run(["make", "-C", str(ROOT), "install", f"VENV={venv_dir}",
                          "PYTHON=/nonexistent/python3"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode != 0 and "PYTHON=/nonexistent/python3 does not run" in out.stderr
    assert (venv_dir / "bin" / "python").exists()
