"""Calibration texts: the built-in generator (no download) and user files."""

import json

import pytest

from heterocache.profile.calibration import default_calibration_texts, generate_text, load_calibration


def word_tokenizer(text, add_special_tokens=True):
    """Stand-in tokenizer: one token per whitespace-separated word."""
    return {"input_ids": text.split()}


def test_same_seed_gives_the_same_texts():
    assert default_calibration_texts(3, 300, seed=7) == default_calibration_texts(3, 300, seed=7)


def test_different_seeds_give_disjoint_sets_of_texts():
    a, b = default_calibration_texts(4, 300, seed=0), default_calibration_texts(4, 300, seed=1)
    assert not set(a) & set(b)


def test_texts_within_a_set_differ():
    texts = default_calibration_texts(5, 300)
    assert len(set(texts)) == 5


def test_texts_reach_the_requested_length_in_tokenizer_tokens():
    for text in default_calibration_texts(3, 5000, tokenizer=word_tokenizer):
        assert len(word_tokenizer(text)["input_ids"]) >= 5000


def test_without_a_tokenizer_length_is_estimated_with_a_margin():
    text = generate_text(seed=0, index=0, min_tokens=5000)
    assert len(text.split()) * 1.3 >= 5000


def test_texts_read_like_encyclopedia_articles():
    text = generate_text(seed=0, index=0, min_tokens=2000)
    assert "\n\n== " in text and text.count(". ") > 50
    assert "{" not in text and "}" not in text  # every template slot was filled


def test_load_calibration_from_a_folder_of_text_files(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "notes.md").write_text("ignored")
    assert load_calibration(tmp_path) == ["first", "second"]


def test_load_calibration_from_jsonl(tmp_path):
    path = tmp_path / "texts.jsonl"
    path.write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps("two") + "\n")
    assert load_calibration(path) == ["one", "two"]


def test_load_calibration_from_json_list(tmp_path):
    path = tmp_path / "texts.json"
    path.write_text(json.dumps(["one", {"text": "two"}]))
    assert load_calibration(path) == ["one", "two"]


def test_load_calibration_from_a_single_text_file(tmp_path):
    (tmp_path / "book.txt").write_text("a whole book")
    assert load_calibration(tmp_path / "book.txt") == ["a whole book"]


def test_empty_calibration_data_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no calibration text"):
        load_calibration(tmp_path)


def test_missing_calibration_path_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_calibration(tmp_path / "missing.jsonl")


def test_malformed_json_entry_is_an_error(tmp_path):
    path = tmp_path / "texts.json"
    path.write_text(json.dumps([{"content": "x"}]))
    with pytest.raises(ValueError, match="'text' string"):
        load_calibration(path)


def test_generator_output_is_pinned():
    # The bundled SmolLM2 profile was made from these texts (see profiles/README.md). If this
    # fails, the generator changed: regenerate that profile with the command recorded in it.
    import hashlib

    assert hashlib.sha256(generate_text(0, 0, 3000).encode()).hexdigest() == (
        "c021a8a2bc45db25745d24378baf8e60d819ad427eab53820b4982021b54210f")
