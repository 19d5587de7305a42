"""LongBench, LongBench v2 and InfiniteBench loaders on hand-written files in the published formats."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from heterocache.eval.prompting import PromptFormatter
from heterocache.eval.tasks import BenchmarkDataMissing, get_task
from heterocache.eval.tasks import longbench as LB
from heterocache.eval.tasks.infinitebench import TEMPLATES as IB_TEMPLATES
from heterocache.eval.toy import byte_tokenizer

DATA = Path(__file__).resolve().parents[1] / "fixtures" / "eval"


@pytest.fixture(scope="module")
def formatter():
    return PromptFormatter(byte_tokenizer())


def _rows(relative: str) -> list[dict]:
    return [
        json.loads(line)
        for line in (DATA / relative).read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]


class TestLongBench:
    def test_prompt_is_the_published_template_split_after_the_context(self, formatter):
        task = get_task("longbench/hotpotqa", DATA)
        samples = task.samples(formatter, 4000, 0, seed=0)
        rows = _rows("longbench/hotpotqa.jsonl")
        assert len(samples) == len(rows) == 2
        for sample, row in zip(samples, rows):
            assert sample.context + sample.question == LB.PROMPTS["hotpotqa"].format(**row)
            assert sample.context.endswith(row["context"]) and row["input"] in sample.question
            assert sample.answers == tuple(row["answers"])
            assert sample.max_new_tokens == 32 and sample.chat

    def test_scores_with_the_task_metric(self, formatter):
        task = get_task("longbench/hotpotqa", DATA)
        sample = task.samples(formatter, 4000, 1, seed=0)[0]
        assert task.score("Marta Velloso", sample) == 100.0
        assert task.score("Velloso", sample) == pytest.approx(100 * 2 / 3)

    def test_few_shot_tasks_skip_the_chat_template_and_use_their_metric(self, formatter):
        trec = get_task("longbench/trec", DATA)
        (sample,) = trec.samples(formatter, 4000, 0, seed=0)
        assert not sample.chat
        assert not formatter.tokenizer.decode(formatter.encode(sample).input_ids).startswith("<|im_start|>")
        assert trec.score("Other location\nQuestion: next", sample) == 100.0  # first line only
        lcc = get_task("longbench/lcc", DATA)
        (code,) = lcc.samples(formatter, 4000, 0, seed=0)
        assert code.question == "Next line of code:\n"
        assert lcc.score("    return width * height\n", code) == 100.0

    def test_over_long_prompts_are_cut_in_the_middle_of_the_context(self, formatter):
        task = get_task("longbench/hotpotqa", DATA)
        full = task.samples(formatter, 4000, 1, seed=0)[0]
        cut = task.samples(formatter, formatter.count(full) - 40, 1, seed=0)[0]
        assert formatter.count(cut) <= formatter.count(full) - 40
        assert cut.question == full.question and cut.meta["truncated_tokens"] >= 40

    def test_every_published_task_has_a_template_a_length_and_a_metric(self):
        assert set(LB.PROMPTS) == set(LB.MAX_NEW_TOKENS) == set(LB.METRICS)
        assert len(LB.PROMPTS) == 21
        assert all("{context}" in t for t in LB.PROMPTS.values())


class TestLongBenchV2:
    def test_prompt_has_the_document_then_question_and_choices(self, formatter):
        task = get_task("longbenchv2", DATA)
        first, second = task.samples(formatter, 4000, 0, seed=0)
        assert first.context == (
            "Please read the following text and answer the question below.\n\n<text>\n"
            "The keeper of the north lighthouse painted the harbor mural in 1925."
        )
        assert first.question.startswith(
            "\n</text>\n\nWhat is the correct answer to this question: What did the keeper paint?"
        )
        assert "(B) The harbor mural\n" in first.question
        assert first.question.endswith('"The correct answer is (insert answer here)".')
        assert first.answers == ("B",) and first.max_new_tokens == 128
        assert second.meta["difficulty"] == "hard"

    def test_accuracy_from_the_extracted_letter(self, formatter):
        task = get_task("longbenchv2", DATA)
        sample = task.samples(formatter, 4000, 1, seed=0)[0]
        assert task.score("The correct answer is (B)", sample) == 100.0
        assert task.score("The correct answer is (A)", sample) == 0.0
        assert task.score("B", sample) == 0.0  # no committed answer in the published format

    def test_subsets_filter_by_difficulty_or_length(self, formatter):
        assert [s.meta["_id"] for s in get_task("longbenchv2/hard", DATA).samples(formatter, 4000, 0, 0)] == [
            "v2-0002"
        ]
        assert [
            s.meta["_id"] for s in get_task("longbenchv2/short", DATA).samples(formatter, 4000, 0, 0)
        ] == ["v2-0001"]


class TestInfiniteBench:
    def test_passkey_prompt_and_score(self, formatter):
        task = get_task("infinitebench/passkey", DATA)
        (sample,) = task.samples(formatter, 4000, 0, seed=0)
        row = _rows("infinitebench/passkey.jsonl")[0]
        assert sample.context + sample.question == IB_TEMPLATES["passkey"].format(**row)
        assert sample.question.endswith("What is the pass key?\n\nThe pass key is")
        assert sample.max_new_tokens == 6
        assert task.score(" 71432.", sample) == 100.0

    def test_choice_label_becomes_text_and_letter(self, formatter):
        task = get_task("infinitebench/longbook_choice_eng", DATA)
        (sample,) = task.samples(formatter, 4000, 0, seed=0)
        assert sample.meta["label"] == ["He lit the lamp", "B"]
        assert (
            "Question: What did the keeper do every evening?\nA. He sailed away\nB. He lit the lamp"
            in sample.question
        )
        assert task.score(" B", sample) == 100.0

    def test_code_run_and_math_find_fill_their_extra_fields(self, formatter):
        (run,) = get_task("infinitebench/code_run", DATA).samples(formatter, 4000, 0, seed=0)
        assert run.context.startswith("There is a function called func_2 in the following Python code.")
        assert run.question.endswith("The value of func_2(3) is")
        (find,) = get_task("infinitebench/math_find", DATA).samples(formatter, 4000, 0, seed=0)
        assert find.context.startswith("What is the largest number in the following list?\n\n[3, 9")
        assert get_task("infinitebench/math_find", DATA).score("9", find) == 100.0

    def test_kv_retrieval(self, formatter):
        task = get_task("infinitebench/kv_retrieval", DATA)
        (sample,) = task.samples(formatter, 4000, 0, seed=0)
        assert task.score("e5f6a7b8-2222-4222-8222-222222222222", sample) == 100.0


@pytest.mark.parametrize(
    "name, expected, source",
    [
        ("longbench/hotpotqa", "longbench/hotpotqa.jsonl", "huggingface.co/datasets/THUDM/LongBench"),
        ("longbenchv2", "longbenchv2/data.json", "huggingface.co/datasets/THUDM/LongBench-v2"),
        (
            "infinitebench/passkey",
            "infinitebench/passkey.jsonl",
            "huggingface.co/datasets/xinrongzhang2022/InfiniteBench",
        ),
    ],
)
def test_missing_files_raise_a_message_with_the_path_and_the_source(
    tmp_path, formatter, name, expected, source
):
    with pytest.raises(BenchmarkDataMissing) as err:
        get_task(name, tmp_path).samples(formatter, 4000, 1, seed=0)
    assert str(tmp_path / expected) in str(err.value) and source in str(err.value)
    assert isinstance(err.value, FileNotFoundError)


def test_unknown_task_names_are_rejected():
    for name in ("longbench/nope", "infinitebench/nope", "longbenchv2/nope", "nope"):
        with pytest.raises(ValueError):
            get_task(name)
