"""What every evaluation task provides: samples (prompts split where the question starts) and a score."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..prompting import PromptFormatter


@dataclass(frozen=True)
class Sample:
    """One prompt of a task.

    The user turn is ``context + question``. In query-agnostic mode only the tokens of ``context``
    (with whatever the chat template puts before it) are prefilled and compressed before the
    question is seen; in query-aware mode the whole prompt is prefilled at once.

    Attributes:
        task: task name (e.g. ``"niah_single"``, ``"longbench/hotpotqa"``).
        index: position of the sample within its (task, length) set.
        context: instructions and document, everything the model may see before the question.
        question: the rest of the user turn (question, answer format).
        answers: expected answers, as the task's scorer reads them.
        max_new_tokens: default generation length for this sample.
        answer_prefix: text that starts the model's reply, appended after the chat template's
            assistant header (RULER's answer prefix); "" for none.
        chat: whether the chat template may wrap this prompt (LongBench leaves it off for its
            few-shot and code-completion tasks).
        meta: small JSON-serialisable facts (needle depths, difficulty, raw labels, ...).
    """

    task: str
    index: int
    context: str
    question: str
    answers: tuple[str, ...]
    max_new_tokens: int
    answer_prefix: str = ""
    chat: bool = True
    meta: dict[str, Any] = field(default_factory=dict, compare=False)


class Task(ABC):
    """A named source of :class:`Sample` objects with a scorer.

    Subclasses set ``name`` and implement :meth:`samples` and :meth:`score`.
    """

    name: str = "task"
    #: "synthetic" tasks build prompts of exactly the requested token length; "dataset" tasks read
    #: published files and truncate longer prompts in the middle of the context.
    kind: str = "synthetic"

    @abstractmethod
    def samples(self, formatter: "PromptFormatter", length: int, num_samples: int, seed: int) -> list[Sample]:
        """Prompts of at most ``length`` tokens (as encoded by ``formatter``).

        Args:
            formatter: turns a sample into token ids (applies the chat template); used to measure.
            length: prompt length in tokens (synthetic: filled up to it; datasets: truncated to it).
            num_samples: how many samples (datasets: the first ``num_samples`` items; 0 = all).
            seed: makes synthetic samples reproducible; same seed, same prompts.
        """

    @abstractmethod
    def score(self, prediction: str, sample: Sample) -> float:
        """Score of one prediction, from 0 to 100."""
