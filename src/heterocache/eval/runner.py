"""The evaluation grid: methods × budgets × tasks × context lengths × modes on one model.

Python API::

    from heterocache.eval import EvalConfig, run_eval
    result = run_eval(model, tokenizer, EvalConfig(methods=("dynamic", "snapkv"), budgets=(0.1, 0.25)),
                      out_dir="runs/eval/smollm2")
    print(result.summary)

Every finished sample is appended to ``<out_dir>/records.jsonl`` at once, keyed by
``(method, budget, task, length, mode, sample_idx)``; a re-run skips those keys, so an interrupted
or extended grid resumes where it stopped. Outputs (rewritten after each run from *all* records
in the folder, so a grid can grow across runs): ``results.json``, ``results.csv`` and
``plots/*.png``. Prompts depend only on (seed, task, length, sample index) and decoding is
greedy, so a run is reproducible.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

from . import plot
from .caches import (
    CacheFactory,
    default_cache_factory,
)
from .config import EvalConfig, EvalResult
from .grid import Grid
from .results import (
    RecordLog,
    aggregate,
    write_csv,
    write_json,
)
from .setup import context_error, fingerprint, stored_setup


def _fingerprint(config: EvalConfig, model_name: str) -> dict:
    """The settings that change what a record means; they must match to resume in a folder."""
    fid = config.fidelity
    return fingerprint(
        model_name, seed=config.seed, chat_template=config.chat_template, max_new_tokens=config.max_new_tokens,
        fidelity_decode_tokens=fid.decode_tokens if fid else None,
        fidelity_text=str(fid.text_path) if fid and fid.text_path else None,
    )


def _check_fingerprint(path: Path, fingerprint: dict) -> None:
    fingerprint = stored_setup(path, fingerprint)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(fingerprint, indent=2) + "\n", encoding="utf-8")


def run_eval(
    model,
    tokenizer,
    config: EvalConfig,
    out_dir: str | Path,
    make_cache: CacheFactory | None = None,
    model_name: str | None = None,
    progress: bool = True,
    plots: bool = True,
) -> EvalResult:
    """Run (or resume) the grid of ``config`` and write the outputs under ``out_dir``.

    Args:
        model: a causal LM in eval mode (its attention must suit the methods evaluated).
        tokenizer: the model's tokenizer.
        config: the grid.
        out_dir: output folder (created); holds ``records.jsonl`` for resuming.
        make_cache: ``make_cache(method, budget, model) -> Cache | None``; default:
            :func:`heterocache.eval.caches.default_cache_factory`.
        model_name: recorded and checked on resume (default: ``model.config.name_or_path``).
        progress: show a tqdm progress bar.
        plots: write PNG plots (needs matplotlib).

    Raises:
        MissingExtraError: ``plots`` without matplotlib installed (raised before anything runs).
        ValueError: a length does not fit the model's context, or ``out_dir`` holds results of
            another model/seed/prompt setting.
    """
    out_dir = Path(out_dir)
    if plots:  # fail before the grid runs, not after
        from .._optional import require_matplotlib

        require_matplotlib("the eval plots (plots=False skips them)")
    model_name = model_name or getattr(model.config, "name_or_path", None) or type(model).__name__
    _check_context(model, config)
    _check_fingerprint(out_dir / "config.json", _fingerprint(config, model_name))
    grid = Grid(
        model, tokenizer, config, make_cache or default_cache_factory(), RecordLog(out_dir / "records.jsonl")
    )
    grid.run(progress)
    return write_outputs(grid.log, out_dir, config, model, model_name, plots=plots, ran=grid.ran,
                         skipped=grid.skipped)


def _check_context(model, config: EvalConfig) -> None:
    fid = config.fidelity
    error = context_error(getattr(model.config, "max_position_embeddings", None), config.lengths,
                          config.max_new_tokens, fid.prefill_tokens + fid.decode_tokens if fid else None)
    if error:
        raise ValueError(error)


def _merged_skipped(results_path: Path, skipped: list, records: list) -> list:
    """This run's skipped (method, budget) pairs plus those an earlier run of the folder recorded
    (a grid grows across runs; a pair skipped then stays explained), unless records now exist."""
    try:
        earlier = json.loads(results_path.read_text()).get("meta", {}).get("skipped", [])
    except (OSError, ValueError):
        earlier = []
    have = {(r["method"], round(float(r["budget"]), 6)) for r in records}
    out, seen = [], set()
    for entry in [*skipped, *earlier]:
        key = (entry["method"], round(float(entry["budget"]), 6))
        if key not in seen and (entry in skipped or key not in have):
            out.append(entry)
            seen.add(key)
    return out


def write_outputs(
    log: RecordLog,
    out_dir: Path,
    config: EvalConfig,
    model,
    model_name: str,
    plots: bool = True,
    ran: int = 0,
    skipped: list | None = None,
) -> EvalResult:
    """Aggregate every record in ``log`` and (re)write ``results.json``, ``results.csv`` and plots."""
    records = list(log.records.values())
    cells = aggregate(records)
    skipped = _merged_skipped(out_dir / "results.json", skipped or [], records)
    meta = {
        "model": model_name,
        "dtype": str(next(model.parameters()).dtype),
        "device": str(next(model.parameters()).device),
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "python": platform.python_version(),
        "written": time.strftime("%Y-%m-%d %H:%M:%S"),
        "records": len(records),
        "skipped": skipped,
    }
    files = [out_dir / "results.json", out_dir / "results.csv"]
    write_json(files[0], cells, config.to_dict(), meta)
    write_csv(files[1], cells)
    if plots:
        files += plot.plot_all(cells, out_dir / "plots", title=model_name)
    return EvalResult(cells=cells, records=records, out_dir=out_dir, files=files, ran=ran)
