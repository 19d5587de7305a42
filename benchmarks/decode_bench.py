"""Decode ms/token and KV bytes on SmolLM2-135M-Instruct: DynamicCache vs our FullKV vs SnapKV.

    python benchmarks/decode_bench.py --lengths 2048 4096 8000 --out benchmarks/results/decode_smollm2_cpu.json

Each method runs on the same prompt (a long natural-looking text); the decode step time is the
median over the timed steps. Run on an otherwise idle machine: other processes distort CPU timings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

import torch

from heterocache import FullKVCache, SnapKVCache
from heterocache.bench.measure import dynamic_cache, measure_decode
from heterocache.models import load_smollm2

WORDS = (
    "river valley stone bridge harbour village library winter autumn bread mountain forest road teacher "
    "council market garden lantern window morning evening story song travel letter silver copper field"
).split()


def prompt_ids(tokenizer, length: int, seed: int = 0) -> torch.Tensor:
    """``[1, length]`` token ids of seeded pseudo-prose."""
    rng = random.Random(seed)
    text = []
    while True:
        text.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))).capitalize() + ".")
        if len(text) % 50 == 0:
            ids = tokenizer(" ".join(text), return_tensors="pt").input_ids
            if ids.shape[1] >= length:
                return ids[:, :length]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8000])
    parser.add_argument("--budget", type=float, default=0.25)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", default="benchmarks/results/decode_smollm2_cpu.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer = load_smollm2(attn_implementation="heterocache")
    methods = {
        "DynamicCache+sdpa": ("sdpa", dynamic_cache),
        "FullKV": ("heterocache", FullKVCache),
        f"SnapKV@{args.budget}": ("heterocache", lambda: SnapKVCache(budget=args.budget)),
    }
    rows, reference_tokens = [], {}
    for length in args.lengths:
        ids = prompt_ids(tokenizer, length)
        for name, (attn, make_cache) in methods.items():
            model.set_attn_implementation(attn)
            result = measure_decode(model, ids, make_cache, new_tokens=args.new_tokens)
            tokens = result.pop("tokens")
            result.update(method=name, length=length)
            if name.startswith("Dynamic"):
                reference_tokens[length] = tokens
            elif name == "FullKV":
                result["tokens_equal_dynamic_cache"] = tokens == reference_tokens[length]
            rows.append(result)
            print(
                f"{length:6d} {name:20s} decode {result['decode_ms_per_token']:7.2f} ms/token  "
                f"KV {result['kv_bytes_end'] / 2**20:7.2f} MiB  prefill {result['prefill_s']:.1f} s",
                flush=True,
            )
    for row in rows:
        base = next(r for r in rows if r["length"] == row["length"] and r["method"].startswith("Dynamic"))
        row["speedup_vs_dynamic"] = base["decode_ms_per_token"] / row["decode_ms_per_token"]
        row["kv_ratio_vs_dynamic"] = row["kv_bytes_end"] / base["kv_bytes_end"]
    out = {
        "benchmark": "decode_bench",
        "model": "SmolLM2-135M-Instruct (fp32, dequantised from Q4_1 GGUF)",
        "machine": {
            "device": "cpu",
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": sys.version.split()[0],
        },
        "command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d"),
        "budget": args.budget,
        "new_tokens": args.new_tokens,
        "results": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
