"""The wheel carries what the commands need: built, installed into a fresh venv, run outside the repo.

No download: the wheel is built without build isolation and installed without dependencies; the
fresh venv sees this test venv's packages (torch, typer, ...) through a .pth file, which adds the
folder to sys.path without running the .pth hooks inside it, so the editable install's finder
stays off and `medmvl_cli` is the wheel's copy.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow

SOURCES = ("medmvl_cli", "recipes", "pyproject.toml", "README.md")


def run(cmd: list[str], cwd: Path, env: dict | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(map(str, cmd))}\n{out.stdout}\n{out.stderr}"
    return out


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    # Build from a copy, so the checkout gets no build/ folder; links (medmvl_cli/recipes) stay links.
    src = tmp / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    for name in SOURCES:
        path = REPO / name
        if path.is_dir() and not path.is_symlink():
            shutil.copytree(path, src / name, symlinks=True, ignore=ignore)
        else:
            shutil.copy2(path, src / name, follow_symlinks=False)
    dist = tmp / "dist"
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", str(dist), str(src)], cwd=tmp, timeout=300)
    wheel = next(dist.glob("medmvl-*.whl"))

    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp)
    python = venv / "bin" / "python"
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
         str(wheel)], cwd=tmp, timeout=300)
    purelib = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                       cwd=tmp).stdout.strip())
    ours = {sysconfig.get_paths()["purelib"], *site.getsitepackages()}
    (purelib / "test-venv-packages.pth").write_text("\n".join(sorted(ours)) + "\n")
    return venv


def outside_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["HF_HUB_OFFLINE"] = "1"
    return env


def test_the_wheel_runs_the_quickstart_help_and_checks_a_packaged_recipe(wheel_venv, tmp_path):
    python, medmvl = wheel_venv / "bin" / "python", wheel_venv / "bin" / "medmvl"
    env = outside_env()
    where = run([str(python), "-c", "import medmvl_cli, pathlib; print(pathlib.Path(medmvl_cli.__file__).resolve())"],
                cwd=tmp_path, env=env).stdout.strip()
    assert Path(where).is_relative_to(wheel_venv.resolve()), where  # the wheel's copy, not the checkout

    help_text = run([str(medmvl), "quickstart", "--help"], cwd=tmp_path, env=env).stdout
    assert "quickstart" in help_text.lower()

    recipes = Path(where).parent / "recipes"
    assert not recipes.is_symlink() and (recipes / "deepspeed" / "zero2.json").is_file()
    for recipe in ("quickstart/tiny-2d.yaml", "quickstart/tiny-ct.yaml", "medmvl-ct/finetune.yaml"):
        checked = run([str(medmvl), "config", "check", str(recipes / recipe)], cwd=tmp_path, env=env)
        assert checked.stdout.startswith("ok "), checked.stdout
    # The quickstart finds its recipes inside the installed package.
    found = run([str(python), "-c", "from medmvl_cli.workflows.quickstart import quickstart_recipe; "
                 "print(quickstart_recipe('3d'))"], cwd=tmp_path, env=env).stdout.strip()
    assert Path(found).is_relative_to(wheel_venv.resolve()) and Path(found).is_file()
