"""The profiler end to end on tiny random models, checked against full (eager) attention matrices."""

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from heterocache._compat import cache_kwarg
from heterocache.profile import HeadProfile, profile_model
from heterocache.profile.profiler import ProfilerSettings, collect_statistics
from heterocache.profile.recorder import ATTENTION_NAME, TopKRecorder, active, profiler_attention_enabled
from heterocache.profile.testing import random_token_texts, tiny_llama, tiny_qwen3

SETTINGS = ProfilerSettings(topk=8, prefill_tokens=48, decode_tokens=6)


def reference_statistics(model, ids, settings):
    """Stability and similarity the way the reference profiler gets them: full attention matrices
    of every layer at every step (eager attention, output_attentions=True)."""
    model.set_attn_implementation("eager")
    prompt = ids.numel()
    k = min(settings.topk, int(settings.max_topk_fraction * prompt))
    group = model.config.num_attention_heads // model.config.num_key_value_heads

    def top_sets(attentions):
        sets = []
        for layer in attentions:  # [1, Hq, q, kv]
            row = layer[0, :, -1, :prompt]
            row = row.reshape(-1, group, prompt).mean(1)
            pooled = F.avg_pool1d(row[:, None], settings.pool_kernel, 1, settings.pool_kernel // 2)[:, 0]
            sets.append([set(s.tolist()) for s in pooled.topk(k, -1).indices])
        return sets

    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model(input_ids=ids[None], **cache_kwarg(model, cache), output_attentions=True, use_cache=True)
        prefill = top_sets(out.attentions)
        steps = []
        for _ in range(settings.decode_tokens):
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            out = model(input_ids=token, **cache_kwarg(model, cache), output_attentions=True, use_cache=True)
            steps.append(top_sets(out.attentions))
    overlaps = torch.tensor([[[len(p & s) / k for p, s in zip(pl, sl)] for pl, sl in zip(prefill, step)]
                             for step in steps])
    similarity = torch.tensor([[[len(a & b) / k for b in layer] for a in layer] for layer in prefill])
    return overlaps.quantile(0.5, dim=0), similarity


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_qwen3], ids=["llama", "qwen3"])
def test_online_statistics_equal_those_from_full_attention_matrices(make_model):
    model = make_model()
    (ids,) = random_token_texts(1, 48, seed=1)
    stats = collect_statistics(model, None, [ids], SETTINGS, progress=False)
    stability, similarity = reference_statistics(make_model(), ids, SETTINGS)
    assert torch.allclose(stats.stability[0], stability)
    assert torch.allclose(stats.similarity[0], similarity)


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_qwen3], ids=["llama", "qwen3"])
def test_profile_model_end_to_end_gives_a_profile_that_fits_the_model(make_model):
    model = make_model()
    profile = profile_model(model, None, random_token_texts(3, 48), SETTINGS, progress=False)
    assert isinstance(profile, HeadProfile)
    profile.validate_for(model)
    assert profile.model_name == model.config.name_or_path
    assert profile.has_stability and ((profile.stability >= 0) & (profile.stability <= 1)).all()
    assert sum(profile.counts().values()) == 2 * 2
    assert profile.calibration["num_texts"] == 3 and profile.calibration["topk_used"]["max"] == 8


def test_profiling_is_deterministic():
    texts = random_token_texts(2, 48)
    a = profile_model(tiny_llama(), None, texts, SETTINGS, progress=False)
    b = profile_model(tiny_llama(), None, texts, SETTINGS, progress=False)
    assert a.to_bytes() == b.to_bytes()


def test_texts_are_aggregated_by_averaging_statistics_before_clustering():
    model = tiny_llama()
    texts = random_token_texts(3, 48, seed=4)
    stats = collect_statistics(model, None, texts, SETTINGS, progress=False)
    profile = profile_model(model, None, texts, SETTINGS, progress=False)
    assert torch.allclose(profile.stability, stats.stability.mean(0))


def test_the_models_attention_is_restored_after_the_run():
    model = tiny_llama()
    profile_model(model, None, random_token_texts(1, 48), SETTINGS, progress=False)
    assert model.config._attn_implementation == "sdpa"


def test_the_attention_is_restored_when_the_run_fails():
    model = tiny_llama()
    with pytest.raises(ValueError):
        profile_model(model, None, [torch.tensor([1])], SETTINGS, progress=False)  # too short
    assert model.config._attn_implementation == "sdpa"


def test_the_profiler_attention_computes_exactly_what_sdpa_computes():
    model = tiny_llama()
    (ids,) = random_token_texts(1, 40)
    with torch.no_grad():
        expected = model(input_ids=ids[None]).logits
        with profiler_attention_enabled(model):
            assert model.config._attn_implementation == ATTENTION_NAME
            recorder = TopKRecorder(2, 2, prefill_len=40, k=4, decode_steps=1)
            with active(recorder):
                got = model(input_ids=ids[None]).logits
    assert torch.equal(got, expected)


def test_short_prompts_cap_k_at_a_fraction_of_their_length():
    stats = collect_statistics(tiny_llama(), None, random_token_texts(1, 20), SETTINGS, progress=False)
    assert stats.topk_used == [5]  # min(8, 0.25 * 20)


def test_long_texts_are_truncated_to_the_prefill_length():
    stats = collect_statistics(tiny_llama(), None, random_token_texts(1, 100), SETTINGS, progress=False)
    assert stats.prompt_lengths == [48]


def test_string_texts_need_a_tokenizer():
    with pytest.raises(ValueError, match="need a tokenizer"):
        collect_statistics(tiny_llama(), None, ["some text"], SETTINGS, progress=False)


def test_settings_are_validated():
    with pytest.raises(ValueError, match="pool_kernel must be odd"):
        ProfilerSettings(pool_kernel=4)
    with pytest.raises(ValueError, match="tau_sim must be in"):
        ProfilerSettings(tau_sim=2.0)


def test_keyword_overrides_replace_settings():
    profile = profile_model(tiny_llama(), None, random_token_texts(1, 48), SETTINGS, tau_sim=0.0, progress=False)
    # every pair of heads is similar at tau_sim 0: each layer is one pivot and one satellite
    assert profile.counts() == {"anchor": 0, "volatile": 0, "pivot": 2, "satellite": 2}
    assert profile.tau_sim == 0.0


def test_a_model_whose_attention_bypasses_the_interface_is_reported():
    recorder = TopKRecorder(num_layers=2, num_kv_heads=2, prefill_len=10, k=2, decode_steps=1)
    with pytest.raises(RuntimeError, match=r"layers \[0, 1\] reported no attention at prefill"):
        recorder.next_step()


def test_memory_holds_top_k_sets_not_attention_matrices():
    recorder = TopKRecorder(num_layers=2, num_kv_heads=2, prefill_len=48, k=8, decode_steps=6)
    model = tiny_llama()
    (ids,) = random_token_texts(1, 48)
    with torch.no_grad(), profiler_attention_enabled(model), active(recorder):
        model(input_ids=ids[None])
    assert [tuple(s.shape) for s in recorder.prefill_sets] == [(2, 8), (2, 8)]
    assert recorder.overlaps.shape == (6, 2, 2) and recorder.similarity.shape == (2, 2, 2)


def test_a_cache_that_dropped_prompt_keys_is_reported():
    recorder = TopKRecorder(num_layers=1, num_kv_heads=1, prefill_len=10, k=2, decode_steps=1)
    with pytest.raises(RuntimeError, match="sees 8 keys, fewer than the 10 prompt tokens"):
        recorder.observe(0, torch.randn(1, 2, 1, 4), torch.randn(1, 1, 8, 4), None, None)


def test_the_calibration_tokens_are_identified_by_a_hash():
    texts = random_token_texts(2, 48)
    a = collect_statistics(tiny_llama(), None, texts, SETTINGS, progress=False).tokens_sha256
    b = collect_statistics(tiny_llama(), None, texts[::-1], SETTINGS, progress=False).tokens_sha256
    assert len(a) == 64 and a != b
