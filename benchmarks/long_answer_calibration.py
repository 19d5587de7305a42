"""Full-cache accuracy per answer line of long-answer task variants: how the defaults of
``recall_lines`` and ``trace_lines`` were chosen (docs/long-answer.md).

    python benchmarks/long_answer_calibration.py --length 1024 --samples 8 \
        recall recall:num_items=4 "recall:needle=The special code of {key} is {value}." trace trace:num_items=4

A variant is ``recall`` or ``trace`` followed by ``:field=value`` settings of the task (``num_items``,
``digits``, ``label``, ``answer_prefix``, ``needle``, ``question``; ``\\n`` in a value is a newline).
Each sample is prefilled query-aware into a ``DynamicCache`` and answered teacher-forced as the
evaluation harness does (:func:`heterocache.eval.long_answer.write_answers`); prints the first two
answers, then the accuracy per line and its mean over the samples, and seconds per sample.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import DynamicCache

from heterocache.eval.long_answer import AnswerStart, answer_lines, answer_record, newline_stop, write_answers
from heterocache.eval.prompting import PromptFormatter
from heterocache.eval.shared_prefill import _step
from heterocache.eval.tasks.long_answer import RecallLinesTask, TraceLinesTask
from heterocache.models import load_smollm2

TEXT_FIELDS = ("label", "answer_prefix", "needle", "question", "head")


def variant(spec: str):
    """``"recall:num_items=4"`` -> ``RecallLinesTask(num_items=4)``; text fields set on the instance."""
    kind, *settings = spec.split(":")
    task = {"recall": RecallLinesTask, "trace": TraceLinesTask}[kind]()
    for setting in settings:
        key, _, value = setting.partition("=")
        setattr(task, key, value.replace("\\n", "\n") if key in TEXT_FIELDS else int(value))
    return task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", nargs="+")
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    model, tokenizer = load_smollm2(attn_implementation="heterocache")
    formatter, stop = PromptFormatter(tokenizer), newline_stop(tokenizer, model)
    for spec in args.variants:
        task, lines_total, start = variant(spec), None, time.perf_counter()
        for sample in task.samples(formatter, args.length, args.samples, args.seed):
            cache = DynamicCache()
            logits = _step(model, cache, torch.tensor([formatter.encode(sample).input_ids]))
            (outcome,) = write_answers(model, [AnswerStart(cache, answer_lines(tokenizer, task, sample), logits)],
                                       stop)
            metrics, extra = answer_record(tokenizer, task, sample, outcome)
            lines = [metrics[f"item_{i + 1}"] for i in range(task.num_items)]
            lines_total = lines if lines_total is None else [a + b for a, b in zip(lines_total, lines)]
            if sample.index < 2:
                print(repr(extra["prediction"]), "expected", list(sample.answers))
        per_line = [x / args.samples for x in lines_total]
        mean = sum(per_line) / len(per_line)
        print(f"{spec} @ {args.length}: per line {[round(x) for x in per_line]}, mean {mean:.1f}, "
              f"{(time.perf_counter() - start) / args.samples:.1f} s/sample", flush=True)


if __name__ == "__main__":
    main()
