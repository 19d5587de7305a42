"""Prompt rendering: chat template, answer prefix, and the context/question split point."""

from __future__ import annotations

from dataclasses import replace

import pytest

from heterocache.eval.prompting import PromptFormatter, truncate_context_middle
from heterocache.eval.tasks.base import Sample
from heterocache.eval.toy import byte_tokenizer

SAMPLE = Sample(
    task="t",
    index=0,
    context="Read this: the key is 42.",
    question="\nWhat is the key?",
    answers=("42",),
    max_new_tokens=4,
    answer_prefix=" The key is",
)


def test_chat_template_wraps_the_user_turn_and_the_answer_prefix_follows_it():
    tok = byte_tokenizer(chat_template=True)
    enc = PromptFormatter(tok).encode(SAMPLE)
    text = tok.decode(enc.input_ids)
    assert text == (
        "<|im_start|>user\nRead this: the key is 42.\nWhat is the key?<|im_end|>\n"
        "<|im_start|>assistant\n The key is"
    )


def test_without_chat_template_the_prompt_is_bos_plus_text():
    tok = byte_tokenizer(chat_template=False)
    enc = PromptFormatter(tok).encode(SAMPLE)
    assert enc.input_ids[0] == tok.bos_token_id
    assert (
        tok.decode(enc.input_ids, skip_special_tokens=True)
        == "Read this: the key is 42.\nWhat is the key? The key is"
    )


def test_chat_template_can_be_switched_off_per_sample_and_globally():
    tok = byte_tokenizer(chat_template=True)
    assert "<|im_start|>" not in tok.decode(
        PromptFormatter(tok, chat_template=False).encode(SAMPLE).input_ids
    )
    assert "<|im_start|>" not in tok.decode(
        PromptFormatter(tok).encode(replace(SAMPLE, chat=False)).input_ids
    )
    with pytest.raises(ValueError):
        PromptFormatter(byte_tokenizer(chat_template=False), chat_template=True)


@pytest.mark.parametrize("chat", [True, False])
def test_context_ids_are_a_prefix_that_excludes_the_question(chat):
    tok = byte_tokenizer(chat_template=chat)
    enc = PromptFormatter(tok).encode(SAMPLE)
    head = tok.decode(enc.input_ids[: enc.context_len], skip_special_tokens=True)
    tail = tok.decode(enc.input_ids[enc.context_len :], skip_special_tokens=True)
    assert head.endswith("Read this: the key is 42.")
    assert tail.startswith("\nWhat is the key?") and tail.endswith(" The key is")
    assert tok(tok.decode(enc.input_ids), add_special_tokens=False)["input_ids"] == enc.input_ids


def test_middle_truncation_keeps_both_ends_of_the_context_and_the_whole_question():
    tok = byte_tokenizer(chat_template=False)
    formatter = PromptFormatter(tok)
    long = replace(SAMPLE, context="BEGIN " + "filler " * 200 + "END")
    cut = truncate_context_middle(long, formatter, 300)
    assert formatter.count(cut) <= 300
    assert cut.context.startswith("BEGIN ") and cut.context.endswith("END")
    assert cut.question == long.question and cut.meta["truncated_tokens"] > 0
    assert truncate_context_middle(SAMPLE, formatter, 300) is SAMPLE
