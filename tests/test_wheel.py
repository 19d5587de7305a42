"""The built wheel works outside the repository: `pip wheel . --no-deps`, installed into a fresh
virtual environment, imported from there (not from the checkout), a bundled profile loaded and
`heterocache profile list` run. The wheel is installed without its dependencies; the environment
finds torch and the others in the site-packages of the interpreter running the tests, appended
after its own (see `_see_site_packages_of_this_interpreter`)."""

from __future__ import annotations

import os
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(cmd, **kwargs):
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kwargs)
    assert result.returncode == 0, f"{cmd}: {result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


def _site_packages_of_this_interpreter() -> list[str]:
    """The site-packages folders that the running interpreter imports from: the system's, or a
    virtual environment's (and the system's too when it was made with --system-site-packages),
    and the user's where this interpreter reads it."""
    dirs = list(site.getsitepackages()) if hasattr(site, "getsitepackages") else []
    dirs += [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    return [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]


def _see_site_packages_of_this_interpreter(venv: Path) -> list[str]:
    """Let the virtual environment import what this interpreter imports (torch, transformers, ...).

    Not `venv --system-site-packages`: a virtual environment made from inside another one gets the
    base interpreter's site-packages, not the outer environment's, where torch may be installed.
    A `.pth` file in the new environment's site-packages instead adds this interpreter's folders
    with `site.addsitedir` (so their own `.pth` files work), which appends them to `sys.path`
    after the new environment's own site-packages: the installed wheel comes first, ahead of the
    checkout that an editable install of heterocache in the outer environment points at."""
    python = venv / "bin" / "python"
    own = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    outer = _site_packages_of_this_interpreter()
    # one line, run by `exec` inside site.addpackage: no comprehension (it would not see `site`)
    line = f"import site; list(map(site.addsitedir, {outer!r}))\n"
    (Path(own) / "zz_heterocache_test_outer_site_packages.pth").write_text(line)
    return outer


@pytest.mark.slow
def test_the_wheel_installs_and_serves_its_bundled_profiles_outside_the_repository(tmp_path):
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "-q", "-w", str(wheels)])
    (wheel,) = wheels.glob("heterocache-*.whl")
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    python = venv / "bin" / "python"
    _run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--disable-pip-version-check", str(wheel)])
    outer = _see_site_packages_of_this_interpreter(venv)  # after the install: pip sees only the wheel
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
        "import torch; print(torch.__file__)\n"
    )
    out = _run([str(python), "-c", check], cwd=work, env=env).stdout.splitlines()
    assert Path(out[0]).is_relative_to(venv), f"imported {out[0]}, not the installed wheel"
    assert any(Path(out[3]).is_relative_to(d) for d in outer), f"torch from {out[3]}, not from {outer}"
    assert Path(out[1]) == Path(out[0]).parent / "_bundled_profiles"
    assert out[2] == "30 3"
    listing = _run([str(venv / "bin" / "heterocache"), "profile", "list"], cwd=work, env=env).stdout
    for name in ("HuggingFaceTB/SmolLM2-135M-Instruct", "meta-llama/Llama-3.1-8B-Instruct",
                 "Qwen/Qwen2.5-14B-Instruct", "deepseek-ai/DeepSeek-R1-Distill-Llama-8B"):
        assert name in listing, listing
