"""Every way a profile can be malformed or not fit its model raises ProfileError naming the problem."""

import pytest
import torch
from safetensors.torch import save_file as st_save_file
from transformers import LlamaConfig

from heterocache.profile import HeadProfile, ProfileError
from heterocache.profile.format import encode
from heterocache.profile.testing import tiny_llama, toy_profile


def edited(name, layer, head, value):
    """toy_profile() with one tensor entry changed."""
    tensor = getattr(toy_profile(), name).clone()
    tensor[layer, head] = value
    return {name: tensor}


def test_profile_error_is_a_value_error():
    assert issubclass(ProfileError, ValueError)


def test_unknown_role_code_is_named_with_its_position():
    with pytest.raises(ProfileError, match=r"unknown role code 7 at layer 1, KV head 2"):
        toy_profile(**edited("roles", 1, 2, 7))


def test_role_code_zero_is_unknown():
    with pytest.raises(ProfileError, match="unknown role code 0"):
        toy_profile(roles=torch.zeros(3, 4, dtype=torch.long), pivots=torch.full((3, 4), -1))


def test_unknown_role_code_in_a_file_is_rejected_on_load(tmp_path):
    tensors, metadata = encode(toy_profile())
    tensors["roles"][0, 3] = 9
    st_save_file(tensors, str(tmp_path / "p.safetensors"), metadata=metadata)
    with pytest.raises(ProfileError, match=r"p.safetensors: unknown role code 9 at layer 0, KV head 3"):
        HeadProfile.load(tmp_path / "p.safetensors")


def test_float_roles_are_rejected():
    with pytest.raises(ProfileError, match="roles must be an integer tensor"):
        toy_profile(roles=toy_profile().roles.float())


def test_satellite_without_pivot_is_rejected():
    with pytest.raises(ProfileError, match=r"satellite at layer 0, KV head 1 has no pivot"):
        toy_profile(**edited("pivots", 0, 1, -1))


def test_satellite_with_pivot_outside_the_layer_is_rejected():
    with pytest.raises(ProfileError, match=r"points to pivot 4, outside the layer's KV heads \[0, 4\)"):
        toy_profile(**edited("pivots", 0, 1, 4))


def test_satellite_pointing_to_itself_is_rejected():
    with pytest.raises(ProfileError, match="is its own pivot"):
        toy_profile(**edited("pivots", 0, 1, 1))


def test_satellite_pointing_to_a_non_pivot_is_rejected():
    # layer 0: P S0 S0 A -- head 3 is an anchor
    with pytest.raises(ProfileError, match=r"points to KV head 3 of the same layer, which is an anchor, not a pivot"):
        toy_profile(**edited("pivots", 0, 1, 3))


def test_non_satellite_with_a_pivot_is_rejected():
    with pytest.raises(ProfileError, match=r"layer 0, KV head 3 is an anchor but has pivot 0"):
        toy_profile(**edited("pivots", 0, 3, 0))


def test_pivot_without_satellites_is_rejected():
    # layer 2: S3 V A P -- turn the only satellite into an anchor
    fields = edited("roles", 2, 0, 1)
    fields.update(edited("pivots", 2, 0, -1))
    with pytest.raises(ProfileError, match=r"pivot at layer 2, KV head 3 has no satellites"):
        toy_profile(**fields)


def test_tensors_of_different_shapes_are_rejected():
    with pytest.raises(ProfileError, match=r"stability has shape \(3, 5\), expected \(3, 4\)"):
        toy_profile(stability=torch.zeros(3, 5))


def test_compressed_head_without_budget_ratio_is_rejected():
    with pytest.raises(ProfileError, match=r"anchor at layer 0, KV head 3 has budget ratio nan"):
        toy_profile(**edited("budget_ratios", 0, 3, float("nan")))


def test_budget_ratios_of_full_heads_are_stored_as_nan():
    profile = toy_profile(**edited("budget_ratios", 0, 0, -1.0))  # head 0 of layer 0 is a pivot
    assert torch.isnan(profile.budget_ratios[0, 0])


def test_stability_outside_unit_interval_is_rejected():
    with pytest.raises(ProfileError, match=r"stability at layer 2, KV head 1 is 1.5"):
        toy_profile(**edited("stability", 2, 1, 1.5))


def test_query_heads_not_a_multiple_of_kv_heads_is_rejected():
    with pytest.raises(ProfileError, match="num_attention_heads=6 is not a multiple of the 4 KV heads"):
        toy_profile(num_attention_heads=6)


def test_invalid_threshold_is_rejected():
    with pytest.raises(ProfileError, match="tau_sim=1.5"):
        toy_profile(tau_sim=1.5)


def config(**changes):
    fields = dict(num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=4, head_dim=16, hidden_size=128)
    fields.update(changes)
    return LlamaConfig(**fields)


def test_validate_for_accepts_a_matching_config():
    profile = toy_profile()
    assert profile.validate_for(config(name_or_path="toy/toy-model")) is profile


def test_validate_for_names_a_layer_mismatch():
    with pytest.raises(ProfileError, match="layers: profile 3 != model 30"):
        toy_profile().validate_for(config(num_hidden_layers=30))


def test_validate_for_names_a_kv_head_mismatch():
    with pytest.raises(ProfileError, match="KV heads: profile 4 != model 2"):
        toy_profile().validate_for(config(num_key_value_heads=2))


def test_validate_for_names_a_head_dim_mismatch():
    with pytest.raises(ProfileError, match="head_dim: profile 16 != model 64"):
        toy_profile().validate_for(config(head_dim=64))


def test_validate_for_lists_every_mismatch_at_once():
    with pytest.raises(ProfileError, match="layers: .*KV heads: .*head_dim: "):
        toy_profile().validate_for(config(num_hidden_layers=2, num_key_value_heads=2, head_dim=32))


def test_validate_for_reads_a_model_and_plain_dicts():
    with pytest.raises(ProfileError, match="does not fit model 'tiny/llama'"):
        toy_profile().validate_for(tiny_llama())
    toy_profile().validate_for({"num_hidden_layers": 3, "num_attention_heads": 8, "num_key_value_heads": 4,
                                "hidden_size": 128})


def test_validate_for_warns_when_only_the_model_name_differs():
    with pytest.warns(UserWarning, match="made for 'toy/toy-model' but is used with 'other/model'"):
        toy_profile().validate_for(config(name_or_path="other/model"))
