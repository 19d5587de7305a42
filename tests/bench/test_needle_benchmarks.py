"""Helpers of benchmarks/needle_coverage.py (the needle's value span, each compressed head's share of it) and
benchmarks/answer_likelihood.py (teacher-forced answer log-probability)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import benchmark_module, tiny_model
from heterocache import HeteroCache
from heterocache._compat import cache_kwarg
from heterocache.profile import Role
from heterocache.profile.testing import toy_profile

pytestmark = pytest.mark.usefixtures("one_thread")


def _bench():
    return benchmark_module("needle_coverage")


def test_value_span_is_the_first_occurrence_and_missing_values_raise():
    bench = _bench()
    assert bench.value_span([5, 1, 2, 3, 9, 1, 2, 3], [1, 2, 3]) == range(1, 4)
    with pytest.raises(ValueError, match="not in the prompt"):
        bench.value_span([1, 2, 4], [2, 3])


def test_head_coverage_is_each_compressed_heads_kept_share_of_the_span():
    bench = _bench()
    model = tiny_model("llama", num_hidden_layers=3, hidden_size=128, num_attention_heads=8,
                       num_key_value_heads=4, head_dim=16)
    profile = toy_profile()
    L = 96
    ids = torch.randint(1, 256, (1, L), generator=torch.Generator().manual_seed(0))
    cache = HeteroCache(profile, budget=0.6)
    with torch.inference_mode():
        model(input_ids=ids, use_cache=True, **cache_kwarg(model, cache))
        cache.end_prompt()
    span = range(30, 40)
    got = bench.head_coverage(cache, span)
    # The same from the stored positions, head by head in (layer, head) order.
    want = []
    for layer_idx, layer in enumerate(cache.layers):
        for h in range(layer.store.num_heads):
            if Role(int(profile.roles[layer_idx, h])) in (Role.ANCHOR, Role.SATELLITE):
                kept = set(layer.store.segment(h)[2].tolist())
                want.append(sum(p in kept for p in span) / len(span))
    assert len(got) == len(profile.heads("anchor")) + len(profile.heads("satellite"))
    np.testing.assert_allclose(got, want)
    assert 0 < got.mean() < 1  # compressed heads keep part of the prompt at this budget
    full = bench.head_coverage(cache, range(L - 1, L))  # the last prompt token is always kept
    assert (full == 1).all()


def _answer_bench():
    return benchmark_module("answer_likelihood")


def test_answer_scores_equal_the_full_sequence_log_probabilities():
    from transformers import DynamicCache

    bench = _answer_bench()
    assert bench.parse_method("heterocache:kernel=15@0.25") == ("heterocache:kernel=15", 0.25)
    assert bench.parse_method("dynamic") == ("dynamic", None)
    model = tiny_model("llama")
    g = torch.Generator().manual_seed(1)
    prompt, question = torch.randint(1, 256, (1, 40), generator=g), torch.randint(1, 256, (1, 5), generator=g)
    answer = [7, 19, 3]
    with torch.inference_mode():
        whole = torch.cat([prompt, question, torch.tensor([answer])], 1)
        lp = torch.log_softmax(model(input_ids=whole).logits.float(), -1)[0]
    first = prompt.shape[1] + question.shape[1] - 1  # the position predicting the first answer token
    want = sum(float(lp[first + i, t]) for i, t in enumerate(answer))
    argmax_ok = all(int(lp[first + i].argmax()) == t for i, t in enumerate(answer))
    cache = DynamicCache()
    with torch.inference_mode():
        model(input_ids=prompt, use_cache=True, **cache_kwarg(model, cache))
    got, exact = bench.answer_scores(model, cache, answer, new_ids=question)
    assert got == pytest.approx(want, abs=1e-4) and exact == argmax_ok
    # The argmax answer is an exact teacher-forced match.
    greedy = [int(lp[first + i].argmax()) for i in range(3)]
    cache = DynamicCache()
    with torch.inference_mode():
        model(input_ids=prompt, use_cache=True, **cache_kwarg(model, cache))
    _, exact = bench.answer_scores(model, cache, greedy[:1], new_ids=question)
    assert exact


def test_answer_summary_rows_keep_budgets_apart():
    bench = _answer_bench()

    def rec(m, b, i, s):
        return {"method": m, "budget": b, "task": "t", "length": 8, "mode": "query_aware",
                "sample_idx": i, "metrics": {"score": s, "exact": s > -1}}

    records = [rec("dynamic", 1.0, i, -0.5) for i in range(2)]
    records += [rec("heterocache", 0.25, 0, -2.0), rec("heterocache", 0.25, 1, -1.0)]
    records += [rec("heterocache", 0.5, 0, -0.5), rec("heterocache", 0.5, 1, -0.7)]
    rows = bench.summary_rows(records, [("dynamic", None), ("heterocache", 0.25), ("heterocache", 0.5)],
                              ["query_aware"], 8, ["t"])
    assert [r["samples"] for r in rows] == [2, 2, 2]
    assert rows[1]["mean_logprob"] == -1.5 and rows[1]["logprob_minus_full"] == -1.0
    assert rows[2]["mean_logprob"] == -0.6 and rows[2]["teacher_forced_exact"] == 1.0
    assert rows[2]["logprob_minus_full"] == pytest.approx(-0.1)
