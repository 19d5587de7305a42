"""Oracle: with nothing compressed, the ragged engine gives exactly DynamicCache + sdpa's tokens."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from helpers import tiny_model
from heterocache import FullKVCache, SnapKVCache
from heterocache._compat import cache_kwarg


def _generate(model, ids, cache, attn, **kwargs):
    model.set_attn_implementation(attn)
    kwargs.setdefault("max_new_tokens", 24)
    kwargs.setdefault("do_sample", False)
    return model.generate(ids, **cache_kwarg(model, cache), pad_token_id=0, **kwargs)


def test_greedy_tokens_equal_dynamic_cache(arch):
    model = tiny_model(arch)
    ids = torch.randint(1, 256, (1, 57), generator=torch.Generator().manual_seed(1))
    ref = _generate(model, ids, DynamicCache(), "sdpa")
    out = _generate(model, ids, FullKVCache(), "heterocache")
    assert torch.equal(out, ref)


def test_sampling_tokens_equal_dynamic_cache(arch):
    model = tiny_model(arch)
    ids = torch.randint(1, 256, (1, 33), generator=torch.Generator().manual_seed(2))
    torch.manual_seed(123)
    ref = _generate(model, ids, DynamicCache(), "sdpa", do_sample=True, top_k=20)
    torch.manual_seed(123)
    out = _generate(model, ids, FullKVCache(), "heterocache", do_sample=True, top_k=20)
    assert torch.equal(out, ref)


def test_batch_with_left_padding_equals_dynamic_cache(arch):
    model = tiny_model(arch)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 256, (2, 40), generator=g)
    mask = torch.ones_like(ids)
    ids[1, :11] = 0  # row 1 is 11 tokens shorter, left-padded
    mask[1, :11] = 0
    ref = _generate(model, ids, DynamicCache(), "sdpa", attention_mask=mask)
    cache = FullKVCache()
    out = _generate(model, ids, cache, "heterocache", attention_mask=mask)
    assert torch.equal(out, ref)
    # Padding is never stored: row 1 holds 11 tokens fewer than row 0 in every head.
    for lengths in cache.stored_tokens():
        assert torch.equal(lengths[0] - lengths[1], torch.full_like(lengths[0], 11))


def test_multi_turn_reuse_equals_dynamic_cache(arch):
    model = tiny_model(arch)
    g = torch.Generator().manual_seed(4)
    turn1 = torch.randint(1, 256, (1, 48), generator=g)
    question = torch.randint(1, 256, (1, 9), generator=g)

    def two_turns(cache, attn):
        first = _generate(model, turn1, cache, attn, max_new_tokens=10)
        return _generate(model, torch.cat([first, question], dim=1), cache, attn, max_new_tokens=12)

    ref = two_turns(DynamicCache(), "sdpa")
    cache = FullKVCache()
    out = two_turns(cache, "heterocache")
    assert torch.equal(out, ref)
    assert cache.get_seq_length() == out.shape[1] - 1


def test_multi_turn_batch_with_padding_equals_dynamic_cache():
    model = tiny_model("llama")
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, 256, (2, 30), generator=g)
    mask = torch.ones_like(ids)
    ids[0, :5], mask[0, :5] = 0, 0

    def two_turns(cache, attn):
        first = _generate(model, ids, cache, attn, attention_mask=mask, max_new_tokens=6)
        more = torch.randint(1, 256, (2, 7), generator=torch.Generator().manual_seed(6))
        ids2 = torch.cat([first, more], dim=1)
        mask2 = torch.cat([mask, torch.ones(2, ids2.shape[1] - mask.shape[1], dtype=mask.dtype)], dim=1)
        return _generate(model, ids2, cache, attn, attention_mask=mask2, max_new_tokens=8)

    assert torch.equal(two_turns(FullKVCache(), "heterocache"), two_turns(DynamicCache(), "sdpa"))


def test_beam_search_equals_dynamic_cache():
    model = tiny_model("llama")
    ids = torch.randint(1, 256, (2, 25), generator=torch.Generator().manual_seed(7))
    ref = _generate(model, ids, DynamicCache(), "sdpa", num_beams=3, max_new_tokens=12)
    out = _generate(model, ids, FullKVCache(), "heterocache", num_beams=3, max_new_tokens=12)
    assert torch.equal(out, ref)


def test_crop_removes_the_last_tokens_like_dynamic_cache():
    model = tiny_model("llama")
    ids = torch.randint(1, 256, (1, 30), generator=torch.Generator().manual_seed(8))
    nxt = torch.randint(1, 256, (1, 1), generator=torch.Generator().manual_seed(9))
    logits = {}
    for name, cache in (("dyn", DynamicCache()), ("ours", FullKVCache())):
        model.set_attn_implementation("sdpa" if name == "dyn" else "heterocache")
        with torch.no_grad():
            model(ids, **cache_kwarg(model, cache))
            cache.crop(-4)
            assert cache.get_seq_length() == 26
            logits[name] = model(nxt, **cache_kwarg(model, cache)).logits
    torch.testing.assert_close(logits["ours"], logits["dyn"], rtol=1e-4, atol=1e-5)


def test_batch_repeat_and_select_match_dynamic_cache():
    model = tiny_model("llama")
    ids = torch.randint(1, 256, (2, 20), generator=torch.Generator().manual_seed(10))
    nxt = torch.randint(1, 256, (4, 1), generator=torch.Generator().manual_seed(11))
    logits = {}
    for name, cache in (("dyn", DynamicCache()), ("ours", FullKVCache())):
        model.set_attn_implementation("sdpa" if name == "dyn" else "heterocache")
        with torch.no_grad():
            model(ids, **cache_kwarg(model, cache))
            cache.batch_repeat_interleave(3)  # rows 0,0,0,1,1,1
            cache.batch_select_indices(torch.tensor([0, 3, 4, 1]))  # rows 0,1,1,0
            logits[name] = model(nxt, **cache_kwarg(model, cache)).logits
    torch.testing.assert_close(logits["ours"], logits["dyn"], rtol=1e-4, atol=1e-5)


def test_compressed_cache_uses_fewer_tokens_but_keeps_logical_length():
    model = tiny_model("llama")
    ids = torch.randint(1, 256, (1, 200), generator=torch.Generator().manual_seed(12))
    cache = SnapKVCache(budget=0.25)
    out = _generate(model, ids, cache, "heterocache", max_new_tokens=5)
    assert cache.get_seq_length() == out.shape[1] - 1
    for lengths in cache.stored_tokens():
        assert torch.equal(lengths, torch.full_like(lengths, 50 + 4))  # round(0.25*200) + 4 decoded


@pytest.mark.slow
def test_smollm2_2k_prompt_equals_dynamic_cache(smollm2):
    model, tokenizer = smollm2
    text = " ".join(f"Item {i} is stored in box {i * 7 % 101}." for i in range(400))
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :2048]
    assert ids.shape[1] == 2048
    ref = _generate(model, ids, DynamicCache(), "sdpa", max_new_tokens=16)
    out = _generate(model, ids, FullKVCache(), "heterocache", max_new_tokens=16)
    model.set_attn_implementation("heterocache")
    assert torch.equal(out, ref)
