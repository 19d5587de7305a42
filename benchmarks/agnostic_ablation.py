"""HeteroCache variants in the query-agnostic RULER mode, paired against the main evaluation grid.

    python benchmarks/agnostic_ablation.py --tasks niah_single,niah_multikey --num-samples 8 \
        --out benchmarks/results/agnostic_ablation_smollm2_cpu

The prompts are those of the main grid (same seed, length and chat template), so every variant's
score is compared per sample with the grid's ``heterocache`` and ``full`` runs of ``--grid``
(records.jsonl): the difference and its 95% interval are paired over samples
(:mod:`heterocache.eval.paired`). Only the variants run here; the grid's records are read.
``--compare-only`` runs nothing and compares what the folder holds.

Variants (``HeteroCachePolicy`` options; each names its ``turn_refresh`` because the default
changed from "after" to "always" on 2026-11-29, after this ablation):
- ``hc_turn_after``: the former default: the question turn is drift-checked after it is attended.
  Its records are the grid's ``heterocache`` query-agnostic runs made before the change, moved here.
- ``hc_turn_before``: drift-checked before the turn is attended.
- ``hc_window32``: anchors and satellites selected by the last 32 context queries, not the last one.
- ``hc_turn_before_window32``: both.
- ``hc_always_refresh``: every drift check refreshes the satellites (``drift_threshold=1.0``).
- ``hc_always_refresh_turn_before``: that, with the question turn refreshed before it is attended.
- ``hc_drift_top64``: drift judged on top-64 sets instead of top-``base`` ones (``base`` is a third
  of a 4K prompt at budget 0.5, so large sets overlap whatever the query).
- ``hc_turn_always``: the turn refreshes every pivot's satellites before it is attended, drifted
  or not (now the default, so the grid's ``heterocache`` runs are this variant).

Writes ``records.jsonl``/``results.json`` of the variants and ``comparison.json`` under ``--out``.

``turn_refresh`` and ``drift_topk`` were removed after this ablation (docs/results.md#ablations):
the variants that set them are compared from the committed records (``--compare-only``); running
them again needs the code before the removal (git history).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
from pathlib import Path

import torch

from heterocache.engine.registry import make_cache
from heterocache.eval.paired import paired_difference
from heterocache.eval.results import RecordLog
from heterocache.eval.runner import EvalConfig, run_eval
from heterocache.methods.heterocache import HeteroCachePolicy
from heterocache.models import SMOLLM2_NAME, load_smollm2

VARIANTS = {
    "hc_turn_after": {"turn_refresh": "after"},
    "hc_turn_before": {"turn_refresh": "before"},
    "hc_window32": {"window": 32, "turn_refresh": "after"},
    "hc_turn_before_window32": {"turn_refresh": "before", "window": 32},
    "hc_always_refresh": {"drift_threshold": 1.0, "turn_refresh": "after"},
    "hc_always_refresh_turn_before": {"drift_threshold": 1.0, "turn_refresh": "before"},
    "hc_drift_top64": {"drift_topk": 64, "turn_refresh": "after"},
    "hc_turn_always": {"turn_refresh": "always"},
}
MODE = "query_agnostic"


def _factory(method, budget, model):
    return make_cache("heterocache", budget, model, **VARIANTS[method])


def compare(records: list[dict], variants, budgets, tasks, length: int) -> list[dict]:
    """Per variant and budget: mean score and paired differences to the grid's heterocache (the current
    default), the former default (``hc_turn_after``) and the full cache."""
    rows = []
    for budget in budgets:
        for method in ("heterocache", *variants):
            scores = [r["metrics"]["score"] for r in records if r["method"] == method and r["mode"] == MODE
                      and round(r["budget"], 6) == budget and r["task"] in tasks and r["length"] == length]
            row = {"method": method, "budget": budget, "samples": len(scores),
                   "mean_score": sum(scores) / len(scores) if scores else None}
            others = (("vs_heterocache", ("heterocache", budget)), ("vs_former_default", ("hc_turn_after", budget)),
                      ("vs_full", ("dynamic", 1.0)))
            for name, other in others:
                if other[0] == method:
                    continue
                diff = paired_difference(records, (method, budget), other, length, MODE, tasks)
                row[name] = None if diff is None else {
                    "mean": diff.mean, "half_width_95": diff.half_width, "pairs": diff.pairs, "text": diff.format()}
            rows.append(row)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", default="niah_single,niah_multikey")
    parser.add_argument("--num-samples", type=int, default=8)
    parser.add_argument("--budgets", default="0.25,0.5")
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--compare-only", action="store_true")
    parser.add_argument("--grid", default="benchmarks/results/eval_smollm2_cpu")
    parser.add_argument("--out", default="benchmarks/results/agnostic_ablation_smollm2_cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tasks = tuple(args.tasks.split(","))
    budgets = tuple(round(float(b), 6) for b in args.budgets.split(","))
    variants = tuple(args.variants.split(","))
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; known: {sorted(VARIANTS)}")
    options = {f.name for f in dataclasses.fields(HeteroCachePolicy)}
    retired = sorted(v for v in variants if set(VARIANTS[v]) - options)
    if retired and not args.compare_only:
        parser.error(f"variants {retired} set removed options (docs/results.md#ablations): compare their committed "
                     "records with --compare-only, or run them with the code before the removal")
    if not args.compare_only:
        grid_config = json.loads((Path(args.grid) / "config.json").read_text())
        model, tokenizer = load_smollm2()
        config = EvalConfig(methods=variants, budgets=budgets, tasks=tasks, lengths=(args.length,), modes=(MODE,),
                            num_samples=args.num_samples, seed=grid_config["seed"],
                            chat_template=grid_config["chat_template"])
        run_eval(model, tokenizer, config, args.out, make_cache=_factory, model_name=SMOLLM2_NAME,
                 progress=not args.no_progress, plots=False)
    ours = list(RecordLog(Path(args.out) / "records.jsonl").records.values())
    ours = [r for r in ours if r["sample_idx"] < args.num_samples]
    samples = {(r["task"], r["sample_idx"]) for r in ours}
    grid = [r for r in RecordLog(Path(args.grid) / "records.jsonl").records.values()
            if (r["task"], r["sample_idx"]) in samples and r["method"] in ("heterocache", "dynamic")]
    rows = compare(grid + ours, variants, budgets, tasks, args.length)
    result = {
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"},
        "model": SMOLLM2_NAME, "mode": MODE, "length": args.length, "tasks": list(tasks),
        "num_samples": args.num_samples, "variants": {v: VARIANTS[v] for v in variants}, "rows": rows,
    }
    Path(args.out, "comparison.json").write_text(json.dumps(result, indent=1))
    for row in rows:
        diffs = "  ".join(f"{k} {row[k]['text']}" for k in ("vs_heterocache", "vs_former_default", "vs_full")
                          if row.get(k))
        score = "n/a" if row["mean_score"] is None else f"{row['mean_score']:.1f}"
        print(f"{row['method']:<30} {row['budget']:<5} n={row['samples']:<3} score {score:>5}  {diffs}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
