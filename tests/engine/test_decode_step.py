"""The decode step as a GPU needs it: no host reads, plans built once per step and layout, the
device path equal to the CPU path (the oracle), and the device half capturable by a compiler."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from transformers import DynamicCache

from helpers import tiny_model
from heterocache import CAKECache, FullKVCache, H2OCache, PyramidKVCache, SnapKVCache, StreamingLLMCache
from heterocache._compat import cache_kwarg
from heterocache.bench.diagnostics import HostReadCounter, count_decode_steps
from heterocache.methods.heterocache import HeteroCache
from heterocache.methods.heterocache.drift import pivot_scores, prompt_scores
from heterocache.profile.testing import toy_profile

pytestmark = pytest.mark.usefixtures("one_thread")

# The toy profile's shape: 3 layers, 8 query heads, 4 KV heads, head_dim 16.
SHAPE = dict(num_hidden_layers=3, hidden_size=128, num_attention_heads=8, num_key_value_heads=4, head_dim=16)

METHODS = {
    "fullkv": FullKVCache,
    "snapkv": lambda: SnapKVCache(budget=0.3),
    "streamingllm": lambda: StreamingLLMCache(budget=0.3),
    "h2o": lambda: H2OCache(budget=0.3),
    "pyramidkv": lambda: PyramidKVCache(budget=0.3),
    "cake": lambda: CAKECache(budget=0.3),
    # A drift check and a refresh decision at every step: the worst case for the host.
    "heterocache": lambda: HeteroCache(toy_profile(), budget=0.5, refresh_interval=1, drift_threshold=1.0,
                                       pivot_offload=False),
    # The default layout at this budget (pivot_offload="auto" compresses the pivots): no clusters.
    "heterocache_pivots_compressed": lambda: HeteroCache(toy_profile(), budget=0.5),
}


def _ids(B=2, L=150, seed=0):
    return torch.randint(1, 256, (B, L), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def dynamic_counts():
    model = tiny_model("llama", attn="sdpa", **SHAPE)
    return count_decode_steps(model, _ids(), DynamicCache(), steps=8)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("strategy", ["device", "segments"])
def test_decode_steps_read_no_more_device_values_than_dynamic_cache(method, strategy, dynamic_counts, monkeypatch):
    monkeypatch.setenv("HETEROCACHE_DECODE", f"strategy={strategy}")
    model = tiny_model("llama", **SHAPE)
    cache = METHODS[method]()
    result = count_decode_steps(model, _ids(), cache, steps=8)
    assert result["host_reads"] <= dynamic_counts["host_reads"] + 1, result["reads_by_kind"]
    compressed_pivots = getattr(getattr(cache, "policy", None), "pivot_offload", False)
    assert compressed_pivots == (method == "heterocache_pivots_compressed")
    if method == "heterocache":
        cache.policy.flush()
        stats = cache.stats()
        assert stats["drift_checks"] > 0 and stats["satellite_refills"] > 0  # the checks ran in the window


@pytest.mark.parametrize("method,ratio", [("fullkv", 1.2), ("snapkv", 1.2), ("heterocache", 1.5),
                                          ("heterocache_pivots_compressed", 1.5)])
def test_device_path_dispatches_few_ops_beyond_dynamic_cache(method, ratio, dynamic_counts, monkeypatch):
    """ATen ops per decode step (averaged, HeteroCache's drift checks at its default interval
    included) within the decode-step targets; each layer's attention is one registered op."""
    monkeypatch.setenv("HETEROCACHE_DECODE", "strategy=device")
    model = tiny_model("llama", **SHAPE)
    cache = {"fullkv": FullKVCache, "snapkv": lambda: SnapKVCache(budget=0.3),
             "heterocache": lambda: HeteroCache(toy_profile(), budget=0.5, pivot_offload=False),
             "heterocache_pivots_compressed": lambda: HeteroCache(toy_profile(), budget=0.5)}[method]()
    steps = 10
    ops = Counter()
    with torch.no_grad():
        token = model(_ids(), **cache_kwarg(model, cache)).logits[:, -1:].argmax(-1)
        cache.end_prompt()  # the prompt's compression is prefill work, not a counted step's
        for _ in range(steps):
            with HostReadCounter() as counter:
                token = model(token, **cache_kwarg(model, cache)).logits[:, -1:].argmax(-1)
            ops.update(counter.op_counts)
    assert ops["heterocache.block_decode.default"] == steps * SHAPE["num_hidden_layers"]
    assert sum(ops.values()) / steps <= ratio * dynamic_counts["aten_ops"], ops.most_common(12)
    if method == "heterocache":
        assert cache.stats()["drift_checks"] > 0  # the window held checks


@pytest.mark.parametrize("method", list(METHODS))
def test_the_device_path_gives_the_tokens_and_logits_of_the_cpu_path(method, monkeypatch):
    model = tiny_model("llama", **SHAPE)
    ids, mask = _ids(), torch.ones(2, 150, dtype=torch.long)
    mask[1, :17] = 0
    outs = {}
    for strategy in ("segments", "device"):
        monkeypatch.setenv("HETEROCACHE_DECODE", f"strategy={strategy}")
        out = model.generate(ids, attention_mask=mask, **cache_kwarg(model, METHODS[method]()), max_new_tokens=12,
                             do_sample=False, output_logits=True, return_dict_in_generate=True)
        outs[strategy] = out
    assert torch.equal(outs["device"].sequences, outs["segments"].sequences)
    for a, b in zip(outs["device"].logits, outs["segments"].logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_fullkv_on_the_device_path_gives_dynamic_cache_tokens(monkeypatch):
    monkeypatch.setenv("HETEROCACHE_DECODE", "strategy=device")
    model = tiny_model("qwen2", **SHAPE)
    ids = _ids()
    model.set_attn_implementation("sdpa")
    ref = model.generate(ids, **cache_kwarg(model, DynamicCache()), max_new_tokens=10, do_sample=False)
    model.set_attn_implementation("heterocache")
    out = model.generate(ids, **cache_kwarg(model, FullKVCache()), max_new_tokens=10, do_sample=False)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("strategy,plans_per_step", [("device", 0), ("segments", 1)])
def test_equal_layouts_share_one_plan_per_step(strategy, plans_per_step, monkeypatch):
    monkeypatch.setenv("HETEROCACHE_DECODE", f"strategy={strategy}")
    model = tiny_model("llama", **SHAPE)
    cache = SnapKVCache(budget=0.3, reserve=64)  # every layer has the same layout
    steps = 6
    with torch.no_grad():
        model.generate(_ids(), **cache_kwarg(model, cache), max_new_tokens=steps + 1, do_sample=False)
    # Capacity-keyed device plans are built once for the whole generation (no growth at reserve 64);
    # length-keyed CPU plans once per step. Never once per layer.
    assert cache.planner.built == 1 + plans_per_step * (steps - 1)
    assert cache.planner.built + cache.planner.reused == steps * SHAPE["num_hidden_layers"]


def test_batched_pivot_scores_equal_the_per_row_scores():
    g = torch.Generator().manual_seed(3)
    B, P, T, G, D, L = 2, 3, 4, 2, 8, 30
    n = [30, 19]
    q = torch.randn(B, P, T, G, D, generator=g)
    keys = torch.randn(B, P, L, D, generator=g)
    valid = (torch.arange(L)[None, :] < torch.tensor(n)[:, None])[:, None, :].expand(B, P, L)
    out = pivot_scores(q, keys, valid, 0.3, kernel=5)
    for b in range(B):
        for p in range(P):
            ref = prompt_scores(q[b, p], keys[b, p, : n[b]], 0.3, 5)  # [T, n]
            torch.testing.assert_close(out[b, p, :, : n[b]], ref, rtol=1e-6, atol=1e-7)
            assert torch.isinf(out[b, p, :, n[b]:]).all()


def _refills_per_step(decision_lag: int | None = None) -> list[int]:
    """Satellite refills after each of 7 decode steps, checks every 3 steps, every pivot drifting."""
    model = tiny_model("llama", **SHAPE)
    cache = HeteroCache(toy_profile(), budget=0.5, refresh_interval=3, drift_threshold=1.0, pivot_offload=False)
    if decision_lag is not None:
        cache.policy._decision_lag = decision_lag  # an internal constant, settable for studies and tests
    with torch.no_grad():
        model(_ids(B=1), **cache_kwarg(model, cache))
        token = _ids(B=1, L=1, seed=9)
        refills = []
        for _ in range(7):
            model(token, **cache_kwarg(model, cache))
            refills.append(cache.policy.stats.satellite_refills)
    return refills


def test_deferred_refresh_acts_two_steps_later_with_the_decision_of_its_check():
    """A decode-time drift decision reaches the host without a wait and is acted on at the start
    of the step after next (DECISION_LAG): equal to acting on the same decision at once."""
    from heterocache.methods.heterocache.config import DECISION_LAG

    assert DECISION_LAG == 2
    per_layer = len(toy_profile().heads("satellite"))  # one batch row
    # Checks after steps 3 and 6 (1-based); acted on at the start of steps 5 and 8.
    assert _refills_per_step() == [0, 0, 0, 0, per_layer, per_layer, per_layer]


def test_decision_lag_zero_refreshes_at_the_check_as_the_paper_does():
    per_layer = len(toy_profile().heads("satellite"))
    assert _refills_per_step(decision_lag=0) == [0, 0, per_layer, per_layer, per_layer, 2 * per_layer, 2 * per_layer]


@pytest.mark.parametrize("method", ["fullkv", "snapkv", "heterocache"])
def test_the_device_half_of_a_decode_step_compiles_as_one_graph(method, monkeypatch):
    """``torch.compile(fullgraph=True)`` captures each layer's device half (append + attention)
    with no graph break, and the compiled steps give the eager logits: the CPU stand-in for CUDA
    graph capture."""
    import torch._dynamo

    monkeypatch.setenv("HETEROCACHE_DECODE", "strategy=device")
    make = {
        "fullkv": FullKVCache,
        "snapkv": lambda: SnapKVCache(budget=0.3),
        "heterocache": lambda: HeteroCache(toy_profile(), budget=0.5, refresh=False),
    }[method]
    model = tiny_model("llama", **SHAPE)
    ids = _ids(B=1)
    logits = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        cache = make()
        if compiled:
            cache.decode_step = torch.compile(cache.decode_step, fullgraph=True, backend="aot_eager", dynamic=False)
        with torch.no_grad():
            out = model(ids, **cache_kwarg(model, cache))
            token, steps = out.logits[:, -1:].argmax(-1), []
            for _ in range(4):
                out = model(token, **cache_kwarg(model, cache))
                steps.append(out.logits[:, -1])
                token = out.logits[:, -1:].argmax(-1)
        logits[compiled] = torch.stack(steps)
        if compiled:
            assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # it really was captured
    torch.testing.assert_close(logits[True], logits[False], rtol=1e-5, atol=1e-5)


def test_the_counter_sees_every_kind_of_host_read():
    t = torch.arange(6)
    with HostReadCounter() as counter:
        t[0].item()
        bool(t[1])
        t.tolist()
        t.cpu()
        t[t > 2]
        t.nonzero()
        torch.repeat_interleave(t)
        torch.repeat_interleave(t, output_size=15)  # told its size: no read
    assert counter.reads == {"scalar": 2, "tolist": 1, "cpu": 1, "bool_index": 1, "nonzero": 1, "repeat_interleave": 1}
