"""A built wheel works outside the checkout: profiles, GPU catalog and calibration ship inside it."""

from __future__ import annotations

import subprocess
import sys
import venv

import pytest


@pytest.mark.slow
def test_wheel_in_a_fresh_venv_without_torch_answers_from_another_folder(root, tmp_path):
    pytest.importorskip("setuptools")
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", str(root), "-w", str(wheels)], check=True,
                   capture_output=True)
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    bin_dir = env_dir / "bin"
    wheel = next(wheels.glob("vramplan-*.whl"))
    subprocess.run([str(bin_dir / "pip"), "install", "-q", "--no-deps", str(wheel)], check=True,
                   capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def run(*argv: str) -> str:
        out = subprocess.run([str(bin_dir / "vramplan"), *argv], cwd=elsewhere,
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return out.stdout

    assert "llama-2-70b" in run("profiles")
    assert "device total" in run("estimate", "llama-2-7b")
    assert "smallest GPU that fits" in run("fit", "llama-2-7b", "--gpus", "rtx-4090,h200")
    assert "139.80" in run("gpus")
    probe = subprocess.run([str(bin_dir / "python"), "-c", "import torch"], capture_output=True)
    assert probe.returncode != 0  # the estimator needed none of the heavy libraries
