"""Store additions for eviction: in-order compaction, capacity release, per-slot policy buffers."""

from __future__ import annotations

import pytest
import torch

from heterocache.store.ragged import RaggedKVStore


def _store(B=2, H=2, L=10, D=4, block_size=8, reserve=3, seed=0):
    key = torch.arange(B * H * L * D, dtype=torch.float32).view(B, H, L, D)
    keep = torch.rand(B, H, L, generator=torch.Generator().manual_seed(seed)) < 0.7
    keep[..., 0] = True  # no empty segment
    store = RaggedKVStore(B, H, D, torch.float32, torch.device("cpu"), block_size, reserve)
    store.fill(key, -key, keep, torch.arange(L))
    return store, key, keep


def _segments(store):
    return [tuple(t.clone() for t in store.segment(s)) for s in range(store.num_segments)]


def test_compact_keeps_marked_tokens_in_order_and_frees_the_rest():
    store, _, _ = _store()
    before = _segments(store)
    idx, valid = store.padded_index()
    keep = valid & (torch.arange(idx.shape[1])[None, :] % 2 == 0)  # every other stored token
    caps = store.cap.clone()
    evicted = store.compact(keep)
    assert torch.equal(evicted, valid.sum(-1) - keep.sum(-1))
    assert torch.equal(store.cap, caps)  # in place: no reallocation
    for s, (k, v, pos) in enumerate(before):
        k2, v2, pos2 = store.segment(s)
        assert torch.equal(k2, k[::2]) and torch.equal(v2, v[::2]) and torch.equal(pos2, pos[::2])
        lo, n, cap = int(store.start[s]), int(store.length[s]), int(store.cap[s])
        assert (store.pos[lo + n : lo + cap] == -1).all()
        assert (store.k[lo + n : lo + cap] == 0).all()


def test_compact_accepts_batch_head_layout_and_ignores_columns_past_the_length():
    store, _, keep_fill = _store()
    M = int(store.length.max())
    keep = torch.ones(2, 2, M + 5, dtype=torch.bool)
    keep[1, 0, 0] = False  # drop the first token of segment 2
    first = store.segment(2)[2][1].item()
    store.compact(keep)
    assert torch.equal(store.length, keep_fill.sum(-1).flatten() - torch.tensor([0, 0, 1, 0]))
    assert store.segment(2)[2][0].item() == first


def test_compact_rejects_a_mask_shorter_than_the_longest_segment():
    store, _, _ = _store()
    with pytest.raises(ValueError, match="columns"):
        store.compact(torch.ones(4, 1, dtype=torch.bool))


def test_append_after_compact_writes_behind_the_kept_tokens():
    store, _, _ = _store()
    idx, valid = store.padded_index()
    keep = valid.clone()
    keep[:, 0] = False
    store.compact(keep)
    lengths = store.length.clone()
    store.append(torch.full((2, 2, 1, 4), 7.0), torch.zeros(2, 2, 1, 4), torch.tensor([10]))
    assert torch.equal(store.length, lengths + 1)
    for s in range(4):
        k, _, pos = store.segment(s)
        assert pos[-1].item() == 10 and (k[-1] == 7.0).all()
        assert bool((pos[1:] > pos[:-1]).all())


def test_shrink_releases_capacity_and_keeps_contents():
    store, _, _ = _store(L=40, reserve=3)
    idx, valid = store.padded_index()
    keep = valid & (torch.arange(idx.shape[1])[None, :] < 3)
    store.compact(keep)
    before = _segments(store)
    cap_before = int(store.cap.sum())
    store.shrink()
    assert int(store.cap.sum()) < cap_before
    assert torch.equal(store.cap % store.block_size, torch.zeros_like(store.cap))
    for s, seg in enumerate(before):
        assert all(torch.equal(a, b) for a, b in zip(store.segment(s), seg))


def test_padded_index_reads_the_padded_layout():
    store, _, _ = _store()
    idx, valid = store.padded_index()
    k, _, valid_p, pos = store.padded()
    assert torch.equal(valid, valid_p.view_as(valid))
    assert torch.equal(store.k[idx][valid], k.view(4, -1, 4)[valid])


def test_slot_buffer_starts_at_fill_and_follows_tokens_through_growth():
    store, _, _ = _store(reserve=1)
    buf = store.add_slot_buffer("score", fill=-1.0)
    assert buf.shape == (store.capacity,) and bool((buf == -1.0).all())
    used = store.used_slots()
    buf[used] = store.pos[used].float()  # tag each token with its position
    caps = store.cap.clone()
    for step in range(30):  # forces reallocation
        store.append(torch.zeros(2, 2, 1, 4), torch.zeros(2, 2, 1, 4), torch.tensor([100 + step]))
    assert not torch.equal(store.cap, caps)
    buf = store.slot_buffer("score")
    used = store.used_slots()
    tagged = store.pos[used] < 100
    assert torch.equal(buf[used][tagged], store.pos[used][tagged].float())
    assert bool((buf[used][~tagged] == -1.0).all())  # appended tokens start at the fill value


def test_slot_buffer_follows_rows_and_compaction():
    store, _, _ = _store()
    store.add_slot_buffer("tag")
    used = store.used_slots()
    store.slot_buffer("tag")[used] = store.pos[used].float() + 1000 * torch.repeat_interleave(
        torch.arange(4), store.length
    ).float()
    store.select_rows(torch.tensor([1, 0, 1]))
    idx, valid = store.padded_index()
    store.compact(valid & (torch.arange(idx.shape[1])[None, :] % 3 != 1))
    source_segment = torch.tensor([2, 3, 0, 1, 2, 3])
    for s in range(store.num_segments):
        lo, n = int(store.start[s]), int(store.length[s])
        expected = store.pos[lo : lo + n].float() + 1000 * source_segment[s]
        assert torch.equal(store.slot_buffer("tag")[lo : lo + n], expected)
        cap = int(store.cap[s])
        assert bool((store.slot_buffer("tag")[lo + n : lo + cap] == 0).all())


def test_slot_buffers_count_in_allocated_bytes_and_can_be_removed():
    store, _, _ = _store()
    base = store.bytes_allocated()
    store.add_slot_buffer("score")
    assert store.bytes_allocated() == base + store.capacity * 4
    with pytest.raises(ValueError, match="exists"):
        store.add_slot_buffer("score")
    store.remove_slot_buffer("score")
    assert store.bytes_allocated() == base and store.slot_buffers == {}


@pytest.mark.parametrize("seed", range(4))
def test_dropping_at_most_one_token_per_segment_equals_the_general_compaction(seed):
    def build():
        store, _, _ = _store(B=3, H=2, L=12, seed=seed)
        store.add_slot_buffer("score", fill=-2.0)
        used = store.used_slots()
        store.slot_buffer("score")[used] = torch.rand(used.numel(), generator=torch.Generator().manual_seed(seed))
        return store

    fast, general = build(), build()
    g = torch.Generator().manual_seed(100 + seed)
    idx, valid = fast.padded_index()
    keep = valid.clone()
    column = torch.zeros(fast.num_segments, dtype=torch.long)
    for s in range(fast.num_segments):  # drop one token at a random place (first, middle, last) or none
        n = int(fast.length[s])
        column[s] = int(torch.randint(0, n + 1, (1,), generator=g))
    column[0] = int(fast.length[0]) - 1  # one segment loses its last token
    column[1] = int(fast.length[1])  # and one loses nothing
    evicting = (column < fast.length).numpy()
    keep[torch.arange(fast.num_segments)[torch.from_numpy(evicting)], column[torch.from_numpy(evicting)]] = False
    fast.drop_one(torch.where(torch.from_numpy(evicting), column, 0), evicting)
    evicted = general.compact(keep)
    assert torch.equal(torch.from_numpy(evicting).long(), evicted) and evicting.sum() >= 1
    assert torch.equal(fast.length, general.length)
    assert (fast.length_h == general.length_h).all() and (fast.length_h == fast.length.numpy()).all()
    for a, b in [(fast.k, general.k), (fast.v, general.v), (fast.pos, general.pos),
                 (fast.slot_buffer("score"), general.slot_buffer("score"))]:
        assert torch.equal(a, b)
