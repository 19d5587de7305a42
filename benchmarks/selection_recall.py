"""How much of each decode step's true attention a per-step page selection reads: Quest's chosen
pages against the best possible choice of as many tokens (the exact top-k of that step's
attention), per query head, on SmolLM2 with RULER-style needle prompts.

    python benchmarks/selection_recall.py --tokens 2000 --budgets 0.1 0.25 --gqa max none \
        --out benchmarks/results/selection_recall_smollm2_cpu.json

For every selective layer and decode step it records the attention mass (softmax over all stored
tokens) that falls on the selected slots, and the mass of the top-N tokens, N the number selected.
A recall near the optimum means the page bounds rank pages well; a gap means they are loose.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from heterocache import QuestCache
from heterocache._compat import cache_kwarg
from heterocache.eval.prompting import PromptFormatter
from heterocache.eval.tasks.ruler import NeedleTask
from heterocache.methods.quest import QuestPolicy
from heterocache.models import load_smollm2


class _Recorder:
    """Wraps ``QuestPolicy.decode_selection`` to record captured and optimal attention mass."""

    def __init__(self):
        self.rows: list[tuple[int, float, float]] = []
        self._original = QuestPolicy.decode_selection

    def __enter__(self):
        recorder = self

        def wrapped(policy, layer_idx, store, query, scaling):
            selection = recorder._original(policy, layer_idx, store, query, scaling)
            if selection is not None:
                recorder.record(layer_idx, store, query, scaling, selection)
            return selection

        QuestPolicy.decode_selection = wrapped
        return self

    def __exit__(self, *exc):
        QuestPolicy.decode_selection = self._original

    def record(self, layer_idx, store, query, scaling, selection) -> None:
        # Diagnostics, not the decode path: host reads are fine here.
        S, Hq, D = store.num_segments, query.shape[1], query.shape[-1]
        G = Hq // store.num_heads
        q = query.reshape(S, G, D).float()
        per_query_head = selection.slots.shape[0] == S * G
        for s in range(S):
            start, n = int(store.start_h[s]), int(store.length_h[s])
            probs = torch.softmax(q[s] @ store.k[start : start + n].float().T * scaling, -1)  # [G, n]
            for g in range(G):
                r = s * G + g if per_query_head else s
                chosen = selection.slots[r][selection.valid[r]] - start
                got = float(probs[g, chosen].sum())
                best = float(probs[g].topk(len(chosen)).values.sum())
                self.rows.append((layer_idx, got, best))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2000, help="prompt tokens")
    parser.add_argument("--samples", type=int, default=3, help="needle prompts (seeds 0..n-1)")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.1, 0.25])
    parser.add_argument("--gqa", nargs="+", default=["max", "none"], help="Quest gqa_reduce values")
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/selection_recall_smollm2_cpu.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tokenizer = load_smollm2(attn_implementation="heterocache")
    formatter = PromptFormatter(tokenizer)
    samples = NeedleTask().samples(formatter, args.tokens, num_samples=args.samples, seed=0)
    results = []
    for budget in args.budgets:
        for gqa in args.gqa:
            with _Recorder() as recorder:
                found = 0
                for sample in samples:
                    ids = torch.tensor([formatter.encode(sample).input_ids])
                    cache = QuestCache(budget=budget, gqa_reduce=gqa, page_size=args.page_size)
                    with torch.no_grad():
                        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                             **cache_kwarg(model, cache), max_new_tokens=args.new_tokens,
                                             do_sample=False)
                    text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
                    found += sample.answers[0] in text
            got = statistics.mean(r[1] for r in recorder.rows)
            best = statistics.mean(r[2] for r in recorder.rows)
            results.append({"budget": budget, "gqa_reduce": gqa, "page_size": args.page_size,
                            "captured_mass": got, "optimal_mass": best, "needles_found": found,
                            "samples": len(samples), "measurements": len(recorder.rows)})
            print(f"budget {budget:g} gqa {gqa:5s}: captured {got:.3f} of the attention (best {best:.3f}); "
                  f"needle {found}/{len(samples)}", flush=True)
    out = {"benchmark": "selection_recall", "model": "SmolLM2-135M-Instruct (fp32)", "tokens": args.tokens,
           "command": "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
           "date": time.strftime("%Y-%m-%d"), "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
