"""The harness with a prompt prefilled in pieces (``--prefill-chunk-size``, ``--prefill``;
``docs/prefill.md``): what reaches the cache, what the records say, what is skipped."""

from __future__ import annotations

import json

import pytest

import heterocache
from helpers import RecordingCache
from heterocache.eval import EvalConfig, run_eval
from heterocache.eval.generation import generate_answer
from heterocache.eval.prompting import PromptFormatter
from heterocache.eval.tasks import get_task
from heterocache.eval.toy import tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")
LENGTH = 700


@pytest.fixture(scope="module")
def model():
    return heterocache.enable(tiny_llama())


def test_the_prompt_or_the_context_arrives_in_pieces(model, tokenizer):
    formatter = PromptFormatter(tokenizer)
    (sample,) = get_task("niah_single").samples(formatter, LENGTH, 1, seed=0)
    prompt = formatter.encode(sample)
    aware, agnostic = RecordingCache(), RecordingCache()
    generate_answer(model, tokenizer, prompt, aware, "query_aware", max_new_tokens=3, prefill_chunk_size=256)
    generate_answer(model, tokenizer, prompt, agnostic, "query_agnostic", max_new_tokens=3, prefill_chunk_size=256)
    pieces = lambda n: [256] * (n // 256) + ([n % 256] if n % 256 else [])  # noqa: E731
    assert aware.chunks == [*pieces(prompt.length), 1, 1]
    # the context in pieces, then the question as one turn
    assert agnostic.chunks == [*pieces(prompt.context_len), prompt.length - prompt.context_len, 1, 1]


def test_a_chunked_grid_records_its_prefill_and_skips_what_cannot_be_bounded(model, tokenizer, tmp_path, capsys):
    config = EvalConfig(methods=("snapkv", "h2o"), budgets=(0.25,), tasks=("niah_single",), lengths=(LENGTH,),
                        num_samples=1, max_new_tokens=2, prefill_chunk_size=128, prefill="bounded")
    result = run_eval(model, tokenizer, config, tmp_path, progress=False, plots=False)
    assert "skipping h2o" in capsys.readouterr().err
    records = [json.loads(line) for line in (tmp_path / "records.jsonl").read_text().splitlines()]
    assert {r["method"] for r in records} == {"snapkv"} and result.ran == 2  # both modes
    assert all(r["settings"]["prefill"] == {"chunk_size": 128, "mode": "bounded"} for r in records)
    assert all(r["shared_prefill"] == 0 for r in records)
    # the same folder without chunks: other settings, refused rather than mixed
    with pytest.raises(ValueError, match="other cache settings"):
        run_eval(model, tokenizer, EvalConfig(**{**config.to_dict(), "prefill_chunk_size": None, "prefill": "exact"}),
                 tmp_path, progress=False, plots=False)


def test_bounded_needs_a_chunk_size():
    with pytest.raises(ValueError, match="prefill_chunk_size"):
        EvalConfig(prefill="bounded")
