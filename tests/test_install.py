"""A non-editable install works from any folder: the wheel carries the configs and the tiny models.

The wheel is built from this checkout and installed without dependencies into a fresh virtual environment that
reads its dependencies from the test's own environment (a path file), so nothing is downloaded; the checkout's
editable install is not visible there."""

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def run(*command, cwd=None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # a PYTHONPATH checkout would shadow the wheel
    done = subprocess.run([str(c) for c in command], capture_output=True, text=True, cwd=cwd, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done


def test_pip_install_of_the_wheel_finds_its_configs_from_another_folder(tmp_path):
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", ROOT, "-w", tmp_path / "wheel")
    (wheel,) = (tmp_path / "wheel").glob("radrl-*.whl")
    run(sys.executable, "-m", "venv", tmp_path / "venv")
    python = tmp_path / "venv" / "bin" / "python"
    site = run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip()
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # torch, ray, …: no download
    run(python, "-m", "pip", "install", "--no-deps", "-q", wheel)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = run(python, "-c", "import radrl; print(radrl.__file__)", cwd=elsewhere).stdout.strip()
    assert where.startswith(site)  # the installed copy, not this checkout
    radrl = tmp_path / "venv" / "bin" / "radrl"
    assert "Train CXRL" in run(radrl, "train", "--help", cwd=elsewhere).stdout
    default = run(radrl, "config", cwd=elsewhere).stdout
    assert "task: cxrl" in default and "The roles ask for" in default
    shipped = run(radrl, "config", "configs/rrg_tiny.yaml", cwd=elsewhere).stdout  # by name, from the package
    assert "task: rrg" in shipped
    assert "iterations: 60" in run(radrl, "config", "cxrl_tiny.yaml", cwd=elsewhere).stdout
    models = run(radrl, "models", cwd=elsewhere).stdout  # the tiny models are in the wheel too
    assert "classifier" in models
