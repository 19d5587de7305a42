"""What the tensor-parallel tests run: in the test process (the single-process reference) and as
a ``torchrun`` worker (``tests/engine/test_tensor_parallel.py`` starts it)::

    PYTHONPATH=src torchrun --nproc_per_node 2 --standalone tests/engine/tp_cases.py DIR... --out OUT.json

Every rank loads each model folder with ``DistributedConfig(tp_plan="auto")`` (transformers'
tensor parallelism: each rank's attention holds half the KV heads) and runs every case: a method
with its parameters, two turns of greedy ``generate()`` on a left-padded batch of two rows.
Rank 0 writes, per model and case: the tokens, the positions stored by every (layer, global KV
head, row), the aggregated memory report, HeteroCache's aggregated refresh statistics and
CAKE's layer budgets as each rank computed them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

#: (case name, method, parameters). Short prompts (48 tokens): windows are shortened to match.
CASES = [
    ("fullkv", "fullkv", {}),
    ("streamingllm", "streamingllm", {"budget": 0.4}),
    ("h2o", "h2o", {"budget": 0.4}),
    ("snapkv", "snapkv", {"budget": 0.4, "window": 8}),
    ("pyramidkv", "pyramidkv", {"budget": 0.4, "window": 8, "beta": 4.0}),
    ("cake", "cake", {"budget": 0.4, "window": 8}),
    ("quest", "quest", {"budget": 0.3, "page_size": 4, "dense_layers": 1, "min_pages": 2}),
    ("omnikv", "omnikv", {"budget": 0.3, "filter_layers": [1], "dense_after_filter": 0}),
    ("omnikv-offload", "omnikv", {"budget": 0.3, "filter_layers": [1], "dense_after_filter": 0, "offload": True}),
    # Drift checks every 2 steps with a high threshold: refreshes while decoding (deferred
    # decisions) and at the second turn (acted on at once), on clusters that cross the shards.
    # The paper's single-turn behaviour at the second turn too (satellites refilled by their pivot).
    ("heterocache", "heterocache", {"budget": 0.6, "refresh_interval": 2, "drift_threshold": 0.9,
                                    "turn_reselect": "pivot"}),
    # Selection windows longer than one query, and refreshes every third step.
    ("heterocache-window", "heterocache", {"budget": 0.55, "refresh_interval": 3, "drift_threshold": 0.7,
                                           "window": 4, "turn_reselect": "pivot"}),
    # The defaults: at the second turn every compressed head re-chooses its tokens from the
    # attention of its own turn queries over its full prompt keys (host copy).
    ("heterocache-keys", "heterocache", {"budget": 0.6, "refresh_interval": 2, "drift_threshold": 0.9}),
    # Pivots compressed too (host copies; no clusters): every compressed head re-chosen at the turn.
    ("heterocache-pivot-offload", "heterocache", {"budget": 0.35, "pivot_offload": True, "kernel": 3}),
]



def _registry_cases() -> list[tuple[str, str, dict]]:
    """A default case for every registered ragged method the list above does not name (a new
    method is run under tensor parallelism without editing this file)."""
    from heterocache.engine.registry import get_method, list_methods

    named = {method for _, method, _ in CASES}
    return [(name, name, {"budget": 0.4} if get_method(name).uses_budget else {})
            for name in list_methods() if get_method(name).needs_heterocache_attention and name not in named]


CASES += _registry_cases()

PROMPT, PAD, NEW1, MORE, NEW2 = 48, 8, 8, 5, 6


def cross_shard_profile(config):
    """A profile of the model's shape (4 KV heads a layer) whose clusters cross two shards (heads
    0-1 on rank 0, 2-3 on rank 1)::

        layer 0:  P  S  S  A    pivot on rank 0, satellites on both ranks
        layer 1:  S  A  V  P    pivot on rank 1, its satellite on rank 0
        layer 2:  P  S  A  A    within rank 0
        layer 3:  A  V  S  P    within rank 1
    """
    from heterocache.profile import HeadProfile
    from heterocache.profile.clustering import budget_ratios

    layers, heads = config.num_hidden_layers, config.num_key_value_heads
    assert heads == 4, "the cross-shard profile is written for 4 KV heads"
    table = [([3, 4, 4, 1], [-1, 0, 0, -1]), ([4, 1, 2, 3], [3, -1, -1, -1]),
             ([3, 4, 1, 1], [-1, 0, -1, -1]), ([1, 2, 4, 3], [-1, -1, 3, -1])]
    roles = torch.tensor([table[i % 4][0] for i in range(layers)])
    pivots = torch.tensor([table[i % 4][1] for i in range(layers)])
    stability = 0.2 + 0.7 * torch.rand(layers, heads, generator=torch.Generator().manual_seed(3))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return HeadProfile(roles=roles, stability=stability, budget_ratios=budget_ratios(roles, stability),
                       pivots=pivots, model_name=getattr(config, "name_or_path", None) or "tiny/tp",
                       num_attention_heads=config.num_attention_heads,
                       head_dim=head_dim, topk=16, source={"made_by": "tests/engine/tp_cases.py"})


def load(path, tensor_parallel: bool):
    """A saved model in float64 with the heterocache attention, sharded when asked."""
    from transformers import AutoModelForCausalLM

    import heterocache  # noqa: F401  (registers the attention)

    kwargs = dict(dtype=torch.float64, attn_implementation="heterocache")
    if tensor_parallel:
        from transformers import DistributedConfig

        kwargs["distributed_config"] = DistributedConfig(tp_plan="auto")
    return AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()


def _gather(cache, obj):
    shard = cache.kv_shard
    return [obj] if shard is None else shard.all_gather_object(obj)


def stored_positions(cache) -> dict:
    """``{"layer:global_head": [positions of row b, in store order]}`` over every rank."""
    mine = {}
    heads = list(cache.kv_heads)
    for layer in cache.layers:
        store = layer.store
        if store is None:
            continue
        pos = store.pos.cpu().numpy()
        for h, g in enumerate(heads):
            rows = []
            for b in range(store.num_rows):
                s = b * store.num_heads + h
                lo, n = int(store.start_h[s]), int(store.length_h[s])
                rows.append(pos[lo : lo + n].tolist())
            mine[f"{layer.layer_idx}:{g}"] = rows
    merged = {}
    for part in _gather(cache, mine):
        merged.update(part)
    return dict(sorted(merged.items(), key=lambda kv: tuple(map(int, kv[0].split(":")))))


def run_case(model, method: str, params: dict, profile) -> dict:
    from heterocache._compat import cache_kwarg
    from heterocache.engine.registry import make_cache

    params = dict(params)
    budget = params.pop("budget", None)
    if method == "heterocache":
        params["profile"] = profile
    cache = make_cache(method, budget, model, **params)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(1, vocab, (2, PROMPT), generator=g)
    mask = torch.ones_like(ids)
    ids[1, :PAD], mask[1, :PAD] = 0, 0
    more = torch.randint(1, vocab, (2, MORE), generator=g)
    gen = dict(do_sample=False, pad_token_id=0, **cache_kwarg(model, cache))
    with torch.no_grad():
        first = model.generate(ids, attention_mask=mask, max_new_tokens=NEW1, **gen)
        ids2 = torch.cat([first, more], 1)
        mask2 = torch.cat([mask, torch.ones(2, ids2.shape[1] - PROMPT, dtype=mask.dtype)], 1)
        out = model.generate(ids2, attention_mask=mask2, max_new_tokens=NEW2, **gen)
    report = cache.memory_report(aggregate=True)
    result = {
        "tokens": out.tolist(),
        "stored": stored_positions(cache),
        "report": {
            "ranks": report.ranks,
            "stored_tokens": [layer.stored_tokens for layer in report.layers],
            "roles": [layer.roles for layer in report.layers],
            "kv_heads": [layer.kv_heads for layer in report.layers],
            "device_used_bytes": report.device_used_bytes,
            "host_bytes": report.host_bytes,
            "dynamic_bytes": report.dynamic_bytes,
        },
    }
    if method == "heterocache":
        stats = cache.stats(aggregate=True)
        result["stats"] = {k: stats[k] for k in ("drift_checks", "refreshes", "refreshes_per_layer_pivot",
                                                 "satellite_refills", "tokens_moved", "bytes_moved", "ranks",
                                                 "reselected_heads")}
    if method == "cake":
        result["layer_budgets"] = _gather(cache, cache.policy.layer_budgets().tolist())
    return result


def run_all(model) -> dict:
    profile = cross_shard_profile(model.config)
    return {name: run_case(model, method, params, profile) for name, method, params in CASES}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="saved model folders")
    parser.add_argument("--out", required=True, help="JSON written by rank 0")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    tensor_parallel = int(os.environ.get("WORLD_SIZE", "1")) > 1
    results = {Path(path).name: run_all(load(path, tensor_parallel)) for path in args.models}
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        Path(args.out).write_text(json.dumps(results))
    if tensor_parallel:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
