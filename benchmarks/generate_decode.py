"""Decode time per token through ``model.generate`` (what users run) and through the bare model
step, paired: the methods alternate in rounds (A B C A B C ...), so a slow phase of a shared
machine hits every method alike; the robust figures are each round's ratio to the reference.

    python benchmarks/generate_decode.py --length 7393 --methods dynamic,fullkv,snapkv,heterocache \
        --budget 0.25 --rounds 5 --new-tokens 65 --threads 2 \
        --out benchmarks/results/generate_decode_smollm2_cpu.json

Per round and method, with a fresh cache:
- ``generate``: one ``generate(max_new_tokens=N)`` on the needle prompt; a logits processor stamps
  the time of every step, so the per-token time is (last stamp - second stamp) / (N - 2): decode steps
  only, without the prefill and without the first decode step, which ends the prompt (compresses it,
  ``docs/prefill.md``; before that change the stamps were (last - first) / (N - 1)).
- ``step``: then ``--steps`` bare ``model(token, cache=...)`` calls on the same cache (what
  ``heterocache bench`` times), median per step.
Run it on an otherwise idle machine (set ``--threads``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import LogitsProcessor, LogitsProcessorList

from heterocache._compat import cache_kwarg
from heterocache.bench.cli import machine_info
from heterocache.engine.registry import get_method, make_cache, parse_method_spec
from heterocache.models import SMOLLM2_NAME, load_smollm2


class _StepClock(LogitsProcessor):
    """Records ``perf_counter()`` each time ``generate`` scores a step (once per new token)."""

    def __init__(self):
        self.stamps: list[float] = []

    def __call__(self, input_ids, scores):
        self.stamps.append(time.perf_counter())
        return scores


def needle_prompt(tokenizer, length: int) -> torch.Tensor:
    """``[1, ~length]`` chat-formatted ids: a number hidden mid-way in filler prose, then a question."""
    filler = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
    unit = len(tokenizer(filler).input_ids)
    half = max(1, (length - 60) // (2 * unit))
    document = filler * half + "The special magic number is 7319. " + filler * half
    question = "What is the special magic number mentioned in the text?"
    enc = tokenizer.apply_chat_template([{"role": "user", "content": document + question}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    return enc["input_ids"]


def cache_for(model, name: str, budget: float):
    """A fresh cache of method spec ``name``, the model switched to the attention it needs."""
    base = get_method(parse_method_spec(name)[0])
    model.set_attn_implementation("heterocache" if base.needs_heterocache_attention else "sdpa")
    return make_cache(name, budget if base.uses_budget else None, model)


@torch.no_grad()
def one_round(model, ids, name: str, budget: float, new_tokens: int, steps: int) -> dict:
    cache = cache_for(model, name, budget)
    clock = _StepClock()
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                         logits_processor=LogitsProcessorList([clock]), **cache_kwarg(model, cache))
    stamps = clock.stamps
    # From the end of the first decode step, which also ends the prompt (compresses it; docs/prefill.md).
    per_token = (stamps[-1] - stamps[1]) / (len(stamps) - 2)
    token = out[:, -1:]
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        logits = model(token, **cache_kwarg(model, cache), use_cache=True, logits_to_keep=1).logits[:, -1]
        token = logits.argmax(-1, keepdim=True)
        times.append(time.perf_counter() - t)
    return {"generate_ms": per_token * 1e3, "step_ms": statistics.median(times) * 1e3,
            "answer_ids": out[0, ids.shape[1]:].tolist()}


def summarise(rounds: list[dict], names: list[str], reference: str) -> dict:
    """Median and range per method and path, and the per-round ratio to ``reference``."""
    out = {}
    for name in names:
        row = {}
        for path in ("generate_ms", "step_ms"):
            values = [r[name][path] for r in rounds]
            ratios = [r[name][path] / r[reference][path] for r in rounds]
            row[path] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
            row[path.replace("_ms", "_ratio_to_" + reference)] = {
                "median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
        out[name] = row
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=7393, help="prompt tokens (approximately)")
    parser.add_argument("--methods", default="dynamic,fullkv,snapkv,heterocache")
    parser.add_argument("--reference", default="dynamic")
    parser.add_argument("--budget", type=float, default=0.25)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=65)
    parser.add_argument("--steps", type=int, default=16, help="bare steps timed after each generate")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    for name in names:
        parse_method_spec(name)  # unknown names fail before the model loads
    if args.reference not in names:
        parser.error(f"--reference {args.reference!r} must be one of --methods")
    torch.set_num_threads(args.threads)
    model, tokenizer = load_smollm2(attn_implementation="heterocache")
    ids = needle_prompt(tokenizer, args.length)
    one_round(model, ids[:, :512], names[0], args.budget, 4, 2)  # warm-up (allocator, kernels)
    rounds = []
    for r in range(args.rounds):
        rounds.append({name: one_round(model, ids, name, args.budget, args.new_tokens, args.steps) for name in names})
        print(f"round {r}: " + ", ".join(f"{n} {v['generate_ms']:.1f}/{v['step_ms']:.1f} ms" for n, v in
                                          rounds[-1].items()), file=sys.stderr, flush=True)
    result = {
        "benchmark": "generate_decode",
        "command": " ".join(sys.argv),
        "machine": {**machine_info(ids.device), "transformers": transformers.__version__},
        "model": SMOLLM2_NAME,
        "prompt_tokens": int(ids.shape[1]),
        "budget": args.budget,
        "new_tokens": args.new_tokens,
        "reference": args.reference,
        "summary": summarise(rounds, names, args.reference),
        "rounds": rounds,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    for name, row in result["summary"].items():
        g, s = row["generate_ms"], row["step_ms"]
        print(f"{name:24} generate {g['median']:7.1f} ms ({g['min']:.1f}-{g['max']:.1f})"
              f"  x{row['generate_ratio_to_' + args.reference]['median']:.2f}"
              f"   step {s['median']:7.1f} ms  x{row['step_ratio_to_' + args.reference]['median']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
