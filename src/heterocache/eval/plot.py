"""PNG plots of the aggregated cells (matplotlib, Agg canvas: no display needed).

- ``score_<task>.png``: score vs budget, one line per method; one panel per (mode, length).
  Full-cache methods (the reference "dynamic", "fullkv") are dashed horizontal lines across the
  whole panel, so they show even when there is a single budget.
- ``fidelity_<P>.png``: KL(full || method) and top-1 agreement vs budget, one line per method.
- ``lines_<task>.png`` (long-answer tasks): accuracy per answer line (1 ... K), one line per
  method; one panel per (mode, length, budget), the full cache dashed in every panel.
"""

from __future__ import annotations

import re
import textwrap
from collections import defaultdict
from pathlib import Path

from .._optional import require_matplotlib
from .caches import is_full
from .generation import MODES
from .results import FIDELITY_TASK, line_positions


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _figure(nrows: int, ncols: int):
    require_matplotlib("the eval plots")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * ncols, 3.2 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _draw(ax, cells: list[dict], metric: str, budgets: list[float]) -> None:
    by_method: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for c in cells:
        if metric in c:
            by_method[c["method"]].append((c["budget"], c[metric]))
    lo, hi = (min(budgets), max(budgets)) if budgets else (0.0, 1.0)
    styles = iter(["--", ":", "-."] * len(by_method))
    for i, (method, points) in enumerate(sorted(by_method.items())):
        points.sort()
        if is_full(method):
            # across the whole axis: a line from the lowest to the highest budget has no length
            # when there is only one budget
            ax.axhline(points[-1][1], color="black", linestyle=next(styles), linewidth=1.2,
                       label=f"{method} (full cache)")
        else:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", label=method, color=f"C{i}")
    if budgets:
        ax.set_xscale("log" if hi / max(lo, 1e-9) >= 8 else "linear")
        ax.set_xticks(budgets, [f"{b:g}" for b in budgets])
    ax.set_xlabel("budget (kept fraction of prompt KV)")
    ax.grid(alpha=0.3)


def _suptitle(fig, text: str):
    """The figure title, wrapped onto more lines when one line is wider than the figure (a
    one-panel figure is narrow; a long model name would be cut off at both edges)."""
    title = fig.suptitle(text)
    renderer = fig.canvas.get_renderer()
    room = 0.96 * fig.bbox.width
    width = title.get_window_extent(renderer).width
    if width > room:
        chars = max(12, int(len(text) * room / width))
        title.set_text("\n".join(textwrap.wrap(text, chars, break_on_hyphens=False)))
    return title


def plot_task(cells: list[dict], task: str, path: Path, title: str = "") -> Path:
    """Score vs budget for one task, saved to ``path`` (see :func:`task_figure`)."""
    return _save(task_figure(cells, task, title), path)


def task_figure(cells: list[dict], task: str, title: str = ""):
    """The matplotlib Figure of score vs budget for one task; panels = modes (rows) × lengths
    (columns)."""
    cells = [c for c in cells if c["task"] == task and "score" in c]
    present = {c["mode"] for c in cells}
    modes = [m for m in MODES if m in present] + sorted(present - set(MODES))
    lengths = sorted({c["length"] for c in cells})
    budgets = sorted({c["budget"] for c in cells if not is_full(c["method"])})
    fig, axes = _figure(len(modes), len(lengths))
    for r, mode in enumerate(modes):
        for k, length in enumerate(lengths):
            ax = axes[r][k]
            _draw(ax, [c for c in cells if c["mode"] == mode and c["length"] == length], "score", budgets)
            ax.set_title(f"{mode}, {length} tokens", fontsize=9)
            ax.set_ylabel("score")
            ax.set_ylim(-3, 103)
    axes[0][-1].legend(fontsize=8, loc="lower right")
    _suptitle(fig, f"{task}" + (f" — {title}" if title else ""))
    return fig


def plot_fidelity(cells: list[dict], prefill: int, path: Path, title: str = "") -> Path:
    """KL and top-1 agreement vs budget, saved to ``path`` (see :func:`fidelity_figure`)."""
    return _save(fidelity_figure(cells, prefill, title), path)


def fidelity_figure(cells: list[dict], prefill: int, title: str = ""):
    """The matplotlib Figure of KL and top-1 agreement vs budget for the fidelity cells with
    ``prefill`` tokens."""
    cells = [c for c in cells if c["task"] == FIDELITY_TASK and c["length"] == prefill]
    budgets = sorted({c["budget"] for c in cells if not is_full(c["method"])})
    fig, axes = _figure(1, 2)
    for ax, metric, label in (
        (axes[0][0], "kl", "mean KL(full || method), nats"),
        (axes[0][1], "top1_agreement", "top-1 agreement"),
    ):
        _draw(ax, cells, metric, budgets)
        ax.set_ylabel(label)
    axes[0][0].legend(fontsize=8)
    _suptitle(fig, f"teacher-forced fidelity after {prefill} prefill tokens" + (f" — {title}" if title else ""))
    return fig


def plot_lines(cells: list[dict], task: str, path: Path, title: str = "") -> Path:
    """Accuracy per answer line for one long-answer task, saved to ``path`` (see :func:`lines_figure`)."""
    return _save(lines_figure(cells, task, title), path)


def lines_figure(cells: list[dict], task: str, title: str = ""):
    """The matplotlib Figure of accuracy vs answer line (``item_1`` ... ``item_K`` of the cells of
    ``task``): panels = modes (rows) × (length, budget) pairs (columns), one line per method."""
    cells = [c for c in cells if c["task"] == task and line_positions(c)]
    present = {c["mode"] for c in cells}
    modes = [m for m in MODES if m in present] + sorted(present - set(MODES))
    columns = sorted({(c["length"], c["budget"]) for c in cells if not is_full(c["method"])}) or sorted(
        {(c["length"], c["budget"]) for c in cells})
    fig, axes = _figure(len(modes), len(columns))
    # One colour per method in every panel, and one legend for the figure (not over the curves).
    methods = sorted({c["method"] for c in cells if not is_full(c["method"])})
    colour = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    handles: dict[str, object] = {}
    for r, mode in enumerate(modes):
        for k, (length, budget) in enumerate(columns):
            ax = axes[r][k]
            here = [c for c in cells if c["mode"] == mode and c["length"] == length
                    and (c["budget"] == budget or is_full(c["method"]))]
            for c in sorted(here, key=lambda c: c["method"]):
                xs = list(range(1, line_positions(c) + 1))
                ys = [c[f"item_{x}"] for x in xs]
                if is_full(c["method"]):
                    label = f"{c['method']} (full cache)"
                    (line,) = ax.plot(xs, ys, color="black", linestyle="--", label=label)
                else:
                    label = c["method"]
                    (line,) = ax.plot(xs, ys, marker="o", color=colour[label], label=label)
                handles.setdefault(label, line)
            ax.set_title(f"{mode}, {length} tokens, budget {budget:g}", fontsize=9)
            ax.set_xlabel("answer line")
            ax.set_ylabel("accuracy")
            ax.set_ylim(-3, 103)
            ax.set_xticks(range(1, max(line_positions(c) for c in cells) + 1))
            ax.grid(alpha=0.3)
    fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncol=min(4, len(handles)),
               fontsize=8)
    _suptitle(fig, f"{task}: accuracy per answer line" + (f" — {title}" if title else ""))
    return fig


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def plot_all(cells: list[dict], out_dir: Path, title: str = "") -> list[Path]:
    """Every plot for ``cells`` under ``out_dir``; returns the written paths."""
    out_dir = Path(out_dir)
    paths = []
    for task in sorted({c["task"] for c in cells if c["task"] != FIDELITY_TASK}):
        paths.append(plot_task(cells, task, out_dir / f"score_{_safe(task)}.png", title))
    for task in sorted({c["task"] for c in cells if line_positions(c)}):
        paths.append(plot_lines(cells, task, out_dir / f"lines_{_safe(task)}.png", title))
    for prefill in sorted({c["length"] for c in cells if c["task"] == FIDELITY_TASK}):
        paths.append(plot_fidelity(cells, prefill, out_dir / f"fidelity_{prefill}.png", title))
    return paths
