"""Golden test: every registered method's exact behaviour on the real SmolLM2-135M-Instruct.

``golden_smollm2.json`` (written by ``make_golden.py``) holds, per entry
``"<method>@<budget>/<mode>"``, the greedy tokens and, for ragged caches, the stored tokens per
layer and the device/host bytes after generation. This test recomputes every entry through the
same function (``golden_cases.compute_entry``) and requires exact equality, so that refactors
(moving files, rewriting a method's module) provably change nothing. A new method fails until the
file is regenerated. Exact equality assumes the machine type and library versions the file was
made with (recorded under "versions" and named in a failure's message when they differ here): a
float-level difference elsewhere can flip a greedy token or a kept position.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # pytest's default import mode puts it there; other modes may not
    sys.path.insert(0, str(HERE))

import golden_cases as G  # noqa: E402

GOLDEN = HERE / "golden_smollm2.json"
CASES = G.cases()

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def golden() -> dict:
    assert GOLDEN.exists(), f"{GOLDEN.name} is missing: {G.MAKE_HINT}"
    return json.loads(GOLDEN.read_text())


def test_every_method_is_covered(golden):
    from heterocache.engine.registry import get_method, list_methods

    assert golden["config"] == G.config(), (
        f"the golden file was made with other settings than golden_cases.py's: {golden['config']} != {G.config()}; "
        f"{G.MAKE_HINT}"
    )
    covered = {G.entry_method(key) for key in golden["entries"]}
    uncovered = [m for m in list_methods() if get_method(m).builtin and m not in covered]
    assert not uncovered, f"method(s) {uncovered} registered but not in {GOLDEN.name}: {G.MAKE_HINT}"
    expected = {key for key, *_ in CASES}
    missing, stale = sorted(expected - set(golden["entries"])), sorted(set(golden["entries"]) - expected)
    assert not missing and not stale, (
        f"{GOLDEN.name} lacks entries {missing} and has entries nothing computes {stale}: {G.MAKE_HINT}"
    )


@pytest.mark.parametrize(("key", "spec", "budget", "mode"), CASES, ids=[case[0] for case in CASES])
def test_entry_is_unchanged(smollm2, golden, key, spec, budget, mode):
    model, tokenizer = smollm2
    expected = golden["entries"].get(key)
    if expected is None:
        pytest.fail(f"{key}: no golden entry in {GOLDEN.name}: {G.MAKE_HINT}", pytrace=False)
    actual = G.compute_entry(model, tokenizer, golden["prompts"], spec, budget, mode)
    problems = G.compare_entry(key, expected, actual)
    if problems:
        made, here = golden.get("versions"), G.environment()
        note = "" if made == here else f"\n(Note: the file was made with {made}, this run has {here}.)"
        pytest.fail(f"{key} differs from {GOLDEN.name}:\n  " + "\n  ".join(problems)
                    + f"\nIf the change is intended, {G.MAKE_HINT}{note}", pytrace=False)
