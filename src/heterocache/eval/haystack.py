"""Offline filler text ("haystack") for the synthetic tasks and the fidelity measurement.

Two kinds, both deterministic functions of a seed:

- ``essay``: procedurally generated, grammatical English sentences from the word lists in
  :mod:`heterocache.eval.words` (a stand-in for RULER's Paul Graham essays, which are a download).
  The sentence stream of a seed is fixed: the first ``n`` sentences never depend on how many are
  asked for, so a prompt grows monotonically when a task adds sentences to reach a token count.
- ``noise``: RULER's repeated noise paragraph ("The grass is green. ...").

Neither contains digits, hyphens or upper-case words other than sentence starts, so needles and
answers inserted by tasks are the only such strings in a prompt.
"""

from __future__ import annotations

import random

from . import words as W

#: RULER's noise haystack unit (one line per unit).
NOISE_UNIT = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

# Sentence templates: {s}/{s2} subject phrases, {o} object phrase, {vp}/{vp2} past tense,
# {vb} base form, {vn} past participle, {adv} adverb, {place}, {time}, {adj}, {noun}.
_TEMPLATES = (
    "{S} {vp} {o} near {place}.",
    "In {time}, {s} {vp} {o}.",
    "Nobody expected that {s} would {vb} {o} so {adv}.",
    "{S} seemed {adj} because {s2} had {vn} {o}.",
    "When {s} {vp} {o}, {s2} {vp2} {adv}.",
    "It is often said that {s} can {vb} {o} better than anyone at {place}.",
    "{S} and {s2} {vp} {o} together during {time}.",
    "After a long wait, {s} finally {vp} {o}.",
    "There was {a_adj} {noun} at {place}, and {s} {vp} it {adv}.",
    "Some people believe that {s} should never {vb} {o}.",
    "The story of how {s} {vp} {o} was told again at {place}.",
    "Every traveller who came to {place} wanted to {vb} {o}.",
    "{S} {vp} {o}, although {s2} thought it was {adj}.",
    "Few things were as {adj} as the moment {s} {vp} {o}.",
    "Later, {s} {vp2} {o} and returned to {place}.",
    "According to an old letter, {s} once {vp} {o} in {time}.",
    "If {s} had not {vn} {o}, {s2} would have {vn2} it instead.",
    "Nothing about {o} surprised {s2} more than how {adj} it looked.",
)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


class EssayStream:
    """An endless, seeded stream of essay-like sentences.

    Args:
        seed: any value accepted by :class:`random.Random` (strings are hashed stably).

    ``sentences(n)`` returns the first ``n`` sentences; it caches what it generated, so asking
    for more later continues the same stream.
    """

    def __init__(self, seed: object = 0) -> None:
        self._rng = random.Random(f"essay:{seed}")
        self._sentences: list[str] = []

    def sentences(self, n: int) -> list[str]:
        while len(self._sentences) < n:
            self._sentences.append(self._next())
        return self._sentences[:n]

    def text(self, n: int) -> str:
        """The first ``n`` sentences joined by spaces."""
        return " ".join(self.sentences(n))

    def _phrase(self) -> str:
        rng = self._rng
        return f"the {rng.choice(W.ADJECTIVES)} {rng.choice(W.NOUNS)}"

    def _next(self) -> str:
        rng = self._rng
        template = rng.choice(_TEMPLATES)
        v1, v2 = rng.choice(W.VERBS), rng.choice(W.VERBS)
        adj = rng.choice(W.ADJECTIVES)
        fields = {
            "s": self._phrase(),
            "s2": self._phrase(),
            "o": self._phrase(),
            "vp": v1[1],
            "vb": v1[0],
            "vn": v1[2],
            "vp2": v2[1],
            "vn2": v2[2],
            "adv": rng.choice(W.ADVERBS),
            "place": rng.choice(W.PLACES),
            "time": rng.choice(W.TIMES),
            "adj": adj,
            "a_adj": f"{_article(adj)} {adj}",
            "noun": rng.choice(W.NOUNS),
        }
        fields["S"] = fields["s"][0].upper() + fields["s"][1:]
        sentence = template.format(**fields)
        return sentence[0].upper() + sentence[1:]


def essay_sentences(n: int, seed: object = 0) -> list[str]:
    """The first ``n`` sentences of the essay stream of ``seed``."""
    return EssayStream(seed).sentences(n)


def noise_units(n: int) -> list[str]:
    """``n`` copies of RULER's noise line."""
    return [NOISE_UNIT] * n
