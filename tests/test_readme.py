"""The README quick start and the demo run as a new user runs them: pasted / from the command line,
offline, on the bundled SmolLM2, with the cache keyword the installed transformers wants."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2", "PYTHONWARNINGS": "default"}


def quick_start_code() -> str:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "the README's quick start has no python block"
    code = match.group(1)
    from transformers import LlamaForCausalLM  # SmolLM2's class

    from heterocache._compat import _cache_keyword

    if _cache_keyword(LlamaForCausalLM) == "past_key_values":  # as its comment says for transformers < 5.24
        assert "cache=cache" in code
        code = code.replace("cache=cache", "past_key_values=cache")
    return code


def printed_block() -> list[str]:
    """The lines the README says the quick start prints (the plain block after the code)."""
    section = (REPO / "README.md").read_text().split("## Quick start", 1)[1]
    after_code = re.split(r"```python\n.*?```", section, maxsplit=1, flags=re.S)[1]
    match = re.search(r"\n```\n(.*?)```", after_code, re.S)
    assert match, "the README's quick start shows no printed block"
    return match.group(1).strip().splitlines()


def _needs_smollm2():
    pytest.importorskip("gguf")
    from heterocache.models import smollm2_path

    try:
        smollm2_path()
    except FileNotFoundError as err:  # pragma: no cover - CI installs it
        pytest.skip(str(err))


def _no_deprecation(stderr: str) -> None:
    assert "FutureWarning" not in stderr and "deprecated" not in stderr.lower(), stderr[-2000:]


@pytest.mark.slow
def test_readme_quick_start_runs_as_pasted(tmp_path):
    _needs_smollm2()
    script = tmp_path / "quick_start.py"
    script.write_text(quick_start_code())
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=ENV, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if line.strip()}
    assert set(lines) == {"FullKVCache", "HeteroCache", "SnapKVCache"}, result.stdout
    assert "7319" in lines["FullKVCache"] and "7319" in lines["HeteroCache"], result.stdout
    # The README shows what a run prints, to the byte (answers and KV sizes): update it with the output.
    assert result.stdout.strip().splitlines() == printed_block(), result.stdout
    _no_deprecation(result.stderr)


@pytest.mark.slow
def test_demo_runs_with_threads_and_no_deprecation_warning():
    _needs_smollm2()
    result = subprocess.run(
        [sys.executable, "examples/quickstart.py", "--tokens", "800", "--max-new-tokens", "8", "--threads", "1"],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("answer:") == 2 and "(correct)" in result.stdout, result.stdout
    _no_deprecation(result.stderr)


def test_the_readme_method_table_is_the_registry_s():
    """The table between the markers is ``describe_methods()`` (regenerate it with
    ``python -c "from heterocache.engine.registry import describe_methods as d; print(d(True))"``)."""
    from heterocache.engine.registry import describe_methods

    readme = (REPO / "README.md").read_text()
    match = re.search(r"<!-- methods:start -->\n(.*?)\n<!-- methods:end -->", readme, re.S)
    assert match, "the README has no <!-- methods:start --> ... <!-- methods:end --> block"
    assert match.group(1).strip() == describe_methods(builtin_only=True).strip()
