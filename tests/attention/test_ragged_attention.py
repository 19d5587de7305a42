"""The ragged decode/extend attention equals dense masked attention on random inputs."""

from __future__ import annotations

import pytest
import torch

from heterocache.attention.decode import decode_attention
from heterocache.attention.extend import extend_attention
from heterocache.store.ragged import RaggedKVStore


def _random_store(B, H, D, lengths, dtype, seed=0, block_size=16):
    """A store whose (row, head) segment i holds lengths[i] random tokens; also the dense copy."""
    g = torch.Generator().manual_seed(seed)
    L = max(lengths)
    key = torch.randn(B, H, L, D, generator=g).to(dtype)
    value = torch.randn(B, H, L, D, generator=g).to(dtype)
    keep = torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]
    keep = keep.view(B, H, L)
    store = RaggedKVStore(B, H, D, dtype, torch.device("cpu"), block_size=block_size, reserve=5)
    store.fill(key, value, keep, torch.arange(L))
    # Garbage in the reserved slots must never reach the result.
    free = torch.ones(store.capacity, dtype=torch.bool)
    free[store.used_slots()] = False
    store.k[free] = 1e4
    store.v[free] = -1e4
    return store, key, value, keep


def _dense_reference(query, key, value, keep, scaling):
    """softmax(q k^T) v per query head with the GQA group expanded and masked keys excluded."""
    G = query.shape[1] // key.shape[1]
    k = key.float().repeat_interleave(G, dim=1)
    v = value.float().repeat_interleave(G, dim=1)
    m = keep.repeat_interleave(G, dim=1)[:, :, None, :]
    s = (query.float() @ k.transpose(-1, -2)) * scaling
    p = torch.softmax(s.masked_fill(~m, float("-inf")), dim=-1)
    return (p @ v).transpose(1, 2)


@pytest.mark.parametrize("strategy", ["blocks", "segments", "kernel", "device"])
@pytest.mark.parametrize("group", [1, 3, 7])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_decode_attention_equals_dense_masked_attention(group, dtype, tol, strategy):
    B, H, D = 2, 3, 32
    lengths = torch.randint(1, 90, (B * H,), generator=torch.Generator().manual_seed(group)).tolist()
    lengths[0] = 1
    store, key, value, keep = _random_store(B, H, D, lengths, dtype, seed=group)
    query = torch.randn(B, H * group, 1, D).to(dtype)
    out = decode_attention(store, query, scaling=D**-0.5, strategy=strategy)
    ref = _dense_reference(query, key, value, keep, D**-0.5)
    assert out.shape == (B, 1, H * group, D) and out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)


def test_unknown_decode_strategy_is_rejected():
    store, *_ = _random_store(1, 1, 8, [3], torch.float32)
    with pytest.raises(ValueError, match="strategy"):
        decode_attention(store, torch.randn(1, 1, 1, 8), 1.0, strategy="dense")


@pytest.mark.parametrize("strategy", ["blocks", "segments"])
def test_decode_attention_after_appends_and_growth(strategy):
    B, H, D, G = 1, 2, 16, 2
    store, key, value, keep = _random_store(B, H, D, [3, 40], torch.float32, seed=1)
    for step in range(30):  # forces several reallocations (reserve=5)
        k_new, v_new = torch.randn(B, H, 1, D), torch.randn(B, H, 1, D)
        store.append(k_new, v_new, torch.tensor([100 + step]))
        key = torch.cat([key, torch.zeros(B, H, 1, D)], 2)
        value = torch.cat([value, torch.zeros(B, H, 1, D)], 2)
        keep = torch.cat([keep, torch.zeros(B, H, 1, dtype=torch.bool)], 2)
        for h in range(H):  # place the new token right after each head's last kept one
            n = int(keep[0, h].sum())
            key[0, h, n], value[0, h, n], keep[0, h, n] = k_new[0, h, 0], v_new[0, h, 0], True
    query = torch.randn(B, H * G, 1, D)
    torch.testing.assert_close(
        decode_attention(store, query, 0.25, strategy), _dense_reference(query, key, value, keep, 0.25),
        rtol=1e-5, atol=1e-5
    )
    assert store.lengths().tolist() == [[33, 70]]


@pytest.mark.parametrize("group", [1, 3])
def test_extend_attention_equals_dense_causal_attention(group):
    B, H, D, q = 2, 2, 16, 5
    store, key, value, keep = _random_store(B, H, D, [7, 12, 3, 9], torch.float32, seed=2)
    query = torch.randn(B, H * group, q, D)
    k_new, v_new = torch.randn(B, H, q, D), torch.randn(B, H, q, D)
    new_valid = torch.ones(B, q, dtype=torch.bool)
    new_valid[1, :2] = False  # row 1's first two new tokens are padding
    out = extend_attention(store, query, k_new, v_new, new_valid, 0.3)
    # Reference per (row, query): dense over kept old tokens + causal valid new tokens.
    for b in range(B):
        for i in range(q):
            if not new_valid[b, i]:
                continue
            for hq in range(H * group):
                h = hq // group
                ks = torch.cat([key[b, h][keep[b, h]], k_new[b, h, : i + 1][new_valid[b, : i + 1]]])
                vs = torch.cat([value[b, h][keep[b, h]], v_new[b, h, : i + 1][new_valid[b, : i + 1]]])
                p = torch.softmax(ks @ query[b, hq, i] * 0.3, 0)
                torch.testing.assert_close(out[b, i, hq], p @ vs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lengths", [[20, 20, 20, 20, 20, 20], [17, 26, 20, 18, 25, 22]])
@pytest.mark.parametrize("group", [1, 3])
def test_equal_capacity_layers_take_the_one_call_path_and_equal_dense_attention(lengths, group):
    from heterocache.attention.plan import plan_decode

    B, H, D = 2, 3, 16
    store, key, value, keep = _random_store(B, H, D, lengths, torch.float32, seed=5)
    assert len(set(store.cap.tolist())) == 1  # same capacity: one strided [B, H, cap, D] view
    plan = plan_decode(store, "segments")
    assert plan.strategy == "uniform" and plan.length == max(lengths) and plan.masked == (len(set(lengths)) > 1)
    query = torch.randn(B, H * group, 1, D)
    ref = _dense_reference(query, key, value, keep, 0.25)
    torch.testing.assert_close(decode_attention(store, query, 0.25, plan=plan), ref, rtol=1e-5, atol=1e-5)


def test_unequal_capacities_fall_back_to_the_segment_loop():
    from heterocache.attention.plan import plan_decode

    store, *_ = _random_store(1, 2, 8, [3, 40], torch.float32)
    plan = plan_decode(store, "segments")
    assert plan.strategy == "segments" and [n for _, n in plan.spans] == [3, 40]


def test_device_plan_depends_on_capacities_only_and_is_reused_across_layers_and_steps():
    from heterocache.attention.plan import DecodePlanner

    planner = DecodePlanner()
    a, *_ = _random_store(1, 2, 8, [3, 40], torch.float32)
    b, *_ = _random_store(1, 2, 8, [5, 41], torch.float32)  # other lengths, same capacities
    assert a.cap_h.tolist() == b.cap_h.tolist()
    first = planner.plan(a, step=0, strategy="device")
    assert planner.plan(b, step=0, strategy="device") is first
    assert planner.plan(a, step=1, strategy="device") is first  # lengths grew, capacities did not
    assert (planner.built, planner.reused) == (1, 2)
    assert first.max_len == int(a.cap_h.max())
    # CPU plans read lengths: one per layout and step.
    planner.plan(a, step=1, strategy="segments")
    planner.plan(b, step=1, strategy="segments")
    planner.plan(a, step=1, strategy="segments")
    assert (planner.built, planner.reused) == (3, 3)


def test_planner_resolves_the_selection_backend_once_per_step(monkeypatch):
    from heterocache.attention import kernels
    from heterocache.attention.plan import DecodePlanner

    calls = []
    real = kernels.resolve_backend
    monkeypatch.setattr(kernels, "resolve_backend", lambda device, backend=None: calls.append(device) or real(device))
    planner = DecodePlanner()
    cpu = torch.device("cpu")
    assert [planner.backend(cpu, step=0) for _ in range(3)] == ["torch"] * 3
    assert len(calls) == 1  # every layer of the step reuses it
    monkeypatch.setenv("HETEROCACHE_DECODE", "backend=triton")
    assert planner.backend(cpu, step=0) == "torch"  # within the step: unchanged
    assert planner.backend(cpu, step=1) == "triton" and len(calls) == 2  # a new step reads the setting again


def test_strategy_comes_from_the_environment(monkeypatch):
    from heterocache.attention.plan import resolve_strategy

    assert resolve_strategy(torch.device("cpu")) == "segments"
    monkeypatch.setenv("HETEROCACHE_DECODE", "strategy=device")
    assert resolve_strategy(torch.device("cpu")) == "device"
    monkeypatch.setenv("HETEROCACHE_DECODE", "strategy=bogus")
    with pytest.raises(ValueError, match="strategy= of .HETEROCACHE_DECODE"):
        resolve_strategy(torch.device("cpu"))
    monkeypatch.setenv("HETEROCACHE_DECODE", "strategi=device")
    with pytest.raises(ValueError, match="comma-separated key=value"):
        resolve_strategy(torch.device("cpu"))
