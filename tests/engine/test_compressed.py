"""The compressed path end to end: stored tokens follow the policy's plan; answers survive."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import DynamicCache

from helpers import tiny_model
from heterocache import SnapKVCache
from heterocache._compat import cache_kwarg
from heterocache.methods.snapkv import SnapKVPolicy
from heterocache.policy.base import PrefillContext
from heterocache.policy.budget import tokens_for_budget


@pytest.mark.parametrize("budget", [0.1, 0.25, 0.5, 1.0])
def test_memory_report_tokens_equal_plan_per_row_and_head(arch, budget):
    model = tiny_model(arch)
    ids = torch.randint(1, 256, (2, 120), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    ids[0, :37], mask[0, :37] = 0, 0
    cache = SnapKVCache(budget=budget)
    with torch.no_grad():
        model(ids, attention_mask=mask, **cache_kwarg(model, cache))
    cache.end_prompt()  # a prompt prefilled without generating (docs/prefill.md)
    plan = tokens_for_budget(budget, mask.sum(-1))  # per row, every head
    report = cache.memory_report()
    assert len(report.layers) == model.config.num_hidden_layers
    for layer in report.layers:
        expected = plan[:, None].expand(2, model.config.num_key_value_heads).tolist()
        assert layer.stored_tokens == expected
        assert layer.roles == ["compressed"] * model.config.num_key_value_heads
    assert report.device_used_bytes < report.dynamic_bytes or budget == 1.0


def test_snapkv_keeps_window_and_most_attended_tokens():
    # One KV head, one query head; the window query (token 11) attends most to token 3, then 7.
    L, D = 12, 4
    key = torch.zeros(1, 1, L, D)
    key[0, 0, 3, 0], key[0, 0, 7, 0] = 10.0, 5.0
    query = torch.zeros(1, 1, L, D)
    query[0, 0, -1, 0] = 1.0
    ctx = PrefillContext(0, query, key, key.clone(), torch.ones(1, L, dtype=torch.bool), scaling=1.0)
    policy = SnapKVPolicy(budget=0.25, window=1, kernel=1)  # keeps round(0.25 * 12) = 3 tokens
    keep = policy.select(ctx, policy.plan(ctx))
    assert torch.nonzero(keep[0, 0]).flatten().tolist() == [3, 7, 11]


def test_budget_one_gives_dynamic_cache_tokens(arch):
    model = tiny_model(arch)
    ids = torch.randint(1, 256, (1, 64), generator=torch.Generator().manual_seed(3))
    model.set_attn_implementation("sdpa")
    ref = model.generate(ids, max_new_tokens=16, do_sample=False, **cache_kwarg(model, DynamicCache()))
    model.set_attn_implementation("heterocache")
    out = model.generate(ids, max_new_tokens=16, do_sample=False, **cache_kwarg(model, SnapKVCache(budget=1.0)))
    assert torch.equal(out, ref)


_SUBJECTS = ["The river", "An old farmer", "The library", "A quiet village", "The northern road", "Our teacher",
             "The harbour", "A small bakery", "The council", "The forest path"]
_VERBS = ["was known for", "slowly changed", "often welcomed", "rarely mentioned", "carefully described",
          "quietly protected", "gladly shared", "once rebuilt"]
_OBJECTS = ["its long winter evenings.", "the smell of fresh bread.", "stories about distant mountains.",
            "the colours of autumn leaves.", "a bridge made of grey stone.", "visitors from the valley.",
            "songs about the sea.", "the careful work of many hands."]


def _needle_prompt(tokenizer, seed=0, sentences=70):
    """A ~800-token chat prompt: varied filler sentences with one code hidden in the middle half."""
    rng = random.Random(seed)
    text = [f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}" for _ in range(sentences)]
    code = str(rng.randint(1000, 9999))
    text.insert(rng.randint(sentences // 4, 3 * sentences // 4), f"The secret code of the vault is {code}.")
    content = " ".join(text) + "\n\nWhat is the secret code of the vault? Answer with the number."
    messages = [{"role": "user", "content": content}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    return inputs, code


@pytest.mark.slow
def test_smollm2_finds_the_needle_with_compressed_cache(smollm2):
    # SnapKV's paper window (32) loses this needle on the 135M model at budgets <= 0.4 (measured:
    # 0/4 prompts at 0.25); a window on the last few tokens keeps it. The test pins a setting that
    # works to prove the compressed path end to end, not SnapKV's quality.
    model, tokenizer = smollm2
    inputs, code = _needle_prompt(tokenizer, seed=0)
    assert inputs["input_ids"].shape[1] > 700
    cache = SnapKVCache(budget=0.5, window=8)
    out = model.generate(**inputs, **cache_kwarg(model, cache), max_new_tokens=14, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert code in answer
    report = cache.memory_report()
    assert report.device_used_bytes < 0.6 * report.dynamic_bytes
