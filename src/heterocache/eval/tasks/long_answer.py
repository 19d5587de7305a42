"""Long-answer synthetic tasks: an answer of K lines, each line needing another part of the context.

A RULER task asks for one or a few values and is answered in a handful of tokens, so a cache that
re-chooses its tokens while decoding (HeteroCache's drift refresh) has little to react to. Here the
answer is K lines ``<label><value>``; the harness (:mod:`heterocache.eval.long_answer`) feeds each
line's label one token at a time (teacher forcing, as single-token decode steps of one decode:
no new turn), then lets the model write the value greedily up to a newline, and scores every line.
Each label names a different statement of the context, so the attention moves through the context
as the answer goes on, and the accuracy at each line position shows where a cache lost track.

Tasks:
    ``recall_lines``: K statements "The special code is <key>: <code>." (adjective-noun keys,
        3-digit codes) spread over an essay; the question lists the K keys in a shuffled order; the
        answer is one line ``<key>: <code>`` per key, in that order.
    ``trace_lines``: K + 1 numbered boxes linked by K statements "Box <a> points to box <b>.", in a
        shuffled order over the essay; the question gives only the first box; the answer follows
        the chain, one line ``Box <a> points to box <b>`` per step. Unlike ``recall_lines`` the
        question does not name the statements the lines need: only the answer's own labels do.

Score: the share of lines whose generated text starts with the expected value as a whole word
(``"125. The"`` answers ``125``), × 100; :meth:`LongAnswerTask.score_items` gives each line's.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .. import words as W
from ..haystack import EssayStream
from .base import Sample, Task
from .ruler import _insert, fit_to_length

RECALL_HEAD = (
    "Some special codes are hidden in the following text, each one belonging to a name. "
    "Memorize them: I will ask you for them afterwards.\n"
)
# The needle holds the answer line's own text ("<key>: <code>"): a small model copies a line it has
# read far more reliably than it rephrases one (calibration in docs/long-answer.md).
RECALL_NEEDLE = "The special code is {key}: {value}."
RECALL_QUESTION = (
    "\nWhat are the special codes of {keys}? Answer with one line per name, in this order, "
    "each line written as name: code."
)

TRACE_HEAD = (
    "Some numbered boxes are hidden in the following text; each one points to another box. "
    "Memorize where each box points: I will ask you to follow the boxes afterwards.\n"
)
TRACE_NEEDLE = "Box {key} points to box {value}."
TRACE_QUESTION = (
    "\nStart at box {start} and follow the boxes for {hops} steps. Write one line per step, "
    "each line written as: Box X points to box Y."
)


@dataclass(frozen=True)
class AnswerItem:
    """One line of a long answer.

    Attributes:
        label: text fed to the model before the value (teacher-forced), e.g. ``"amber-owl: "``;
            the first line's label follows the prompt directly, the next ones a newline. The line
            reads ``label + value``: a space between them ends the label.
        value: the expected value, e.g. ``"4821"``; the model writes it, up to a newline.
    """

    label: str
    value: str


class LongAnswerTask(Task):
    """A task whose answer is a list of lines, each scored on its own.

    Subclasses build samples whose ``meta["items"]`` lists ``{"label", "value"}`` per line (the
    answer's order); :meth:`items` reads them back.
    """

    #: joins the lines of the answer (the separator a line's label follows, from the second line on)
    separator: str = "\n"

    def items(self, sample: Sample) -> list[AnswerItem]:
        """The lines of ``sample``'s answer, in order."""
        return [AnswerItem(i["label"], i["value"]) for i in sample.meta["items"]]

    def score_items(self, values: list[str], sample: Sample) -> list[float]:
        """Per line, 100 when the generated text starts with the expected value as a whole word
        (leading spaces skipped; what follows, if anything, is neither a letter, a digit nor a
        hyphen: ``"125. The"`` answers ``125``, ``"1250"`` and ``"shiny-pillar"`` for ``"shiny"``
        do not), else 0. ``values[i]`` is the text generated after line ``i``'s label."""
        items = self.items(sample)
        if len(values) != len(items):
            raise ValueError(f"{len(values)} values for {len(items)} lines")
        return [100.0 * _starts_with_word(v.lstrip(), item.value) for v, item in zip(values, items)]

    def score(self, prediction: str, sample: Sample) -> float:
        """Mean line score of a free-running answer (not teacher-forced): line ``i`` of the
        prediction scores when it starts with line ``i``'s label (stripped) and its remainder is the
        value. The harness scores teacher-forced answers with :meth:`score_items` instead."""
        lines = prediction.strip("\n").split(self.separator)
        values = []
        for i, item in enumerate(self.items(sample)):
            line = lines[i].strip() if i < len(lines) else ""
            label = item.label.strip()
            values.append(line[len(label):] if line.startswith(label) else "")
        return sum(self.score_items(values, sample)) / len(values)


def _starts_with_word(text: str, word: str) -> bool:
    rest = text[len(word):] if text.startswith(word) else None
    return rest is not None and not (rest[:1].isalnum() or rest[:1] in ("-", "_"))


def _rng(seed: int, task: str, length: int, index: int) -> random.Random:
    # String seeds are hashed with SHA-512 by `random`: stable across runs and platforms.
    return random.Random(f"{seed}:{task}:{length}:{index}")


def _names(rng: random.Random, n: int) -> list[str]:
    """``n`` distinct adjective-noun names ("amber-owl"); a hyphen never occurs in the essay."""
    out: list[str] = []
    while len(out) < n:
        name = f"{rng.choice(W.ADJECTIVES)}-{rng.choice(W.NOUNS)}"
        if name not in out:
            out.append(name)
    return out


def _codes(rng: random.Random, n: int, digits: int) -> list[str]:
    """``n`` distinct numbers of exactly ``digits`` digits (no leading zero)."""
    out: list[str] = []
    while len(out) < n:
        code = str(rng.randint(10 ** (digits - 1), 10**digits - 1))
        if code not in out:
            out.append(code)
    return out


def _spread(rng: random.Random, n: int) -> list[float]:
    """``n`` sorted depths in [0, 1), one drawn in each of ``n`` equal slices of the context, so the
    statements are spread over the whole context instead of clustering."""
    return [(i + rng.random()) / n for i in range(n)]


@dataclass
class _LinesTask(LongAnswerTask):
    """Statements hidden at spread depths of an essay; the answer is one line per statement."""

    name: str = "lines"
    num_items: int = 5
    answer_prefix: str = ""
    max_new_tokens: int = 64  # unused by the teacher-forced harness; a free-running answer's limit

    def samples(self, formatter, length, num_samples, seed):
        return [self._sample(formatter, length, i, seed) for i in range(num_samples)]

    def _statements(self, rng: random.Random) -> tuple[list[tuple[str, str]], list[AnswerItem], dict]:
        """The (key, value) statements in context order, the answer's lines, and the question's
        fields."""
        raise NotImplementedError

    head = needle = question = ""

    def _sample(self, formatter, length: int, index: int, seed: int) -> Sample:
        rng = _rng(seed, self.name, length, index)
        statements, items, fields = self._statements(rng)
        texts = [self.needle.format(key=k, value=v) for k, v in statements]
        depths = _spread(rng, len(texts))
        essay = EssayStream(f"{seed}:{self.name}:{length}:{index}")
        question = self.question.format(**fields)

        def build(n: int) -> Sample:
            merged, before = _insert(list(essay.sentences(n)), texts, depths)
            body = " ".join(merged)
            info, cursor = [], 0
            for text, depth, b in zip(texts, depths, before):
                cursor = body.index(text, cursor)
                info.append(dict(text=text, depth=round(depth, 4), units_before=b, char=len(self.head) + cursor))
            return Sample(
                task=self.name,
                index=index,
                context=self.head + body,
                question=question,
                answer_prefix=self.answer_prefix,
                answers=tuple(item.value for item in items),
                max_new_tokens=self.max_new_tokens,
                meta={
                    "items": [dict(label=i.label, value=i.value) for i in items],
                    "statements": info,
                    "haystack_units": n,
                },
            )

        return fit_to_length(build, formatter.count, length)


@dataclass
class RecallLinesTask(_LinesTask):
    """Multi-value recall: K "key: code" lines, keys asked in a shuffled order (see the module).

    Args:
        num_items: K, the statements and answer lines (default 5).
        digits: digits per code (default 3).
    """

    name: str = "recall_lines"
    digits: int = 3
    label: str = "{key}: "
    head, needle, question = RECALL_HEAD, RECALL_NEEDLE, RECALL_QUESTION

    def _statements(self, rng):
        keys = _names(rng, self.num_items)
        codes = _codes(rng, self.num_items, self.digits)
        asked = rng.sample(range(self.num_items), self.num_items)  # the answer's order
        items = [AnswerItem(self.label.format(key=keys[i]), codes[i]) for i in asked]
        listed = [keys[i] for i in asked]
        return list(zip(keys, codes)), items, {"keys": ", ".join(listed[:-1]) + " and " + listed[-1]}


@dataclass
class TraceLinesTask(_LinesTask):
    """Chain following: K lines "Box <a> points to box <b>" from the first box given (see the module).

    Args:
        num_items: K, the hops (K + 1 boxes, K statements; default 5).
        digits: digits per box number (default 3).
    """

    name: str = "trace_lines"
    digits: int = 3
    label: str = "Box {key} points to box "
    head, needle, question = TRACE_HEAD, TRACE_NEEDLE, TRACE_QUESTION

    def _statements(self, rng):
        chain = _codes(rng, self.num_items + 1, self.digits)
        hops = list(zip(chain[:-1], chain[1:]))
        items = [AnswerItem(self.label.format(key=a), b) for a, b in hops]
        placed = rng.sample(hops, len(hops))  # context order: not the chain's
        return placed, items, {"start": chain[0], "hops": self.num_items}


#: The long-answer tasks by name, with their default sizes.
LONG_ANSWER_TASKS: dict[str, LongAnswerTask] = {
    "recall_lines": RecallLinesTask(),
    "trace_lines": TraceLinesTask(),
}
