"""Per-sample records (the resumable JSON-lines log), their aggregation into cells, and the outputs.

A *record* is one scored generation (or one fidelity text): a dict with the key fields
``method, budget, task, length, mode, sample_idx`` and ``metrics`` (``{"score": ...}`` for tasks,
``{"kl": ..., "top1_agreement": ...}`` for fidelity), plus what helps debugging (prediction,
answers, timings, token counts). A *cell* is the mean over the samples of one
``(method, budget, task, length, mode)``.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from collections import defaultdict
from pathlib import Path

from .caches import current_name

KEY_FIELDS = ("method", "budget", "task", "length", "mode", "sample_idx")
#: How fidelity records fill the key: task "fidelity", length = prefill tokens, mode "teacher_forced".
FIDELITY_TASK, FIDELITY_MODE = "fidelity", "teacher_forced"
CELL_FIELDS = KEY_FIELDS[:-1]

Key = tuple


def record_key(record: dict) -> Key:
    """``(method, budget, task, length, mode, sample_idx)`` of a record (budget rounded to 1e-6)."""
    return (
        record["method"],
        round(float(record["budget"]), 6),
        record["task"],
        int(record["length"]),
        record["mode"],
        int(record["sample_idx"]),
    )


class RecordLog:
    """Append-only JSON-lines file of records; what it holds is never recomputed.

    Args:
        path: the ``.jsonl`` file (created with its folder on first append).

    A line cut short by a crash is ignored on load (that sample is simply run again). Old method
    names are read under their current ones ("full" -> "dynamic"), so a folder written before the
    rename resumes instead of running its reference again.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.records: dict[Key, dict] = {}
        if self.path.exists():
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    record["method"] = current_name(record["method"])
                    self.records[record_key(record)] = record

    def __contains__(self, key: Key) -> bool:
        return key in self.records

    def __len__(self) -> int:
        return len(self.records)

    def append(self, record: dict) -> None:
        """Write ``record`` and flush it to disk before returning (so a kill loses at most one)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.records[record_key(record)] = record


def aggregate(records) -> list[dict]:
    """Cells: per ``(method, budget, task, length, mode)``, ``n`` samples and the mean of each
    metric, of ``seconds`` and of ``prompt_tokens``; sorted by task, length, mode, method, budget."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        groups[record_key(r)[:-1]].append(r)
    cells = []
    for key, rs in groups.items():
        cell = dict(zip(CELL_FIELDS, key))
        cell["n"] = len(rs)
        for name in sorted({m for r in rs for m in r["metrics"]}):
            values = [r["metrics"][name] for r in rs if name in r["metrics"]]
            cell[name] = sum(values) / len(values)
        for extra in ("seconds", "prompt_tokens"):
            values = [r[extra] for r in rs if r.get(extra) is not None]
            if values:
                cell[extra] = sum(values) / len(values)
        cells.append(cell)
    cells.sort(key=lambda c: (c["task"], c["length"], c["mode"], c["method"], c["budget"]))
    return cells


def write_json(path: Path, cells: list[dict], config: dict, meta: dict | None = None) -> None:
    """``{"config": ..., "meta": ..., "cells": [...]}``, the input of plots and the results page."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"config": config, "meta": meta or {}, "cells": cells}
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_csv(path: Path, cells: list[dict]) -> None:
    """One row per cell; columns: the cell fields, ``n``, then every metric that occurs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = sorted({k for c in cells for k in c} - set(CELL_FIELDS) - {"n"})
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=[*CELL_FIELDS, "n", *extra])
        writer.writeheader()
        for cell in cells:
            writer.writerow(cell)


def load_cells(path: Path) -> tuple[list[dict], dict, dict]:
    """``(cells, config, meta)`` from a ``results.json``; old method names are given their current
    ones ("full" -> "dynamic"), so pages drawn from old files name the reference like new ones."""
    payload = json.loads(Path(path).read_text(encoding="utf-8"))
    cells, config, meta = payload["cells"], payload.get("config", {}), payload.get("meta", {})
    for item in [*cells, *(meta.get("skipped") or [])]:
        item["method"] = current_name(item["method"])
    if config.get("methods"):
        config["methods"] = [current_name(m) for m in config["methods"]]
    return cells, config, meta


_FORMATS = {"score": "{:.1f}", "kl": "{:.4g}", "top1_agreement": "{:.3f}", "count": "{:.1f}"}


def format_metric(value, metric: str) -> str:
    """``value`` as tables show it: scores with 1 decimal, KL with 4 significant digits."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return _FORMATS.get(metric, "{:.4g}").format(value)


def pivot(cells: list[dict], metric: str) -> tuple[list[str], list[list[str]]]:
    """Rows ``(task, length, mode, method)`` × budget columns of ``metric``, as strings.

    Returns ``(header, rows)``; full-cache methods (budget 1.0 only) show their value under 1.0.
    """
    budgets = sorted({c["budget"] for c in cells if metric in c})
    table: dict[tuple, dict] = defaultdict(dict)
    for c in cells:
        if metric in c:
            table[(c["task"], c["length"], c["mode"], c["method"])][c["budget"]] = c[metric]
    header = ["task", "length", "mode", "method", *[f"{b:g}" for b in budgets]]
    rows = [
        [t, str(n), m, meth, *[format_metric(v.get(b), metric) for b in budgets]]
        for (t, n, m, meth), v in sorted(table.items())
    ]
    return header, rows


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """A plain-text table with aligned columns."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


#: The answer totals of a cache's ``stats()`` counters that per-line tables show (long-answer tasks).
ANSWER_COUNTERS = ("decode_drift_checks", "decode_refreshes", "decode_tokens_moved", "turn_reselected_heads")


def line_positions(cell: dict) -> int:
    """How many answer lines a long-answer cell scores per position (``item_1`` ... ``item_K``)."""
    return sum(1 for k in cell if re.fullmatch(r"item_\d+", k))


def position_table(cells: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Accuracy per answer line of the long-answer cells: rows ``(task, length, mode, method,
    budget)``, columns line 1 ... K, the mean (``score``) and the answer totals of
    :data:`ANSWER_COUNTERS` the cells have (means per answer; "-" for a cache without ``stats()``).
    Returns ``(header, rows)``; no rows when no cell scores lines."""
    cells = [c for c in cells if line_positions(c)]
    if not cells:
        return [], []
    k = max(line_positions(c) for c in cells)
    counters = [name for name in ANSWER_COUNTERS if any(name in c for c in cells)]
    header = ["task", "length", "mode", "method", "budget", *[f"line {i + 1}" for i in range(k)], "mean",
              *[name.replace("_", " ") for name in counters]]
    rows = []
    for c in sorted(cells, key=lambda c: (c["task"], c["length"], c["mode"], c["method"], c["budget"])):
        rows.append([c["task"], str(c["length"]), c["mode"], c["method"], f"{c['budget']:g}",
                     *[format_metric(c.get(f"item_{i + 1}"), "score") for i in range(k)],
                     format_metric(c["score"], "score"), *[format_metric(c.get(n), "count") for n in counters]])
    return header, rows


def summary(cells: list[dict]) -> str:
    """Printable summary: the score table (tasks), the accuracy per answer line (long-answer
    tasks) and the fidelity tables, budgets as columns."""
    parts = []
    for metric, title in (
        ("score", "score (0-100)"),
        ("kl", "fidelity: mean KL(full || method), nats"),
        ("top1_agreement", "fidelity: top-1 agreement"),
    ):
        header, rows = pivot(cells, metric)
        if rows:
            parts.append(f"{title}\n{format_table(header, rows)}")
        if metric == "score":
            header, rows = position_table(cells)
            if rows:
                parts.append(f"long answers: accuracy per line (0-100) and stats() counters per answer\n"
                             f"{format_table(header, rows)}")
    return "\n\n".join(parts) if parts else "(no results)"
