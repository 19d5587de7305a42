"""What a decode step costs the host, per method: host reads of device values, ATen ops and host
milliseconds per step on the device path, and decode ms/token on this machine's default path.

    python benchmarks/decode_overhead.py --lengths 2048 8192 --threads 2 \
        --out benchmarks/results/decode_overhead_smollm2_cpu.json

For each method and prompt length: one prefill, then ``--timed`` greedy steps on the default
strategy (on CPU: "segments"), timed (median ms/token), then ``--counted`` steps on the device
strategy (``HETEROCACHE_DECODE=strategy=device``: the path CUDA tensors take, with PyTorch standing
in for the Triton kernel) under ``heterocache.bench.diagnostics.HostReadCounter``. DynamicCache + sdpa is
the reference. Run on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from heterocache import (
    CAKECache,
    FullKVCache,
    H2OCache,
    OmniKVCache,
    PyramidKVCache,
    QuestCache,
    ShadowKVCache,
    SnapKVCache,
    StreamingLLMCache,
)
from heterocache._compat import cache_kwarg
from heterocache.attention.kernels.settings import ENV_VAR
from heterocache.bench.cli import machine_info
from heterocache.bench.diagnostics import count_steps
from heterocache.bench.measure import kv_bytes, prompt_ids
from heterocache.engine.cache import RaggedCache
from heterocache.engine.registry import make_cache, parse_method_spec
from heterocache.methods.heterocache import HeteroCache
from heterocache.models import load_smollm2

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"


def methods(budget: float) -> dict:
    return {
        "dynamic": ("sdpa", DynamicCache),
        "fullkv": ("heterocache", FullKVCache),
        "snapkv": ("heterocache", lambda: SnapKVCache(budget=budget)),
        "streamingllm": ("heterocache", lambda: StreamingLLMCache(budget=budget)),
        "h2o": ("heterocache", lambda: H2OCache(budget=budget)),
        "pyramidkv": ("heterocache", lambda: PyramidKVCache(budget=budget)),
        "cake": ("heterocache", lambda: CAKECache(budget=budget)),
        "heterocache": ("heterocache", lambda: HeteroCache(SMOLLM2, budget=budget)),
        "quest": ("heterocache", lambda: QuestCache(budget=budget)),
        "omnikv": ("heterocache", lambda: OmniKVCache(budget=budget)),
        "shadowkv": ("heterocache", lambda: ShadowKVCache(budget=budget)),
    }


def resolve(name: str, table: dict, budget: float):
    """(attention, cache factory) of a method in ``table`` or of one with options
    ("heterocache:pivot_offload=false", as ``--methods`` of the eval takes it)."""
    if name in table:
        return table[name]
    base, _ = parse_method_spec(name)  # ValueError/TypeError: unknown method or option
    if base not in table:
        raise ValueError(f"unknown method {name!r}")
    extra = {"profile": SMOLLM2} if base == "heterocache" else {}
    return table[base][0], lambda: make_cache(name, budget, **extra)


def _step(model, cache, token):
    logits = model(token, **cache_kwarg(model, cache), use_cache=True, logits_to_keep=1).logits[:, -1]
    return logits.argmax(-1, keepdim=True)


@torch.no_grad()
def measure(model, ids, make_cache, timed: int, counted: int, warmup: int = 2) -> dict:
    cache = make_cache()
    t0 = time.perf_counter()
    logits = model(ids, **cache_kwarg(model, cache), use_cache=True, logits_to_keep=1).logits[:, -1]
    if hasattr(cache, "end_prompt"):  # compress now: the prompt's end is prefill work, not a decode step's
        cache.end_prompt()
    prefill_s = time.perf_counter() - t0
    token = logits.argmax(-1, keepdim=True)
    saved = os.environ.pop(ENV_VAR, None)
    times = []
    for i in range(warmup + timed):  # the machine's default strategy
        t = time.perf_counter()
        token = _step(model, cache, token)
        if i >= warmup:
            times.append(time.perf_counter() - t)
    os.environ[ENV_VAR] = "strategy=device"
    try:
        _, counts = count_steps(model, cache, token, counted, warmup)
    finally:
        os.environ.pop(ENV_VAR, None)
        if saved is not None:
            os.environ[ENV_VAR] = saved
    stats = cache.stats() if isinstance(cache, RaggedCache) else {}
    return {
        "prefill_s": prefill_s,
        "decode_ms_per_token": statistics.median(times) * 1e3,
        "device_path": {
            "host_reads_per_step": counts["host_reads"],
            "aten_ops_per_step": counts["aten_ops"],
            "host_ms_per_step_counted": counts["host_ms"],
            "reads_by_kind": counts["reads_by_kind"],
        },
        "kv_bytes": kv_bytes(cache),
        "drift_checks": stats.get("drift_checks"),
        "refreshes": stats.get("refreshes"),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--budget", type=float, default=0.25)
    parser.add_argument("--methods", default=",".join(methods(0.25)))
    parser.add_argument("--timed", type=int, default=16, help="timed decode steps (default path)")
    parser.add_argument("--counted", type=int, default=10, help="counted decode steps (device path)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/decode_overhead_smollm2_cpu.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    table = methods(args.budget)
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    try:
        resolved = {name: resolve(name, table, args.budget) for name in names}
    except (ValueError, TypeError) as err:
        parser.error(f"{err}; choose from {list(table)}, optionally with options (name:key=value)")
    model, tokenizer = load_smollm2(attn_implementation="heterocache")
    rows = []
    for length in args.lengths:
        ids = prompt_ids(tokenizer, length)
        base = None
        for name in names:
            attn, make = resolved[name]
            model.set_attn_implementation(attn)
            row = {"method": name, "prompt_tokens": length,
                   "budget": None if name in ("dynamic", "fullkv") else args.budget}
            row.update(measure(model, ids, make, args.timed, args.counted))
            if name == "dynamic":
                base = row
            if base is not None:
                row["aten_ops_vs_dynamic"] = (row["device_path"]["aten_ops_per_step"]
                                              / base["device_path"]["aten_ops_per_step"])
                row["ms_vs_dynamic"] = row["decode_ms_per_token"] / base["decode_ms_per_token"]
            rows.append(row)
            d = row["device_path"]
            print(f"{length:6d} {name:13s} decode {row['decode_ms_per_token']:7.1f} ms/token | device path: "
                  f"{d['host_reads_per_step']:.1f} host reads, {d['aten_ops_per_step']:.0f} ATen ops, "
                  f"{d['host_ms_per_step_counted']:.1f} host ms (counted) | prefill {row['prefill_s']:.1f} s",
                  flush=True)
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = None
    result = {
        "benchmark": "decode_overhead",
        "model": "SmolLM2-135M-Instruct (fp32, dequantised from Q4_1 GGUF)",
        "machine": machine_info(torch.device("cpu")),
        "command": "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
        "commit": commit,
        "date": time.strftime("%Y-%m-%d"),
        "notes": "decode_ms_per_token: default strategy of this machine (CPU: segments), median of the timed steps. "
                 "device_path: HETEROCACHE_DECODE=strategy=device, per step, under a TorchDispatchMode counter "
                 "(host_ms includes the counter's own overhead). HeteroCache: bundled SmolLM2 profile, defaults "
                 "(drift checks every 5 steps included).",
        "results": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
