"""StreamingLLM: attention sinks + a recent window that slides while decoding."""

from __future__ import annotations

import pytest
import torch
from test_policies_common import EachStep, padded_batch
from transformers import LogitsProcessorList

from helpers import tiny_model
from heterocache import StreamingLLMCache
from heterocache._compat import cache_kwarg
from heterocache.methods.streamingllm import StreamingLLMPolicy
from heterocache.policy.base import PrefillContext


def _ctx(valid):
    B, L = valid.shape
    x = torch.zeros(B, 2, L, 4)
    return PrefillContext(0, x, x[:, :1], x[:, :1], valid, scaling=1.0)


def test_keeps_first_tokens_and_last_window_of_each_row():
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[1, :3] = False  # row 1: 9 real tokens at 3..11
    policy = StreamingLLMPolicy(budget_tokens=6, sinks=2)
    ctx = _ctx(valid)
    keep = policy.select(ctx, policy.plan(ctx))
    assert torch.nonzero(keep[0, 0]).flatten().tolist() == [0, 1, 8, 9, 10, 11]
    assert torch.nonzero(keep[1, 0]).flatten().tolist() == [3, 4, 8, 9, 10, 11]


def test_budget_smaller_than_the_sinks_still_keeps_the_newest_token():
    policy = StreamingLLMPolicy(budget_tokens=3, sinks=4)
    ctx = _ctx(torch.ones(1, 10, dtype=torch.bool))
    keep = policy.select(ctx, policy.plan(ctx))
    assert torch.nonzero(keep[0, 0]).flatten().tolist() == [0, 1, 9]


def test_window_slides_while_decoding_and_sinks_stay():
    model = tiny_model("llama")
    ids, mask = padded_batch((40, 31))
    cache = StreamingLLMCache(budget_tokens=10)  # 4 sinks + 6 recent

    def check():
        cache.end_prompt()  # after the prefill forward the prompt is still open (the first step would end it)
        for layer in cache.layers:
            seen = layer.seen
            for row, n in enumerate((40, 31)):
                pad = 40 - n
                expected = [pad, pad + 1, pad + 2, pad + 3] + list(range(seen - 6, seen))
                for h in range(2):
                    got = layer.store.segment(row * 2 + h)[2].tolist()
                    assert got == expected, (layer.layer_idx, row, h, got)
                    steps.append(1)

    steps = []
    model.generate(ids, attention_mask=mask, **cache_kwarg(model, cache), max_new_tokens=12, do_sample=False,
                   pad_token_id=0, logits_processor=LogitsProcessorList([EachStep(check)]))
    assert len(steps) == 12 * 3 * 2 * 2


def test_prefill_only_variant_keeps_decoded_tokens():
    model = tiny_model("llama")
    ids, mask = padded_batch((40, 31))
    cache = StreamingLLMCache(budget=0.25, evict_during_decode=False)
    model.generate(ids, attention_mask=mask, **cache_kwarg(model, cache), max_new_tokens=5, do_sample=False,
                   pad_token_id=0)
    for lengths in cache.stored_tokens():
        assert lengths.tolist() == [[14, 14], [12, 12]]  # round(0.25 n) + 4 decoded tokens
    assert cache.is_croppable


@pytest.mark.parametrize("sinks", [-1, 2.5, True])
def test_invalid_sinks_are_rejected(sinks):
    with pytest.raises(ValueError, match="sinks"):
        StreamingLLMPolicy(sinks=sinks)
