"""Evaluation harness: RULER-style synthetic tasks, LongBench / LongBench v2 / InfiniteBench
loaders, teacher-forced fidelity, and a resumable grid runner over methods × budgets × tasks ×
lengths × modes. See :mod:`heterocache.eval.runner` for the Python API, ``heterocache eval`` for
the command line and ``docs/evaluation.md`` for the guide.

Names are imported lazily, so that ``heterocache --help`` (which imports :mod:`.cli`) does not
load torch and transformers.
"""

from __future__ import annotations

from .._lazy import lazy_exports

_EXPORTS = {
    "FULL_METHODS": "caches",
    "default_cache_factory": "caches",
    "FidelityConfig": "fidelity",
    "MODES": "generation",
    "generate_answer": "generation",
    "EncodedPrompt": "prompting",
    "PromptFormatter": "prompting",
    "EvalConfig": "config",
    "EvalResult": "config",
    "run_eval": "runner",
    "BenchmarkDataMissing": "tasks",
    "Sample": "tasks",
    "Task": "tasks",
    "available_tasks": "tasks",
    "get_task": "tasks",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS, globals(), __all__)[0]  # __dir__: below


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
