"""What the drift-triggered refresh is worth on long answers: paired differences over the long-answer
grid's samples (``benchmarks/long_answer_grid.sh``), per mode and budget, averaged over the two
tasks (recall_lines, trace_lines), plus the decode-time refresh counters per answer.

    python benchmarks/long_answer_compare.py benchmarks/results/long_answer_smollm2_cpu \
        --out benchmarks/results/long_answer_smollm2_cpu/compare.json

Prints a Markdown table (the one in docs/heterocache.md) and writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from heterocache.eval.paired import paired_difference

TASKS = ("recall_lines", "trace_lines")
DEFAULT, PAPER, NO_REFRESH = ("heterocache", "heterocache:pivot_offload=false",
                              "heterocache:pivot_offload=false:refresh=false")
#: (label, a, b, budget of a, budget of b): a − b, paired over the same samples
COMPARISONS = [
    ("drift refresh on (paper) − off, pivots full", PAPER, NO_REFRESH, 0.25, 0.25),
    ("default (pivots compressed) − paper (pivots full, drift refresh)", DEFAULT, PAPER, 0.25, 0.25),
    ("default − full cache", DEFAULT, "dynamic", 0.25, 1.0),
    ("paper − full cache", PAPER, "dynamic", 0.25, 1.0),
    ("default − best other (OmniKV)", DEFAULT, "omnikv", 0.25, 0.25),
    ("default − full cache", DEFAULT, "dynamic", 0.1, 1.0),
]


def load(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "records.jsonl").read_text().splitlines() if line.strip()]


def counters(records: list[dict]) -> dict:
    """Mean decode-time counters per answer, by (method, budget, mode)."""
    sums: dict[tuple, dict] = defaultdict(lambda: defaultdict(float))
    counts: dict[tuple, int] = defaultdict(int)
    for r in records:
        key = (r["method"], float(r["budget"]), r["mode"])
        counts[key] += 1
        for name, steps in (r.get("step_stats") or {}).items():
            sums[key][name] += sum(steps) if isinstance(steps, list) else steps
    return {f"{m}@{b}:{mode}": {k: v / counts[(m, b, mode)] for k, v in s.items()}
            for (m, b, mode), s in sums.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="the grid's output folder (records.jsonl)")
    parser.add_argument("--out", type=Path, default=None, help="JSON file to write")
    args = parser.parse_args()
    records = load(args.folder)
    length = int(records[0]["length"])
    rows = []
    table = ["| comparison (points, 95% interval) | budget | query-aware | query-agnostic |", "|---|---|---|---|"]
    for label, a, b, budget_a, budget_b in COMPARISONS:
        cells = {}
        for mode in ("query_aware", "query_agnostic"):
            d = paired_difference(records, (a, budget_a), (b, budget_b), length, mode, TASKS)
            cells[mode] = None if d is None else {"mean": d.mean, "half_width": d.half_width, "pairs": d.pairs}
        rows.append({"comparison": label, "a": a, "b": b, "budget": budget_a, **cells})
        shown = [("n/a" if c is None else f"{c['mean']:+.1f} ± {c['half_width']:.1f} ({c['pairs']} pairs)")
                 for c in (cells["query_aware"], cells["query_agnostic"])]
        table.append(f"| {label} | {budget_a} | {shown[0]} | {shown[1]} |")
    print("\n".join(table))
    result = {"source": str(args.folder / "records.jsonl"), "length": length, "tasks": list(TASKS),
              "comparisons": rows, "decode_counters_per_answer": counters(records)}
    for key, value in sorted(result["decode_counters_per_answer"].items()):
        if value.get("drift_checks"):
            print(f"{key}: " + ", ".join(f"{k} {v:.1f}" for k, v in value.items()))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
