"""The packed store: per-head lengths, order, growth, row selection, truncation."""

from __future__ import annotations

import torch

from heterocache.store.ragged import RaggedKVStore, segment_ranges_host


def _store(B=2, H=2, L=10, D=4, block_size=8, reserve=3):
    key = torch.arange(B * H * L * D, dtype=torch.float32).view(B, H, L, D)
    keep = torch.rand(B, H, L, generator=torch.Generator().manual_seed(0)) < 0.6
    store = RaggedKVStore(B, H, D, torch.float32, torch.device("cpu"), block_size, reserve)
    store.fill(key, -key, keep, torch.arange(L))
    return store, key, keep


def test_segment_ranges_concatenates_aranges():
    assert segment_ranges_host([10, 0, 5], [2, 0, 3]).tolist() == [10, 11, 5, 6, 7]


def test_fill_keeps_selected_tokens_in_original_order_without_padding():
    store, key, keep = _store()
    assert torch.equal(store.lengths(), keep.sum(-1))
    for s in range(4):
        k, v, pos = store.segment(s)
        b, h = divmod(s, 2)
        assert torch.equal(k, key[b, h][keep[b, h]])
        assert torch.equal(v, -key[b, h][keep[b, h]])
        assert torch.equal(pos.long(), torch.nonzero(keep[b, h]).flatten())
    # Capacity is each head's own need plus reserve, block aligned: not the longest head's.
    assert torch.equal(store.cap % 8, torch.zeros(4, dtype=torch.long))
    assert int(store.cap.sum()) <= int(((keep.sum(-1).flatten() + 3 + 7) // 8 * 8).sum())


def test_append_grows_and_preserves_contents():
    store, key, keep = _store()
    before = [store.segment(s)[0].clone() for s in range(4)]
    for step in range(20):
        store.append(torch.full((2, 2, 1, 4), 1000.0 + step), torch.zeros(2, 2, 1, 4), torch.tensor([10 + step]))
    for s in range(4):
        k, _, pos = store.segment(s)
        n = len(before[s])
        assert torch.equal(k[:n], before[s])
        assert torch.equal(k[n:, 0], 1000.0 + torch.arange(20.0))
        assert pos[n:].tolist() == list(range(10, 30))


def test_append_skips_padding_tokens():
    store, _, keep = _store()
    valid = torch.tensor([[True, False, True], [False, False, True]])
    store.append(torch.ones(2, 2, 3, 4), torch.ones(2, 2, 3, 4), torch.tensor([10, 11, 12]), valid)
    assert torch.equal(store.lengths(), keep.sum(-1) + torch.tensor([[2, 2], [1, 1]]))
    assert store.segment(2)[2][-1].item() == 12


def test_select_rows_reorders_and_repeats():
    store, key, keep = _store()
    originals = [store.segment(s)[0].clone() for s in range(4)]
    store.select_rows(torch.tensor([1, 1, 0]))
    assert store.num_rows == 3
    expected = [originals[2], originals[3], originals[2], originals[3], originals[0], originals[1]]
    for s, ref in enumerate(expected):
        assert torch.equal(store.segment(s)[0], ref)


def test_truncate_positions_drops_tokens_at_or_after_limit():
    store, _, keep = _store()
    store.truncate_positions(5)
    assert torch.equal(store.lengths(), keep[..., :5].sum(-1))


def test_padded_view_matches_segments():
    store, key, keep = _store()
    k, v, valid, pos = store.padded()
    assert torch.equal(valid.sum(-1), store.lengths())
    for s in range(4):
        b, h = divmod(s, 2)
        n = int(store.length[s])
        assert torch.equal(k[b, h, :n], store.segment(s)[0])
