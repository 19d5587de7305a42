"""Decode ms/token of several caches measured paired: every cache is prefilled once, then timing
rounds alternate between them (A, B, C, A, B, C, ...), so slow phases of a shared machine hit
every cache alike. Reports each cache's median over rounds and, for every round, its time
relative to the reference cache of that round; the median and spread of those ratios are the
robust figures. With ``--turn-tokens N`` every round first feeds each cache a further turn of N
tokens (timed: what a new turn costs, HeteroCache's re-selection included), so the decode steps
timed after it run between turns.

    python benchmarks/paired_decode.py --lengths 2048 8192 --methods snapkv,pyramidkv,heterocache \
        --reference snapkv --rounds 8 --steps 8 --threads 2 \
        --out benchmarks/results/paired_decode_smollm2_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from heterocache._compat import cache_kwarg
from heterocache.bench.cli import machine_info
from heterocache.bench.measure import prompt_ids
from heterocache.engine.registry import get_method, make_cache, parse_method_spec
from heterocache.models import load_smollm2


def _step(model, cache, token):
    logits = model(token, **cache_kwarg(model, cache), use_cache=True, logits_to_keep=1).logits[:, -1]
    return logits.argmax(-1, keepdim=True)


@torch.no_grad()
def paired(model, ids, names: list[str], budget: float, rounds: int, steps: int, warmup: int,
           turn_tokens: int = 0) -> tuple[dict, dict]:
    """Prefill one cache per method, then ``rounds`` alternating rounds of ``steps`` timed steps
    (each after a timed turn of ``turn_tokens`` tokens when > 0). Returns ms per token and ms per
    turn, by method and round."""
    caches, tokens = {}, {}
    turn = ids[:, :turn_tokens]
    for name in names:
        model.set_attn_implementation("sdpa" if name == "dynamic" else "heterocache")
        cache = make_cache(name, budget if get_method(parse_method_spec(name)[0]).uses_budget else None, model)
        logits = model(ids, **cache_kwarg(model, cache), use_cache=True, logits_to_keep=1).logits[:, -1]
        if hasattr(cache, "end_prompt"):  # compress now: a later turn is a new turn, not more prompt
            cache.end_prompt()
        token = logits.argmax(-1, keepdim=True)
        for _ in range(warmup):
            token = _step(model, cache, token)
        caches[name], tokens[name] = cache, token
    per_round = {name: [] for name in names}
    turns = {name: [] for name in names}
    for _ in range(rounds):
        for name in names:
            model.set_attn_implementation("sdpa" if name == "dynamic" else "heterocache")
            if turn_tokens:
                t = time.perf_counter()
                logits = model(turn, **cache_kwarg(model, caches[name]), use_cache=True, logits_to_keep=1).logits
                tokens[name] = logits[:, -1].argmax(-1, keepdim=True)
                turns[name].append((time.perf_counter() - t) * 1e3)
            times = []
            for _ in range(steps):
                t = time.perf_counter()
                tokens[name] = _step(model, caches[name], tokens[name])
                times.append(time.perf_counter() - t)
            per_round[name].append(statistics.median(times) * 1e3)
    model.set_attn_implementation("heterocache")
    return per_round, turns


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192], help="prompt tokens")
    parser.add_argument("--methods", default="snapkv,pyramidkv,heterocache", help="comma-separated registry names")
    parser.add_argument("--reference", default="snapkv", help="the method ratios are taken against")
    parser.add_argument("--budget", type=float, default=0.25)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per round (median taken)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--turn-tokens", type=int, default=0, help="tokens of a further turn fed every round (0: none)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/paired_decode_smollm2_cpu.json")
    args = parser.parse_args(argv)
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    for name in names:
        parse_method_spec(name)  # unknown names or options fail here, before the model loads
    if args.reference not in names:
        parser.error(f"--reference {args.reference!r} must be one of --methods {names}")
    if min(args.rounds, args.steps) < 1:
        parser.error("--rounds and --steps must be >= 1")
    torch.set_num_threads(args.threads)
    model, tokenizer = load_smollm2(attn_implementation="heterocache")
    results = []
    for length in args.lengths:
        ids = prompt_ids(tokenizer, length)
        per_round, turns = paired(model, ids, names, args.budget, args.rounds, args.steps, args.warmup,
                                  args.turn_tokens)
        ref = per_round[args.reference]
        for name in names:
            ratios = [a / b for a, b in zip(per_round[name], ref)]
            row = {"prompt_tokens": length, "method": name, "budget": args.budget,
                   "ms_per_token_by_round": per_round[name],
                   "median_ms_per_token": statistics.median(per_round[name]),
                   f"ratio_vs_{args.reference}_median": statistics.median(ratios),
                   f"ratio_vs_{args.reference}_min": min(ratios), f"ratio_vs_{args.reference}_max": max(ratios)}
            if args.turn_tokens:
                row.update(turn_tokens=args.turn_tokens, ms_per_turn_by_round=turns[name],
                           median_ms_per_turn=statistics.median(turns[name]),
                           turn_ratio_vs_reference_median=statistics.median(
                               [a / b for a, b in zip(turns[name], turns[args.reference])]))
            results.append(row)
            print(f"{length:6d} {name:12s} {row['median_ms_per_token']:7.1f} ms/token  x{args.reference}: "
                  f"median {statistics.median(ratios):.2f} (rounds {min(ratios):.2f}-{max(ratios):.2f})"
                  + (f"; turn {row['median_ms_per_turn']:.0f} ms" if args.turn_tokens else ""), flush=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip() or None
    out = {
        "benchmark": "paired_decode",
        "model": "SmolLM2-135M-Instruct (fp32, dequantised from Q4_1 GGUF)",
        "machine": machine_info(torch.device("cpu")),
        "command": "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
        "commit": commit,
        "date": time.strftime("%Y-%m-%d"),
        "reference": args.reference,
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
