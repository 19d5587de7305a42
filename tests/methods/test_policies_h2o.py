"""H2O: heavy hitters by accumulated attention + recent window; evicting back to budget each step."""

from __future__ import annotations

import pytest
import torch
from test_policies_common import EachStep, decode_step, padded_batch, positions, prefill, random_ctx
from transformers import LogitsProcessorList

from helpers import tiny_model
from heterocache import H2OCache
from heterocache._compat import cache_kwarg
from heterocache.methods.h2o import SCORE_BUFFER, H2OPolicy
from heterocache.policy.base import PrefillContext
from heterocache.policy.scoring import accumulated_attention


def _eager_column_sums(query, key, valid, scaling):
    """Oracle: the full causal attention matrix, summed over real queries."""
    B, Hq, L, D = query.shape
    G = Hq // key.shape[1]
    k = key.repeat_interleave(G, dim=1)
    s = query @ k.transpose(-1, -2) * scaling
    allowed = torch.ones(L, L, dtype=torch.bool).tril()[None, None] & valid[:, None, None, :]
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
    return (p * valid[:, None, :, None]).sum(2)


def test_hand_case_keeps_recent_tokens_and_the_heavy_hitters():
    # One head. Every query is e0; token 3's key is 10*e0, the others 0. Queries 0..2 spread their
    # attention uniformly (token 0: 1 + 1/2 + 1/3, token 1: 1/2 + 1/3, token 2: 1/3), queries 3..5
    # put almost all of theirs on token 3 (~3). Budget 4 = 2 recent (4, 5) + 2 heavy (3 and 0).
    L, D = 6, 2
    query = torch.zeros(1, 1, L, D)
    query[..., 0] = 1.0
    key = torch.zeros(1, 1, L, D)
    key[0, 0, 3, 0] = 10.0
    ctx = PrefillContext(0, query, key, key.clone(), torch.ones(1, L, dtype=torch.bool), scaling=1.0)
    policy = H2OPolicy(budget_tokens=4, recent_ratio=0.5)
    scores = policy.token_scores(ctx)[0, 0]
    assert scores[0] == pytest.approx(1 + 1 / 2 + 1 / 3, abs=2e-3)
    assert scores[3] == pytest.approx(3.0, abs=2e-3)
    keep = policy.select(ctx, policy.plan(ctx))
    assert torch.nonzero(keep[0, 0]).flatten().tolist() == [0, 3, 4, 5]


@pytest.mark.parametrize("query_chunk,max_elements", [(512, 1 << 24), (1, 1 << 24), (7, 1 << 24), (512, 500)])
def test_accumulated_attention_in_query_chunks_equals_full_matrix_column_sums(query_chunk, max_elements):
    valid = torch.ones(2, 30, dtype=torch.bool)
    valid[1, :9] = False
    ctx = random_ctx(0, valid, H=2, G=3, D=8, seed=3)
    got = accumulated_attention(ctx.query, ctx.key, valid, ctx.scaling, query_chunk, max_elements)
    want = _eager_column_sums(ctx.query, ctx.key, valid, ctx.scaling)
    assert torch.allclose(got, want, atol=1e-5)
    assert bool((got[1, :, :9] == 0).all())  # padding gets nothing
    assert torch.allclose(got.sum(-1), valid.sum(-1, keepdim=True).float().expand(2, 6))  # one per query


def _reference_h2o(qs, ks, valid_n, k_budget, recent, scaling, steps_q, steps_k):
    """Dense oracle for one (row, KV head): H2O's prefill selection and decode-time eviction.

    qs: [G, n, D] prompt queries of the group; ks: [n, D]; steps_*: per step [G, D] / [D].
    Yields (kept positions, their scores) after prefill and after every step.
    """
    G, n, D = qs.shape
    s = qs @ ks.T * scaling
    s = s.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    score = torch.softmax(s, -1).sum(1).mean(0)  # [n], GQA mean
    order = sorted(range(n - recent), key=lambda j: -float(score[j]))[: k_budget - recent]
    kept = sorted(order) + list(range(n - recent, n))
    keys = {j: ks[j] for j in kept}
    scores = {j: float(score[j]) for j in kept}
    yield list(kept), [scores[j] for j in kept]
    for t, (q, k) in enumerate(zip(steps_q, steps_k)):
        pos = n + t
        kept.append(pos)
        keys[pos] = k
        scores[pos] = 0.0
        K = torch.stack([keys[j] for j in kept])
        a = torch.softmax(q @ K.T * scaling, -1).mean(0)
        for j, aj in zip(kept, a.tolist()):
            scores[j] += aj
        if len(kept) > k_budget:
            victim = min(kept[: len(kept) - recent], key=lambda j: scores[j])
            kept.remove(victim)
        yield list(kept), [scores[j] for j in kept]


def test_decode_eviction_and_score_buffer_follow_the_dense_oracle():
    lengths, H, G, D, steps = (24, 17), 2, 2, 8, 12
    L = max(lengths)
    valid = torch.zeros(2, L, dtype=torch.bool)
    for r, n in enumerate(lengths):
        valid[r, L - n :] = True
    ctx = random_ctx(0, valid, H=H, G=G, D=D, num_layers=1, seed=5)
    policy = H2OPolicy(budget=0.4, recent_ratio=0.5)
    (store,) = prefill(policy, [ctx], block_size=4, reserve=1)
    g = torch.Generator().manual_seed(6)
    step_q = [torch.randn(2, H * G, 1, D, generator=g) for _ in range(steps)]
    step_k = [torch.randn(2, H, 1, D, generator=g) for _ in range(steps)]
    observed = [[(positions(store, s).tolist(), _scores(store, s)) for s in range(2 * H)]]
    for t in range(steps):
        if t == steps // 2:
            store.select_rows(torch.arange(2))  # a reallocation must carry the scores along
        decode_step(policy, [store], [step_q[t]], [step_k[t]], L + t)
        observed.append([(positions(store, s).tolist(), _scores(store, s)) for s in range(2 * H)])
    for r, n in enumerate(lengths):
        budget = round(0.4 * n)
        for h in range(H):
            oracle = _reference_h2o(
                ctx.query[r, h * G : (h + 1) * G, L - n :],
                ctx.key[r, h, L - n :],
                n,
                budget,
                round(0.5 * budget),
                ctx.scaling,
                [q[r, h * G : (h + 1) * G, 0] for q in step_q],
                [k[r, h, 0] for k in step_k],
            )
            for t, (want_pos, want_scores) in enumerate(oracle):
                got_pos, got_scores = observed[t][r * H + h]
                assert [p - (L - n) for p in got_pos] == want_pos, (r, h, t)
                assert got_scores == pytest.approx(want_scores, abs=1e-4), (r, h, t)


def _scores(store, s):
    lo, n = int(store.start[s]), int(store.length[s])
    return store.slot_buffer(SCORE_BUFFER)[lo : lo + n].tolist()


def test_never_exceeds_budget_during_a_long_decode():
    model = tiny_model("qwen2")
    ids, mask = padded_batch((40, 29))
    cache = H2OCache(budget=0.25)
    budget = [[10, 10], [7, 7]]
    lengths = []
    check = EachStep(lambda: lengths.append([t.tolist() for t in cache.stored_tokens()]))
    model.generate(ids, attention_mask=mask, **cache_kwarg(model, cache), max_new_tokens=40, do_sample=False,
                   pad_token_id=0, logits_processor=LogitsProcessorList([check]))
    assert len(lengths) == 40
    assert all(layer == budget for step in lengths for layer in step)


def test_beam_search_reorders_rows_and_scores_with_the_store():
    model = tiny_model("llama")
    ids, mask = padded_batch((36, 30))
    cache = H2OCache(budget=0.3)
    out = model.generate(ids, attention_mask=mask, **cache_kwarg(model, cache), max_new_tokens=6, num_beams=2,
                         do_sample=False, pad_token_id=0)
    assert out.shape[0] == 2
    for layer in cache.layers:
        store = layer.store
        assert store.num_rows == 4  # 2 rows x 2 beams
        assert store.slot_buffer(SCORE_BUFFER).shape == (store.capacity,)
        assert torch.equal(store.lengths(), torch.tensor([[11, 11], [11, 11], [9, 9], [9, 9]]))


def test_prefill_only_variant_appends_decoded_tokens():
    model = tiny_model("llama")
    ids, mask = padded_batch((40, 29))
    cache = H2OCache(budget=0.25, evict_during_decode=False)
    model.generate(ids, attention_mask=mask, **cache_kwarg(model, cache), max_new_tokens=5, do_sample=False,
                   pad_token_id=0)
    for lengths in cache.stored_tokens():
        assert lengths.tolist() == [[14, 14], [11, 11]]  # budget + 4 decoded tokens
    assert cache.is_croppable


@pytest.mark.parametrize("kwargs,match",
                         [({"recent_ratio": 1.5}, "recent_ratio"), ({"gqa_reduce": "sum"}, "gqa_reduce")])
def test_invalid_options_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        H2OPolicy(**kwargs)


def test_accumulated_attention_without_padding_and_shared_within_a_block(monkeypatch):
    from heterocache.policy import scoring

    valid = torch.ones(1, 40, dtype=torch.bool)
    ctx = random_ctx(0, valid, H=2, G=2, D=8, seed=5)
    want = _eager_column_sums(ctx.query, ctx.key, valid, ctx.scaling)
    assert torch.allclose(accumulated_attention(ctx.query, ctx.key, valid, ctx.scaling, 16), want, atol=1e-5)
    calls = []
    inner = scoring._accumulated_attention
    monkeypatch.setattr(scoring, "_accumulated_attention", lambda *a: calls.append(1) or inner(*a))
    with scoring.shared_scores():
        first = accumulated_attention(ctx.query, ctx.key, valid, ctx.scaling)
        first.zero_()  # a caller's in-place change must not reach the next caller
        again = accumulated_attention(ctx.query, ctx.key, valid, ctx.scaling)
        prefix = accumulated_attention(ctx.query[:, :, :30], ctx.key[:, :, :30], valid[:, :30], ctx.scaling)
        with pytest.raises(RuntimeError, match="nest"):
            with scoring.shared_scores():
                pass
    assert len(calls) == 2 and torch.allclose(again, want, atol=1e-5)
    assert torch.allclose(prefix, _eager_column_sums(ctx.query[:, :, :30], ctx.key[:, :, :30], valid[:, :30],
                                                     ctx.scaling), atol=1e-5)
    accumulated_attention(ctx.query, ctx.key, valid, ctx.scaling)
    assert len(calls) == 3  # outside the block nothing is kept


@pytest.mark.parametrize("pad", [0, 5])
def test_a_declared_prefix_is_recorded_by_the_longer_call_and_equals_its_own_computation(monkeypatch, pad):
    from heterocache.policy import scoring

    valid = torch.ones(2, 50, dtype=torch.bool)
    valid[1, :pad] = False
    ctx = random_ctx(0, valid, H=2, G=2, D=8, seed=7)
    # Outside a block: each length on its own (chunks of 16: the prefix 37 is not a chunk boundary).
    alone = {n: accumulated_attention(ctx.query[:, :, :n], ctx.key[:, :, :n], valid[:, :n], ctx.scaling, 16)
             for n in (50, 37, 20)}
    calls = []
    inner = scoring._accumulated_attention
    monkeypatch.setattr(scoring, "_accumulated_attention", lambda *a: calls.append(1) or inner(*a))
    with scoring.shared_scores(prefixes=[50, 37, 20]):
        shared = {n: accumulated_attention(ctx.query[:, :, :n], ctx.key[:, :, :n], valid[:, :n], ctx.scaling, 16)
                  for n in (50, 37, 20)}
        other_scale = accumulated_attention(ctx.query[:, :, :37], ctx.key[:, :, :37], valid[:, :37], 0.5, 16)
    assert len(calls) == 2  # the 37- and 20-token results came with the 50-token one; another scale did not
    for n in (50, 37, 20):
        assert torch.allclose(shared[n], alone[n], rtol=1e-5, atol=1e-6), n  # chunked at other rows only
        want = _eager_column_sums(ctx.query[:, :, :n], ctx.key[:, :, :n], valid[:, :n], ctx.scaling)
        assert torch.allclose(shared[n], want, atol=1e-5)
    assert not torch.allclose(other_scale, shared[37])


def test_window_scores_and_stats_are_computed_once_per_input_within_a_block(monkeypatch):
    from heterocache.policy import scoring

    valid = torch.ones(1, 40, dtype=torch.bool)
    ctx = random_ctx(0, valid, H=2, G=2, D=8, seed=9)
    args = (ctx.query, ctx.key, valid)
    want = scoring.window_attention_scores(*args, 8, ctx.scaling)
    want_stats = scoring.window_attention_stats(*args, 8, ctx.scaling)
    calls = []
    inner = scoring._window_probabilities
    monkeypatch.setattr(scoring, "_window_probabilities", lambda *a: calls.append(a[3]) or inner(*a))
    with scoring.shared_scores():
        first = scoring.window_attention_scores(*args, 8, ctx.scaling)
        first.zero_()  # stays with its caller
        again = scoring.window_attention_scores(*args, 8, ctx.scaling)
        other = scoring.window_attention_scores(*args, 4, ctx.scaling)
        stats = [scoring.window_attention_stats(*args, 8, ctx.scaling) for _ in range(2)]
    assert calls == [8, 4, 8]  # one per distinct (kind, window)
    assert torch.equal(again, want) and not torch.allclose(other, want)
    assert all(torch.equal(a, b) for s in stats for a, b in zip(s, want_stats))
    scoring.window_attention_scores(*args, 8, ctx.scaling)
    assert calls == [8, 4, 8, 8]  # nothing kept outside the block
