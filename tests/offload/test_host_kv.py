"""HostKV, the one host-KV container: packing a prompt (real tokens only or padded per segment),
the device-index gather, the host-index staging, row selection and byte accounting; and the
transfer's ``fetch`` of staged rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from heterocache.offload.host_kv import HostKV
from heterocache.offload.transfer import RefreshTransfer
from heterocache.store.ragged import RaggedKVStore

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")


def _prompt(B=2, H=3, L=6, D=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    key, value = torch.randn(B, H, L, D, generator=g), torch.randn(B, H, L, D, generator=g)
    valid = torch.ones(B, L, dtype=torch.bool)
    valid[1, :2] = False  # row 1 left-padded: 4 real tokens
    valid[1, 3] = False  # and a hole: its real columns are 2, 4, 5
    return key, value, valid


def test_a_prompt_packs_each_segments_real_tokens_in_order_with_their_columns():
    key, value, valid = _prompt()
    host = HostKV.from_prompt(key, value, valid, CPU, positions=True)
    assert host.lengths_h.tolist() == [6, 6, 6, 3, 3, 3] and host.offsets_h.tolist() == [0, 6, 12, 18, 21, 24]
    k, v = host.segment(host.segment_of(1, 2))
    assert torch.equal(k, key[1, 2, [2, 4, 5]]) and torch.equal(v, value[1, 2, [2, 4, 5]])
    assert host.pos[21:24].tolist() == [2, 4, 5] and host.pos.dtype == torch.int32
    assert host.nbytes() == 27 * 4 * 4 * 2 + 27 * 4 and host.mode == "cpu"


def test_padded_segments_hold_the_longest_prompt_with_zeros_after_the_real_tokens():
    key, value, valid = _prompt()
    host = HostKV.from_prompt(key, value, valid, CPU, heads=[2, 0], padded=True)
    assert host.lengths_h.tolist() == [6] * 4 and host.pos is None
    assert host.nbytes() == 2 * 2 * 6 * 4 * 4 * 2  # [B, held, Lmax, D] keys and values
    blocks = host.k.view(2, 2, 6, 4)
    assert torch.equal(blocks[0, 0], key[0, 2]) and torch.equal(blocks[0, 1], key[0, 0])
    assert torch.equal(blocks[1, 0, :3], key[1, 2, [2, 4, 5]]) and not blocks[1, :, 3:].any()
    assert host.segment_of(np.array([1, 0]), np.array([0, 2])).tolist() == [3, 0]


def test_gather_reads_one_index_list_per_row_or_per_segment_and_clamps():
    key, value, valid = _prompt()
    host = HostKV.from_prompt(key, value, valid, CPU)
    chosen = torch.tensor([[0, 5], [1, 2]])  # per row, for all its heads
    k, v = host.gather(chosen)
    assert k.shape == (6 * 2, 4)
    assert torch.equal(k.view(2, 3, 2, 4)[1, 1], key[1, 1, [4, 5]])
    assert torch.equal(v.view(2, 3, 2, 4)[0, 2], value[0, 2, [0, 5]])
    per_segment = torch.tensor([[0], [1], [2], [0], [1], [2]])
    k, _ = host.gather(per_segment)
    assert torch.equal(k[5], key[1, 2, 5])
    k, _ = host.gather(torch.tensor([[0, 0], [0, 9]]))  # past the buffer: clamped to its last row
    assert torch.equal(k[-1], key[1, 2, 5])


def test_values_only_keep_no_keys():
    rows = torch.randn(10, 6)
    host = HostKV(np.full(2, 5), range(2), CPU, v=rows)
    assert host.k is None and host.nbytes() == 240
    k, v = host.gather(torch.tensor([[3, 0], [4, 1]]))
    assert k is None and torch.equal(v, rows[[3, 0, 9, 6]])


def test_stage_copies_host_indexed_rows_and_passes_the_whole_buffer_through():
    key, value, valid = _prompt()
    host = HostKV.from_prompt(key, value, valid, CPU, heads=[1, 2], padded=True)
    segments = host.segment_of(np.array([1, 0]), np.array([2, 1]))
    k, v = host.stage(host.rows_of(segments, [0, 2, 5], [2, 1]))
    assert torch.equal(k, torch.stack([key[1, 2, 2], key[1, 2, 5], key[0, 1, 5]]))
    assert torch.equal(v[2], value[0, 1, 5]) and k.data_ptr() != host.k.data_ptr()
    (whole,) = host.stage(host.rows_of(np.arange(4)), values=False)
    assert whole is host.k


def test_select_rows_reorders_and_repeats_every_held_head():
    key, value, valid = _prompt()
    host = HostKV.from_prompt(key, value, valid, CPU, positions=True)
    host.select_rows(np.array([1, 1, 0]))
    assert host.lengths_h.tolist() == [3, 3, 3, 3, 3, 3, 6, 6, 6]
    assert torch.equal(host.segment(4)[0], key[1, 1, [2, 4, 5]]) and torch.equal(host.segment(8)[1], value[0, 2])
    assert host.pos[:3].tolist() == [2, 4, 5]


def test_a_store_round_trips_through_host_memory():
    store = RaggedKVStore(2, 3, 4, torch.float32, "cpu")
    key, value, valid = _prompt()
    store.fill(key, value, valid[:, None, :].expand(2, 3, 6), torch.arange(6))
    before = [[t.clone() for t in store.segment(s)] for s in range(6)]
    host = HostKV.from_store(store)
    assert host.lengths_h.tolist() == store.length_h.tolist()
    none = store.k.new_zeros(2, 3, 0, 4)
    store.fill(none, none, torch.zeros(2, 3, 0, dtype=torch.bool), torch.zeros(0, dtype=torch.long))
    host.restore_into(store)
    assert all(torch.equal(a, b) for s in range(6) for a, b in zip(store.segment(s), before[s]))


def test_fetch_copies_staged_rows_to_the_device():
    rows = torch.randn(5, 4)
    (out,) = RefreshTransfer(CPU).fetch(0, rows)
    assert torch.equal(out, rows)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pinned_rows_are_read_by_the_device_without_a_host_wait():  # pragma: no cover - GPU only
    rows = torch.randn(1000, 64, dtype=torch.bfloat16)
    host = HostKV(np.full(4, 250), range(4), torch.device("cuda"), k=rows, v=rows + 1)
    assert host.mode == "uva" and host.k.is_pinned() and host.v.is_pinned()
    within = torch.randint(0, 250, (4, 30), device="cuda")
    flat = (torch.arange(4, device="cuda")[:, None] * 250 + within).reshape(-1).cpu()
    k, v = host.gather(within)
    assert torch.equal(k.cpu(), rows[flat]) and torch.equal(v.cpu(), rows[flat] + 1) and host.sync_gathers == 0
    staged, _ = host.stage(np.array([3, 999]))
    assert staged.is_pinned() and torch.equal(staged, rows[[3, 999]])
