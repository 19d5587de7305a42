"""RULER-style synthetic tasks (Hsieh et al., 2024), generated offline from a seed.

Templates, answer prefixes, needle format, depth grid, default sizes and the scoring rule follow
the RULER paper and its published configuration; the haystack is our own generated essay text
(:mod:`heterocache.eval.haystack`) instead of Paul Graham's essays, and key words come from our
own lists. Each prompt is filled to the requested number of tokens as measured by the model's
tokenizer with the chat template applied (the largest haystack that fits).

Tasks: ``niah_single``, ``niah_multikey`` (4 keys, 1 asked), ``niah_multivalue`` (1 key, 4 values),
``niah_multiquery`` (4 keys, all asked), ``vt`` (variable tracking, 1 chain of 4 hops) and ``cwe``
(common-word extraction, 10 words). Score: RULER's ``string_match_all`` × 100 (share of the
expected answers found in the reply, case-insensitive).
"""

from __future__ import annotations

import functools
import random
import string
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from .. import words as W
from ..haystack import EssayStream, noise_units
from ..metrics import string_match_all
from .base import Sample, Task

#: Needle depths in percent: RULER's 40-point grid from 0 to 100.
DEPTHS = tuple(round(i * 100 / 39) for i in range(40))

NIAH_NEEDLE = "One of the special magic {type_v} for {key} is: {value}."
NIAH_HEAD = (
    "Some special magic {type_v} are hidden within the following text. "
    "Make sure to memorize it. I will quiz you about the {type_v} afterwards."
)
NIAH_QUESTION = "What are all the special magic {type_v} for {query} mentioned in the provided text?"
NIAH_ANSWER_PREFIX = " The special magic {type_v} for {query} mentioned in the provided text are"

VT_HEAD = "Memorize and track the chain(s) of variable assignment hidden in the following text."
VT_QUESTION = "Question: Find all variables that are assigned the value {query} in the text above."
VT_ANSWER_PREFIX = (
    " Answer: According to the chain(s) of variable assignment in the text above, "
    "{num_v} variables are assigned the value {query}, they are: "
)

CWE_HEAD = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often."
)
CWE_QUESTION = "Question: What are the {num_cw} most common words in the above list?"
CWE_ANSWER_PREFIX = " Answer: The top {num_cw} words that appear most often in the list are:"


def _sample_rng(seed: int, task: str, length: int, index: int, what: str = "") -> random.Random:
    # String seeds are hashed with SHA-512 by `random`: stable across runs and platforms.
    return random.Random(f"{seed}:{task}:{length}:{index}:{what}")


def fit_to_length(build: Callable[[int], Sample], count: Callable[[Sample], int], length: int) -> Sample:
    """The sample ``build(n)`` with the largest ``n >= 0`` whose prompt has at most ``length`` tokens.

    ``build(n)`` must grow with ``n`` (``n`` haystack units). Starts from an estimate of the
    tokens per unit, brackets the answer, then bisects: about a dozen tokenizations.

    Raises:
        ValueError: even ``build(0)`` is longer than ``length``.
    """
    base = count(build(0))
    if base > length:
        raise ValueError(f"{length} tokens is too short for this task: its smallest prompt has {base}")
    fits = lambda n: count(build(n)) <= length  # noqa: E731
    probe = 16
    per_unit = max((count(build(probe)) - base) / probe, 1e-3)
    guess = max(int((length - base) / per_unit), 0)
    # Bracket: build(lo) fits, build(hi) does not.
    if fits(guess):
        lo, hi = guess, int(guess * 1.05) + 2
        while fits(hi):
            lo, hi = hi, int(hi * 1.05) + 2
    else:
        lo, hi = 0, guess
        n = int(guess * 0.9)
        while n > 0 and not fits(n):
            hi, n = n, int(n * 0.9)
        lo = n
    while hi - lo > 1:  # bisect
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return build(lo)


def _insert(units: list[str], items: list[str], fractions: list[float]) -> tuple[list[str], list[int]]:
    """Insert ``items`` into ``units`` at ``int(len(units) * f)`` for the sorted fractions ``f``.

    Returns the merged list and, for each item, the number of units before it.
    """
    n = len(units)
    positions = [int(n * f) for f in sorted(fractions)]
    merged, before, start = [], [], 0
    for item, pos in zip(items, positions):
        merged.extend(units[start:pos])
        before.append(pos)
        merged.append(item)
        start = pos
    merged.extend(units[start:])
    return merged, before


def _random_token(rng: random.Random, kind: str) -> str:
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))  # RULER: 7-digit numbers
    if kind == "words":
        return f"{rng.choice(W.ADJECTIVES)}-{rng.choice(W.NOUNS)}"
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"unknown needle type {kind!r} (numbers, words, uuids)")


def _distinct(rng: random.Random, kind: str, n: int, taken: set[str]) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        token = _random_token(rng, kind)
        if token not in taken:
            taken.add(token)
            out.append(token)
    return out


@dataclass
class NeedleTask(Task):
    """Needle(s) in a haystack: "One of the special magic numbers for <key> is: <value>."

    Args:
        name: task name.
        num_keys: needles with distinct keys (distractors when more than queried).
        num_values: values per key (each value is its own needle).
        num_queries: keys asked about; all their values are expected.
        haystack: ``"essay"`` (generated prose, sentence units) or ``"noise"`` (RULER's noise lines).
        key_type, value_type: ``"words"`` (adjective-noun), ``"numbers"`` (7 digits) or ``"uuids"``.
        max_new_tokens: RULER's 128.

    ``meta["needles"]`` lists each needle's ``text``, ``key``, ``value``, requested ``depth``
    (0-1), ``units_before`` (haystack units preceding it, ``int(depth · units)``) and ``char``
    (its offset in ``sample.context``).
    """

    name: str = "niah_single"
    num_keys: int = 1
    num_values: int = 1
    num_queries: int = 1
    haystack: str = "essay"
    key_type: str = "words"
    value_type: str = "numbers"
    max_new_tokens: int = 128

    def __post_init__(self) -> None:
        if not 1 <= self.num_queries <= self.num_keys:
            raise ValueError("need 1 <= num_queries <= num_keys")
        if self.haystack not in ("essay", "noise"):
            raise ValueError(f"haystack must be 'essay' or 'noise', not {self.haystack!r}")

    def samples(self, formatter, length, num_samples, seed):
        return [self._sample(formatter, length, i, seed) for i in range(num_samples)]

    def score(self, prediction, sample):
        return 100.0 * string_match_all(prediction, sample.answers)

    def _sample(self, formatter, length: int, index: int, seed: int) -> Sample:
        rng = _sample_rng(seed, self.name, length, index)
        taken: set[str] = set()
        keys = _distinct(rng, self.key_type, self.num_keys, taken)
        values = [_distinct(rng, self.value_type, self.num_values, taken) for _ in keys]
        needles = [(k, v) for k, vs in zip(keys, values) for v in vs]
        rng.shuffle(needles)
        depths = [d / 100 for d in rng.sample(DEPTHS, len(needles))]
        # Needles are placed in shuffled order at the sorted depths (as RULER does).
        order = sorted(range(len(depths)), key=lambda i: depths[i])
        depths = [depths[i] for i in order]
        queried = rng.sample(range(self.num_keys), self.num_queries)
        answers = tuple(v for i in queried for v in values[i])
        query_keys = [keys[i] for i in queried]
        query = (
            query_keys[0] if len(query_keys) == 1 else ", ".join(query_keys[:-1]) + ", and " + query_keys[-1]
        )

        type_v = self.value_type
        head, question, prefix = NIAH_HEAD, NIAH_QUESTION, NIAH_ANSWER_PREFIX
        if len(answers) == 1:  # RULER's singular wording, applied to the templates before filling
            head, question, prefix = (
                t.replace("Some", "A").replace("are all", "is").replace("are", "is")
                for t in (head, question, prefix)
            )
            type_v = type_v[:-1]
        needle_texts = [NIAH_NEEDLE.format(type_v=type_v, key=k, value=v) for k, v in needles]
        head = head.format(type_v=type_v) + "\n"
        essay = EssayStream(f"{seed}:{self.name}:{length}:{index}")
        sep = " " if self.haystack == "essay" else "\n"

        def build(n: int) -> Sample:
            units = essay.sentences(n) if self.haystack == "essay" else noise_units(n)
            merged, before = _insert(list(units), needle_texts, depths)
            body = sep.join(merged)
            info, cursor = [], 0
            for (k, v), text, d, b in zip(needles, needle_texts, depths, before):
                cursor = body.index(text, cursor)
                info.append(dict(text=text, key=k, value=v, depth=d, units_before=b, char=len(head) + cursor))
            return Sample(
                task=self.name,
                index=index,
                context=head + body,
                question="\n" + question.format(type_v=type_v, query=query),
                answer_prefix=prefix.format(type_v=type_v, query=query),
                answers=answers,
                max_new_tokens=self.max_new_tokens,
                meta={"needles": info, "haystack_units": n, "query": query},
            )

        return fit_to_length(build, formatter.count, length)


@dataclass
class VariableTrackingTask(Task):
    """Variable tracking: chains ``VAR A = 12345``, ``VAR B = VAR A``, ... hidden in noise lines;
    the question asks for every variable that ends up holding the first chain's value.

    Args:
        num_chains: chains inserted (the first one is asked about).
        num_hops: assignments after the first in each chain (answers = num_hops + 1 names).
        few_shot: prepend one short solved example, as RULER does.
        max_new_tokens: RULER's 30.

    ``meta["statements"]`` lists each chain statement with ``units_before`` and ``char``.
    """

    name: str = "vt"
    num_chains: int = 1
    num_hops: int = 4
    few_shot: bool = True
    max_new_tokens: int = 30

    def samples(self, formatter, length, num_samples, seed):
        return [self._sample(formatter, length, i, seed) for i in range(num_samples)]

    def score(self, prediction, sample):
        return 100.0 * string_match_all(prediction, sample.answers)

    @staticmethod
    def _chains(
        rng: random.Random, num_chains: int, num_hops: int, letters: int
    ) -> tuple[list[list[str]], list[str]]:
        names: list[str] = []
        while len(names) < num_chains * (num_hops + 1):
            name = "".join(rng.choices(string.ascii_uppercase, k=letters))
            if name not in names:
                names.append(name)
        chains, values = [], []
        for c in range(num_chains):
            chain_vars = names[c * (num_hops + 1) : (c + 1) * (num_hops + 1)]
            value = str(rng.randint(10000, 99999))
            statements = [f"VAR {chain_vars[0]} = {value}"]
            statements += [f"VAR {chain_vars[j + 1]} = VAR {chain_vars[j]}" for j in range(num_hops)]
            chains.append(statements)
            values.append(value)
        return chains, [values[0]] + names[: num_hops + 1]

    def _example(self, rng: random.Random) -> str:
        chains, (value, *answer) = self._chains(rng, 1, self.num_hops, letters=3)
        fractions = sorted(rng.random() for _ in chains[0])
        lines, _ = _insert(noise_units(5), chains[0], fractions)
        return (
            VT_HEAD
            + "\n\n"
            + "\n".join(lines)
            + "\n"
            + VT_QUESTION.format(query=value)
            + VT_ANSWER_PREFIX.format(num_v=len(answer), query=value)
            + " ".join(answer)
            + "\n\n"
        )

    def _sample(self, formatter, length: int, index: int, seed: int) -> Sample:
        rng = _sample_rng(seed, self.name, length, index)
        chains, (value, *answer) = self._chains(rng, self.num_chains, self.num_hops, letters=5)
        example = self._example(rng) if self.few_shot else ""
        statements = [s for chain in chains for s in chain]
        # Chains are interleaved in a random order that keeps each chain's own order.
        order = [c for c, chain in enumerate(chains) for _ in chain]
        rng.shuffle(order)
        cursors = [0] * len(chains)
        interleaved = []
        for c in order:
            interleaved.append(chains[c][cursors[c]])
            cursors[c] += 1
        fractions = sorted(rng.random() for _ in statements)
        head = example + VT_HEAD + "\n\n"

        def build(n: int) -> Sample:
            lines, before = _insert(noise_units(n), interleaved, fractions)
            body = "\n".join(lines)
            info, cursor = [], 0
            for text, b in zip(interleaved, before):
                cursor = body.index(text, cursor)
                info.append(dict(text=text, units_before=b, char=len(head) + cursor))
            return Sample(
                task=self.name,
                index=index,
                context=head + body,
                question="\n" + VT_QUESTION.format(query=value),
                answer_prefix=VT_ANSWER_PREFIX.format(num_v=len(answer), query=value),
                answers=tuple(answer),
                max_new_tokens=self.max_new_tokens,
                meta={"statements": info, "value": value, "haystack_units": n},
            )

        return fit_to_length(build, formatter.count, length)


@dataclass
class CommonWordsTask(Task):
    """Common-word extraction: a numbered list where ``num_cw`` words appear ``freq_cw`` times
    and every other word ``freq_ucw`` times; the question asks for the ``num_cw`` most common.

    Below 4096 tokens RULER lowers the frequencies to 6 and 1 (and shrinks its example); so do we.

    Args:
        num_cw, freq_cw, freq_ucw: RULER's 10, 30, 3.
        few_shot: prepend one short solved example, as RULER does.
        max_new_tokens: RULER's 120.

    """

    name: str = "cwe"
    num_cw: int = 10
    freq_cw: int = 30
    freq_ucw: int = 3
    few_shot: bool = True
    max_new_tokens: int = 120

    def samples(self, formatter, length, num_samples, seed):
        return [self._sample(formatter, length, i, seed) for i in range(num_samples)]

    def score(self, prediction, sample):
        return 100.0 * string_match_all(prediction, sample.answers)

    def _word_list(
        self, rng: random.Random, n_words: int, freq_cw: int, freq_ucw: int
    ) -> tuple[str, list[str]]:
        # Real words while they suffice (RULER likewise switches to a larger list only when needed).
        pool = _word_pool(1 << max(10, (n_words - 1).bit_length())) if n_words > len(_REAL) else _REAL
        chosen = rng.sample(pool, n_words)
        common, uncommon = chosen[: self.num_cw], chosen[self.num_cw :]
        listed = common * freq_cw + uncommon * freq_ucw
        rng.shuffle(listed)
        return " ".join(f"{i + 1}. {w}" for i, w in enumerate(listed)), common

    def _sample(self, formatter, length: int, index: int, seed: int) -> Sample:
        short = length < 4096
        freq_cw, freq_ucw = (6, 1) if short else (self.freq_cw, self.freq_ucw)
        question = CWE_QUESTION.format(num_cw=self.num_cw)
        prefix = CWE_ANSWER_PREFIX.format(num_cw=self.num_cw)
        example = ""
        if self.few_shot:
            rng = _sample_rng(seed, self.name, length, index, "example")
            ex_words, ex_freq = (20, (3, 1)) if short else (40, (10, 3))
            text, common = self._word_list(rng, ex_words, *ex_freq)
            example = (
                CWE_HEAD
                + "\n"
                + text
                + "\n"
                + question
                + prefix
                + " "
                + " ".join(f"{i + 1}. {w}" for i, w in enumerate(common))
                + "\n\n"
            )

        def build(extra: int) -> Sample:
            # The word choice and order depend on n: fix them by (seed, n) so build() is a function.
            rng = _sample_rng(seed, self.name, length, index, f"list:{extra}")
            text, common = self._word_list(rng, self.num_cw + extra, freq_cw, freq_ucw)
            return Sample(
                task=self.name,
                index=index,
                context=example + CWE_HEAD + "\n" + text,
                question="\n" + question,
                answer_prefix=prefix,
                answers=tuple(common),
                max_new_tokens=self.max_new_tokens,
                meta={"freq_cw": freq_cw, "freq_ucw": freq_ucw, "num_words": self.num_cw + extra},
            )

        return fit_to_length(build, formatter.count, length)


_REAL = W.real_words()


@functools.lru_cache(maxsize=8)
def _word_pool(n: int) -> list[str]:
    """At least ``n`` distinct words: the real ones first, then pseudo-words."""
    pool = W.real_words()
    seen, i = set(pool), 0
    while len(pool) < n:
        word = W.pseudo_word(i)
        i += 1
        if word not in seen:
            seen.add(word)
            pool.append(word)
    return pool


#: The RULER-style tasks by name, with RULER's default settings.
RULER_TASKS: dict[str, Task] = {
    "niah_single": NeedleTask("niah_single"),
    "niah_multikey": NeedleTask("niah_multikey", num_keys=4),
    "niah_multivalue": NeedleTask("niah_multivalue", num_values=4),
    "niah_multiquery": NeedleTask("niah_multiquery", num_keys=4, num_queries=4),
    "vt": VariableTrackingTask(),
    "cwe": CommonWordsTask(),
}
