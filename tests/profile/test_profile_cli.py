"""`heterocache profile ...`: run, show, plot, compare, list, and the short form `profile MODEL`."""

import json

import pytest

from heterocache.profile import HeadProfile
from heterocache.profile.cli import main
from heterocache.profile.testing import tiny_llama, toy_profile

TINY_RUN = ["--num-texts", "2", "--prefill-tokens", "48", "--decode-tokens", "3", "--topk", "8", "--no-progress"]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama saved like a Hub checkpoint, with a word-level tokenizer of 128 entries."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from heterocache.profile._calibration_words import WORDS

    words = sorted({w.lower() for key in ("noun", "adjective", "occupation", "industry", "month") for w in WORDS[key]})
    vocab = {"[UNK]": 0, "<s>": 1}
    for word in words[:126]:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", bos_token="<s>")
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_run_profiles_a_local_model_folder(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "tiny.safetensors"
    assert main(["run", str(tiny_model_dir), "--out", str(out), *TINY_RUN]) == 0
    profile = HeadProfile.load(out)
    assert (profile.num_layers, profile.num_kv_heads, profile.head_dim) == (2, 2, 16)
    assert profile.calibration["command"] == (
        f"heterocache profile run {tiny_model_dir} --out {out} --num-texts 2 --seed 0 --prefill-tokens 48 "
        "--decode-tokens 3 --topk 8 --max-topk-fraction 0.25 --tau-stable 0.5 --tau-sim 0.5 --pool-kernel 5")
    assert "wrote" in capsys.readouterr().out


def test_profile_model_without_run_is_short_for_run(tiny_model_dir, tmp_path):
    out = tmp_path / "short.safetensors"
    assert main([str(tiny_model_dir), "--out", str(out), *TINY_RUN, "--model-name", "tiny/llama"]) == 0
    assert HeadProfile.load(out).model_name == "tiny/llama"


def test_run_reads_a_calibration_folder(tiny_model_dir, tmp_path):
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "a.txt").write_text(" ".join(["harbour garden bridge archive"] * 30))
    out = tmp_path / "cal.safetensors"
    assert main(["run", str(tiny_model_dir), "--out", str(out), "--calibration", str(texts), *TINY_RUN]) == 0
    calibration = HeadProfile.load(out).calibration
    assert calibration["num_texts"] == 1 and "--calibration" in calibration["command"]


def test_top_level_cli_has_the_profile_command():
    from heterocache.cli import build_parser

    args = build_parser().parse_args(["profile", "show", "x"])
    assert args.profile_command == "show" and callable(args.func)


def test_short_form_parses_to_run():
    from heterocache.cli import build_parser

    args = build_parser().parse_args(["profile", "smollm2", "--out", "p.safetensors", "--topk", "64"])
    assert (args.profile_command, args.model, args.out, args.topk) == ("run", "smollm2", "p.safetensors", 64)


def test_show_prints_counts_and_a_per_layer_table(tmp_path, capsys):
    toy_profile().save(tmp_path / "p.safetensors")
    assert main(["show", str(tmp_path / "p.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "satellite        4   33.3%" in out and "anchor           3   25.0%" in out
    assert "    0  1  0  1  2     P  S0  S0   A" in out
    assert "    2  1  1  1  1    S3   V   A   P" in out


def test_show_with_stability_prints_the_scores(tmp_path, capsys):
    toy_profile().save(tmp_path / "p.safetensors")
    main(["show", str(tmp_path / "p.safetensors"), "--stability"])
    assert "0.95" in capsys.readouterr().out


def test_show_a_bundled_profile_by_short_name(capsys):
    assert main(["show", "llama-3.1-8b-instruct"]) == 0
    out = capsys.readouterr().out
    assert "anchor          10    3.9%" in out and "ponytaill/HeteroCache" in out


def test_a_missing_profile_is_an_argument_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["show", str(tmp_path / "missing.safetensors")])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("heterocache profile show: error: argument PROFILE: no head profile") and err.count("\n") == 1


def test_compare_prints_agreement(tmp_path, capsys):
    toy_profile().save(tmp_path / "a.safetensors")
    assert main(["compare", str(tmp_path / "a.safetensors"), str(tmp_path / "a.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "same role               1.000" in out and "stability Spearman      1.000" in out


def test_compare_json(tmp_path, capsys):
    toy_profile().save(tmp_path / "a.safetensors")
    main(["compare", str(tmp_path / "a.safetensors"), str(tmp_path / "a.safetensors"), "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["role_agreement"] == 1.0 and result["confusion"]["pivot"]["pivot"] == 3


def test_plot_writes_the_image(tmp_path):
    pytest.importorskip("matplotlib")
    toy_profile().save(tmp_path / "p.safetensors")
    assert main(["plot", str(tmp_path / "p.safetensors"), "--out", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_list_names_the_bundled_profiles(capsys):
    assert main(["list"]) == 0
    assert "meta-llama/Llama-3.1-8B-Instruct" in capsys.readouterr().out
