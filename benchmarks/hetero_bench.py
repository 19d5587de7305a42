"""HeteroCache on SmolLM2-135M-Instruct: decode speed, device vs host bytes, refreshes and needle
accuracy per budget, with each mechanism switched off in turn.

    python benchmarks/hetero_bench.py --lengths 4096 8000 --budgets 0.15 0.25 0.5 --samples 5 \\
        --out benchmarks/results/hetero_smollm2_cpu.json

Variants: ``heterocache`` (everything on), ``no_refresh``, ``no_offload`` (satellites fixed like
anchors), ``uniform`` (equal shares instead of inverse stability). A budget the profile cannot meet
is recorded with its error. Needle prompts are RULER-style single needles (heterocache.eval).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from heterocache import FullKVCache
from heterocache._compat import cache_kwarg
from heterocache.bench.measure import measure_decode
from heterocache.eval.prompting import PromptFormatter
from heterocache.eval.tasks.ruler import NeedleTask
from heterocache.methods.heterocache import HeteroCache, InfeasibleBudgetError
from heterocache.models import load_smollm2
from heterocache.profile import HeadProfile, profile_for_model

VARIANTS = {
    "heterocache": {},
    "no_refresh": {"refresh": False},
    "no_offload": {"offload": False},
    "uniform": {"inverse_stability": False},
}


NEEDLE_NEW_TOKENS = 16


def needle_accuracy(model, tokenizer, samples, formatter, make_cache,
                    max_new_tokens=NEEDLE_NEW_TOKENS) -> tuple[float, list]:
    hits, stats = 0, []
    for sample in samples:
        ids = torch.tensor([formatter.encode(sample).input_ids])
        cache = make_cache()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwarg(model, cache),
                             max_new_tokens=max_new_tokens, do_sample=False)
        hits += sample.answers[0] in tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        if hasattr(cache, "stats"):
            stats.append(cache.stats())
    return 100.0 * hits / len(samples), stats


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8000])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.15, 0.25, 0.5])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--samples", type=int, default=5, help="needle prompts per cell")
    parser.add_argument("--new-tokens", type=int, default=32, help="decode steps timed")
    parser.add_argument("--profile", default=None, help="profile file/name (default: the model's bundled one)")
    parser.add_argument("--window", type=int, default=None, help="selection window (default: the policy's)")
    parser.add_argument("--out", default="benchmarks/results/hetero_smollm2_cpu.json")
    args = parser.parse_args(argv)

    model, tokenizer = load_smollm2()
    profile = HeadProfile.from_pretrained(args.profile) if args.profile else profile_for_model(model)
    formatter = PromptFormatter(tokenizer)
    extra = {} if args.window is None else {"window": args.window}
    rows = []
    for length in args.lengths:
        samples = NeedleTask().samples(formatter, length, num_samples=args.samples, seed=0)
        ids = torch.tensor([formatter.encode(samples[0]).input_ids])
        full = measure_decode(model, ids, FullKVCache, new_tokens=args.new_tokens)
        acc, _ = needle_accuracy(model, tokenizer, samples, formatter, FullKVCache)
        rows.append({"length": length, "method": "fullkv", "needle_accuracy": acc,
                     **{k: v for k, v in full.items() if k != "tokens"}})
        print(f"{length} fullkv: {full['decode_ms_per_token']:.1f} ms/token, needle {acc:.0f}", flush=True)
        for budget in args.budgets:
            for variant in args.variants:
                params = {**VARIANTS[variant], **extra}

                def make(budget=budget, params=params):
                    return HeteroCache(profile, budget=budget, **params)

                row = {"length": length, "method": variant, "budget": budget, "params": params}
                try:
                    timing = measure_decode(model, ids, make, new_tokens=args.new_tokens)
                    acc, stats = needle_accuracy(model, tokenizer, samples, formatter, make)
                except InfeasibleBudgetError as err:
                    row["error"] = str(err)
                    rows.append(row)
                    print(f"{length} {variant} b={budget}: infeasible", flush=True)
                    continue
                decoded = NEEDLE_NEW_TOKENS - 1  # decode steps of each needle generation (first token: prefill)
                refreshes = sum(s["refreshes"] for s in stats) / len(stats)
                row.update({k: v for k, v in timing.items() if k != "tokens"})
                row.update(
                    needle_accuracy=acc,
                    speedup_vs_fullkv=full["decode_ms_per_token"] / timing["decode_ms_per_token"],
                    refreshes_per_100_tokens=100.0 * refreshes / decoded,
                    device_bytes=stats[0]["device_bytes"],
                    host_bytes=stats[0]["host_bytes"],
                    bytes_moved_per_generation=sum(s["bytes_moved"] for s in stats) / len(stats),
                )
                rows.append(row)
                print(
                    f"{length} {variant} b={budget}: {row['decode_ms_per_token']:.1f} ms/token, needle {acc:.0f}, "
                    f"refreshes/100 tok {row['refreshes_per_100_tokens']:.1f}, device "
                    f"{row['device_bytes'] / 2**20:.1f} MiB, host {row['host_bytes'] / 2**20:.1f} MiB",
                    flush=True,
                )
    out = {
        "benchmark": "hetero_bench",
        "model": "SmolLM2-135M-Instruct (fp32, dequantised from Q4_1 GGUF)",
        "profile": {"model_name": profile.model_name, "counts": profile.counts(), "tau_sim": profile.tau_sim},
        "machine": {"device": "cpu", "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
        "command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d"),
        "samples": args.samples,
        "results": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
