"""LongBench v2 (Bai et al., 2024): 503 four-choice questions over long documents.

File: ``data.json`` from https://huggingface.co/datasets/THUDM/LongBench-v2 (zai-org/LongBench-v2)
placed at ``data/longbenchv2/data.json``: a JSON list of objects with ``_id, domain, sub_domain,
difficulty, length, question, choice_A, choice_B, choice_C, choice_D, answer, context``.

Published protocol reproduced: the zero-shot template (no chain of thought), 128 new tokens, the
"The correct answer is (X)" extraction, accuracy × 100; over-long prompts cut in the middle of the
document. Task names: ``longbenchv2`` (all), or filtered ``longbenchv2/<difficulty or length>``
(``easy``, ``hard``, ``short``, ``medium``, ``long``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..metrics import extract_choice
from ..prompting import truncate_context_middle
from .base import Sample, Task
from .files import read_json, require

SOURCE = (
    "Download data.json from https://huggingface.co/datasets/THUDM/LongBench-v2 "
    "(zai-org/LongBench-v2) and save it as {path}"
)

# The published 0-shot prompt, split where the document ends.
TEMPLATE_HEAD = "Please read the following text and answer the question below.\n\n<text>\n"
TEMPLATE_TAIL = (
    "\n</text>\n\nWhat is the correct answer to this question: {question}\nChoices:\n"
    "(A) {A}\n(B) {B}\n(C) {C}\n(D) {D}\n\n"
    'Format your response as follows: "The correct answer is (insert answer here)".'
)
MAX_NEW_TOKENS = 128
FILTERS = ("easy", "hard", "short", "medium", "long")


@dataclass
class LongBenchV2Task(Task):
    """LongBench v2, optionally filtered by difficulty or length class.

    Args:
        subset: ``None`` for all questions, or one of ``easy, hard, short, medium, long``.
        data_dir: root holding ``longbenchv2/data.json`` (default ``data``).
    """

    subset: str | None = None
    data_dir: Path = Path("data")
    kind = "dataset"

    def __post_init__(self) -> None:
        if self.subset is not None and self.subset not in FILTERS:
            raise ValueError(f"unknown LongBench v2 subset {self.subset!r}; one of {', '.join(FILTERS)}")
        self.name = "longbenchv2" + (f"/{self.subset}" if self.subset else "")

    @property
    def path(self) -> Path:
        return Path(self.data_dir) / "longbenchv2" / "data.json"

    def load(self, limit: int | None = None) -> list[dict]:
        rows = read_json(require(self.path, "LongBench v2", SOURCE.format(path=self.path)))
        if self.subset:
            rows = [r for r in rows if self.subset in (r.get("difficulty"), r.get("length"))]
        return rows[:limit] if limit else rows

    def to_sample(self, row: dict, index: int) -> Sample:
        choices = {k: row[f"choice_{k}"].strip() for k in "ABCD"}
        return Sample(
            task=self.name,
            index=index,
            context=TEMPLATE_HEAD + row["context"].strip(),
            question=TEMPLATE_TAIL.format(question=row["question"].strip(), **choices),
            answers=(row["answer"],),
            max_new_tokens=MAX_NEW_TOKENS,
            meta={k: row.get(k) for k in ("_id", "domain", "sub_domain", "difficulty", "length")},
        )

    def samples(self, formatter, length, num_samples, seed):
        rows = self.load(num_samples or None)
        return [truncate_context_middle(self.to_sample(r, i), formatter, length) for i, r in enumerate(rows)]

    def score(self, prediction, sample):
        return 100.0 * float(extract_choice(prediction) == sample.answers[0])
