"""Do HeteroCache's compressed heads keep a needle's answer whole? Coverage of the asked needle's
value tokens after a query-aware prefill, per selection pooling kernel and budget, on SmolLM2.

    python benchmarks/needle_coverage.py --tokens 4096 --samples 10 --kernels 5 9 15 \
        --budgets 0.25 0.5 --out benchmarks/results/needle_coverage_smollm2_cpu.json

Why: SmolLM2's tokenizer writes every digit as its own token (a 7-digit value is 7 tokens; Llama-3
writes it in 3-digit pieces, 3 tokens), and the selection scores are average-pooled over
``kernel`` neighbouring tokens (5 in the paper's code) before the top tokens are taken. A head
that keeps the first digits of a value but not the last ones can copy only part of it: the
answers the full cache gets right and HeteroCache gets wrong at budget 0.5 drop trailing digits
(``8693355`` -> ``869335``).

Per (kernel, budget) it records, over the compressed heads (anchors and satellites) of every
layer and the needle prompts (RULER-style ``niah_single`` and ``niah_multikey``; the needle the
question asks for): the mean share of the value's tokens a head keeps, and of the heads that keep
at least one of them, the share that keep all (a partial value is what makes the copy stop). One
prefill forward fills every configuration's cache (``prefill_many``), so all see the same
attention.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from heterocache.bench.cli import machine_info
from heterocache.engine.registry import make_cache
from heterocache.eval.prompting import PromptFormatter
from heterocache.eval.shared_prefill import PrefillTarget, prefill_many
from heterocache.eval.tasks import get_task
from heterocache.models import load_smollm2
from heterocache.profile import Role


def value_span(input_ids: list[int], value_ids: list[int]) -> range:
    """Token positions of the first occurrence of ``value_ids`` in ``input_ids``."""
    n = len(value_ids)
    for i in range(len(input_ids) - n + 1):
        if input_ids[i : i + n] == value_ids:
            return range(i, i + n)
    raise ValueError("the needle's value is not in the prompt as encoded on its own")


def head_coverage(cache, span: range) -> np.ndarray:
    """Share of ``span`` each compressed (anchor, satellite) head of ``cache`` keeps (row 0):
    float ``[compressed heads]``."""
    roles = cache.policy.profile.roles
    want = np.asarray(span)
    out = []
    for layer_idx, layer in enumerate(cache.layers):
        store = layer.store
        if store is None:
            continue
        for h in range(store.num_heads):
            if int(roles[layer_idx, h]) not in (int(Role.ANCHOR), int(Role.SATELLITE)):
                continue
            pos = store.segment(h)[2].numpy()
            out.append(np.isin(want, pos).mean())
    return np.asarray(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096, help="prompt tokens")
    parser.add_argument("--samples", type=int, default=10, help="prompts per task (seed 0)")
    parser.add_argument("--tasks", nargs="+", default=["niah_single", "niah_multikey"])
    parser.add_argument("--kernels", type=int, nargs="+", default=[5, 9, 15])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/needle_coverage_smollm2_cpu.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tokenizer = load_smollm2()
    formatter = PromptFormatter(tokenizer)
    configs = [(k, b) for k in args.kernels for b in args.budgets]
    per_config: dict[tuple, list[np.ndarray]] = {c: [] for c in configs}
    start = time.perf_counter()
    for task_name in args.tasks:
        task = get_task(task_name)
        for sample in task.samples(formatter, args.tokens, args.samples, 0):
            prompt = formatter.encode(sample)
            asked = next(n for n in sample.meta["needles"] if n["key"] == sample.meta["query"])
            span = value_span(prompt.input_ids, tokenizer.encode(asked["value"], add_special_tokens=False))
            caches = [make_cache(f"heterocache:kernel={k}", b, model=model) for k, b in configs]
            ids = torch.tensor([prompt.input_ids])
            prefill_many(model, ids, [PrefillTarget(c, prompt.length) for c in caches])  # under inference_mode itself
            for config, cache in zip(configs, caches):
                per_config[config].append(head_coverage(cache, span))
            print(f"{task_name} #{sample.index}: value at {span.start}..{span.stop - 1}", file=sys.stderr)
    rows = []
    for (kernel, budget), covs in per_config.items():
        c = np.concatenate(covs)
        touched = c[c > 0]
        rows.append({
            "kernel": kernel, "budget": budget, "heads": int(c.size),
            "mean_value_share_kept": round(float(c.mean()), 4),
            "heads_keeping_any": round(float((c > 0).mean()), 4),
            "whole_among_touched": round(float((touched == 1).mean()), 4) if touched.size else None,
        })
        print(json.dumps(rows[-1]))
    result = {
        "machine": machine_info(torch.device("cpu")), "model": "SmolLM2-135M-Instruct (fp32)",
        "command": " ".join(["python", "benchmarks/needle_coverage.py", *(argv if argv is not None else sys.argv[1:])]),
        "tokens": args.tokens, "samples_per_task": args.samples, "tasks": args.tasks, "mode": "query_aware",
        "seconds": round(time.perf_counter() - start, 1), "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
