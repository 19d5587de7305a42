"""Uncertainty of a score difference between two methods run on the same samples.

Every (method, budget) of a grid sees the same prompts, so the difference between two of them is
best judged per sample (paired): it cancels how hard each sample is. The RULER average is a mean
over tasks of per-task means, so its variance is the sum of the per-task variances of the mean
over the squared number of tasks (tasks draw independent samples).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

#: Two-sided 95% normal quantile (the half-width is a large-sample approximation).
Z95 = 1.959964


@dataclass
class PairedDifference:
    """Mean over tasks of the mean per-sample difference ``a - b``.

    Attributes:
        mean: in score points.
        half_width: of the 95% interval (normal approximation); None when a task has fewer than
            two pairs (no variance to estimate).
        pairs: samples scored by both, over all tasks.
        tasks: tasks that had at least one pair.
        a_mean, b_mean: each side's score over the same pairs (mean over tasks of the per-task
            mean), so that ``a_mean - b_mean == mean``.
    """

    mean: float
    half_width: float | None
    pairs: int
    tasks: int
    a_mean: float | None = None
    b_mean: float | None = None

    def format(self) -> str:
        """``"+8.3 ± 6.1"`` (``"+8.3 (n/a)"`` without an interval)."""
        spread = f"± {self.half_width:.1f}" if self.half_width is not None else "(± n/a)"
        return f"{self.mean:+.1f} {spread}"


def paired_difference(
    records: list[dict], a: tuple[str, float], b: tuple[str, float], length: int, mode: str, tasks
) -> PairedDifference | None:
    """The paired difference of (method, budget) ``a`` minus ``b`` over ``tasks`` at one length and mode.

    Args:
        records: per-sample records (``method``, ``budget``, ``task``, ``length``, ``mode``,
            ``sample_idx``, ``metrics["score"]``).
        a, b: ``(method, budget)`` pairs.
        length, mode: the cell.
        tasks: the tasks to average over (e.g. the RULER ones).

    Returns:
        the difference, or None when no task has a sample scored by both.
    """
    tasks = set(tasks)
    scores: dict[tuple, dict] = defaultdict(dict)
    for r in records:
        if r.get("length") != length or r.get("mode") != mode or r.get("task") not in tasks:
            continue
        score = (r.get("metrics") or {}).get("score")
        if score is None:
            continue
        for side, (method, budget) in (("a", a), ("b", b)):
            if r["method"] == method and math.isclose(float(r["budget"]), budget, abs_tol=1e-6):
                scores[(r["task"], int(r["sample_idx"]))][side] = float(score)
    diffs: dict[str, list[float]] = defaultdict(list)
    sides: dict[str, dict[str, list[float]]] = defaultdict(lambda: {"a": [], "b": []})
    for (task, _), pair in sorted(scores.items()):
        if len(pair) == 2:
            diffs[task].append(pair["a"] - pair["b"])
            sides[task]["a"].append(pair["a"])
            sides[task]["b"].append(pair["b"])
    if not diffs:
        return None
    T = len(diffs)
    mean = sum(sum(d) / len(d) for d in diffs.values()) / T
    a_mean, b_mean = (sum(sum(s[side]) / len(s[side]) for s in sides.values()) / T for side in ("a", "b"))
    if any(len(d) < 2 for d in diffs.values()):
        half = None
    else:
        var = sum(_sample_variance(d) / len(d) for d in diffs.values()) / T**2
        half = Z95 * math.sqrt(var)
    return PairedDifference(mean, half, sum(len(d) for d in diffs.values()), T, a_mean, b_mean)


def _sample_variance(x: list[float]) -> float:
    m = sum(x) / len(x)
    return sum((v - m) ** 2 for v in x) / (len(x) - 1)
