"""What every baseline method must do on the engine: run generate() on every architecture with a
padded batch, store exactly its plan, compress each batch row as if it were alone, and (where the
method is exact at budget 1.0) reproduce the full cache. Helpers shared by test_policies_*.py."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList

from helpers import tiny_model
from heterocache._compat import cache_kwarg
from heterocache.engine.registry import make_cache
from heterocache.methods.cake import CAKEPolicy
from heterocache.methods.h2o import H2OPolicy
from heterocache.methods.pyramidkv import PyramidKVPolicy
from heterocache.methods.snapkv import SnapKVPolicy
from heterocache.methods.streamingllm import StreamingLLMPolicy
from heterocache.policy.base import PrefillContext
from heterocache.policy.budget import tokens_for_budget
from heterocache.store.ragged import RaggedKVStore

COMPRESSING = ["streamingllm", "h2o", "snapkv", "pyramidkv", "cake"]


# ------------------------------------------------------------------------------------- helpers
def random_ctx(layer_idx, valid, *, H=2, G=3, D=8, num_layers=3, seed=0, queries=None, keys=None):
    """A PrefillContext of random queries/keys/values for a padding mask ``valid`` [B, L]."""
    B, L = valid.shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H * G, L, D, generator=g) if queries is None else queries
    k = torch.randn(B, H, L, D, generator=g) if keys is None else keys
    v = torch.randn(B, H, L, D, generator=g)
    return PrefillContext(layer_idx, q, k, v, valid, scaling=D**-0.5, num_layers=num_layers)


def prefill(policy, ctxs, block_size=8, reserve=4):
    """Run a policy over a model's layers exactly as ``RaggedCache._fill`` does; return the stores."""
    stores = []
    for ctx in ctxs:
        B, H, L, D = ctx.key.shape
        plan = policy.plan(ctx)
        keep = policy.select(ctx, plan)
        assert torch.equal(keep.sum(-1), plan), "selection does not match the plan"
        assert not bool((keep & ~ctx.valid[:, None, :]).any()), "padding kept"
        store = RaggedKVStore(B, H, D, torch.float32, torch.device("cpu"), block_size, reserve)
        store.fill(ctx.key, ctx.value, keep, torch.arange(L))
        stores.append(store)
        policy.on_prefill_done(ctx.layer_idx, store, ctx)
    return stores


def decode_step(policy, stores, queries, keys, position):
    """One decode step on every layer: append, (attend), then the policy's hook."""
    for layer, store in enumerate(stores):
        store.append(keys[layer], keys[layer].clone(), torch.tensor([position]))
        policy.on_decode(layer, store, queries[layer], queries[layer].shape[-1] ** -0.5)


def positions(store, s):
    return store.segment(s)[2].long()


class EachStep(LogitsProcessor):
    """Calls ``fn()`` after every forward of generate() (prefill and each decode step)."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, input_ids, scores):
        self.fn()
        return scores


def padded_batch(lengths=(64, 47), seed=0):
    ids = torch.randint(1, 256, (len(lengths), max(lengths)), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    for row, n in enumerate(lengths):
        ids[row, : max(lengths) - n] = 0
        mask[row, : max(lengths) - n] = 0
    return ids, mask


def policy_for(method, **kwargs):
    cls = {
        "streamingllm": StreamingLLMPolicy,
        "h2o": H2OPolicy,
        "snapkv": SnapKVPolicy,
        "pyramidkv": PyramidKVPolicy,
        "cake": CAKEPolicy,
    }[method]
    if method in ("snapkv", "pyramidkv", "cake"):
        kwargs.setdefault("window", 4)
    return cls(**kwargs)


# --------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("method", ["fullkv", *COMPRESSING])
def test_generate_runs_with_padded_batch(arch, method):
    model = tiny_model(arch)
    ids, mask = padded_batch()
    params = {"window": 4} if method in ("snapkv", "pyramidkv", "cake") else {}
    cache = make_cache(method, 0.3, model, **params)
    out = model.generate(ids, attention_mask=mask, **cache_kwarg(model, cache), max_new_tokens=3, do_sample=False,
                         pad_token_id=0)
    assert out.shape == (2, ids.shape[1] + 3)
    for lengths in cache.stored_tokens():
        assert lengths.shape == (2, model.config.num_key_value_heads)
        assert bool((lengths[1] < lengths[0]).all())  # the shorter row never stores padding


@pytest.mark.parametrize("method", ["streamingllm", "h2o", "snapkv"])
def test_uniform_methods_store_their_plan_in_every_layer_and_head(method):
    model = tiny_model("llama")
    ids, mask = padded_batch()
    cache = make_cache(method, 0.2, model)
    with torch.no_grad():
        model(ids, attention_mask=mask, **cache_kwarg(model, cache))
        cache.end_prompt()
    expected = tokens_for_budget(0.2, mask.sum(-1))[:, None].expand(2, 2).tolist()
    report = cache.memory_report()
    assert len(report.layers) == 3
    for layer in report.layers:
        assert layer.stored_tokens == expected
        assert layer.roles == ["compressed", "compressed"]
    assert report.device_used_bytes < 0.3 * report.dynamic_bytes


@pytest.mark.parametrize("method", COMPRESSING)
def test_each_batch_row_is_compressed_as_if_alone(method):
    """Rows of a left-padded batch select exactly what they select as single-row batches, at
    prefill and through decode steps (garbage in the padding must not matter)."""
    lengths, num_layers, H, G, D = (40, 27), 3, 2, 3, 8
    L = max(lengths)
    g = torch.Generator().manual_seed(1)
    rows = [
        [(torch.randn(1, H * G, n, D, generator=g), torch.randn(1, H, n, D, generator=g)) for _ in range(num_layers)]
        for n in lengths
    ]
    valid = torch.zeros(2, L, dtype=torch.bool)
    batch_layers = []
    for layer in range(num_layers):
        q = torch.randn(2, H * G, L, D, generator=g) * 5  # garbage where padded
        k = torch.randn(2, H, L, D, generator=g) * 5
        for r, n in enumerate(lengths):
            q[r, :, L - n :], k[r, :, L - n :] = rows[r][layer]
            valid[r, L - n :] = True
        batch_layers.append((q, k))
    steps = [
        [(torch.randn(2, H * G, 1, D, generator=g), torch.randn(2, H, 1, D, generator=g)) for _ in range(num_layers)]
        for _ in range(6)
    ]

    def run(policy, layers, valid, row_steps):
        ctxs = [
            random_ctx(i, valid, H=H, G=G, D=D, num_layers=num_layers, queries=q, keys=k)
            for i, (q, k) in enumerate(layers)
        ]
        stores = prefill(policy, ctxs)
        for t, step in enumerate(row_steps):
            decode_step(policy, stores, [q for q, _ in step], [k for _, k in step], valid.shape[1] + t)
        return stores

    batch = run(policy_for(method, budget=0.3), batch_layers, valid, steps)
    for r, n in enumerate(lengths):
        single_steps = [[(q[r : r + 1], k[r : r + 1]) for q, k in step] for step in steps]
        single = run(policy_for(method, budget=0.3), rows[r], torch.ones(1, n, dtype=torch.bool), single_steps)
        for layer in range(num_layers):
            for h in range(H):
                got = positions(batch[layer], r * H + h) - (L - n)
                assert torch.equal(got, positions(single[layer], h)), (method, r, layer, h)


def _exact_variant(method):
    params = {"window": 4} if method in ("snapkv", "pyramidkv", "cake") else {}
    if method in ("streamingllm", "h2o", "cake"):
        params["evict_during_decode"] = False
    return params


@pytest.mark.parametrize("method", COMPRESSING)
def test_budget_one_gives_full_cache_tokens(method):
    model = tiny_model("qwen3")
    ids, mask = padded_batch((40, 33), seed=4)
    model.set_attn_implementation("sdpa")
    ref = model.generate(ids, attention_mask=mask, **cache_kwarg(model, DynamicCache()), max_new_tokens=8,
                         do_sample=False, pad_token_id=0)
    model.set_attn_implementation("heterocache")
    cache = make_cache(method, 1.0, model, **_exact_variant(method))
    out = model.generate(ids, attention_mask=mask, **cache_kwarg(model, cache), max_new_tokens=8, do_sample=False,
                         pad_token_id=0)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("method", ["streamingllm", "h2o", "cake"])
def test_methods_evicting_while_decoding_hold_the_prompt_size_at_budget_one(method):
    model = tiny_model("llama")
    ids, mask = padded_batch((30, 22))
    cache = make_cache(method, 1.0, model)
    seen = []
    check = EachStep(lambda: seen.append([t.clone() for t in cache.stored_tokens()]))
    model.generate(ids, attention_mask=mask, **cache_kwarg(model, cache), max_new_tokens=6, do_sample=False,
                   pad_token_id=0, logits_processor=LogitsProcessorList([check]))
    assert len(seen) == 6
    for step in seen:
        for lengths in step:
            assert lengths.tolist() == [[30, 30], [22, 22]]


@pytest.mark.parametrize("method", ["streamingllm", "h2o", "cake"])
def test_methods_evicting_while_decoding_cannot_be_cropped(method):
    model = tiny_model("llama")
    cache = make_cache(method, 0.5, model)
    with torch.no_grad():
        model(torch.randint(1, 256, (1, 20)), **cache_kwarg(model, cache))
    with pytest.raises(NotImplementedError, match="evicts tokens while decoding"):
        cache.crop(-2)
    assert make_cache(method, 0.5, model, evict_during_decode=False).is_croppable


@pytest.mark.parametrize("mode", ["avg", "max"])
@pytest.mark.parametrize("kernel", [1, 3, 5, 7])
def test_pool_scores_is_torchs_1d_pooling(mode, kernel):
    import torch.nn.functional as F

    from heterocache.policy.scoring import pool_scores

    torch.manual_seed(kernel)
    x = torch.rand(2, 3, 4, 50)
    out = pool_scores(x, kernel, mode)
    if kernel == 1:
        assert out is x
        return
    pool = F.avg_pool1d if mode == "avg" else F.max_pool1d
    ref = pool(x.reshape(-1, 1, 50), kernel, stride=1, padding=kernel // 2).reshape(x.shape)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-7)
    assert out.shape == x.shape


def test_pool_scores_rejects_an_unknown_mode():
    from heterocache.policy.scoring import pool_scores

    with pytest.raises(ValueError, match="'avg' or 'max'"):
        pool_scores(torch.rand(4, 9), 3, "median")
