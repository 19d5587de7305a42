"""The accuracy cost of bounded-memory prefill against exact chunked prefill: two eval folders of the
same grid (``--prefill exact`` and ``--prefill bounded``), paired per sample, RULER average.

    python benchmarks/prefill_accuracy_compare.py runs/eval/chunked_exact runs/eval/chunked_bounded \
        --out benchmarks/results/chunked_prefill_ruler_compare.json

Prints a Markdown table (the one in docs/results.md#ablations) and writes it as JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from heterocache.eval.paired import paired_difference
from heterocache.eval.tasks.ruler import RULER_TASKS


def load(folder: Path, tag: str) -> list[dict]:
    records = [json.loads(line) for line in (folder / "records.jsonl").read_text().splitlines() if line.strip()]
    for r in records:
        r["method"] = f"{r['method']}|{tag}"
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("exact", type=Path, help="eval folder of the exact chunked prefill")
    parser.add_argument("bounded", type=Path, help="eval folder of the bounded prefill")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    records = load(args.exact, "exact") + load(args.bounded, "bounded")
    methods = sorted({r["method"].split("|")[0] for r in records})
    cells = sorted({(int(r["length"]), float(r["budget"]), r["mode"]) for r in records})
    rows = ["| method | length | budget | mode | exact | bounded | bounded − exact (pairs) |",
            "|---|---|---|---|---|---|---|"]
    out = []
    for method in methods:
        for length, budget, mode in cells:
            d = paired_difference(records, (f"{method}|bounded", budget), (f"{method}|exact", budget), length, mode,
                                  RULER_TASKS)
            if d is None:
                continue
            means = {"exact": d.b_mean, "bounded": d.a_mean}  # over the same samples
            out.append({"method": method, "length": length, "budget": budget, "mode": mode, **means,
                        "difference": d.mean, "half_width": d.half_width, "pairs": d.pairs})
            rows.append(f"| {method} | {length} | {budget} | {mode} | {means['exact']:.1f} | {means['bounded']:.1f} | "
                        f"{d.format()} ({d.pairs}) |")
    print("\n".join(rows))
    if args.out:
        args.out.write_text(json.dumps({"exact": str(args.exact), "bounded": str(args.bounded), "rows": out},
                                       indent=2) + "\n")


if __name__ == "__main__":
    main()
