"""OmniKV on the engine: filter layers scaled to depth, the filter layer's choice by hand on tiny
tensors and its reuse by the layers behind it, dense layers, generate() on a left-padded batch and
in a second turn (with and without host offload), memory on device and host by hand, and the
decode-step rule (no host reads)."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from helpers import tiny_model
from heterocache import FullKVCache, OmniKVCache
from heterocache._compat import cache_kwarg
from heterocache.bench.diagnostics import count_decode_steps
from heterocache.methods.omnikv import OmniKVPolicy, scaled_filter_layers
from heterocache.policy.base import PrefillContext
from heterocache.store.ragged import RaggedKVStore

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = dict(num_hidden_layers=4, hidden_size=128, num_attention_heads=8, num_key_value_heads=4, head_dim=16)


# ---------------------------------------------------------------------------------------- layers
@pytest.mark.parametrize("depth,layers", [(32, (2, 8, 18)), (30, (2, 8, 17)), (28, (2, 7, 16)), (16, (1, 4, 9)),
                                          (4, (0, 1, 2)), (2, (0, 1)), (1, (0,))])
def test_filter_layers_scale_the_published_ones_to_the_depth(depth, layers):
    # l of 32 -> floor(l * depth / 32 + 1/2): 30 layers: 1.875 -> 2, 7.5 -> 8, 16.875 -> 17; 4: 0.25, 1, 2.25
    assert scaled_filter_layers(depth) == layers
    assert OmniKVPolicy().layers_for(depth) == layers


def test_roles_of_the_published_setting():
    policy = OmniKVPolicy()
    policy._resolve(32)
    roles = [policy.role(i) for i in range(32)]
    expected = [("dense", None)] * 2 + [("filter", None), ("dense", None)] + [("sparse", 2)] * 4
    expected += [("filter", None), ("dense", None)] + [("sparse", 8)] * 8
    expected += [("filter", None), ("dense", None)] + [("sparse", 18)] * 12
    assert roles == expected
    policy = OmniKVPolicy(filter_layers="1,3", dense_after_filter=0)
    policy._resolve(5)
    assert [policy.role(i) for i in range(5)] == [("dense", None), ("filter", None), ("sparse", 1),
                                                  ("filter", None), ("sparse", 3)]


# ------------------------------------------------------------------------- the choice, by hand
def _prefill(policy, keys, valid, groups=2):
    """One store per layer filled through the policy's prefill hooks from ``keys[i] [B, H, L, D]``."""
    stores = []
    for i, key in enumerate(keys):
        B, H, L, D = key.shape
        value = torch.randn(B, H, L, D, generator=torch.Generator().manual_seed(i))
        ctx = PrefillContext(i, torch.zeros(B, H * groups, L, D), key, value, valid, 1.0, num_layers=len(keys))
        keep = policy.select(ctx, policy.plan(ctx))
        store = RaggedKVStore(B, H, D, torch.float32, torch.device("cpu"), 4, 8)
        store.fill(key, value, keep, torch.arange(L))
        policy.on_prefill_done(i, store, ctx)
        stores.append(store)
    return stores


def _decode_step(policy, stores, query):
    """One decode step through every layer in order (the token at position 6 appended first)."""
    selections = []
    for i, store in enumerate(stores):
        B, H, D = store.num_rows, store.num_heads, store.head_dim
        store.begin_decode_append()
        store.append_decode(torch.full((B, H, 1, D), 0.5), torch.zeros(B, H, 1, D), torch.tensor([6]))
        selections.append(policy.decode_selection(i, store, query, 1.0))
    return selections


def _positions(store, selection, s):
    """Logical positions a segment attends to among its store's slots."""
    slots = selection.slots[s][selection.valid[s]]
    return sorted(store.pos[slots].tolist())


# Two query heads (one KV head): q0 = e0, q1 = e1, so a token's score is max(k_0, k_1).
QUERY = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(1, 2, 1, 2).expand(2, 2, 1, 2).contiguous()
FILTER1 = torch.stack([  # layer 1, [B=2, H=1, L=6, D=2]; row 1 is left-padded by 2 (padding never stored)
    torch.tensor([[0, 0], [5, 0], [0, 1], [0, 4], [2, 2], [1, 0]], dtype=torch.float),  # scores 0 5 1 4 2 1
    torch.tensor([[9, 9], [9, 9], [3, 0], [0, 0], [0, 2], [1, 1]], dtype=torch.float),  # (pad) 3 0 2 1
])[:, None]
FILTER3 = torch.stack([  # layer 3
    torch.tensor([[1, 0], [0, 0], [0, 2], [0, 0], [0, 0], [0, 6]], dtype=torch.float),  # scores 1 0 2 0 0 6
    torch.tensor([[9, 9], [9, 9], [0, 0], [2, 0], [0, 0], [0, 3]], dtype=torch.float),  # (pad) 0 2 0 3
])[:, None]
VALID = torch.tensor([[True] * 6, [False, False] + [True] * 4])


@pytest.mark.parametrize("kwargs,chosen", [
    # 2 tokens per row. Layer 1: positions 1, 3 (row 0) and 2, 4 (row 1's context tokens 0 and 2);
    # layer 3: 2, 5 and 3, 5.
    (dict(budget_tokens=2), {2: ([1, 3], [2, 4]), 4: ([2, 5], [3, 5])}),
    # Half of each row's context: 3 of row 0's 6 tokens, 2 of row 1's 4.
    (dict(budget=0.5), {2: ([1, 3, 4], [2, 4]), 4: ([0, 2, 5], [3, 5])}),
])
@pytest.mark.parametrize("offload", [False, True])
def test_the_filter_layers_choice_is_reused_up_to_the_next_filter_layer(kwargs, chosen, offload):
    # filter layers 1 and 3: layer 0 dense, 1 filter, 2 reads 1's choice, 3 filter, 4 reads 3's
    policy = OmniKVPolicy(filter_layers=(1, 3), dense_after_filter=0, offload=offload, **kwargs)
    g = torch.Generator().manual_seed(0)
    keys = [torch.randn(2, 1, 6, 2, generator=g), FILTER1, torch.randn(2, 1, 6, 2, generator=g), FILTER3,
            torch.randn(2, 1, 6, 2, generator=g)]
    stores = _prefill(policy, keys, VALID)
    selections = _decode_step(policy, stores, QUERY)
    assert selections[0] is None  # before the first filter layer: dense
    assert selections[1] is None and selections[3] is None  # the filter layers attend densely
    for layer, rows in chosen.items():
        sel, store = selections[layer], stores[layer]
        for s, positions in enumerate(rows):
            if not offload:  # the chosen context tokens and the token decoded since
                assert _positions(store, sel, s) == positions + [6]
            else:
                # The store holds only the decoded token; the chosen context comes from host memory,
                # in position order (a prompt token's position is its column).
                assert _positions(store, sel, s) == [6]
                torch.testing.assert_close(sel.extra_key[s][sel.extra_valid[s]], keys[layer][s, 0][positions])


def test_one_choice_per_row_for_every_kv_head_reduced_by_the_maximum_over_query_heads():
    # H = 2 KV heads, G = 1: head 0 alone would pick tokens 1, 2; head 1 alone 4, 3; together 1 and 4.
    key = torch.zeros(1, 2, 6, 2)
    key[0, 0, 1, 0], key[0, 0, 2, 0] = 5.0, 1.0
    key[0, 1, 4, 1], key[0, 1, 3, 1] = 4.0, 1.0
    query = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(1, 2, 1, 2)
    policy = OmniKVPolicy(filter_layers=(0,), dense_after_filter=0, budget_tokens=2)
    stores = _prefill(policy, [key, torch.randn(1, 2, 6, 2)], torch.ones(1, 6, dtype=torch.bool), groups=1)
    selection = _decode_step(policy, stores, query)[1]
    assert _positions(stores[1], selection, 0) == _positions(stores[1], selection, 1) == [1, 4, 6]


@pytest.mark.parametrize("scores,chosen", [("logits", [0, 1]), ("probs", [0, 2])])
def test_probs_scores_take_each_heads_softmax_before_the_maximum(scores, chosen):
    # head 0 logits: 10, 9.9, 0, 0, 0, 0; head 1: 0, 0, 3, 0, 0, 0.
    # max of logits: tokens 0 (10) and 1 (9.9); max of softmaxes: token 2 (e^3 / (e^3 + 5) = 0.80) and
    # token 0 (e^10 / (e^10 + e^9.9 + 4) = 0.52) before token 1 (0.47).
    key = torch.zeros(1, 1, 6, 2)
    key[0, 0, 0, 0], key[0, 0, 1, 0], key[0, 0, 2, 1] = 10.0, 9.9, 3.0
    policy = OmniKVPolicy(filter_layers=(0,), dense_after_filter=0, budget_tokens=2, scores=scores)
    stores = _prefill(policy, [key, torch.randn(1, 1, 6, 2)], torch.ones(1, 6, dtype=torch.bool))
    selection = _decode_step(policy, stores, QUERY[:1])[1]
    assert _positions(stores[1], selection, 0) == chosen + [6]


def test_dense_after_filter_layers_attend_densely():
    policy = OmniKVPolicy(filter_layers=(1,), dense_after_filter=1, budget_tokens=2)
    g = torch.Generator().manual_seed(1)
    keys = [torch.randn(2, 1, 6, 2, generator=g) for _ in range(4)]
    stores = _prefill(policy, keys, VALID)
    selections = _decode_step(policy, stores, QUERY)
    assert selections[:3] == [None, None, None] and selections[3] is not None
    assert [policy.head_roles(i, 1)[0] for i in range(4)] == ["dense", "filter", "dense", "sparse"]


# ------------------------------------------------------------------------------------ generate
def _padded_batch(length=90, pad=11, seed=0):
    ids = torch.randint(1, 256, (2, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    return ids, mask


@pytest.mark.parametrize("kwargs", [dict(filter_layers=(1,), dense_after_filter=0), {}])
def test_a_budget_covering_every_token_gives_exactly_dynamic_cache_tokens(kwargs):
    model = tiny_model("llama", **SHAPE)
    ref_model = tiny_model("llama", attn="sdpa", **SHAPE)
    ids, mask = _padded_batch()
    kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=False)
    ref = ref_model.generate(ids, **cache_kwarg(ref_model, DynamicCache()), **kw)
    assert torch.equal(model.generate(ids, **cache_kwarg(model, OmniKVCache(budget=1.0, **kwargs)), **kw), ref)


def test_padded_batch_and_second_turn_with_and_without_offload():
    model = tiny_model("llama", **SHAPE)
    ids, mask = _padded_batch(120, 9, seed=1)
    kw = dict(filter_layers=(1,), dense_after_filter=0, budget=0.2)
    caches = {offload: OmniKVCache(offload=offload, **kw) for offload in (False, True)}
    gen = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    results = {o: model.generate(ids, **cache_kwarg(model, c), **gen) for o, c in caches.items()}
    results["full"] = model.generate(ids, **cache_kwarg(model, FullKVCache()), **gen)
    logits = {o: torch.stack(r.logits) for o, r in results.items()}
    outs = {o: r.sequences for o, r in results.items()}
    # Same tokens attended in the same order: host offload changes where they live, not one bit of the result.
    assert torch.equal(logits[False], logits[True]) and outs[True].shape == (2, 126)
    assert (logits[False] - logits["full"]).abs().max() > 1e-3  # and the layers behind the filter were sparse
    policy = caches[False].policy
    group = policy._groups[1]
    assert group.k_h.tolist() == [24, 22] and not group.dense  # floor(0.2 * 120), floor(0.2 * 111)
    assert caches[True].layers[2].store.lengths_host().tolist() == [[5] * 4] * 2  # decoded tokens only
    # A second turn on the same caches: the turn is attended densely, then everything stored is the context.
    turn = torch.randint(1, 256, (2, 7), generator=torch.Generator().manual_seed(2))
    ids2 = torch.cat([outs[False], turn], 1)
    mask2 = torch.cat([mask, torch.ones(2, ids2.shape[1] - mask.shape[1], dtype=mask.dtype)], 1)
    gen2 = dict(gen, attention_mask=mask2, max_new_tokens=5)
    results2 = {o: model.generate(ids2, **cache_kwarg(model, c), **gen2) for o, c in caches.items()}
    assert torch.equal(torch.stack(results2[False].logits), torch.stack(results2[True].logits))
    assert results2[True].sequences.shape == (2, ids2.shape[1] + 5)
    context = [120 + 6 + 7, 111 + 6 + 7]  # prompt, 6 answer tokens (the last fed in turn 2), the turn
    assert policy._contexts[2].context_h.tolist() == [context[0]] * 4 + [context[1]] * 4
    offloaded = caches[True].policy._contexts[2]
    assert offloaded.host is not None and offloaded.host.lengths_h.tolist() == offloaded.context_h.tolist()
    assert caches[True].layers[2].store.lengths_host().tolist() == [[4] * 4] * 2
    assert policy._groups[1].k_h.tolist() == [int(0.2 * n) for n in context]


def test_beam_search_reorders_the_context_and_host_copies():
    model = tiny_model("llama", **SHAPE)
    ids = torch.randint(1, 256, (1, 70), generator=torch.Generator().manual_seed(5))
    kw = dict(filter_layers=(1,), dense_after_filter=0, budget=0.25)
    outs = [model.generate(ids, **cache_kwarg(model, OmniKVCache(offload=o, **kw)), max_new_tokens=4, num_beams=2,
                           do_sample=False) for o in (False, True)]
    assert torch.equal(outs[0], outs[1])


# ------------------------------------------------------------------------------------ memory
ELT = 4  # float32


def test_memory_report_on_device_and_host_by_hand():
    model = tiny_model("llama", **SHAPE)
    ids, mask = _padded_batch(100, 11, seed=3)
    kw = dict(filter_layers=(1,), dense_after_filter=0, budget=0.25)
    full, kept, offloaded = FullKVCache(), OmniKVCache(**kw), OmniKVCache(offload=True, **kw)
    for cache in (full, kept, offloaded):
        model.generate(ids, attention_mask=mask, **cache_kwarg(model, cache), max_new_tokens=3, do_sample=False)
    rf, rk, ro = full.memory_report(), kept.memory_report(), offloaded.memory_report()
    # Without offload every token stays on the device, exactly as FullKV's stores.
    assert rk.device_bytes == rf.device_bytes and rk.device_used_bytes == rf.device_used_bytes and rk.host_bytes == 0
    assert [layer.roles[0] for layer in rk.layers] == ["dense", "filter", "sparse", "sparse"]
    D, H = 16, 4
    per_token = 2 * D * ELT + 4  # key + value + int32 position
    for layer, ref in zip(ro.layers, rf.layers):
        if layer.layer_idx < 2:  # dense and filter layers: the full store on the device
            assert (layer.device_bytes, layer.host_bytes) == (ref.device_bytes, 0)
        else:
            # device: the decoded tokens only, in a fresh segment of reserve=128 slots per (row, head)
            assert layer.stored_tokens == [[2] * H] * 2
            assert layer.device_bytes == 2 * H * 128 * per_token
            assert layer.device_used_bytes == 2 * H * 2 * 2 * D * ELT
            # host: the context of every (row, head), packed: 100 and 89 real prompt tokens
            assert layer.host_bytes == H * (100 + 89) * per_token
    assert ro.host_bytes == 2 * H * (100 + 89) * per_token


# ------------------------------------------------------------------------------------ decode rules
@pytest.mark.parametrize("offload", [False, True])
@pytest.mark.parametrize("strategy", ["device", "segments"])
def test_decode_steps_read_no_device_values_on_the_host(strategy, offload, monkeypatch):
    monkeypatch.setenv("HETEROCACHE_DECODE", f"strategy={strategy}")
    model = tiny_model("llama", **SHAPE)
    ids = torch.randint(1, 256, (2, 150), generator=torch.Generator().manual_seed(4))
    cache = OmniKVCache(budget=0.2, filter_layers=(1,), dense_after_filter=0, offload=offload)
    result = count_decode_steps(model, ids, cache, steps=6)
    assert result["host_reads"] == 0, result["reads_by_kind"]
    assert not cache.policy._groups[1].dense


# ------------------------------------------------------------------------------------ parameters
@pytest.mark.parametrize("kwargs", [{"budget": 0}, {"budget": 1.5}, {"budget_tokens": 0}, {"filter_layers": ()},
                                    {"filter_layers": (-1,)}, {"filter_layers": (3, 1)}, {"filter_layers": (1, 1)},
                                    {"filter_layers": "a,b"}, {"filter_layers": (1.5,)}, {"dense_after_filter": -1},
                                    {"scores": "sum"}, {"offload": "yes"}])
def test_bad_parameters_are_rejected(kwargs):
    with pytest.raises(ValueError):
        OmniKVPolicy(**kwargs)


def test_filter_layers_beyond_the_models_depth_are_a_clear_error():
    model = tiny_model("llama", **SHAPE)
    with pytest.raises(ValueError, match=r"below the model's 4 full-attention layers"):
        model.generate(torch.randint(1, 256, (1, 20)), **cache_kwarg(model, OmniKVCache(filter_layers=(1, 4))),
                       max_new_tokens=2, do_sample=False)


def test_crop_is_refused_not_stale():
    assert not OmniKVCache().is_croppable


def test_omnikv_is_registered_with_the_reference_defaults():
    from heterocache.engine.registry import describe_methods, get_method, make_cache

    spec = get_method("omnikv")
    assert spec.params["filter_layers"] is None and spec.params["dense_after_filter"] == 1
    assert spec.params["scores"] == "logits" and spec.params["offload"] is False
    assert OmniKVPolicy().budget == 0.067 and OmniKVCache().policy.budget == 0.067
    assert "`omnikv`" in describe_methods()
    cache = make_cache("omnikv", 0.3, None, filter_layers="2,8,18", offload=True)
    assert isinstance(cache, OmniKVCache) and cache.policy.filter_layers == (2, 8, 18)
    assert cache.policy.budget == 0.3 and cache.policy.offload
    assert make_cache("omnikv", None, budget_tokens=64).policy.budget_tokens == 64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_offload_on_cuda_reads_the_pinned_context_from_the_device_and_keeps_the_tokens():
    """On CUDA the chosen tokens come through the pinned context's device alias on a side stream:
    the same logits as without offload, and no gather had to bring indices to the host."""
    model = tiny_model("llama", **SHAPE).cuda()
    ids, mask = _padded_batch(120, 9, seed=1)
    ids, mask = ids.cuda(), mask.cuda()
    kw = dict(filter_layers=(1,), dense_after_filter=0, budget=0.2)
    gen = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    caches = {o: OmniKVCache(offload=o, **kw) for o in (False, True)}
    logits = {o: torch.stack(model.generate(ids, **cache_kwarg(model, c), **gen).logits) for o, c in caches.items()}
    torch.testing.assert_close(logits[True], logits[False], rtol=1e-5, atol=1e-5)
    host = caches[True].policy._contexts[2].host
    assert host.mode == "uva" and host.sync_gathers == 0 and host.k.is_pinned() and host.v.is_pinned()
