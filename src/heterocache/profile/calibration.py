"""Calibration texts: a built-in generator of encyclopedia-like English, or the user's files.

Default data (no download). :func:`default_calibration_texts` writes long, Wikipedia-like texts
from a seed: each text is a run of articles about invented places, people, species, events,
inventions, works and organisations, with sections ("History", "Geography", ...) and sentences
that keep referring back to the names, dates and numbers introduced earlier, so attention has
long-range structure to find. Every word list and sentence template is written for heterocache;
the data is part of the package and shares its licence (Apache-2.0); nothing is copied from an
external corpus. The same seed gives the same texts on every platform (``random.Random`` seeded
with a string); different seeds give different texts (disjoint calibration sets).

User data (``--calibration FILE_OR_DIR``), see :func:`load_calibration`:
a folder of ``*.txt`` files (one text each), a ``.jsonl`` file (one ``{"text": ...}`` object or
JSON string per line), a ``.json`` file (a list of strings or of ``{"text": ...}``), or a single
text file.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Callable

from ._calibration_words import WORDS

#: Rough tokens per generated word for sub-word tokenizers; used only without a tokenizer.
_TOKENS_PER_WORD = 1.3


def default_calibration_texts(
    num_texts: int = 50,
    min_tokens: int = 5000,
    seed: int = 0,
    tokenizer: Any | None = None,
) -> list[str]:
    """``num_texts`` generated texts of at least ``min_tokens`` tokens each.

    Args:
        num_texts: how many texts (paper: ~50).
        min_tokens: length of each text in tokens of ``tokenizer`` (exact when given; estimated
            at 1.3 tokens per word, with a margin, otherwise).
        seed: texts depend only on (seed, index).
        tokenizer: a callable tokenizer returning ``{"input_ids": [...]}`` (e.g. transformers').
    """
    return [generate_text(seed, index, min_tokens, tokenizer) for index in range(num_texts)]


def generate_text(seed: int, index: int, min_tokens: int, tokenizer: Any | None = None) -> str:
    """Text number ``index`` of calibration set ``seed`` (see :func:`default_calibration_texts`)."""
    rng = random.Random(f"heterocache-calibration/{seed}/{index}")
    writer = _Writer(rng)
    count: Callable[[str], int]
    if tokenizer is not None:
        def count(text: str) -> int:
            return len(tokenizer(text, add_special_tokens=False)["input_ids"])
        target = min_tokens
    else:
        def count(text: str) -> int:
            return len(text.split())
        target = int(min_tokens / _TOKENS_PER_WORD * 1.1) + 1
    parts: list[str] = []
    total = 0
    while True:
        # Paragraph counts are summed (cheap); the joined text is counted once at the end.
        while total < target:
            part = writer.next_block()
            parts.append(part)
            total += count(part) + 1
        text = "\n\n".join(parts)
        if tokenizer is None or count(text) >= target:
            return text
        total = count(text)


class _Writer:
    """Builds articles block by block (a block is a heading or a paragraph)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.places: list[str] = []
        self.people: list[str] = []
        self.queue: list[str] = []

    # ---- names and numbers -------------------------------------------------------------------
    def coined(self, parts: int | None = None) -> str:
        syllables = WORDS["syllables"]
        n = parts or self.rng.choice((2, 2, 3))
        return "".join(self.rng.choice(syllables) for _ in range(n)).capitalize()

    def place(self, new: bool = False) -> str:
        if self.places and not new and self.rng.random() < 0.6:
            return self.rng.choice(self.places)
        name = self.coined() + self.rng.choice(WORDS["place_suffixes"])
        self.places.append(name)
        return name

    def person(self, new: bool = False) -> str:
        if self.people and not new and self.rng.random() < 0.55:
            return self.rng.choice(self.people)
        name = f"{self.rng.choice(WORDS['given_names'])} {self.coined()}"
        self.people.append(name)
        return name

    def year(self, low: int = 1520, high: int = 2019) -> int:
        return self.rng.randint(low, high)

    def pick(self, key: str) -> str:
        return self.rng.choice(WORDS[key])

    def fields(self) -> dict[str, Any]:
        """Values for every slot a template may use (fresh draws for each sentence)."""
        r = self.rng
        y1 = self.year()
        return {
            "place": self.place(), "place2": self.place(), "new_place": self.place(new=True),
            "person": self.person(), "person2": self.person(), "new_person": self.person(new=True),
            "year": y1, "year2": min(y1 + r.randint(2, 60), 2024), "century": f"{r.randint(15, 20)}th",
            "number": f"{r.randint(120, 98000):,}", "small": r.randint(2, 19), "percent": r.randint(3, 87),
            "km": r.randint(4, 900), "metres": r.randint(40, 4200), "ordinal": _ordinal(r.randint(2, 9)),
            **{key: self.pick(key) for key in WORDS if key not in ("syllables", "templates", "sections")},
            # second, different values for templates that name two of a kind
            **{f"{key}2": r.choice(WORDS[key]) for key in ("month", "industry", "material", "colour")},
        }

    def sentence(self, template: str) -> str:
        fields = self.fields()
        for key in ("month", "industry", "material", "colour"):
            while fields[f"{key}2"] == fields[key]:
                fields[f"{key}2"] = self.pick(key)
        text = template.format(**fields)
        return text[0].upper() + text[1:]

    # ---- structure ---------------------------------------------------------------------------
    def next_block(self) -> str:
        if not self.queue:
            self.queue = self.article()
        return self.queue.pop(0)

    def article(self) -> list[str]:
        domain = self.rng.choice(sorted(WORDS["sections"]))
        title = self.title(domain)
        blocks = [title, self.paragraph(domain, lead=title)]
        sections = list(WORDS["sections"][domain])
        self.rng.shuffle(sections)
        for section in sections[: self.rng.randint(3, len(sections))]:
            blocks.append(f"== {section} ==")
            blocks.extend(self.paragraph(domain) for _ in range(self.rng.randint(1, 3)))
        return blocks

    def title(self, domain: str) -> str:
        return {
            "place": lambda: self.place(new=True),
            "person": lambda: self.person(new=True),
            "species": lambda: f"{self.coined().capitalize()} {self.pick('animal')}",
            "event": lambda: f"{self.pick('event_kind')} of {self.place()} ({self.year()})",
            "science": lambda: f"{self.coined()} {self.pick('science_kind')}",
            "work": lambda: f"The {self.pick('adjective').capitalize()} {self.pick('noun').capitalize()}",
            "organisation": lambda: f"{self.place()} {self.pick('organisation_kind')}",
        }[domain]()

    def paragraph(self, domain: str, lead: str | None = None) -> str:
        pool = WORDS["templates"][domain] + WORDS["templates"]["general"]
        sentences = [self.sentence(t) for t in self.rng.sample(pool, self.rng.randint(3, 7))]
        if lead is not None:
            sentences.insert(0, f"{lead} is a {self.pick(domain + '_lead')}.")
        return " ".join(sentences)


def _ordinal(n: int) -> str:
    return {1: "first", 2: "second", 3: "third", 4: "fourth", 5: "fifth", 6: "sixth", 7: "seventh",
            8: "eighth", 9: "ninth"}[n]


def load_calibration(path: str | Path) -> list[str]:
    """Texts from a folder of ``*.txt`` files, a ``.jsonl``/``.json`` file, or one text file.

    Raises:
        FileNotFoundError: no such path.
        ValueError: no non-empty text found, or a malformed JSON entry.
    """
    path = Path(path)
    if path.is_dir():
        texts = [p.read_text(encoding="utf-8") for p in sorted(path.glob("*.txt"))]
    elif not path.exists():
        raise FileNotFoundError(f"calibration data {path} does not exist")
    elif path.suffix == ".jsonl":
        texts = [_text_of(json.loads(line), path) for line in path.read_text(encoding="utf-8").splitlines()
                 if line.strip()]
    elif path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of texts")
        texts = [_text_of(item, path) for item in data]
    else:
        texts = [path.read_text(encoding="utf-8")]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError(f"no calibration text found in {path}")
    return texts


def _text_of(item: Any, path: Path) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, dict) and isinstance(item.get("text"), str):
        return item["text"]
    raise ValueError(f"{path}: each entry must be a string or an object with a 'text' string")
