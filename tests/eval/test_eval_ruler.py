"""RULER-style task generators: deterministic, filled to length, answers where they claim to be."""

from __future__ import annotations

import re

import pytest

from heterocache.eval.haystack import NOISE_UNIT, EssayStream
from heterocache.eval.prompting import PromptFormatter
from heterocache.eval.tasks import get_task
from heterocache.eval.tasks.ruler import RULER_TASKS, fit_to_length
from heterocache.eval.toy import byte_tokenizer

# The byte tokenizer spends one token per byte, so these lengths hold a few thousand characters.
LENGTH = 2000
NIAH = ["niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery"]


@pytest.fixture(scope="module")
def formatter():
    return PromptFormatter(byte_tokenizer())


def _samples(formatter, name, seed=0, n=2, length=LENGTH):
    return get_task(name).samples(formatter, length, n, seed)


@pytest.mark.parametrize("name", list(RULER_TASKS))
def test_same_seed_gives_the_same_prompts(formatter, name):
    first = _samples(formatter, name)
    again = _samples(PromptFormatter(byte_tokenizer()), name)
    assert [(s.context, s.question, s.answer_prefix, s.answers) for s in first] == [
        (s.context, s.question, s.answer_prefix, s.answers) for s in again
    ]


@pytest.mark.parametrize("name", list(RULER_TASKS))
def test_another_seed_or_index_gives_other_prompts(formatter, name):
    a, b = _samples(formatter, name, seed=0)
    (c,) = _samples(formatter, name, seed=1, n=1)
    assert a.context != b.context and a.context != c.context


@pytest.mark.parametrize("name", list(RULER_TASKS))
def test_prompt_is_filled_up_to_the_requested_length(formatter, name):
    for sample in _samples(formatter, name):
        tokens = formatter.count(sample)
        # At most the target; short of it by less than one haystack unit (an essay sentence is
        # under 150 bytes; a common-words unit adds one list entry).
        assert LENGTH - 150 < tokens <= LENGTH


def test_a_length_below_the_smallest_prompt_is_an_error(formatter):
    with pytest.raises(ValueError, match="too short"):
        _samples(formatter, "vt", length=100)


@pytest.mark.parametrize(
    "cost, largest",
    [
        (lambda n: 10 + 7 * n, 12),  # linear: the estimate is exact
        (lambda n: 10 + n * n, 9),  # convex: the estimate from 16 units undershoots
        (lambda n: 10 + 30 * n**0.5, 9),  # concave: the estimate overshoots
    ],
)
def test_fit_to_length_takes_the_largest_size_that_fits(cost, largest):
    # A "sample" is its own size n here; its prompt costs cost(n) tokens.
    assert fit_to_length(lambda n: n, cost, 100) == largest


@pytest.mark.parametrize("name", NIAH)
def test_needles_sit_at_their_claimed_depth(formatter, name):
    for sample in _samples(formatter, name):
        units = sample.meta["haystack_units"]
        body_start = sample.context.index("\n") + 1  # after the instruction line
        needles = sample.meta["needles"]
        for k, needle in enumerate(needles):
            start = needle["char"]
            assert sample.context[start : start + len(needle["text"])] == needle["text"]
            assert needle["units_before"] == int(units * needle["depth"])
            # Every essay sentence and needle ends with ". ": count what precedes this needle.
            preceding = sample.context[body_start:start].count(". ")
            assert preceding == needle["units_before"] + k
            # The depth also holds in tokens, to within a couple of sentences.
            enc = formatter.tokenizer(sample.context[:start], add_special_tokens=False)["input_ids"]
            total = formatter.tokenizer(sample.context, add_special_tokens=False)["input_ids"]
            assert abs(len(enc) / len(total) - needle["depth"]) < 0.1


@pytest.mark.parametrize("name", NIAH)
def test_each_expected_answer_appears_once_in_its_needle(formatter, name):
    task = RULER_TASKS[name]
    for sample in _samples(formatter, name):
        assert len(sample.answers) == task.num_values * task.num_queries
        needles = {n["value"]: n for n in sample.meta["needles"]}
        assert len(needles) == task.num_keys * task.num_values
        for answer in sample.answers:
            assert sample.context.count(answer) == 1
            needle = needles[answer]
            assert f"for {needle['key']} is: {answer}." in sample.context
            assert needle["key"] in sample.question and needle["key"] in sample.answer_prefix
        # The filler itself carries no digits, so no other number can be mistaken for an answer.
        assert len(re.findall(r"\d{7}", sample.context)) == len(needles)


def test_single_needle_uses_singular_wording(formatter):
    (sample,) = _samples(formatter, "niah_single", n=1)
    assert sample.context.startswith("A special magic number is hidden within the following text.")
    assert sample.question.startswith("\nWhat is the special magic number for")
    assert sample.answer_prefix.endswith("mentioned in the provided text is")


def test_variable_chain_is_hidden_in_order_and_answers_are_its_variables(formatter):
    for sample in _samples(formatter, "vt"):
        names, value = sample.answers, sample.meta["value"]
        chain = [f"VAR {names[0]} = {value}"] + [f"VAR {b} = VAR {a}" for a, b in zip(names, names[1:])]
        offsets = [s["char"] for s in sample.meta["statements"]]
        assert [s["text"] for s in sample.meta["statements"]] == chain
        assert offsets == sorted(offsets)
        for statement, start in zip(chain, offsets):
            assert sample.context[start : start + len(statement)] == statement
        assert f"assigned the value {value}" in sample.question
        lines = sample.context.split("\n")
        assert lines.count(NOISE_UNIT) >= sample.meta["haystack_units"]


def test_common_words_appear_most_often(formatter):
    for sample in _samples(formatter, "cwe", length=3000):
        listing = sample.context.rsplit("\n", 1)[1]  # the last line is the numbered list
        words = re.findall(r"\d+\. (\w+)", listing)
        counts = {w: words.count(w) for w in set(words)}
        freq_cw, freq_ucw = sample.meta["freq_cw"], sample.meta["freq_ucw"]
        assert len(sample.answers) == 10
        assert all(counts[w] == freq_cw for w in sample.answers)
        assert all(c == freq_ucw for w, c in counts.items() if w not in sample.answers)
        assert [int(n) for n in re.findall(r"(\d+)\. ", listing)] == list(range(1, len(words) + 1))


def test_essay_haystack_is_a_stable_stream_without_digits():
    assert EssayStream(7).sentences(5) == EssayStream(7).sentences(50)[:5]
    assert EssayStream(7).text(20) != EssayStream(8).text(20)
    assert not re.search(r"[0-9-]", EssayStream(7).text(500))


@pytest.mark.parametrize("name", list(RULER_TASKS))
def test_scores_are_the_share_of_expected_answers_in_the_reply(formatter, name):
    (sample,) = _samples(formatter, name, n=1)
    task = get_task(name)
    assert task.score(" ".join(sample.answers), sample) == 100.0
    assert task.score("I do not know.", sample) == 0.0
    if len(sample.answers) > 1:
        assert task.score(sample.answers[0].upper(), sample) == pytest.approx(100.0 / len(sample.answers))
