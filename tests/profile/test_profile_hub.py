"""Loading profiles from files, folders and the Hub (through huggingface_hub's own cache, offline).

The Hub tests build the cache layout huggingface_hub reads (models--org--name/{refs, snapshots,
blobs}) in a temporary folder and run in offline mode, so huggingface_hub serves the files from
that cache exactly as it would after a download; nothing of ours is mocked.
"""

import hashlib
import os
import subprocess
import sys

import huggingface_hub
import pytest

from heterocache.profile import PROFILE_FILENAME, HeadProfile, ProfileError, ProfileNotFoundError, profile_for_model
from heterocache.profile.testing import toy_profile

SHA_MAIN = "a" * 40
SHA_V2 = "b" * 40


def add_snapshot(cache, repo_id, commit, profile, refs=("main",), filename=PROFILE_FILENAME):
    """Put ``profile`` into the hub cache as ``filename`` of ``repo_id`` at ``commit``."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    data = profile.to_bytes()
    blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    link = repo / "snapshots" / commit / filename
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty hub cache used by huggingface_hub in offline mode (HF_HUB_OFFLINE=1, HF_HUB_CACHE)."""
    cache = tmp_path / "hub"
    cache.mkdir()
    # huggingface_hub reads these environment variables at import; set both the variables and
    # the constants it derived from them.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_from_pretrained_reads_a_file(tmp_path):
    toy_profile().save(tmp_path / "p.safetensors")
    assert HeadProfile.from_pretrained(tmp_path / "p.safetensors").model_name == "toy/toy-model"


def test_from_pretrained_reads_the_default_file_of_a_folder(tmp_path):
    toy_profile().save(tmp_path / PROFILE_FILENAME)
    assert HeadProfile.from_pretrained(tmp_path).num_layers == 3


def test_folder_lookup_skips_safetensors_files_that_are_not_profiles(tmp_path):
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    toy_profile().save(tmp_path / "my_profile.safetensors")
    assert HeadProfile.from_pretrained(tmp_path).model_name == "toy/toy-model"


def test_folder_with_two_profiles_is_ambiguous(tmp_path):
    toy_profile().save(tmp_path / "a.safetensors")
    toy_profile().save(tmp_path / "b.safetensors")
    with pytest.raises(ProfileError, match="several head profiles"):
        HeadProfile.from_pretrained(tmp_path)


def test_folder_without_a_profile_is_not_found(tmp_path):
    with pytest.raises(ProfileNotFoundError, match="no 'heterocache_profile.safetensors'"):
        HeadProfile.from_pretrained(tmp_path)


def test_hub_repo_is_read_from_the_cache_offline(offline_hub):
    add_snapshot(offline_hub, "someone/toy-profile", SHA_MAIN, toy_profile())
    profile = HeadProfile.from_pretrained("someone/toy-profile")
    assert profile.model_name == "toy/toy-model" and profile.counts()["satellite"] == 4


def test_hub_revision_selects_a_branch_or_a_commit(offline_hub):
    add_snapshot(offline_hub, "someone/toy-profile", SHA_MAIN, toy_profile(model_name="toy/main"))
    add_snapshot(offline_hub, "someone/toy-profile", SHA_V2, toy_profile(model_name="toy/v2"), refs=("v2",))
    assert HeadProfile.from_pretrained("someone/toy-profile").model_name == "toy/main"
    assert HeadProfile.from_pretrained("someone/toy-profile", revision="v2").model_name == "toy/v2"
    assert HeadProfile.from_pretrained("someone/toy-profile", revision=SHA_MAIN).model_name == "toy/main"


def test_hub_custom_filename_and_explicit_cache_dir(offline_hub, tmp_path):
    other_cache = tmp_path / "other-cache"
    add_snapshot(other_cache, "someone/toy-profile", SHA_MAIN, toy_profile(), filename="profiles/alt.safetensors")
    profile = HeadProfile.from_pretrained("someone/toy-profile", filename="profiles/alt.safetensors",
                                          cache_dir=other_cache)
    assert profile.num_kv_heads == 4


def test_hub_repo_missing_from_the_offline_cache_is_not_found(offline_hub):
    with pytest.raises(ProfileNotFoundError, match="Hub repository 'someone/absent' has no usable"):
        HeadProfile.from_pretrained("someone/absent")


def test_unknown_revision_offline_is_not_found(offline_hub):
    add_snapshot(offline_hub, "someone/toy-profile", SHA_MAIN, toy_profile())
    with pytest.raises(ProfileNotFoundError, match="at revision 'nope'"):
        HeadProfile.from_pretrained("someone/toy-profile", revision="nope")


def test_profile_for_model_finds_the_profile_in_the_models_hub_repo(offline_hub):
    from transformers import LlamaConfig

    add_snapshot(offline_hub, "toy/toy-model", SHA_MAIN, toy_profile())
    config = LlamaConfig(num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=4, head_dim=16,
                         hidden_size=128, name_or_path="toy/toy-model")
    assert profile_for_model(config).model_name == "toy/toy-model"


def test_profile_for_model_checks_the_shape_of_what_it_found(offline_hub):
    from heterocache.profile.testing import tiny_llama

    model = tiny_llama()
    add_snapshot(offline_hub, model.config.name_or_path, SHA_MAIN, toy_profile())
    with pytest.raises(ProfileError, match="does not fit model 'tiny/llama'"):
        profile_for_model(model)


def test_profile_for_model_reads_a_profile_beside_local_weights(tmp_path):
    from heterocache.profile.testing import tiny_llama

    model = tiny_llama()
    model.config.name_or_path = str(tmp_path)
    profile = HeadProfile(roles=[[3, 4], [1, 2]], stability=[[0.4, 0.6], [0.7, 0.1]],
                          budget_ratios=[[0, 0.9], [1.1, 0]], pivots=[[-1, 0], [-1, -1]],
                          model_name=str(tmp_path), num_attention_heads=4, head_dim=16)
    profile.save(tmp_path / PROFILE_FILENAME)
    assert profile_for_model(model).counts() == {"anchor": 1, "volatile": 1, "pivot": 1, "satellite": 1}


def test_profile_for_model_explains_how_to_make_a_missing_profile(offline_hub):
    with pytest.raises(ProfileNotFoundError) as info:
        profile_for_model("someone/Unprofiled-7B")
    message = str(info.value)
    assert "heterocache profile run someone/Unprofiled-7B --out someone--Unprofiled-7B.safetensors" in message
    assert "not bundled" in message and "not on the Hub" in message


def test_push_to_hub_goes_through_huggingface_hub(offline_hub):
    # Without network only the hand-over can be checked: huggingface_hub refuses in offline mode.
    with pytest.raises(huggingface_hub.errors.OfflineModeIsEnabled):
        toy_profile().push_to_hub("someone/toy-profile")


def test_cli_reads_a_hub_profile_with_hf_hub_offline_env(tmp_path):
    cache = tmp_path / "hub"
    add_snapshot(cache, "someone/toy-profile", SHA_MAIN, toy_profile())
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    result = subprocess.run([sys.executable, "-m", "heterocache.profile", "show", "someone/toy-profile"],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "toy/toy-model" in result.stdout and "satellite" in result.stdout


@pytest.fixture
def unreachable_hub(tmp_path, monkeypatch):
    """Online mode with an empty cache and a Hub that cannot be reached; every hf_hub_download call
    is recorded (a call that would go to the network fails the test)."""
    from heterocache.profile.io import hub

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub, "_unreachable_reason", lambda timeout=3.0: "example.invalid:443: no route")
    calls = []
    real = huggingface_hub.hf_hub_download

    def recording(*args, **kwargs):
        calls.append(kwargs.get("local_files_only", False))
        if not kwargs.get("local_files_only", False):
            raise AssertionError("went to the network although the Hub is unreachable")
        return real(*args, cache_dir=str(cache), **{k: v for k, v in kwargs.items() if k != "cache_dir"})

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", recording)
    return cache, calls


def test_an_unreachable_hub_fails_at_once_with_the_reason(unreachable_hub):
    cache, calls = unreachable_hub
    with pytest.raises(ProfileNotFoundError, match="the Hub cannot be reached .*no route.*HF_HUB_OFFLINE=1"):
        HeadProfile.from_pretrained("someone/absent")
    assert calls == [True]  # only the local cache was asked


def test_an_unreachable_hub_still_serves_a_cached_profile(unreachable_hub):
    cache, calls = unreachable_hub
    add_snapshot(cache, "someone/toy-profile", SHA_MAIN, toy_profile())
    assert HeadProfile.from_pretrained("someone/toy-profile").num_kv_heads == 4
    assert calls == [True]


@pytest.mark.parametrize("typo", ["HuggingFaceTB/SmolLM2-135M-Instruc", "huggingfacetb/smollm2-135m-instrukt",
                                  "meta-llama/Llama-3.1-8B-Instrct"])
def test_a_typo_in_a_bundled_name_suggests_the_bundled_profile(offline_hub, typo):
    from heterocache.profile.io.bundled import bundled_profiles

    with pytest.raises(ProfileNotFoundError, match="Did you mean the bundled") as info:
        HeadProfile.from_pretrained(typo)
    suggested = str(info.value).split("Did you mean the bundled '")[1].split("'")[0]
    assert suggested in bundled_profiles() and suggested.split("/")[1].lower()[:8] == typo.split("/")[1].lower()[:8]


def test_a_name_far_from_every_bundled_one_suggests_nothing(offline_hub):
    with pytest.raises(ProfileNotFoundError) as info:
        HeadProfile.from_pretrained("someone/absent")
    assert "Did you mean" not in str(info.value)
