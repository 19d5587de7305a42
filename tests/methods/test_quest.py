"""Quest on the engine: page summaries, page scores and choice by hand, the selected-slot
attention against a naive oracle, generate() on padded batches and a second turn, memory and the
decode-step rules (no host reads)."""

from __future__ import annotations

import pytest
import torch

from helpers import dynamic_reference, tiny_model
from heterocache import FullKVCache, QuestCache
from heterocache._compat import cache_kwarg
from heterocache.attention.decode import SlotSelection, selected_decode_attention
from heterocache.bench.diagnostics import count_decode_steps
from heterocache.methods.quest import QuestPolicy
from heterocache.policy.page_selection import PageSummaries
from heterocache.store.ragged import RaggedKVStore

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = dict(num_hidden_layers=4, hidden_size=128, num_attention_heads=8, num_key_value_heads=4, head_dim=16)


def _store(lengths, H=1, D=4, seed=0, reserve=8):
    """A store whose segment s (row-major over H heads) holds its first ``lengths[s]`` random tokens."""
    g = torch.Generator().manual_seed(seed)
    B, L = len(lengths) // H, max(lengths)
    key, value = torch.randn(B, H, L, D, generator=g), torch.randn(B, H, L, D, generator=g)
    keep = torch.arange(L)[None, None, :] < torch.tensor(lengths).view(B, H, 1)
    store = RaggedKVStore(B, H, D, torch.float32, torch.device("cpu"), 4, reserve)
    store.fill(key, value, keep, torch.arange(L))
    return store, key, keep


def _append(store, key):
    """One decode-step append of ``key [S, D]`` (values zero)."""
    B, H, D = store.num_rows, store.num_heads, store.head_dim
    store.begin_decode_append()
    store.append_decode(key.view(B, H, 1, D), torch.zeros(B, H, 1, D), torch.tensor([store.max_length()]))


def test_page_summaries_are_the_channel_extrema_of_each_page():
    store, key, keep = _store([10, 5], H=1)
    summaries = PageSummaries.build(store, page_size=4)
    for s, n in enumerate([10, 5]):
        tokens = key[s, 0, :n]
        for p in range(-(-n // 4)):
            page = tokens[p * 4 : (p + 1) * 4]
            assert torch.equal(summaries.kmin[s, p], page.amin(0)) and torch.equal(summaries.kmax[s, p], page.amax(0))


def test_decode_updates_equal_a_rebuild_and_a_new_page_opens_on_its_first_token():
    store, key, keep = _store([7, 8], H=1, reserve=2)  # segment 1's 9th token opens page 2; growth on the way
    summaries = PageSummaries.build(store, page_size=4)
    g = torch.Generator().manual_seed(3)
    for _ in range(11):
        _append(store, torch.randn(2, 4, generator=g) * 5)
        summaries.update(store)
        rebuilt = PageSummaries.build(store, page_size=4)
        P = rebuilt.kmin.shape[1]
        used = (store.lengths() + 3) // 4
        for s in range(2):
            u = int(used[s])
            assert torch.equal(summaries.kmin[s, :u], rebuilt.kmin[s, :u])
            assert torch.equal(summaries.kmax[s, :u], rebuilt.kmax[s, :u])
        assert summaries.kmin.shape[1] >= P


def test_page_scores_are_the_upper_bound_formula_with_the_newest_page_forced_in():
    store, key, keep = _store([10, 3], H=1)
    summaries = PageSummaries.build(store, page_size=4)
    q = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(1))  # [S, G, D]
    raw = QuestPolicy().page_scores(q, summaries.kmin, summaries.kmax)
    scores = summaries.mask(raw, store, "max")
    for s, n in enumerate([10, 3]):
        used = -(-n // 4)
        for p in range(scores.shape[1]):
            if p >= used:
                assert scores[s, p] == float("-inf")
            elif p == used - 1:
                assert scores[s, p] == float("inf")
            else:
                bound = torch.maximum(q[s] * summaries.kmin[s, p], q[s] * summaries.kmax[s, p]).sum(-1)  # [G]
                torch.testing.assert_close(scores[s, p], bound.max())
                # it bounds every real product of the page
                page = key[s, 0, p * 4 : min((p + 1) * 4, n)]
                assert (q[s] @ page.T).max() <= bound.max() + 1e-5


def _naive_selected(store, query, scaling, slots, valid):
    B, Hq, _, D = query.shape
    S, G = store.num_segments, Hq // store.num_heads
    out = torch.empty(S, G, D)
    for s in range(S):
        idx = slots[s][valid[s]]
        k, v = store.k[idx], store.v[idx]
        p = torch.softmax(query.reshape(S, G, D)[s] @ k.T * scaling, -1)
        out[s] = p @ v
    return out.view(B, 1, Hq, D)


def test_selected_attention_equals_the_naive_oracle_on_ragged_gqa_rows():
    store, _, _ = _store([9, 4, 13, 6], H=2, D=8)
    query = torch.randn(2, 6, 1, 8, generator=torch.Generator().manual_seed(2))  # G = 3
    g = torch.Generator().manual_seed(4)
    lengths = store.lengths().reshape(-1)  # [S]
    within = torch.stack([torch.randperm(13, generator=g)[:5] for _ in range(4)])
    valid = within < lengths[:, None]
    valid[:, 0] = True
    within = torch.where(valid, within, 0) % lengths[:, None]
    slots = store.start[:, None] + within
    out = selected_decode_attention(store, query, 0.3, SlotSelection(slots, valid))
    torch.testing.assert_close(out, _naive_selected(store, query, 0.3, slots, valid), rtol=1e-5, atol=1e-6)


def test_the_policy_reads_the_top_pages_and_the_current_one():
    policy = QuestPolicy(budget_tokens=8, page_size=4, dense_layers=0, min_pages=1)
    store, key, keep = _store([20], H=1)
    policy.on_prefill_done(0, store, None)
    _append(store, torch.randn(1, 4, generator=torch.Generator().manual_seed(5)))  # 21 tokens: page 5 opens
    query = torch.randn(1, 2, 1, 4, generator=torch.Generator().manual_seed(6))  # G = 2
    selection = policy.decode_selection(0, store, query, 0.5)
    pages = sorted({int(s) // 4 for s, ok in zip(selection.slots[0], selection.valid[0]) if ok})
    summaries = policy._summaries[0]
    bounds = [float(torch.maximum(query[0, :, 0] * summaries.kmin[0, p],
                                  query[0, :, 0] * summaries.kmax[0, p]).sum(-1).max())
              for p in range(5)]
    best = max(range(5), key=lambda p: bounds[p])
    assert pages == sorted({5, best})  # 8 tokens = 2 pages: the current one and the best other
    assert int(selection.valid.sum()) == 4 + 1  # a full page and the 1-token current page


def test_budget_one_and_dense_layers_give_exactly_dynamic_cache_tokens_on_a_padded_batch():
    model, ids, kw, ref = dynamic_reference(SHAPE)
    assert torch.equal(model.generate(ids, **cache_kwarg(model, QuestCache(budget=1.0)), **kw), ref)
    assert torch.equal(model.generate(ids, **cache_kwarg(model, QuestCache(budget=0.1, dense_layers=4)), **kw), ref)


def test_a_small_budget_reads_fewer_tokens_and_survives_a_second_turn():
    model = tiny_model("llama", **SHAPE)
    ids = torch.randint(1, 256, (2, 120), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :9] = 0
    cache = QuestCache(budget=0.2, page_size=8)
    out = model.generate(ids, attention_mask=mask, **cache_kwarg(model, cache), max_new_tokens=6, do_sample=False)
    policy = cache.policy
    assert set(policy._summaries) == {2, 3}  # the first two layers are dense
    store = cache.layers[3].store
    assert policy.pages_per_step(store) * 8 < store.max_length()  # selective, not dense
    turn = torch.randint(1, 256, (2, 7), generator=torch.Generator().manual_seed(2))
    ids2 = torch.cat([out, turn], 1)
    mask2 = torch.cat([mask, torch.ones(2, ids2.shape[1] - mask.shape[1], dtype=mask.dtype)], 1)
    out2 = model.generate(ids2, attention_mask=mask2, **cache_kwarg(model, cache), max_new_tokens=5, do_sample=False)
    assert out2.shape[1] == ids2.shape[1] + 5
    # Summaries cover the second turn exactly (rebuilt at the turn, then updated per step).
    rebuilt = PageSummaries.build(cache.layers[3].store, 8)
    used = int((cache.layers[3].store.lengths().max() + 7) // 8)
    torch.testing.assert_close(policy._summaries[3].kmin[:, :used], rebuilt.kmin[:, :used])


def test_memory_report_counts_every_token_and_the_summaries():
    model = tiny_model("llama", **SHAPE)
    ids = torch.randint(1, 256, (1, 100), generator=torch.Generator().manual_seed(3))
    full, quest = FullKVCache(), QuestCache(budget=0.25)
    for cache in (full, quest):
        model.generate(ids, **cache_kwarg(model, cache), max_new_tokens=3, do_sample=False)
    rf, rq = full.memory_report(), quest.memory_report()
    assert rq.device_used_bytes == rf.device_used_bytes  # Quest saves bandwidth, not memory
    summaries = sum(s.nbytes() for s in quest.policy._summaries.values())
    assert summaries > 0 and rq.device_bytes == rf.device_bytes + summaries
    assert {layer.roles[0] for layer in rq.layers} == {"dense", "paged"}


@pytest.mark.parametrize("strategy", ["device", "segments"])
def test_decode_steps_read_no_device_values_on_the_host(strategy, monkeypatch):
    monkeypatch.setenv("HETEROCACHE_DECODE", f"strategy={strategy}")
    model = tiny_model("llama", **SHAPE)
    ids = torch.randint(1, 256, (2, 150), generator=torch.Generator().manual_seed(4))
    result = count_decode_steps(model, ids, QuestCache(budget=0.2), steps=8)
    assert result["host_reads"] == 0, result["reads_by_kind"]


@pytest.mark.parametrize("kwargs", [{"budget": 0}, {"budget_tokens": 0}, {"page_size": 0}, {"min_pages": 0},
                                    {"dense_layers": -1}, {"gqa_reduce": "sum"}])
def test_bad_parameters_are_rejected(kwargs):
    with pytest.raises(ValueError):
        QuestPolicy(**kwargs)


def test_crop_is_refused_not_stale():
    model = tiny_model("llama", **SHAPE)
    cache = QuestCache(budget=0.5)
    model.generate(torch.randint(1, 256, (1, 40)), **cache_kwarg(model, cache), max_new_tokens=2, do_sample=False)
    assert not cache.is_croppable


def test_quest_is_registered_with_its_defaults():
    from heterocache.engine.registry import describe_methods, get_method, make_cache

    spec = get_method("quest")
    assert spec.params["page_size"] == 16 and spec.params["dense_layers"] == 2 and spec.params["min_pages"] == 3
    assert "`quest`" in describe_methods()
    cache = make_cache("quest", 0.3, None, page_size=8)
    assert isinstance(cache, QuestCache) and cache.policy.page_size == 8 and cache.policy.budget == 0.3


def test_selected_attention_with_extra_tokens_equals_attention_over_the_union():
    store, _, _ = _store([9, 4], H=1, D=8)
    g = torch.Generator().manual_seed(7)
    query = torch.randn(2, 2, 1, 8, generator=g)
    slots = store.start[:, None] + torch.tensor([[0, 3, 8], [1, 2, 0]])
    valid = torch.tensor([[True, True, True], [True, True, False]])
    ek, ev = torch.randn(2, 4, 8, generator=g), torch.randn(2, 4, 8, generator=g)
    evalid = torch.tensor([[True, False, True, True], [True, True, True, True]])
    out = selected_decode_attention(store, query, 0.4, SlotSelection(slots, valid, ek, ev, evalid))
    for s in range(2):
        k = torch.cat([store.k[slots[s][valid[s]]], ek[s][evalid[s]]])
        v = torch.cat([store.v[slots[s][valid[s]]], ev[s][evalid[s]]])
        p = torch.softmax(query[s, :, 0] @ k.T * 0.4, -1)
        torch.testing.assert_close(out[s, 0], p @ v, rtol=1e-5, atol=1e-6)


def test_per_query_head_selection_equals_the_naive_oracle():
    store, _, _ = _store([9, 13], H=1, D=8)
    g = torch.Generator().manual_seed(8)
    query = torch.randn(2, 3, 1, 8, generator=g)  # G = 3: rows s * 3 + g
    within = torch.stack([torch.randperm(9, generator=g)[:4] for _ in range(6)])
    valid = torch.ones(6, 4, dtype=torch.bool)
    valid[4, 2:] = False
    slots = store.start.repeat_interleave(3)[:, None] + within
    out = selected_decode_attention(store, query, 0.3, SlotSelection(slots, valid))
    for s in range(2):
        for h in range(3):
            r = s * 3 + h
            idx = slots[r][valid[r]]
            p = torch.softmax(query[s, h, 0] @ store.k[idx].T * 0.3, -1)
            torch.testing.assert_close(out[s, 0, h], p @ store.v[idx], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="one per KV head"):
        selected_decode_attention(store, query, 0.3, SlotSelection(slots[:5], valid[:5]))


def test_gqa_none_gives_each_query_head_its_own_top_pages():
    policy = QuestPolicy(budget_tokens=8, page_size=4, dense_layers=0, min_pages=1, gqa_reduce="none")
    store, key, keep = _store([20], H=1)
    policy.on_prefill_done(0, store, None)
    _append(store, torch.randn(1, 4, generator=torch.Generator().manual_seed(5)))
    query = torch.randn(1, 2, 1, 4, generator=torch.Generator().manual_seed(9))
    selection = policy.decode_selection(0, store, query, 0.5)
    assert selection.slots.shape[0] == 2  # a selection per query head
    summaries = policy._summaries[0]
    for g in range(2):
        bounds = [float(torch.maximum(query[0, g, 0] * summaries.kmin[0, p],
                                      query[0, g, 0] * summaries.kmax[0, p]).sum())
                  for p in range(5)]
        best = max(range(5), key=lambda p: bounds[p])
        pages = sorted({int(s) // 4 for s, ok in zip(selection.slots[g], selection.valid[g]) if ok})
        assert pages == sorted({5, best})


def test_gqa_none_generates_and_equals_dynamic_cache_at_full_budget():
    model, ids, kw, ref = dynamic_reference(SHAPE, L=70, pad=(0, 6), new_tokens=6, seed=5)
    assert torch.equal(model.generate(ids, **cache_kwarg(model, QuestCache(budget=1.0, gqa_reduce="none")), **kw), ref)
    out = model.generate(ids, **cache_kwarg(model, QuestCache(budget=0.2, page_size=4, gqa_reduce="none")), **kw)
    assert out.shape == ref.shape


def test_extra_tokens_must_match_the_selection_rows():
    store, _, _ = _store([9, 13], H=1, D=8)
    query = torch.randn(2, 3, 1, 8)
    slots = store.start.repeat_interleave(3)[:, None] + torch.zeros(6, 2, dtype=torch.long)
    valid = torch.ones(6, 2, dtype=torch.bool)
    extra = torch.zeros(2, 1, 8)
    with pytest.raises(ValueError, match="extra tokens must have the selection's 6 rows"):
        selected_decode_attention(store, query, 0.3,
                                  SlotSelection(slots, valid, extra, extra, torch.ones(2, 1, dtype=torch.bool)))
