"""One prefill forward for every cell of a sample: the same tokens as one generate() per cache."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import DynamicCache

import heterocache
from heterocache.engine.registry import make_cache
from heterocache.eval import EvalConfig, run_eval
from heterocache.eval.batched_decode import DecodeStart, greedy_continue_many
from heterocache.eval.generation import generate_answer
from heterocache.eval.prompting import PromptFormatter
from heterocache.eval.shared_prefill import (
    PrefillTarget,
    eos_ids,
    greedy_continue,
    prefill_many,
    supports_shared_prefill,
)
from heterocache.eval.tasks import get_task
from heterocache.eval.toy import tiny_llama
from heterocache.profile.clustering import budget_ratios
from heterocache.profile.testing import toy_profile

LENGTH = 600


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    # float64: the shared and the per-cache paths sum in different orders at prefill (one forward
    # over the whole prompt vs the context alone); greedy tokens must not hinge on that noise.
    return heterocache.enable(tiny_llama(dtype=torch.float64))


def _tiny_profile():
    """Pivot + satellite in layer 0, anchor + volatile in layer 1 (tiny_llama: 2 layers x 2 KV heads)."""
    roles = torch.tensor([[3, 4], [1, 2]])
    stability = torch.tensor([[0.3, 0.6], [0.8, 0.2]])
    return toy_profile(
        roles=roles, stability=stability, budget_ratios=budget_ratios(roles, stability),
        pivots=torch.tensor([[-1, 0], [-1, -1]]), num_attention_heads=4,
    )


METHODS = [
    ("dynamic", None, {}),
    ("fullkv", None, {}),
    ("snapkv", 0.3, {}),
    ("h2o", 0.3, {}),
    ("streamingllm", 0.3, {}),
    ("pyramidkv", 0.3, {}),
    ("cake", 0.3, {}),
    ("heterocache", 0.7, {"profile": _tiny_profile()}),
]


def test_every_method_gives_the_tokens_of_its_own_generate_call(model, tokenizer):
    formatter = PromptFormatter(tokenizer)
    (sample,) = get_task("niah_multikey").samples(formatter, LENGTH, 1, seed=1)
    prompt = formatter.encode(sample)
    ids = torch.tensor([prompt.input_ids])
    stop = eos_ids(model, tokenizer)
    for mode, tokens in (("query_aware", prompt.length), ("query_agnostic", prompt.context_len)):
        caches = [make_cache(m, b, model, **kw) for m, b, kw in METHODS]
        logits = prefill_many(model, ids, [PrefillTarget(c, tokens) for c in caches])
        for (method, budget, kw), cache in zip(METHODS, caches):
            if mode == "query_aware":
                new = greedy_continue(model, cache, 6, stop, logits=logits)
            else:
                new = greedy_continue(model, cache, 6, stop, new_ids=ids[:, tokens:])
            ref = generate_answer(model, tokenizer, prompt, make_cache(method, budget, model, **kw), mode, 6)
            assert (tokenizer.decode(new, skip_special_tokens=True), len(new)) == (ref.text, ref.new_tokens), (
                mode, method
            )
            assert cache.get_seq_length() == prompt.length + len(new) - 1


@pytest.mark.parametrize("max_batch", [64, 5])
def test_batched_decoding_gives_the_tokens_of_one_greedy_continue_per_cache(model, tokenizer, max_batch):
    formatter = PromptFormatter(tokenizer)
    (sample,) = get_task("niah_multikey").samples(formatter, LENGTH, 1, seed=2)
    prompt = formatter.encode(sample)
    ids = torch.tensor([prompt.input_ids])
    question = ids[:, prompt.context_len :]
    # Rows at two logical lengths (aware / agnostic), different limits, and a stop id that ends some early.
    plan = [(m, b, kw, mode, 4 + i % 5) for i, (m, b, kw) in enumerate(METHODS) for mode in ("aware", "agnostic")]

    def filled():
        caches = [make_cache(m, b, model, **kw) for m, b, kw, _, _ in plan]
        tokens = [prompt.length if mode == "aware" else prompt.context_len for *_, mode, _ in plan]
        logits = prefill_many(model, ids, [PrefillTarget(c, n) for c, n in zip(caches, tokens)])
        return caches, logits

    caches, logits = filled()
    stop = {int(logits.argmax(-1)[0]) + 1}  # some row will likely emit it; either way the lists must match
    one_by_one = [
        greedy_continue(model, c, n, stop, logits=logits) if mode == "aware"
        else greedy_continue(model, c, n, stop, new_ids=question)
        for c, (*_, mode, n) in zip(caches, plan)
    ]
    lengths_after = [c.get_seq_length() for c in caches]
    caches, logits = filled()
    starts = [
        DecodeStart(c, logits=logits, max_new_tokens=n) if mode == "aware"
        else DecodeStart(c, new_ids=question, max_new_tokens=n)
        for c, (*_, mode, n) in zip(caches, plan)
    ]
    together = greedy_continue_many(model, starts, stop, max_batch=max_batch)
    assert together == one_by_one
    assert [c.get_seq_length() for c in caches] == lengths_after
    assert len({len(t) for t in together}) > 1  # the rows really finished at different steps


def test_batched_decoding_refuses_bad_starts(model):
    ids = torch.randint(0, 250, (1, 30))
    cache = make_cache("snapkv", 0.5, model)
    logits = prefill_many(model, ids, [PrefillTarget(cache, 30)])
    with pytest.raises(ValueError, match="exactly one"):
        greedy_continue_many(model, [DecodeStart(cache)], set())
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_continue_many(model, [DecodeStart(cache, logits=logits, max_new_tokens=0)], set())
    with pytest.raises(ValueError, match="max_batch"):
        greedy_continue_many(model, [DecodeStart(cache, logits=logits)], set(), max_batch=0)
    with pytest.raises(ValueError, match="decode_batch"):
        EvalConfig(decode_batch=0)


def test_a_compressed_cache_filled_by_the_fan_out_stores_its_plan(model):
    ids = torch.randint(0, 250, (1, 200), generator=torch.Generator().manual_seed(0))
    snap, full = make_cache("snapkv", 0.25, model), make_cache("fullkv", None, model)
    prefill_many(model, ids, [PrefillTarget(snap, 200), PrefillTarget(full, 150)])
    assert all(int(n) == 50 for layer in snap.stored_tokens() for n in layer.flatten())
    assert all(int(n) == 150 for layer in full.stored_tokens() for n in layer.flatten())
    assert snap.get_seq_length() == 200 and full.get_seq_length() == 150


def test_unsupported_targets_and_bad_calls_are_refused(model, tokenizer):
    ids = torch.randint(0, 250, (1, 40))
    with pytest.raises(ValueError, match="cannot fill"):
        prefill_many(model, ids, [PrefillTarget(object(), 40)])
    with pytest.raises(ValueError, match="41 tokens"):
        prefill_many(model, ids, [PrefillTarget(DynamicCache(), 41)])
    sdpa_model = tiny_llama()
    assert not supports_shared_prefill(sdpa_model, DynamicCache())
    with pytest.raises(ValueError, match="exactly one"):
        greedy_continue(model, DynamicCache(), 3, set())


def test_the_runner_shares_the_prefill_and_matches_one_generate_per_cell(model, tokenizer, tmp_path, monkeypatch):
    grid = dict(
        methods=("dynamic", "snapkv", "h2o"), budgets=(0.3,), tasks=("niah_single", "niah_multikey"), lengths=(LENGTH,),
        num_samples=2, max_new_tokens=5,
    )
    forwards = []
    original = model.forward

    def counting_forward(*args, **kwargs):
        forwards.append(kwargs["input_ids"].shape[1])
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "forward", counting_forward)
    shared = run_eval(model, tokenizer, EvalConfig(**grid), tmp_path / "shared", progress=False, plots=False)
    # 2 tasks x 2 samples, one long forward each; everything after it is a question or one token
    assert sum(n >= 300 for n in forwards) == 4
    records = {(r["task"], r["sample_idx"], r["mode"], r["method"]): r for r in shared.records}
    assert len(records) == 2 * 2 * 2 * 3 and all(r["shared_prefill"] == 6 for r in records.values())
    assert all(r["batched_decode"] == 6 for r in records.values())
    separate = run_eval(
        model, tokenizer, EvalConfig(**grid, shared_prefill=False), tmp_path / "separate", progress=False,
        plots=False,
    )
    unbatched = run_eval(
        model, tokenizer, EvalConfig(**grid, decode_batch=1), tmp_path / "unbatched", progress=False, plots=False
    )
    for r in separate.records + unbatched.records:
        twin = records[(r["task"], r["sample_idx"], r["mode"], r["method"])]
        assert (twin["prediction"], twin["new_tokens"]) == (r["prediction"], r["new_tokens"])
        assert r["batched_decode"] == 0 and r["shared_prefill"] == (6 if r in unbatched.records else 0)
    line = json.loads((tmp_path / "shared" / "records.jsonl").read_text().splitlines()[0])
    assert line["prefill_seconds"] > 0 and line["seconds"] >= line["prefill_seconds"]


def test_fidelity_from_a_shared_prefill_equals_one_prefill_per_cache(model, tokenizer, tmp_path):
    from heterocache.eval import FidelityConfig

    fidelity = FidelityConfig(prefill_tokens=120, decode_tokens=10, num_samples=1)
    results = {}
    for shared in (True, False):
        config = EvalConfig(methods=("dynamic", "snapkv", "h2o"), budgets=(0.3,), tasks=(), fidelity=fidelity,
                            shared_prefill=shared)
        out = run_eval(model, tokenizer, config, tmp_path / str(shared), progress=False, plots=False)
        results[shared] = {r["method"]: r["metrics"] for r in out.records}
    assert results[True]["dynamic"]["kl"] == pytest.approx(0.0, abs=1e-9)
    assert results[True]["snapkv"]["kl"] > 1e-4
    for method, metrics in results[False].items():
        assert results[True][method]["kl"] == pytest.approx(metrics["kl"], rel=1e-6, abs=1e-9)
        assert results[True][method]["top1_agreement"] == metrics["top1_agreement"]
