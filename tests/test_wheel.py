"""The built wheel works outside the repository: `pip wheel . --no-deps`, installed into a fresh
virtual environment, imported from there (not from the checkout), a bundled profile loaded and
`heterocache profile list` run. The environment sees the system's site-packages only for torch and
the other dependencies; the wheel itself is installed without them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(cmd, **kwargs):
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kwargs)
    assert result.returncode == 0, f"{cmd}: {result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.mark.slow
def test_the_wheel_installs_and_serves_its_bundled_profiles_outside_the_repository(tmp_path):
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "-q", "-w", str(wheels)])
    (wheel,) = wheels.glob("heterocache-*.whl")
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)])
    python = venv / "bin" / "python"
    _run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--disable-pip-version-check", str(wheel)])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    work = tmp_path / "elsewhere"
    work.mkdir()
    check = (
        "import heterocache, sys\n"
        "from heterocache import HeadProfile\n"
        "from heterocache.profile.io.bundled import bundled_dir\n"
        "p = HeadProfile.from_pretrained('HuggingFaceTB/SmolLM2-135M-Instruct')\n"
        "print(heterocache.__file__); print(bundled_dir()); print(p.num_layers, p.num_kv_heads)\n"
    )
    out = _run([str(python), "-c", check], cwd=work, env=env).stdout.splitlines()
    assert Path(out[0]).is_relative_to(venv), f"imported {out[0]}, not the installed wheel"
    assert Path(out[1]) == Path(out[0]).parent / "_bundled_profiles"
    assert out[2] == "30 3"
    listing = _run([str(venv / "bin" / "heterocache"), "profile", "list"], cwd=work, env=env).stdout
    for name in ("HuggingFaceTB/SmolLM2-135M-Instruct", "meta-llama/Llama-3.1-8B-Instruct",
                 "Qwen/Qwen2.5-14B-Instruct", "deepseek-ai/DeepSeek-R1-Distill-Llama-8B"):
        assert name in listing, listing
