"""ShadowKV on the engine: chunk landmarks and outliers by hand, the truncated SVD's error (Eckart-Young),
the RoPE inverse against transformers' rotary embeddings, the chosen chunks and a decode step against
a naive oracle, generate() on a left-padded batch and a second turn, memory on device and host, the
decode-step rules (no host reads) and the parameters."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LlamaConfig

from helpers import dynamic_reference, tiny_model
from heterocache import FullKVCache, ShadowKVCache
from heterocache._compat import cache_kwarg
from heterocache.attention.decode import selected_decode_attention
from heterocache.bench.diagnostics import count_decode_steps
from heterocache.engine.rope import Rotary
from heterocache.methods.shadowkv import ShadowKVPolicy
from heterocache.policy.base import PrefillContext
from heterocache.store.ragged import RaggedKVStore

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
SMALL = dict(budget_tokens=8, chunk_size=4, outlier_chunks=2, local_chunks=2)  # for prompts of ~100 tokens
LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32}


def _config(D=4, Hq=2, H=2, rope=None):
    kw = {} if rope is None else {"rope_parameters": rope}
    return LlamaConfig(hidden_size=Hq * D, num_attention_heads=Hq, num_key_value_heads=H, head_dim=D, vocab_size=16,
                       intermediate_size=8, num_hidden_layers=1, max_position_embeddings=256, **kw)


def _ctx(key, value, valid=None, config=None, position_ids=None, G=1):
    B, H, L, D = key.shape
    valid = torch.ones(B, L, dtype=torch.bool) if valid is None else valid
    config = _config(D, H * G, H) if config is None else config
    query = torch.zeros(B, H * G, L, D, dtype=key.dtype)
    return PrefillContext(0, query, key, value, valid, D**-0.5, 1, config, position_ids=position_ids)


def _fill(policy, ctx):
    """What RaggedCache._fill does: plan, select, fill a store, hand it to the policy."""
    keep = policy.select(ctx, policy.plan(ctx))
    B, H, L, D = ctx.key.shape
    store = RaggedKVStore(B, H, D, ctx.key.dtype, torch.device("cpu"), 4, 8)
    store.fill(ctx.key, ctx.value, keep, torch.arange(L))
    policy.on_prefill_done(0, store, ctx)
    return store, keep


def _rotated_prompt(B=2, H=2, G=2, D=8, L=40, pads=(0, 7), seed=0, dtype=torch.float64, rope=None):
    """Random pre-RoPE keys rotated as the model would at generate()'s positions (left padding: each
    row's real tokens count from 0). Returns the context and the pre-RoPE keys."""
    g = torch.Generator().manual_seed(seed)
    pre = torch.randn(B, H, L, D, generator=g, dtype=dtype)
    value = torch.randn(B, H, L, D, generator=g, dtype=dtype)
    valid = torch.ones(B, L, dtype=torch.bool)
    for b, p in enumerate(pads):
        valid[b, :p] = False
    position_ids = (valid.long().cumsum(-1) - 1).clamp(min=0)
    config = _config(D, H * G, H, rope)
    rotary = Rotary.from_config(config)
    cos, sin = rotary.cos_sin(position_ids, dtype)
    post = rotary.apply(pre, cos[:, None], sin[:, None])
    return _ctx(post, value, valid, config, position_ids, G), pre


# ----------------------------------------------------------------------------- landmarks, outliers
def test_landmarks_are_chunk_means_and_outliers_the_least_similar_chunks():
    # chunk_size 2, 10 tokens: chunks 0..3 (10 // 2 - 1 local chunk), tokens 8, 9 local.
    e0, e1, e2 = torch.eye(4)[0], torch.eye(4)[1], torch.eye(4)[2]
    head0 = [e0, e0, e0 + e1, e0 + e1, e0, e1, 2 * e0 + e2, 2 * e0 + 0.5 * e2, e0, e1]
    head1 = [e0, -e0 + 0.1 * e1, e0 + e1, e0 + e1, e0, e0, 2 * e0 + e2, 2 * e0 + 0.5 * e2, e0, e1]
    key = torch.stack([torch.stack(head0), torch.stack(head1)])[None]  # [1, 2, 10, 4]
    value = torch.arange(80, dtype=torch.float32).view(1, 2, 10, 4)
    policy = ShadowKVPolicy(budget_tokens=2, chunk_size=2, outlier_chunks=1, local_chunks=1)
    store, keep = _fill(policy, _ctx(key, value))
    layer = policy.layer(0)
    # Minimum cosine similarity to the chunk mean, head 0: chunks 0, 1: 1; chunk 2 (e0, e1 around
    # their mean (e0 + e1) / 2): 1 / sqrt(2); chunk 3: ~0.99. Head 1: chunk 0 (e0 and -e0 + 0.1 e1,
    # mean 0.05 e1) has a key orthogonal to its mean: 0. The lowest is each head's outlier.
    assert layer.outliers.tolist() == [[[False, False, True, False], [True, False, False, False]]]
    assert layer.chunk_index.tolist() == [[0, 1, 3], [1, 2, 3]]
    means = {0: (e0 + e0) / 2, 1: e0 + e1, 2: (e0 + e1) / 2, 3: 2 * e0 + 0.75 * e2}
    means1 = {1: e0 + e1, 2: e0, 3: 2 * e0 + 0.75 * e2}
    torch.testing.assert_close(layer.landmarks[0], torch.stack([means[0], means[1], means[3]]))
    torch.testing.assert_close(layer.landmarks[1], torch.stack([means1[1], means1[2], means1[3]]))
    # Exact in the store: the outlier chunk and the local tail, in order.
    assert keep[0, 0].nonzero().flatten().tolist() == [4, 5, 8, 9]
    assert keep[0, 1].nonzero().flatten().tolist() == [0, 1, 8, 9]
    assert store.lengths().tolist() == [[4, 4]]
    # The other chunks' values are in host memory, chunk after chunk.
    host = layer.values.v.view(2, 3, 2, 4)
    assert torch.equal(host[0], value[0, 0, [0, 1, 2, 3, 6, 7]].view(3, 2, 4))
    assert torch.equal(host[1], value[0, 1, [2, 3, 4, 5, 6, 7]].view(3, 2, 4))


def test_no_compression_when_the_candidates_fit_the_budget():
    key, value = torch.randn(2, 2, 30, 4), torch.randn(2, 2, 30, 4)
    valid = torch.ones(2, 30, dtype=torch.bool)
    valid[1, :10] = False  # row 1: 20 tokens, 5 - 1 local = 4 chunks, 3 candidates: not more than 3
    policy = ShadowKVPolicy(budget_tokens=12, chunk_size=4, outlier_chunks=1, local_chunks=1)
    store, _ = _fill(policy, _ctx(key, value, valid))
    layer = policy.layer(0)
    assert layer.picks.h.tolist() == [3, 3, 0, 0] and layer.num_candidates.h.tolist() == [5, 5, 0, 0]
    assert store.lengths().tolist() == [[30 - 24 + 4, 30 - 24 + 4], [20, 20]]  # row 1 whole, exact
    policy = ShadowKVPolicy(budget_tokens=24, chunk_size=4, outlier_chunks=1, local_chunks=1)
    _fill(policy, _ctx(key, value, valid))
    assert policy.layer(0) is None  # no row compressed: the layer is plain full attention


# ----------------------------------------------------------------------------- SVD
@pytest.mark.parametrize("rank", [1, 3, 5])
def test_the_truncated_svd_error_is_the_tail_singular_energy(rank):
    # local_chunks = outlier_chunks = 0 and 12 tokens in chunks of 2: U covers every prompt token.
    ctx, pre = _rotated_prompt(B=1, H=2, G=1, D=4, L=12, pads=(0,))
    policy = ShadowKVPolicy(budget_tokens=2, chunk_size=2, outlier_chunks=0, local_chunks=0, rank_dims=rank)
    _fill(policy, ctx)
    layer = policy.layer(0)
    X = pre[0].permute(1, 0, 2).reshape(12, 8)  # [tokens, H * D], heads side by side
    rebuilt = torch.einsum("tr,hrd->thd", layer.U[0], layer.SV.view(2, rank, 4)).reshape(12, 8)
    sigma = torch.linalg.svdvals(X)
    error = ((X - rebuilt) ** 2).sum()
    torch.testing.assert_close(error, (sigma[rank:] ** 2).sum(), rtol=1e-9, atol=1e-12)
    assert layer.U.shape == (1, 12, rank) and layer.SV.shape == (2, rank, 4)


def test_rank_is_a_fraction_of_the_key_width_capped_by_the_prompt():
    assert ShadowKVPolicy().rank_for(1024, 100_000) == 160  # the published 160 of 1024
    assert ShadowKVPolicy(rank=0.5).rank_for(32, 10) == 10
    assert ShadowKVPolicy(rank_dims=7).rank_for(32, 100) == 7


def test_full_rank_rebuilds_the_exact_post_rope_keys_at_left_padded_positions():
    ctx, _ = _rotated_prompt(rope=LLAMA3)
    policy = ShadowKVPolicy(budget_tokens=4, chunk_size=4, outlier_chunks=1, local_chunks=1, rank=1.0)
    _fill(policy, ctx)
    layer = policy.layer(0)
    M = int(layer.num_candidates.h.max())
    everything = torch.arange(M).expand(4, M)  # every candidate of every segment
    keys = layer.rebuild_keys(everything).view(2, 2, M, 4, 8)
    for b, pad in enumerate((0, 7)):
        for h in range(2):
            m = int(layer.num_candidates.h[b * 2 + h])
            chunks = layer.chunk_index[b * 2 + h, :m]
            tokens = pad + (chunks[:, None] * 4 + torch.arange(4)).flatten()
            torch.testing.assert_close(keys[b, h, :m].reshape(-1, 8), ctx.key[b, h, tokens], rtol=1e-9, atol=1e-9)


# ----------------------------------------------------------------------------- RoPE
@pytest.mark.parametrize("rope", [None, LLAMA3, YARN], ids=["default", "llama3", "yarn"])
def test_rope_cos_sin_match_the_models_and_the_inverse_is_exact(rope):
    from transformers.models.llama.modeling_llama import (
        LlamaRotaryEmbedding,
        apply_rotary_pos_emb,
    )

    config = _config(D=16, Hq=2, H=2, rope=rope)
    position_ids = torch.tensor([[0, 0, 0, 1, 2, 3, 40, 90], [0, 1, 2, 3, 4, 5, 6, 200]])  # left padding, long
    rotary = Rotary.from_config(config)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 2e-6), (torch.bfloat16, None)):
        x = torch.zeros(2, 8, 16, dtype=dtype)
        cos_ref, sin_ref = LlamaRotaryEmbedding(config)(x, position_ids)
        cos, sin = rotary.cos_sin(position_ids, dtype)
        assert torch.equal(cos, cos_ref) and torch.equal(sin, sin_ref)
        if tol is None:
            continue
        k = torch.randn(2, 3, 8, 16, dtype=dtype, generator=torch.Generator().manual_seed(0))
        _, post = apply_rotary_pos_emb(k, k, cos_ref, sin_ref)  # what the model's attention receives
        assert (post - k).abs().max() > 0.1  # it did rotate
        torch.testing.assert_close(rotary.invert(post, cos[:, None], sin[:, None]), k, rtol=tol, atol=tol)
        torch.testing.assert_close(rotary.apply(k, cos[:, None], sin[:, None]), post, rtol=tol, atol=tol)
    if rope is YARN:
        assert rotary.attention_scaling > 1.0  # cos^2 + sin^2 != 1: the inverse divides it out


def test_rope_parameters_per_layer_type_and_unsupported_types():
    from transformers import Gemma3TextConfig
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding

    config = Gemma3TextConfig(hidden_size=32, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                              num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"])
    pos = torch.arange(50)[None]
    x = torch.zeros(1, 50, 16)
    cos_ref, sin_ref = Gemma3RotaryEmbedding(config)(x, pos, "full_attention")
    cos, sin = Rotary.from_config(config, "full_attention").cos_sin(pos, torch.float32)
    assert torch.equal(cos, cos_ref) and torch.equal(sin, sin_ref)
    with pytest.raises(NotImplementedError, match="dynamic"):
        Rotary.from_config(_config(rope={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}))


def test_the_pre_rope_keys_are_those_the_model_made():
    """Full rank: U @ SV equals the k_proj outputs (the keys before RoPE) of the compressed tokens,
    on a left-padded generate() batch with llama3-scaled RoPE."""
    model = tiny_model("llama", **SHAPE, rope_parameters=LLAMA3).to(torch.float64)
    made = []
    hook = model.model.layers[1].self_attn.k_proj.register_forward_hook(lambda m, i, out: made.append(out))
    ids = torch.randint(1, 256, (2, 60), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :11] = 0
    cache = ShadowKVCache(budget_tokens=4, chunk_size=4, outlier_chunks=1, local_chunks=1, rank=1.0)
    model.generate(ids, attention_mask=mask, **cache_kwarg(model, cache), max_new_tokens=2, do_sample=False)
    hook.remove()
    layer = cache.policy.layer(1)
    pre = made[0].view(2, 60, 2, 16)  # [B, L, H, D] before RoPE
    for b, pad in enumerate((0, 11)):
        A = int(layer.chunks[b]) * 4
        rebuilt = torch.einsum("tr,hrd->thd", layer.U[b, :A], layer.SV.view(2, 2, -1, 16)[b])
        torch.testing.assert_close(rebuilt, pre[b, pad : pad + A], rtol=1e-8, atol=1e-8)


# ----------------------------------------------------------------------------- the decode step
def test_the_chosen_chunks_are_the_top_landmark_scores_and_the_step_equals_a_naive_oracle():
    ctx, _ = _rotated_prompt(seed=1)  # B 2 (row 1 left-padded by 7), H 2, G 2, D 8, 40 tokens
    policy = ShadowKVPolicy(budget_tokens=8, chunk_size=4, outlier_chunks=1, local_chunks=1, rank=1.0)
    store, _ = _fill(policy, ctx)
    layer = policy.layer(0)
    g = torch.Generator().manual_seed(2)
    store.begin_decode_append()
    store.append_decode(torch.randn(2, 2, 1, 8, generator=g, dtype=torch.float64),
                        torch.randn(2, 2, 1, 8, generator=g, dtype=torch.float64), torch.tensor([40]))
    query = torch.randn(2, 4, 1, 8, generator=g, dtype=torch.float64)
    scale = 8**-0.5
    picks, ok = layer.choose(query.reshape(4, 2, 1, 8), scale)
    out = selected_decode_attention(store, query, scale, policy.decode_selection(0, store, query, scale))
    for b, pad in enumerate((0, 7)):
        for h in range(2):
            s = b * 2 + h
            m = int(layer.num_candidates.h[s])
            q = query[b, 2 * h : 2 * h + 2, 0]  # the group's 2 query heads
            # By hand: softmax over the landmarks per query head, max over the group, the top 2.
            probs = torch.softmax(q @ layer.landmarks[s, :m].T * scale, dim=-1).amax(0)
            assert sorted(picks[s][ok[s]].tolist()) == sorted(probs.argsort(descending=True)[:2].tolist())
            # Oracle: attention over the stored (exact) tokens + the chosen chunks' true keys and values.
            chunks = layer.chunk_index[s, picks[s][ok[s]]]
            tokens = pad + (chunks[:, None] * 4 + torch.arange(4)).flatten()
            k_exact, v_exact, _ = store.segment(s)
            k = torch.cat([k_exact, ctx.key[b, h, tokens]])
            v = torch.cat([v_exact, ctx.value[b, h, tokens]])
            expected = torch.softmax(q @ k.T * scale, dim=-1) @ v
            torch.testing.assert_close(out[b, 0, 2 * h : 2 * h + 2], expected, rtol=1e-9, atol=1e-9)


def test_chunk_scores_are_the_groups_max_of_per_head_softmax():
    from heterocache.policy.budgeted import HostDevice

    ctx, _ = _rotated_prompt(B=1, H=1, G=2, D=4, L=40, pads=(0,))
    policy = ShadowKVPolicy(budget_tokens=4, chunk_size=4, outlier_chunks=1, local_chunks=1)
    _fill(policy, ctx)
    layer = policy.layer(0)
    e0, e1 = torch.eye(4, dtype=torch.float64)[:2]
    layer.landmarks = torch.zeros_like(layer.landmarks)
    layer.landmarks[0, :3] = torch.stack([e0, e1, 0.95 * (e0 + e1)])
    layer.num_candidates = HostDevice([3], torch.device("cpu"))  # 3 landmarks in this segment
    q = torch.stack([3 * e0, 3 * e1])[None, :, None, :]  # [S=1, G=2, T=1, D]
    # Head 0 scores (3, 0, 2.85), head 1 (0, 3, 2.85): softmax each, max over the group.
    p0 = torch.softmax(torch.tensor([3.0, 0.0, 2.85], dtype=torch.float64), 0)
    p1 = torch.softmax(torch.tensor([0.0, 3.0, 2.85], dtype=torch.float64), 0)
    scores = layer.chunk_scores(q, 1.0)
    torch.testing.assert_close(scores[0, :3], torch.maximum(p0, p1))
    assert (scores[0, 3:] == -1).all()
    picks, ok = layer.choose(q, 1.0)  # 1 chunk: landmark 0 or 1 (0.52), not 2 (0.45; a group mean would pick it)
    assert picks.shape == (1, 1) and int(picks[0, 0]) in (0, 1) and bool(ok.all())


def test_a_later_turn_attends_the_extra_tokens_as_if_they_were_stored():
    from heterocache.attention.extend import extend_attention

    g = torch.Generator().manual_seed(5)
    B, H, G, D, L, M, q = 2, 2, 2, 8, 9, 5, 4
    old_k, old_v = torch.randn(B, H, L, D, generator=g), torch.randn(B, H, L, D, generator=g)
    ek, ev = torch.randn(B * H, M, D, generator=g), torch.randn(B * H, M, D, generator=g)
    evalid = torch.rand(B * H, M, generator=g) > 0.3
    new_k, new_v = torch.randn(B, H, q, D, generator=g), torch.randn(B, H, q, D, generator=g)
    query = torch.randn(B, H * G, q, D, generator=g)
    kept = torch.rand(B, H, L, generator=g) > 0.4
    store = RaggedKVStore(B, H, D, torch.float32, torch.device("cpu"), 4, 8)
    store.fill(old_k, old_v, kept, torch.arange(L))
    out = extend_attention(store, query, new_k, new_v, None, 0.3, extra=(ek, ev, evalid))
    union = RaggedKVStore(B, H, D, torch.float32, torch.device("cpu"), 4, 8)
    union.fill(torch.cat([old_k, ek.view(B, H, M, D)], 2), torch.cat([old_v, ev.view(B, H, M, D)], 2),
               torch.cat([kept, evalid.view(B, H, M)], 2), torch.arange(L + M))
    torch.testing.assert_close(out, extend_attention(union, query, new_k, new_v, None, 0.3), rtol=1e-5, atol=1e-6)


def test_select_rows_reorders_the_compressed_rows():
    ctx, _ = _rotated_prompt(seed=3)
    policy = ShadowKVPolicy(budget_tokens=8, chunk_size=4, outlier_chunks=1, local_chunks=1)
    _fill(policy, ctx)
    layer = policy.layer(0)
    q = torch.randn(4, 2, 1, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    before = layer.extra_tokens(q, 0.3)
    policy.select_rows(torch.tensor([1, 0, 1]))
    after = layer.extra_tokens(q[[2, 3, 0, 1, 2, 3]], 0.3)
    keys, values, valid = (x[[2, 3, 0, 1, 2, 3]] for x in before)
    torch.testing.assert_close(after[0], keys, rtol=1e-12, atol=1e-12)
    assert torch.equal(after[1], values) and torch.equal(after[2], valid)
    assert layer.values.v.shape[0] == 6 * layer.max_candidates and layer.values.k is None


# ----------------------------------------------------------------------------- generate()
def test_nothing_compressed_gives_exactly_dynamic_cache_tokens():
    model, ids, kw, ref = dynamic_reference(SHAPE)
    for cache in (ShadowKVCache(budget=1.0, **{**SMALL, "budget_tokens": None}), ShadowKVCache()):
        assert torch.equal(model.generate(ids, **cache_kwarg(model, cache), **kw), ref)
        assert cache.policy.layer(0) is None and cache.policy.layer(1) is None


def _padded_turn(model, cache, steps=6):
    ids = torch.randint(1, 256, (2, 120), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :9] = 0
    out = model.generate(ids, attention_mask=mask, **cache_kwarg(model, cache), max_new_tokens=steps, do_sample=False)
    return out, mask


def test_generate_on_a_left_padded_batch_and_a_second_turn(monkeypatch):
    model = tiny_model("llama", **SHAPE)
    cache = ShadowKVCache(**SMALL)
    out, mask = _padded_turn(model, cache)
    assert out.shape == (2, 126)
    # Rows of 111 and 120 tokens: 25 and 28 compressed chunks of 4 (tokens // 4 - 2 local); stored
    # exact per head: the rest of the prompt, 2 outlier chunks, 5 decoded tokens.
    for i in (0, 1):
        layer = cache.policy.layer(i)
        assert layer.prompt_tokens.tolist() == [111, 120] and layer.chunks.tolist() == [25, 28]
        assert cache.layers[i].store.lengths().tolist() == [[111 - 100 + 8 + 5] * 2, [120 - 112 + 8 + 5] * 2]
    extra_calls = []
    original = cache.policy.extend_extra

    def spy(*args, **kwargs):
        extra = original(*args, **kwargs)
        extra_calls.append(extra)
        return extra

    monkeypatch.setattr(cache.policy, "extend_extra", spy)
    turn = torch.randint(1, 256, (2, 7), generator=torch.Generator().manual_seed(2))
    ids2 = torch.cat([out, turn], 1)
    mask2 = torch.cat([mask, torch.ones(2, ids2.shape[1] - mask.shape[1], dtype=mask.dtype)], 1)
    out2 = model.generate(ids2, attention_mask=mask2, **cache_kwarg(model, cache), max_new_tokens=5, do_sample=False)
    assert out2.shape == (2, 133 + 5) and torch.equal(out2[:, :126], out)
    # The turn's 8 new tokens (the last answer token + 7) attended the exact tokens plus the chunks its
    # queries chose (8 tokens per head: the budget) and were stored exact, as the 4 decoded after them.
    assert len(extra_calls) == 2 and all(e is not None and e[0].shape == (4, 8, 16) for e in extra_calls)
    for i in (0, 1):
        assert cache.layers[i].store.lengths().tolist() == [[19 + 5 + 8 + 4] * 2, [16 + 5 + 8 + 4] * 2]
        assert cache.policy.layer(i).chunks.tolist() == [25, 28]  # the prompt stays compressed


def test_memory_report_counts_factors_landmarks_and_exact_tokens_on_device_and_values_on_host():
    model = tiny_model("llama", **SHAPE)
    cache = ShadowKVCache(**SMALL)
    _padded_turn(model, cache)
    report = cache.memory_report()
    B, H, D, cs, f32, i64 = 2, 2, 16, 4, 4, 8
    S, A, M, r = B * H, 28 * cs, 28 - 2, round(32 * 160 / 1024)  # longest area, most candidates, rank 5
    factors = B * A * r * f32 + S * r * D * f32  # U [B, A, r], SV [S, r, D]
    landmarks = S * M * D * f32 + S * M * i64  # landmarks + their chunk indices
    bookkeeping = B * A * i64 + 2 * S * i64  # positions of the area's tokens, per-segment counts
    for i, layer in enumerate(report.layers):
        store = cache.layers[i].store
        assert layer.roles == ["shadowkv", "shadowkv"]
        assert layer.device_bytes == store.bytes_allocated() + factors + landmarks + bookkeeping
        assert layer.device_used_bytes == (24 * 2 + 21 * 2) * D * f32 * 2  # exact tokens' keys and values
        assert layer.host_bytes == S * M * cs * D * f32  # the candidates' values
    full = FullKVCache()
    _padded_turn(model, full)
    assert report.device_used_bytes < full.memory_report().device_used_bytes / 4


@pytest.mark.parametrize("strategy", ["device", "segments"])
def test_decode_steps_read_no_device_values_on_the_host(strategy, monkeypatch):
    monkeypatch.setenv("HETEROCACHE_DECODE", f"strategy={strategy}")
    model = tiny_model("llama", **SHAPE)
    ids = torch.randint(1, 256, (2, 150), generator=torch.Generator().manual_seed(4))
    cache = ShadowKVCache(**SMALL)
    result = count_decode_steps(model, ids, cache, steps=6)
    assert cache.policy.layer(0) is not None and cache.policy.layer(1) is not None  # compressed
    assert result["host_reads"] == 0, result["reads_by_kind"]


# ----------------------------------------------------------------------------- parameters, registry
@pytest.mark.parametrize("kwargs", [{"budget": 0}, {"budget": 1.5}, {"budget_tokens": 0}, {"budget_tokens": 12},
                                    {"rank": 0}, {"rank": 1.5}, {"rank_dims": 0}, {"chunk_size": 0},
                                    {"outlier_chunks": -1}, {"local_chunks": -1}])
def test_bad_parameters_are_rejected(kwargs):
    with pytest.raises(ValueError):
        ShadowKVPolicy(**kwargs)


def test_a_prefill_without_the_config_is_refused():
    key = torch.randn(1, 1, 80, 4)
    ctx = PrefillContext(0, torch.zeros(1, 1, 80, 4), key, key, torch.ones(1, 80, dtype=torch.bool), 0.5, 1, None)
    with pytest.raises(ValueError, match="config"):
        ShadowKVPolicy(**SMALL).plan(ctx)


def test_shadowkv_is_registered_with_the_published_defaults():
    from heterocache.engine.registry import describe_methods, get_method, make_cache

    spec = get_method("shadowkv")
    assert (spec.params["rank"], spec.params["chunk_size"], spec.params["outlier_chunks"],
            spec.params["local_chunks"]) == (160 / 1024, 8, 48, 4)
    assert "`shadowkv`" in describe_methods()
    assert ShadowKVPolicy().budget_chunks(np.array([10_000])).tolist() == [2048 // 8]
    cache = make_cache("shadowkv", 0.3, None, chunk_size=4)
    assert isinstance(cache, ShadowKVCache) and cache.policy.budget == 0.3 and cache.policy.chunk_size == 4
    assert cache.policy.budget_chunks(np.array([100])).tolist() == [8]  # ceil(0.3 * 100 / 4)
    assert make_cache("shadowkv", None, budget_tokens=1024).policy.budget_tokens == 1024
    assert not cache.is_croppable


def test_tensor_parallel_shadowkv_says_it_factors_each_ranks_heads_alone():
    from heterocache.engine.parallel import KVShard
    from heterocache.methods.shadowkv import ShadowKVPolicy

    policy = ShadowKVPolicy()
    with pytest.warns(UserWarning, match="factors the keys of this rank's 2 KV heads alone"):
        policy.bind_kv_shard(KVShard.contiguous(1, 2, 4))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ShadowKVPolicy().bind_kv_shard(KVShard.single(4))  # one process: nothing to say


def test_key_rank_benchmark_errors_equal_the_reconstruction_error():
    from helpers import benchmark_module

    bench = benchmark_module("shadowkv_keys")
    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 3, generator=g) @ torch.randn(3, 12, generator=g) + 0.01 * torch.randn(40, 12, generator=g)
    errors, curve = bench.relative_errors(X, [1, 3, 12])
    U, S, Vh = torch.linalg.svd(X.double(), full_matrices=False)
    for r in (1, 3):
        approx = U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]
        assert errors[r] == pytest.approx(float((X.double() - approx).norm() / X.double().norm()), rel=1e-9)
    assert errors[3] < 0.01 < errors[1] and errors[12] == pytest.approx(0.0, abs=1e-12)
    assert curve[0] == pytest.approx(1.0) and bool((curve[1:] <= curve[:-1]).all())
