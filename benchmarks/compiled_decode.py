"""Decode ms/token with compiled steps: transformers' fastest path (StaticCache + a compiled
forward) against heterocache's caches whose per-layer device half (``cache.decode_step``: append +
attention) is compiled, on CUDA with ``mode="reduce-overhead"`` (CUDA graphs). The GPU stage of
the decode-step issue (``benchmarks/gpu_checks.sh decode``) runs it; on CPU it runs with
``--backend aot_eager`` as a smoke test (tiny shapes, no timing claims).

    python benchmarks/compiled_decode.py --model random:meta-llama/Llama-3.1-8B-Instruct --device cuda \
        --lengths 32768 131072 --methods static,dynamic,fullkv,snapkv,heterocache --out runs/gpu/compiled.json

Rows: ``static`` (StaticCache, ``torch.compile(model.forward)``), ``dynamic`` (DynamicCache,
eager), and for each ragged method an eager row and a ``+graphs`` row (its decode step compiled).
Greedy tokens of every row are recorded (compiled rows must match their eager row).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache, StaticCache

from heterocache._compat import cache_kwarg
from heterocache.bench.cli import machine_info
from heterocache.bench.measure import prompt_ids
from heterocache.engine.registry import get_method, make_cache, parse_method_spec
from heterocache.models import load_model


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def _decode(model, ids, cache, steps: int, warmup: int, forward=None) -> dict:
    """Prefill, then ``warmup + steps`` greedy steps (``forward``: the model's forward or a compiled
    one, called with explicit cache positions so a StaticCache graph keeps one shape)."""
    device = ids.device
    kw = cache_kwarg(model, cache)
    L = ids.shape[1]
    logits = model(ids, **kw, use_cache=True, logits_to_keep=1).logits[:, -1]
    if hasattr(cache, "end_prompt"):  # compress now, not in the first (compiled) step
        cache.end_prompt()
    token = logits.argmax(-1, keepdim=True)
    forward = forward or model.forward
    out, times = [token], []
    for step in range(warmup + steps):
        pos = torch.tensor([L + step], device=device)
        _sync(device)
        t = time.perf_counter()
        logits = forward(input_ids=token, cache_position=pos, position_ids=pos[None], use_cache=True,
                         logits_to_keep=1, **kw).logits[:, -1]
        token = logits.argmax(-1, keepdim=True)
        _sync(device)
        if step >= warmup:
            times.append(time.perf_counter() - t)
        out.append(token)
    return {"decode_ms_per_token": statistics.median(times) * 1e3, "tokens": torch.cat(out, 1).tolist()}


def run(model, ids, methods: list[str], budget: float, steps: int, warmup: int, backend: str, mode: str | None):
    rows = []
    compile_kw = {"backend": backend} if mode is None else {"backend": backend, "mode": mode}
    for name in methods:
        if name == "static":
            model.set_attn_implementation("sdpa")
            cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + warmup + steps + 1)
            forward = torch.compile(model.forward, fullgraph=True, **compile_kw)
            rows.append({"method": "static+compile", **_decode(model, ids, cache, steps, warmup, forward)})
            torch._dynamo.reset()
            continue
        if name == "dynamic":
            model.set_attn_implementation("sdpa")
            rows.append({"method": "dynamic", **_decode(model, ids, DynamicCache(), steps, warmup)})
            continue
        model.set_attn_implementation("heterocache")
        base = get_method(parse_method_spec(name)[0])
        for graphs in (False, True):
            cache = make_cache(name, budget if base.uses_budget else None, model, reserve=warmup + steps + 1)
            if graphs:  # the device half of each layer's step, compiled (CUDA graphs with reduce-overhead)
                cache.decode_step = torch.compile(cache.decode_step, fullgraph=True, dynamic=False, **compile_kw)
            row = {"method": name + ("+graphs" if graphs else ""), **_decode(model, ids, cache, steps, warmup)}
            rows.append(row)
            torch._dynamo.reset()
    model.set_attn_implementation("heterocache")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None, help="default bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--num-layers", type=int, default=None, help="random: models only")
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--methods", default="static,dynamic,fullkv,snapkv,heterocache")
    parser.add_argument("--budget", type=float, default=0.25)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=4, help="untimed steps (compilation happens here)")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (aot_eager on CPU)")
    parser.add_argument("--mode", default=None, help="torch.compile mode (default: reduce-overhead on CUDA)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="runs/gpu/compiled_decode.json")
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for name in methods:
        if name not in ("static", "dynamic"):
            parse_method_spec(name)  # unknown names fail before the model loads
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    mode = args.mode or ("reduce-overhead" if device.type == "cuda" else None)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    if device.type == "cpu":  # the path CUDA takes (CPU's own strategy plans lengths per step)
        os.environ["HETEROCACHE_DECODE"] = "strategy=device"
    model, tokenizer = load_model(args.model, attn_implementation="heterocache", dtype=dtype, device=device,
                                  num_layers=args.num_layers)
    # A layer's step closes over its own store: one graph per layer, so allow as many recompiles.
    layers = model.config.num_hidden_layers
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 2 * layers + 8)
    torch._dynamo.config.accumulated_cache_size_limit = max(
        torch._dynamo.config.accumulated_cache_size_limit, 4 * layers + 16)
    results = []
    for length in args.lengths:
        ids = prompt_ids(tokenizer, length).to(device)
        for row in run(model, ids, methods, args.budget, args.steps, args.warmup, args.backend, mode):
            row["prompt_tokens"] = length
            results.append(row)
            print(f"{length:7d} {row['method']:24s} {row['decode_ms_per_token']:8.2f} ms/token", flush=True)
    out = {"benchmark": "compiled_decode", "model": args.model, "machine": machine_info(device),
           "command": "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
           "date": time.strftime("%Y-%m-%d"), "backend": args.backend, "mode": mode, "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
