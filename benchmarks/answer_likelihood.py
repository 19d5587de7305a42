"""Log-probability of the right answer, teacher-forced, per method: a low-noise companion to the
RULER scores on the single-value needle tasks.

    python benchmarks/answer_likelihood.py --tokens 4096 --samples 20 --modes query_aware \
        --methods heterocache@0.25 heterocache@0.5 snapkv@0.25 \
        --out benchmarks/results/answer_likelihood_smollm2_cpu.json

Why: a greedy answer is right or wrong, and on SmolLM2 many needle answers sit on a knife edge
(a value with a repeated digit, ``4227777``, is copied one digit short even by the full cache), so a
small change in what a cache keeps flips whole samples either way and 20 samples per task leave a
+-5 point interval on the RULER average. The log-probability of the right answer's tokens moves
continuously with what was kept, and its paired difference to the full cache says how much of the
answer a method lost, sample by sample.

For each prompt (``niah_single`` and ``niah_multikey`` by default: one value per answer, written
`` <digits>`` by the model) one prefill forward fills every method's cache and the full cache's
(``prefill_many``); each then reads the question (query-agnostic mode) or not (query-aware) and the
answer's tokens one decode step at a time. Recorded per sample and method: the summed
log-probability of the answer's tokens (nats) and whether every one of them is the argmax
(teacher-forced exact match). Differences to the full cache are paired over the samples, with the
95% interval of ``heterocache.eval.paired``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from heterocache.bench.cli import machine_info
from heterocache.engine.registry import make_cache
from heterocache.eval.paired import paired_difference
from heterocache.eval.prompting import PromptFormatter
from heterocache.eval.shared_prefill import PrefillTarget, _step, prefill_many
from heterocache.eval.tasks import get_task
from heterocache.models import load_smollm2

FULL = "dynamic"


def parse_method(text: str) -> tuple[str, float | None]:
    """``"heterocache:kernel=15@0.25"`` -> ``("heterocache:kernel=15", 0.25)``; ``"dynamic"`` ->
    ``("dynamic", None)``."""
    name, _, budget = text.rpartition("@")
    return (name, float(budget)) if name else (text, None)


@torch.inference_mode()
def answer_scores(model, cache, answer: list[int], logits: torch.Tensor | None = None,
                  new_ids: torch.Tensor | None = None) -> tuple[float, bool]:
    """Teacher-force ``answer`` through ``cache``: (summed log-probability of its tokens in nats,
    whether each was the argmax). Either ``logits`` ``[1, vocab]`` of the last cached position or
    the ``new_ids`` ``[1, q]`` still to be read (the question after a query-agnostic prefill)."""
    if new_ids is not None:
        logits = _step(model, cache, new_ids)
    total, exact = 0.0, True
    device = next(model.parameters()).device
    for i, token in enumerate(answer):
        lp = torch.log_softmax(logits.float(), -1)[0]
        total += float(lp[token])
        exact &= int(lp.argmax()) == token
        if i + 1 < len(answer):
            logits = _step(model, cache, torch.tensor([[token]], device=device))
    return total, exact


def summary_rows(records: list[dict], methods: list[tuple[str, float | None]], modes, tokens: int, tasks) -> list[dict]:
    """Per (mode, method, budget): samples, mean log-probability, teacher-forced exact share and,
    but for the full cache, the paired difference to it with its 95% half-width."""
    rows = []
    for mode in modes:
        for m, b in methods:
            budget = 1.0 if b is None else b
            mine = [r for r in records if r["method"] == m and r["budget"] == budget and r["mode"] == mode]
            row = {"method": m, "budget": b, "mode": mode, "samples": len(mine),
                   "mean_logprob": round(sum(r["metrics"]["score"] for r in mine) / len(mine), 4),
                   "teacher_forced_exact": round(sum(r["metrics"]["exact"] for r in mine) / len(mine), 4)}
            if m != FULL:
                d = paired_difference(records, (m, budget), (FULL, 1.0), tokens, mode, tasks)
                row["logprob_minus_full"] = round(d.mean, 4)
                row["interval95"] = None if d.half_width is None else round(d.half_width, 4)
            rows.append(row)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096, help="prompt tokens")
    parser.add_argument("--samples", type=int, default=20, help="prompts per task (seed 0, as the eval grid)")
    parser.add_argument("--tasks", nargs="+", default=["niah_single", "niah_multikey"])
    parser.add_argument("--modes", nargs="+", default=["query_aware"], choices=["query_aware", "query_agnostic"])
    parser.add_argument("--methods", nargs="+", default=["heterocache@0.25", "heterocache@0.5"],
                        help="method specs with their budget, e.g. heterocache:kernel=15@0.25")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/answer_likelihood_smollm2_cpu.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tokenizer = load_smollm2()
    formatter = PromptFormatter(tokenizer)
    methods = [(FULL, None)] + [parse_method(m) for m in args.methods]
    records = []
    start = time.perf_counter()
    for task_name in args.tasks:
        task = get_task(task_name)
        for sample in task.samples(formatter, args.tokens, args.samples, 0):
            prompt = formatter.encode(sample)
            answer = tokenizer.encode(" " + sample.answers[0], add_special_tokens=False)
            ids = torch.tensor([prompt.input_ids])
            caches = {(m, b, mode): make_cache(m, b, model=model) for mode in args.modes for m, b in methods}
            targets = [PrefillTarget(c, prompt.length if mode == "query_aware" else prompt.context_len)
                       for (_, _, mode), c in caches.items()]
            last = prefill_many(model, ids, targets)  # under inference_mode itself
            question = ids[:, prompt.context_len:]
            for (m, b, mode), cache in caches.items():
                aware = mode == "query_aware"
                lp, exact = answer_scores(model, cache, answer, logits=last if aware else None,
                                          new_ids=None if aware else question)
                records.append({"method": m, "budget": 1.0 if b is None else b, "task": task_name,
                                "length": args.tokens, "mode": mode, "sample_idx": sample.index,
                                "metrics": {"score": lp, "exact": exact}, "answer_tokens": len(answer)})
            del caches
            print(f"{task_name} #{sample.index} done ({time.perf_counter() - start:.0f} s)", file=sys.stderr,
                  flush=True)
    rows = summary_rows(records, methods, args.modes, args.tokens, args.tasks)
    for row in rows:
        print(json.dumps(row))
    result = {
        "machine": machine_info(torch.device("cpu")), "model": "SmolLM2-135M-Instruct (fp32)",
        "command": " ".join(["python", "benchmarks/answer_likelihood.py",
                             *(argv if argv is not None else sys.argv[1:])]),
        "tokens": args.tokens, "samples_per_task": args.samples, "tasks": args.tasks,
        "seconds": round(time.perf_counter() - start, 1), "rows": rows, "records": records,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
