"""Where one decode step's time goes inside ``model.generate``: the ATen ops (torch profiler, self
CPU time per step) and the heterocache Python functions (cProfile call counts per step) of each
method, side by side with DynamicCache.

    python benchmarks/profile_decode_step.py --length 7393 --methods dynamic,fullkv,snapkv \
        --threads 2 --out benchmarks/results/profile_decode_step_smollm2_cpu.json

Steps 3..10 of one greedy ``generate`` are profiled (after a warm-up of two steps); the figures
are per step. Run on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
import time
from pathlib import Path

import torch
import transformers
from generate_decode import cache_for, needle_prompt  # the same prompt and caches as the timing benchmark
from torch.profiler import ProfilerActivity, profile
from transformers import LogitsProcessor, LogitsProcessorList

from heterocache._compat import cache_kwarg
from heterocache.bench.cli import machine_info
from heterocache.engine.registry import parse_method_spec
from heterocache.models import SMOLLM2_NAME, load_smollm2

FIRST, LAST = 3, 11  # profile the steps between these logits-processor calls


class _Window(LogitsProcessor):
    """Starts both profilers at call FIRST and stops them at call LAST (steps FIRST..LAST-1)."""

    def __init__(self):
        self.calls, self.stamps = 0, []
        self.torch_prof = profile(activities=[ProfilerActivity.CPU])
        self.py_prof = cProfile.Profile()

    def __call__(self, input_ids, scores):
        self.calls += 1
        self.stamps.append(time.perf_counter())
        if self.calls == FIRST:
            self.torch_prof.__enter__()
            self.py_prof.enable()
        elif self.calls == LAST:
            self.py_prof.disable()
            self.torch_prof.__exit__(None, None, None)
        return scores


@torch.no_grad()
def profile_method(model, ids, name: str, budget: float, top: int) -> dict:
    cache = cache_for(model, name, budget)
    window = _Window()
    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=LAST + 1,
                   min_new_tokens=LAST + 1, do_sample=False, pad_token_id=0,
                   logits_processor=LogitsProcessorList([window]), **cache_kwarg(model, cache))
    steps = LAST - FIRST
    ops = sorted(window.torch_prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total_us = sum(e.self_cpu_time_total for e in ops)
    stats = pstats.Stats(window.py_prof)
    ours = {f"{Path(path).name}:{func}": calls / steps
            for (path, _, func), (_, calls, *_rest) in stats.stats.items() if "heterocache" in path}
    return {
        "step_ms": (window.stamps[LAST - 1] - window.stamps[FIRST - 1]) / steps * 1e3,
        "aten_self_ms_per_step": total_us / steps / 1e3,
        "aten_ops_per_step": sum(e.count for e in ops) / steps,
        "top_ops": [{"op": e.key, "self_ms_per_step": e.self_cpu_time_total / steps / 1e3,
                     "calls_per_step": e.count / steps} for e in ops[:top]],
        "python_calls_per_step": sum(c for (_, _, _), (_, c, *_r) in stats.stats.items()) / steps,
        "heterocache_calls_per_step": dict(sorted(ours.items(), key=lambda kv: -kv[1])[:top]),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=7393)
    parser.add_argument("--methods", default="dynamic,fullkv,snapkv")
    parser.add_argument("--budget", type=float, default=0.25)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    for name in names:
        parse_method_spec(name)
    torch.set_num_threads(args.threads)
    model, tokenizer = load_smollm2(attn_implementation="heterocache")
    ids = needle_prompt(tokenizer, args.length)
    for name in names:  # warm-up: first calls of each path (allocations, the profiler's own start-up)
        profile_method(model, ids[:, :256], name, args.budget, args.top)
    result = {"benchmark": "profile_decode_step", "command": " ".join(sys.argv),
              "machine": {**machine_info(ids.device), "transformers": transformers.__version__},
              "model": SMOLLM2_NAME, "prompt_tokens": int(ids.shape[1]), "budget": args.budget,
              "profiled_steps": LAST - FIRST,
              "methods": {name: profile_method(model, ids, name, args.budget, args.top) for name in names}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    for name, row in result["methods"].items():
        top = ", ".join(f"{o['op'].removeprefix('aten::')} {o['self_ms_per_step']:.1f}" for o in row["top_ops"][:4])
        print(f"{name:12} {row['step_ms']:6.1f} ms/step (profiled)  ATen {row['aten_self_ms_per_step']:6.1f} ms "
              f"in {row['aten_ops_per_step']:.0f} ops; Python calls {row['python_calls_per_step']:.0f}; top: {top}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
