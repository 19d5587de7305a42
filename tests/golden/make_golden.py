"""Write ``tests/golden/golden_smollm2.json``: the exact behaviour of every registered method on the
real SmolLM2-135M-Instruct, which ``tests/golden/test_golden.py`` recomputes and compares.

Run from the repository root (deterministic: the same file every time on the same machine)::

    PYTHONPATH=src python tests/golden/make_golden.py

Regenerate only when a change of behaviour is intended (or a method is added), and review the
diff: every changed entry is a method whose tokens or stored bytes changed. What is recorded and
how is in ``golden_cases.py``; the prompts are built here, from the eval harness's RULER-style
generators (fixed seed), and stored with their token ids in the file.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import golden_cases as G  # noqa: E402

OUT = HERE / "golden_smollm2.json"


def build_prompts(tokenizer) -> dict[str, dict]:
    """The fixed prompts: ``{name: {"task", "target_tokens", "seed", "answers", "input_ids", "context_len"}}``."""
    from heterocache.eval.prompting import PromptFormatter
    from heterocache.eval.tasks.ruler import RULER_TASKS

    formatter = PromptFormatter(tokenizer)
    prompts = {}
    for name, (task, length) in G.PROMPTS.items():
        sample = RULER_TASKS[task].samples(formatter, length, num_samples=1, seed=G.PROMPT_SEED)[0]
        encoded = formatter.encode(sample)
        prompts[name] = {
            "task": task,
            "target_tokens": length,
            "seed": G.PROMPT_SEED,
            "answers": list(sample.answers),
            "input_ids": list(encoded.input_ids),
            "context_len": encoded.context_len,
        }
    return prompts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT, help=f"file to write (default {OUT})")
    parser.add_argument("--threads", type=int, default=G.THREADS,
                        help=f"torch threads (default {G.THREADS}; another value is for checking that the "
                        "entries do not depend on it, its file does not pass the test)")
    args = parser.parse_args(argv)
    G.THREADS = args.threads

    import torch

    torch.set_num_threads(G.THREADS)  # the model's loading; compute_entry sets it for each entry too
    from heterocache.models import load_smollm2

    model, tokenizer = load_smollm2(attn_implementation="heterocache")
    prompts = build_prompts(tokenizer)
    entries = {}
    start = time.perf_counter()
    for key, method, budget, mode in G.cases():
        t0 = time.perf_counter()
        entries[key] = G.compute_entry(model, tokenizer, prompts, method, budget, mode)
        texts = " | ".join(f"{n}: {r['text']!r}" for n, r in entries[key].items())
        print(f"{key:<40} {time.perf_counter() - t0:6.1f}s  {texts}", flush=True)
    golden = {
        "about": "pinned behaviour of every method; regenerate with tests/golden/make_golden.py (see golden_cases.py)",
        "config": G.config(),
        "versions": G.environment(),  # information only
        "prompts": prompts,
        "entries": entries,
    }
    args.out.write_text(G.dumps(golden))
    print(f"wrote {args.out}: {len(entries)} entries x {len(prompts)} prompts in {time.perf_counter() - start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
