"""How well a truncated SVD keeps a model's pre-RoPE prompt keys: ShadowKV's low-rank key cache,
measured on SmolLM2 with RULER-style needle prompts.

    python benchmarks/shadowkv_keys.py --tokens 4096 --samples 3 \
        --out benchmarks/results/shadowkv_keys_smollm2_cpu.json

Per layer it factors the prompt's pre-RoPE keys (all KV heads side by side, ``[L, H * D]``, as
ShadowKV does) and records the relative Frobenius error of the rank-r reconstruction at ShadowKV's
default rank (``ShadowKVPolicy.rank``: 160 of Llama-3.1-8B's 1024 key dimensions) and at other
shares of the width, and the smallest rank that keeps the error under 5% and 10%. A key width
far narrower than the published model's (SmolLM2: 3 KV heads x 64 = 192) leaves fewer directions
to drop at the same share.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from heterocache.eval.prompting import PromptFormatter
from heterocache.eval.tasks.ruler import NeedleTask
from heterocache.methods.shadowkv import ShadowKVPolicy
from heterocache.models import load_smollm2


def relative_errors(X: torch.Tensor, ranks: list[int]) -> tuple[dict[int, float], torch.Tensor]:
    """Relative Frobenius error of the best rank-r approximation of ``X`` for each r in ``ranks``
    (from the singular values: the error is the energy of the dropped ones), and the error at every
    rank 0..width as a tensor."""
    sigma = torch.linalg.svdvals(X.double())
    energy = sigma.pow(2)
    tail = energy.flip(0).cumsum(0).flip(0)  # tail[r] = energy of singular values r, r+1, ...
    err = torch.cat([tail, energy.new_zeros(1)]).div(energy.sum()).sqrt()  # [width + 1]
    return {r: float(err[min(r, len(err) - 1)]) for r in ranks}, err


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096, help="prompt tokens")
    parser.add_argument("--samples", type=int, default=3, help="needle prompts (seeds 0..n-1)")
    parser.add_argument("--shares", type=float, nargs="+", default=[0.15625, 0.25, 0.5],
                        help="ranks as shares of the key width")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/shadowkv_keys_smollm2_cpu.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tokenizer = load_smollm2(attn_implementation="sdpa")
    formatter = PromptFormatter(tokenizer)
    samples = NeedleTask().samples(formatter, args.tokens, num_samples=args.samples, seed=0)
    layers = model.model.layers
    cfg = model.config
    width = cfg.num_key_value_heads * (getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    default_rank = ShadowKVPolicy().rank_for(width, args.tokens)
    ranks = sorted({default_rank, *(max(1, round(s * width)) for s in args.shares)})

    captured: dict[int, torch.Tensor] = {}
    hooks = [layer.self_attn.k_proj.register_forward_hook(
        lambda mod, inp, out, i=i: captured.__setitem__(i, out[0].detach())) for i, layer in enumerate(layers)]
    per_layer: dict[int, list[dict]] = {i: [] for i in range(len(layers))}
    try:
        for sample in samples:
            ids = torch.tensor([formatter.encode(sample).input_ids])
            with torch.no_grad():
                model(input_ids=ids)  # k_proj's output is the pre-RoPE key, [L, H * D]
            for i, X in captured.items():
                errs, curve = relative_errors(X, ranks)
                per_layer[i].append({"errors": errs,
                                     "rank_for_5pct": int((curve <= 0.05).nonzero()[0]),
                                     "rank_for_10pct": int((curve <= 0.10).nonzero()[0])})
    finally:
        for h in hooks:
            h.remove()

    rows = []
    for i, ms in per_layer.items():
        rows.append({"layer": i,
                     "relative_error": {str(r): statistics.mean(m["errors"][r] for m in ms) for r in ranks},
                     "rank_for_5pct": statistics.mean(m["rank_for_5pct"] for m in ms),
                     "rank_for_10pct": statistics.mean(m["rank_for_10pct"] for m in ms)})
    summary = {str(r): statistics.mean(row["relative_error"][str(r)] for row in rows) for r in ranks}
    for r in ranks:
        worst = max(rows, key=lambda row: row["relative_error"][str(r)])
        print(f"rank {r:4d} of {width} ({r / width:.3f}): mean relative key error {summary[str(r)]:.3f}, "
              f"worst layer {worst['layer']} {worst['relative_error'][str(r)]:.3f}", flush=True)
    print(f"rank for 5% error: mean {statistics.mean(r['rank_for_5pct'] for r in rows):.1f}; "
          f"for 10%: {statistics.mean(r['rank_for_10pct'] for r in rows):.1f} (of {width})")
    out = {"benchmark": "shadowkv_keys", "model": "SmolLM2-135M-Instruct (fp32)", "tokens": args.tokens,
           "samples": len(samples), "key_width": width, "default_rank": default_rank,
           "command": "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
           "machine": "2-core x86_64 CPU VM", "date": time.strftime("%Y-%m-%d"),
           "mean_relative_error": summary,
           "mean_rank_for_5pct": statistics.mean(r["rank_for_5pct"] for r in rows),
           "mean_rank_for_10pct": statistics.mean(r["rank_for_10pct"] for r in rows),
           "layers": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
