"""The grid runner end to end on a tiny random Llama: modes, resume, outputs, fidelity."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

from helpers import RecordingCache
from heterocache.eval import EvalConfig, FidelityConfig, run_eval
from heterocache.eval.caches import dynamic_only_factory
from heterocache.eval.generation import generate_answer
from heterocache.eval.prompting import PromptFormatter
from heterocache.eval.tasks import get_task
from heterocache.eval.toy import tiny_llama

LENGTH = 700  # byte tokens: a short niah prompt
GRID = dict(tasks=("niah_single",), lengths=(LENGTH,), num_samples=2, max_new_tokens=3)


class ForgetfulCache(DynamicCache):
    """A lossy stand-in method: attention over the prompt is exact during prefill, but the prompt
    values it stores are zeroed, as if compression had thrown them away."""

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if key_states.shape[-2] > 1:  # a prefill chunk: answer with the truth, keep zeros
            keys, values = keys.clone(), values.clone()
            self.layers[layer_idx].values.zero_()
        return keys, values


def factory(method, budget, model):
    """Stand-in registry: "dynamic" is exact, "forget" is lossy at any budget."""
    return {"dynamic": DynamicCache, "forget": ForgetfulCache}[method]()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture
def counted(model, monkeypatch):
    """The model, with ``model.calls`` counting ``generate`` calls."""
    calls = []
    original = model.generate

    def generate(*args, **kwargs):
        calls.append(kwargs.get("cache", kwargs.get("past_key_values")))  # past_key_values before transformers 5.24
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "generate", generate)
    return model, calls


def _run(model, tokenizer, out, **overrides):
    config = EvalConfig(**{**GRID, "methods": ("dynamic", "forget"), "budgets": (0.25,), **overrides})
    return run_eval(model, tokenizer, config, out, make_cache=factory, progress=False, plots=False)


def test_query_agnostic_prefills_the_context_before_the_question_is_seen(model, tokenizer):
    formatter = PromptFormatter(tokenizer)
    (sample,) = get_task("niah_single").samples(formatter, LENGTH, 1, seed=0)
    prompt = formatter.encode(sample)
    aware, agnostic = RecordingCache(), RecordingCache()
    generate_answer(model, tokenizer, prompt, aware, "query_aware", max_new_tokens=3)
    generate_answer(model, tokenizer, prompt, agnostic, "query_agnostic", max_new_tokens=3)
    question = prompt.length - prompt.context_len
    assert aware.chunks == [prompt.length, 1, 1]
    assert agnostic.chunks == [prompt.context_len, question, 1, 1]


def test_with_the_full_cache_both_modes_give_the_same_answer(tokenizer):
    exact = tiny_llama(dtype=torch.float64)  # float64: no summation-order noise between the two paths
    formatter = PromptFormatter(tokenizer)
    for sample in get_task("niah_multikey").samples(formatter, LENGTH, 2, seed=1):
        prompt = formatter.encode(sample)
        aware = generate_answer(exact, tokenizer, prompt, DynamicCache(), "aware", max_new_tokens=6)
        agnostic = generate_answer(exact, tokenizer, prompt, DynamicCache(), "agnostic", max_new_tokens=6)
        assert aware.text == agnostic.text and aware.new_tokens == 6


def test_resume_skips_finished_cells(counted, tokenizer, tmp_path):
    model, calls = counted
    first = _run(model, tokenizer, tmp_path)
    # 2 samples x 2 modes x (full at 1.0 + forget at 0.25), each with a cache of its own
    assert len(calls) == first.ran == 8
    assert len({id(cache) for cache in calls}) == 8
    again = _run(model, tokenizer, tmp_path)
    assert len(calls) == 8 and again.ran == 0 and again.cells == first.cells
    _run(model, tokenizer, tmp_path, budgets=(0.25, 0.5))  # only forget@0.5 is new
    assert len(calls) == 8 + 4
    log = tmp_path / "records.jsonl"
    lines = log.read_text().splitlines()
    log.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])  # a crash cut the last line short
    _run(model, tokenizer, tmp_path, budgets=(0.25, 0.5))
    assert len(calls) == 13


def test_outputs_json_csv_plots_and_summary(model, tokenizer, tmp_path):
    config = EvalConfig(**{**GRID, "methods": ("dynamic", "forget"), "budgets": (0.25, 0.5)})
    result = run_eval(model, tokenizer, config, tmp_path, make_cache=factory, progress=False)
    payload = json.loads((tmp_path / "results.json").read_text())
    cells = payload["cells"]
    assert {(c["method"], c["budget"], c["mode"]) for c in cells} == {
        (m, b, mode)
        for m, b in [("dynamic", 1.0), ("forget", 0.25), ("forget", 0.5)]
        for mode in ("query_aware", "query_agnostic")
    }
    assert all(c["n"] == 2 and 0 <= c["score"] <= 100 and c["task"] == "niah_single" for c in cells)
    assert payload["config"]["budgets"] == [0.25, 0.5] and payload["meta"]["records"] == 12
    with open(tmp_path / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == len(cells)
    png = tmp_path / "plots" / "score_niah_single.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "niah_single" in result.summary and "forget" in result.summary
    record = json.loads((tmp_path / "records.jsonl").read_text().splitlines()[0])
    assert {"prediction", "answers", "prompt_tokens", "context_tokens", "seconds", "meta"} <= set(record)


def test_fidelity_of_the_full_cache_is_exact_and_a_lossy_cache_is_not(model, tokenizer, tmp_path):
    fidelity = FidelityConfig(prefill_tokens=96, decode_tokens=12, num_samples=2)
    config = EvalConfig(methods=("dynamic", "forget"), budgets=(0.5,), tasks=(), fidelity=fidelity)
    result = run_eval(model, tokenizer, config, tmp_path, make_cache=factory, progress=False)
    cells = {c["method"]: c for c in result.cells}
    assert cells["dynamic"]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert cells["dynamic"]["top1_agreement"] == 1.0
    assert cells["forget"]["kl"] > 1e-3
    assert (cells["dynamic"]["task"], cells["dynamic"]["length"], cells["dynamic"]["n"]) == ("fidelity", 96, 2)
    assert (tmp_path / "plots" / "fidelity_96.png").exists()


def test_a_folder_with_another_seed_is_refused(model, tokenizer, tmp_path):
    _run(model, tokenizer, tmp_path, num_samples=1, modes=("aware",), methods=("dynamic",))
    with pytest.raises(ValueError, match="different setup"):
        _run(model, tokenizer, tmp_path, num_samples=1, modes=("aware",), methods=("dynamic",), seed=1)


def test_a_folder_with_fidelity_takes_task_runs_without_it_but_not_other_fidelity_settings(model, tokenizer, tmp_path):
    fidelity = FidelityConfig(prefill_tokens=64, decode_tokens=4, num_samples=1)
    _run(model, tokenizer, tmp_path, tasks=(), methods=("dynamic",), fidelity=fidelity)
    more = _run(model, tokenizer, tmp_path, num_samples=1, modes=("aware",), methods=("dynamic",))
    assert more.ran == 1 and {r["task"] for r in more.records} == {"fidelity", "niah_single"}
    with pytest.raises(ValueError, match="different setup"):
        _run(model, tokenizer, tmp_path, tasks=(), methods=("dynamic",),
             fidelity=FidelityConfig(prefill_tokens=64, decode_tokens=8, num_samples=1))


def test_lengths_beyond_the_model_context_are_refused(model, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="context"):
        _run(model, tokenizer, tmp_path, lengths=(model.config.max_position_embeddings,))


def test_config_validates_budgets_and_modes_and_expands_groups():
    with pytest.raises(ValueError):
        EvalConfig(budgets=(0.0,))
    with pytest.raises(ValueError):
        EvalConfig(modes=("sideways",))
    config = EvalConfig(
        tasks=("ruler",), modes=("aware", "agnostic"), methods=("dynamic", "snapkv"), budgets=(0.1, 0.2)
    )
    assert config.tasks == ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe")
    assert config.modes == ("query_aware", "query_agnostic")
    assert config.method_budgets() == [("dynamic", 1.0), ("snapkv", 0.1), ("snapkv", 0.2)]


def test_without_a_registry_only_the_full_cache_is_available(model):
    assert isinstance(dynamic_only_factory("dynamic", 0.5, model), DynamicCache)
    with pytest.raises(ValueError, match="snapkv"):
        dynamic_only_factory("snapkv", 0.5, model)


def test_dataset_tasks_run_all_rows_when_num_samples_is_zero(counted, tokenizer, tmp_path):
    model, calls = counted
    data = Path(__file__).resolve().parents[1] / "fixtures" / "eval"
    config = EvalConfig(
        methods=("dynamic",),
        tasks=("longbench/hotpotqa",),
        lengths=(1500,),
        modes=("aware",),
        num_samples=0,
        max_new_tokens=2,
        data_dir=str(data),
    )
    result = run_eval(model, tokenizer, config, tmp_path, make_cache=factory, progress=False, plots=False)
    assert len(calls) == 2 and [c["n"] for c in result.cells] == [2]
    run_eval(model, tokenizer, config, tmp_path, make_cache=factory, progress=False, plots=False)
    assert len(calls) == 2


def test_a_budget_the_method_cannot_meet_is_skipped_with_its_reason(model, tokenizer, tmp_path):
    from heterocache.methods.heterocache import HeteroCache
    from heterocache.profile.testing import toy_profile

    def with_hetero(method, budget, model):
        # toy profile: 2 of 12 heads volatile, so budget 0.1 is infeasible (it never reaches the model)
        return HeteroCache(toy_profile(), budget=budget) if method == "hetero" else factory(method, budget, model)

    config = EvalConfig(**{**GRID, "methods": ("dynamic", "hetero"), "budgets": (0.1,)})
    result = run_eval(model, tokenizer, config, tmp_path, make_cache=with_hetero, progress=False, plots=False)
    assert {r["method"] for r in result.records} == {"dynamic"}
    meta = json.loads((tmp_path / "results.json").read_text())["meta"]
    assert meta["skipped"][0]["method"] == "hetero" and "must exceed 0.1667" in meta["skipped"][0]["reason"]


def test_records_made_with_other_cache_settings_are_not_resumed_over(model, tokenizer, tmp_path):
    from heterocache.methods.heterocache import HeteroCache
    from heterocache.profile.testing import toy_profile

    def hetero(**options):
        def make(method, budget, model):
            return HeteroCache(toy_profile(), budget=budget, **options) if method == "hetero" \
                else factory(method, budget, model)
        return make

    from helpers import tiny_model

    small = tiny_model(vocab_size=260, num_hidden_layers=3, hidden_size=128, num_attention_heads=8,
                       num_key_value_heads=4, head_dim=16, max_position_embeddings=4096)  # the toy profile's shape
    config = EvalConfig(**{**GRID, "methods": ("dynamic", "hetero"), "budgets": (0.5,), "num_samples": 1})
    run = dict(progress=False, plots=False)
    first = run_eval(small, tokenizer, config, tmp_path, make_cache=hetero(refresh_interval=3), **run)
    settings = {r["method"]: r["settings"] for r in first.records}
    assert settings["dynamic"] == {"cache": "DynamicCache"}
    assert settings["hetero"]["policy"] == "HeteroCachePolicy"
    assert settings["hetero"]["options"]["refresh_interval"] == 3 and settings["hetero"]["options"]["budget"] == 0.5
    assert settings["hetero"]["options"]["profile"]["roles"] == {"anchor": 3, "pivot": 3, "satellite": 4, "volatile": 2}
    with pytest.raises(ValueError, match="other cache settings.*hetero@0.5"):
        run_eval(small, tokenizer, config, tmp_path, make_cache=hetero(), **run)
    again = run_eval(small, tokenizer, config, tmp_path, make_cache=hetero(refresh_interval=3), **run)
    assert again.ran == 0
    log = tmp_path / "records.jsonl"

    def rewrite_options(change):
        rows = [json.loads(line) for line in log.read_text().splitlines()]
        for r in rows:
            if "options" in r["settings"]:
                change(r["settings"]["options"])
        log.write_text("".join(json.dumps(r) + "\n" for r in rows))

    # Records written before an option existed: it counts as its default (the old behaviour) ...
    rewrite_options(lambda options: options.pop("inverse_stability"))
    assert run_eval(small, tokenizer, config, tmp_path, make_cache=hetero(refresh_interval=3), **run).ran == 0
    # ... so the same records are stale for a cache that sets it otherwise.
    with pytest.raises(ValueError, match="other cache settings"):
        run_eval(small, tokenizer, config, tmp_path, make_cache=hetero(refresh_interval=3, inverse_stability=False),
                 **run)
    # Records written while a since removed option existed agree at the value whose behaviour was
    # kept (anchor_offload: on exactly with turn_reselect="own") ...
    rewrite_options(lambda options: options.update(pooling="avg", turn_window=32, decision_lag=2,
                                                   anchor_offload=options["turn_reselect"] == "own"))
    assert run_eval(small, tokenizer, config, tmp_path, make_cache=hetero(refresh_interval=3), **run).ran == 0
    # ... and describe another cache at any other value.
    for retired in ({"pooling": "max"}, {"anchor_offload": False}, {"turn_window": 8}):
        rewrite_options(lambda options: options.update(retired))
        with pytest.raises(ValueError, match="other cache settings"):
            run_eval(small, tokenizer, config, tmp_path, make_cache=hetero(refresh_interval=3), **run)
        rewrite_options(lambda options: options.update(pooling="avg", turn_window=32, anchor_offload=True))


def test_pairs_skipped_by_an_earlier_run_stay_explained(tmp_path):
    from heterocache.eval.runner import _merged_skipped

    earlier = {"method": "heterocache", "budget": 0.1, "reason": "budget 0.1 is too small"}
    done = {"method": "snapkv", "budget": 0.1, "reason": "old"}
    (tmp_path / "results.json").write_text(json.dumps({"meta": {"skipped": [earlier, done]}}))
    now = {"method": "quest", "budget": 0.05, "reason": "new"}
    records = [{"method": "snapkv", "budget": 0.1}]  # measured since: no longer skipped
    assert _merged_skipped(tmp_path / "results.json", [now], records) == [now, earlier]
    assert _merged_skipped(tmp_path / "missing.json", [now], records) == [now]
