"""Layers spread over devices (what ``device_map="auto"`` does to a model too large for one GPU):
each layer's store, its policy state, its host copies and its copy stream follow that layer's
device, and nothing moves a layer's tensors elsewhere.

The model is spread by hand with accelerate's hooks (the ones ``device_map`` installs): layer i
runs on ``devices[i]``. On CPU every device is the CPU (the hook path and the invariants are
checked; tokens equal the unspread model's); with CUDA the layers alternate between two GPUs, or
between the GPU and the CPU when there is one.
"""

from __future__ import annotations

import pytest
import torch

from helpers import tiny_model
from heterocache._compat import cache_kwarg
from heterocache.attention.plan import plan_key
from heterocache.engine.registry import make_cache
from heterocache.offload.transfer import RefreshTransfer
from heterocache.profile.testing import toy_profile
from heterocache.store.ragged import RaggedKVStore

pytestmark = pytest.mark.usefixtures("one_thread")

TOY_SHAPE = dict(num_hidden_layers=3, hidden_size=128, num_attention_heads=8, num_key_value_heads=4, head_dim=16)
METHODS = {
    "fullkv": {},
    "streamingllm": {"budget": 0.4},
    "h2o": {"budget": 0.4},
    "snapkv": {"budget": 0.4, "window": 8},
    "pyramidkv": {"budget": 0.4, "window": 8},
    "cake": {"budget": 0.4, "window": 8},
    "quest": {"budget": 0.3, "page_size": 4, "dense_layers": 1},
    "heterocache": {"budget": 0.6, "refresh_interval": 2, "drift_threshold": 0.9},
}

_CUDA = torch.cuda.device_count() if torch.cuda.is_available() else 0
LAYOUTS = {
    "cpu": pytest.param(["cpu", "cpu", "cpu"], id="cpu"),
    "two-gpus": pytest.param(["cuda:0", "cuda:1", "cuda:0"], id="two-gpus", marks=[
        pytest.mark.gpu, pytest.mark.skipif(_CUDA < 2, reason="needs two CUDA devices")]),
    "gpu-and-cpu": pytest.param(["cuda:0", "cpu", "cuda:0"], id="gpu-and-cpu", marks=[
        pytest.mark.gpu, pytest.mark.skipif(_CUDA < 1, reason="needs CUDA")]),
}


def spread(model, devices):
    """Put decoder layer i on ``devices[i]`` with the hooks ``device_map`` dispatching installs
    (inputs moved to the module's device; the cache is never moved)."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    skip = list(getattr(model, "_skip_keys_device_placement", None) or [])
    inner = model.model
    placed = [(inner.embed_tokens, devices[0]), (inner.rotary_emb, devices[0]), *zip(inner.layers, devices),
              (inner.norm, devices[-1]), (model.lm_head, devices[-1])]
    for module, device in placed:
        module.to(device)
        add_hook_to_module(module, AlignDevicesHook(execution_device=torch.device(device), skip_keys=skip))
    return model


def two_turns(model, cache, device):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, 256, (2, 40), generator=g)
    mask = torch.ones_like(ids)
    ids[1, :6], mask[1, :6] = 0, 0
    more = torch.randint(1, 256, (2, 4), generator=g)
    kw = dict(do_sample=False, pad_token_id=0, **cache_kwarg(model, cache))
    with torch.no_grad():
        first = model.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=6, **kw)
        ids2 = torch.cat([first.cpu(), more], 1)
        mask2 = torch.cat([mask, torch.ones(2, ids2.shape[1] - mask.shape[1], dtype=mask.dtype)], 1)
        return model.generate(ids2.to(device), attention_mask=mask2.to(device), max_new_tokens=5, **kw).cpu()


def _make(method, params):
    params = dict(params)
    budget = params.pop("budget", None)
    if method == "heterocache":
        params["profile"] = toy_profile()
    return make_cache(method, budget, None, **params)


def _tensors(obj):
    """Every tensor an object holds directly, in lists/tuples/dicts, or in a HostDevice (``.d``)."""
    stack, seen = [obj], set()
    while stack:
        x = stack.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, torch.Tensor):
            yield x
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
        elif isinstance(x, dict):
            stack.extend(x.values())
        elif hasattr(x, "d") and isinstance(x.d, torch.Tensor):
            yield x.d


def _policy_state_of_layer(policy, idx):
    """The device tensors a policy keeps for one layer (per-layer state of every method)."""
    found = []
    if hasattr(policy, "_layers") and idx in policy._layers:  # HeteroCache
        state = policy._layers[idx]
        found += [state.k_dev, state.target_tokens_dev, state.reference]
        if state.turn is not None:
            found += [state.turn.heads_dev, state.turn.counts_dev, state.turn.prompt_dev]
        if state.index is not None:
            found += list(vars(state.index).values())
    for holder in ("_decode", "_state"):  # LayerState of the evicting methods
        layer_state = getattr(policy, holder, None)
        if layer_state is not None and hasattr(layer_state, "get") and layer_state.get(idx) is not None:
            found += list(layer_state.get(idx).values())
    if hasattr(policy, "_summaries") and idx in policy._summaries:  # Quest
        found += [policy._summaries[idx].kmin, policy._summaries[idx].kmax]
    return [t for t in _tensors(found) if t is not None]


@pytest.mark.parametrize("devices", list(LAYOUTS.values()))
@pytest.mark.parametrize("method", list(METHODS))
def test_each_layer_lives_on_its_decoder_layers_device(method, devices):
    model = spread(tiny_model("llama", **TOY_SHAPE), devices)
    cache = _make(method, METHODS[method])
    out = two_turns(model, cache, devices[0])
    for i, layer in enumerate(cache.layers):
        want = torch.device(devices[i])
        store = layer.store
        assert store.device == want
        for t in (store.k, store.v, store.pos, store.start, store.cap, store.length, *store.slot_buffers.values()):
            assert t.device == want, (i, t.shape)
        for t in _policy_state_of_layer(cache.policy, layer.policy_idx):
            assert t.device == want, (method, i, t.shape)
    report = cache.memory_report()
    assert [layer.device for layer in report.layers] == [str(torch.device(d)) for d in devices]
    assert set(report.by_device()) == {str(torch.device(d)) for d in devices}
    if method == "heterocache":
        policy = cache.policy
        assert cache.stats()["satellite_refills"] > 0  # copies ran on every device that has satellites
        for idx, state in policy._layers.items():
            if state.host is None:
                continue
            store = policy._stores[idx]
            assert state.host.k.device.type == "cpu" and state.host.k.is_pinned() == (store.device.type == "cuda")
            assert policy._layer_transfer[idx].device == store.device
        assert set(policy.transfers) == {str(policy._stores[i].device) for i, s in policy._layers.items()
                                         if s.host is not None}
    if len({torch.device(d).type for d in devices}) == 1 and devices[0] == "cpu":
        ref = two_turns(tiny_model("llama", **TOY_SHAPE), _make(method, METHODS[method]), "cpu")
        assert torch.equal(out, ref)


def test_a_transfer_never_writes_into_another_devices_store():
    store = RaggedKVStore(1, 2, 4, torch.float32, "cpu")
    transfer = RefreshTransfer(torch.device("meta"))
    with pytest.raises(ValueError, match="cannot write into a store on cpu"):
        transfer.write(0, store, torch.zeros(1, dtype=torch.long), torch.zeros(1, 4), torch.zeros(1, 4))


def test_decode_plans_are_kept_per_device():
    store = RaggedKVStore(1, 2, 4, torch.float32, "cpu")
    key = plan_key(store, "segments")
    assert "cpu" in key  # a layer of the same layout on another device gets its own plan
