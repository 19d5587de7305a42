"""InfiniteBench (Zhang et al., 2024): loader, published prompts, generation lengths, scorers.

Files: the per-task JSON-lines files of https://huggingface.co/datasets/xinrongzhang2022/InfiniteBench
placed as ``data/infinitebench/<task>.jsonl``; each line has ``id, context, input, answer, options``.

Published protocol reproduced: the prompt templates the InfiniteBench authors use for open models
(their ``yarn_mistral_templates``), the per-task ``max_new_tokens``, middle truncation (we cut the
middle of the context so the question stays whole) and the per-task scorers of
``compute_scores.py``. Differences: ``longbook_sum_eng`` uses our ROUGE-L (see
:mod:`heterocache.eval.metrics`) instead of HF ``evaluate``'s rougeLsum; ``longbook_qa_chn`` F1
is over characters, as published.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .. import metrics as M
from ..prompting import truncate_context_middle
from .base import Sample, Task
from .files import read_jsonl, require

SOURCE = (
    "Download {name}.jsonl from https://huggingface.co/datasets/xinrongzhang2022/InfiniteBench "
    "and save it as {path}"
)

TEMPLATES = {
    "passkey": "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. I will quiz you about the important information.\n\n{context}\n\n{input}\n\nThe pass key is",
    "number_string": "There is an important info hidden inside a lot of irrelevant text. Find it. I will quiz you about the important information there.\n\n{context}\n\n{input}\n\nThe sequence of digits is",
    "kv_retrieval": "Extract the value corresponding to the specified key in the JSON object below.\n\n{context}\n\n{input}",
    "longbook_sum_eng": "Summarize the book below.\n\n{context}\n\nSummary:",
    "longbook_choice_eng": "Read the book and answer the question.\n\n{context}\n\nQuestion: {question}\nA. {OPTION_A}\nB. {OPTION_B}\nC. {OPTION_C}\nD. {OPTION_D}\n\nThe letter of the correct answer is",
    "longbook_qa_eng": "Read the book and answer the question. Be very concise in your answer.\n\n{context}\n\nQuestion: {question}\nAnswer:",
    "longbook_qa_chn": "阅读以下书籍然后回答问题。\n\n{context}\n\n问题：{question}\n答案：",
    "math_find": "{prefix}\n\n{context}\n\n{input}",
    "math_calc": "Let us calculate the intermediate values of an expression.\n\nExpression: 1 + 3 + 4\nValues: [1, 4, 8]\n\nExpression: 8 - 3 + 2 - 4\nValues: [8, 5, 7, 3]\n\nExpression: {context}\nValues:",
    "code_run": "There is a function called {func} in the following Python code.\n\n{context}\n\nPlease compute the exact value of {func_call}. The value of {func_call} is",
    "code_debug": "Following is a Python code where exactly one of the functions/methods has a deliberate error that makes it crash.\n\n{context}\n\nOptions:\nA. {OPTION_A}\nB. {OPTION_B}\nC. {OPTION_C}\nD. {OPTION_D}\n\nThe correct option is:",
    "longdialogue_qa_eng": 'Below is a dialogue script where one random occurrence of a character name is replaced with "$$MASK$$", and you should try to guess who that character is.\n\n{context}\n\nThe name that has been replaced with $$MASK$$ is likely',
}

MAX_NEW_TOKENS = {
    "passkey": 6, "number_string": 12, "kv_retrieval": 50, "longbook_sum_eng": 1200,
    "longbook_choice_eng": 40, "longbook_qa_eng": 40, "longbook_qa_chn": 40, "longdialogue_qa_eng": 40,
    "math_find": 3, "math_calc": 30000, "code_run": 5, "code_debug": 5,
}  # fmt: skip


def template_fields(task: str, row: dict) -> dict:
    """The values that fill ``TEMPLATES[task]`` for one published row."""
    fields = {"context": row["context"], "input": row.get("input", ""), "question": row.get("input", "")}
    options = row.get("options") or []
    for letter, option in zip("ABCD", options):
        fields[f"OPTION_{letter}"] = option
    if task == "code_run":
        call = re.findall(r"func_[0-9]+\(\-?[0-9]+\)", row["input"])[0]
        fields.update(func=call.split("(")[0], func_call=call)
    elif task == "math_find":
        target = re.findall(r"The .+ of", row["input"])
        if not target:
            raise ValueError(f"math_find input names no target: {row['input']!r}")
        fields["prefix"] = f"What is {target[0].lower()[:-3]} in the following list?"
    return fields


def label(task: str, row: dict):
    """The published label: for choice tasks ``[answer text, letter]``, else ``row["answer"]``."""
    answer = row["answer"]
    if task in ("code_debug", "longbook_choice_eng"):
        if isinstance(answer, str):
            answer = [answer]
        if len(answer) == 2 and answer[1] in ("A", "B", "C", "D"):
            return list(answer)
        return [answer[0], "ABCD"[row["options"].index(answer[0])]]
    return answer


def _first_int(text: str) -> str:
    return next((part for part in re.split("[^0-9]", text) if part), "")


def _words(text: str, chars: str) -> list[str]:
    for c in chars:
        text = text.replace(c, " ")
    return text.split()


def _after_prefix(pred: str, prefixes, targets) -> bool | None:
    for prefix in prefixes:
        idx = pred.find(prefix)
        if idx == -1:
            continue
        if len(pred) < idx + len(prefix) + 1:
            return False
        rest = pred[idx + len(prefix) + 1 :]
        return any(rest.startswith(t) for t in targets)
    return None


def _refs(label_) -> list:
    return label_ if isinstance(label_, list) else [label_]


def _score_first_int(pred, label_):
    return float(str(_refs(label_)[0]) == _first_int(pred))


def _score_kv(pred, label_):
    return float(str(_refs(label_)[0]) in _words(pred, "\n:\"'.,?!{}"))


def _score_dialogue(pred, label_):
    return float(str(_refs(label_)[0]) in [w.upper() for w in _words(pred.strip(), "\n:\"'.,?!{}")])


def _score_math_find(pred, label_):
    want = _refs(label_)[0]
    match = re.search(r"\d+\.\d+|\d+", pred)
    if match is None:
        return 0.0
    if isinstance(want, float):
        return float(float(match.group(0)) == want)
    return float("." not in match.group(0) and int(match.group(0)) == int(want))


def _score_math_calc(pred, label_):
    """Share of the expected intermediate values that the reply gets right before its first mistake."""
    want = label_[0] if isinstance(label_[0], list) else label_
    got = [int(x) for x in re.split("[^0-9]", pred) if x]
    correct = 0
    for a, b in zip(want, got):
        if a != b:
            break
        correct += 1
    return correct / len(want)


def _score_code_run(pred, label_):
    words = _words(pred.strip(), "\n.`'\":")
    try:
        return float(bool(words) and int(words[-1]) == int(_refs(label_)[0]))
    except ValueError:
        return 0.0


def _score_code_debug(pred, label_):
    fn_name, letter = label_[0], label_[1]
    pred = pred.strip()
    if pred[:2] in (f"{letter}.", f"{letter}:"):
        return 1.0
    for c in ("\n", "`", "'", '"', "-", "*", "Option", "option"):
        pred = pred.replace(c, " ")
    pred = re.sub(" {2,}", " ", pred)
    return float(
        bool(_after_prefix(pred, ["answer is:", "is:", "answer:", "correct option is:"], [letter, fn_name]))
    )


def _score_choice(pred, label_):
    pred = pred.strip()
    if not pred:
        return 0.0
    if pred[0] in "ABCD":
        return float(pred[0] in label_)
    if pred in label_:
        return 1.0
    for c in ("\n", '"', "'", ".", ",", "?", "!", "{", "}"):
        pred = pred.replace(c, " ")
    pred = re.sub(" {2,}", " ", pred)
    found = _after_prefix(pred, ["answer is:", "answer:", "answer is", "option is"], label_)
    if found is not None:
        return float(found)
    for word in pred.split():  # finally, the first A/B/C/D word
        if word in "ABCD":
            return float(word in label_)
    return 0.0


SCORERS = {
    "passkey": _score_first_int,
    "number_string": _score_first_int,
    "kv_retrieval": _score_kv,
    "longdialogue_qa_eng": _score_dialogue,
    "longbook_qa_eng": lambda pred, lab: max(M.qa_f1(pred, r) for r in _refs(lab)),
    "longbook_qa_chn": lambda pred, lab: max(M.qa_f1_zh(pred, r) for r in _refs(lab)),
    "longbook_sum_eng": lambda pred, lab: max(M.rouge_l(pred, r) for r in _refs(lab)),
    "math_find": _score_math_find,
    "math_calc": _score_math_calc,
    "code_run": _score_code_run,
    "code_debug": _score_code_debug,
    "longbook_choice_eng": _score_choice,
}


def score_infinitebench(task: str, pred: str, label_) -> float:
    """One sample's score in [0, 1], following InfiniteBench's ``compute_scores.py``."""
    return float(SCORERS[task](pred, label_))


@dataclass
class InfiniteBenchTask(Task):
    """One InfiniteBench task, read from ``<data_dir>/infinitebench/<task>.jsonl``.

    Args:
        task: published task name (``passkey``, ``kv_retrieval``, ``longbook_qa_eng``, ...).
        data_dir: root holding ``infinitebench/`` (default ``data``).
    """

    task: str = "passkey"
    data_dir: Path = Path("data")
    kind = "dataset"

    def __post_init__(self) -> None:
        if self.task not in TEMPLATES:
            raise ValueError(f"unknown InfiniteBench task {self.task!r}; known: {', '.join(TEMPLATES)}")
        self.name = f"infinitebench/{self.task}"

    @property
    def path(self) -> Path:
        return Path(self.data_dir) / "infinitebench" / f"{self.task}.jsonl"

    def load(self, limit: int | None = None) -> list[dict]:
        path = require(self.path, "InfiniteBench", SOURCE.format(name=self.task, path=self.path))
        return read_jsonl(path, limit)

    def to_sample(self, row: dict, index: int) -> Sample:
        fields = template_fields(self.task, row)
        head, tail = TEMPLATES[self.task].split("{context}", 1)
        lab = label(self.task, row)
        answers = tuple(str(a) for a in (lab if isinstance(lab, list) else [lab]))
        return Sample(
            task=self.name,
            index=index,
            context=head.format(**fields) + fields["context"],
            question=tail.format(**fields),
            answers=answers,
            max_new_tokens=MAX_NEW_TOKENS[self.task],
            meta={"id": row.get("id"), "label": lab},
        )

    def samples(self, formatter, length, num_samples, seed):
        rows = self.load(num_samples or None)
        return [truncate_context_middle(self.to_sample(r, i), formatter, length) for i, r in enumerate(rows)]

    def score(self, prediction, sample):
        return 100.0 * score_infinitebench(self.task, prediction, sample.meta["label"])
