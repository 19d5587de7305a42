"""Evaluation tasks by name.

Names:
    ``niah_single``, ``niah_multikey``, ``niah_multivalue``, ``niah_multiquery``, ``vt``, ``cwe``:
        RULER-style synthetic tasks (group name ``ruler``).
    ``longbench/<task>``: a LongBench task file (group name ``longbench``: all 21 tasks).
    ``longbenchv2`` or ``longbenchv2/<easy|hard|short|medium|long>``: LongBench v2.
    ``infinitebench/<task>``: an InfiniteBench task file (group name ``infinitebench``).
    ``recall_lines``, ``trace_lines``: long-answer synthetic tasks, one scored line per context
        statement, labels teacher-forced (group name ``long_answer``; :mod:`.long_answer`).
"""

from __future__ import annotations

from pathlib import Path

from . import infinitebench, longbench, longbenchv2
from .base import Sample, Task
from .files import BenchmarkDataMissing
from .long_answer import LONG_ANSWER_TASKS, LongAnswerTask
from .ruler import RULER_TASKS

GROUPS = {
    "ruler": list(RULER_TASKS),
    "long_answer": list(LONG_ANSWER_TASKS),
    "longbench": [f"longbench/{t}" for t in longbench.PROMPTS],
    "infinitebench": [f"infinitebench/{t}" for t in infinitebench.TEMPLATES],
}


def expand_task_names(names) -> list[str]:
    """Replace group names (``ruler``, ``long_answer``, ``longbench``, ``infinitebench``) by their members."""
    out: list[str] = []
    for name in names:
        for member in GROUPS.get(name, [name]):
            if member not in out:
                out.append(member)
    return out


def get_task(name: str, data_dir: Path | str = "data") -> Task:
    """The task called ``name`` (see the module docstring); dataset tasks read under ``data_dir``."""
    if name in RULER_TASKS:
        return RULER_TASKS[name]
    if name in LONG_ANSWER_TASKS:
        return LONG_ANSWER_TASKS[name]
    family, _, sub = name.partition("/")
    if family == "longbench" and sub:
        return longbench.LongBenchTask(dataset=sub, data_dir=Path(data_dir))
    if family == "longbenchv2":
        return longbenchv2.LongBenchV2Task(subset=sub or None, data_dir=Path(data_dir))
    if family == "infinitebench" and sub:
        return infinitebench.InfiniteBenchTask(task=sub, data_dir=Path(data_dir))
    raise ValueError(f"unknown task {name!r}; known: {', '.join(available_tasks())}")


def available_tasks() -> list[str]:
    """Every task name (dataset tasks listed whether or not their files are present)."""
    return [*RULER_TASKS, *LONG_ANSWER_TASKS, *GROUPS["longbench"], "longbenchv2", *GROUPS["infinitebench"]]


__all__ = [
    "Sample",
    "Task",
    "LongAnswerTask",
    "BenchmarkDataMissing",
    "get_task",
    "expand_task_names",
    "available_tasks",
    "GROUPS",
]
