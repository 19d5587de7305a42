"""The profile file: one .safetensors file, tensors + JSON metadata, no pickle."""

import json
import math
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load as safetensors_load
from safetensors.torch import save_file as st_save_file

from heterocache.profile import FORMAT_TAG, FORMAT_VERSION, HeadProfile, ProfileError, ProfileNotFoundError
from heterocache.profile.format import encode
from heterocache.profile.testing import toy_profile

METADATA = ("model_name", "num_attention_heads", "head_dim", "revision", "tau_stable", "tau_sim", "topk",
            "calibration", "source", "library_version", "has_stability", "extra")


def assert_same(a: HeadProfile, b: HeadProfile) -> None:
    for name in ("roles", "pivots"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    for name in ("stability", "budget_ratios"):
        assert torch.allclose(getattr(a, name), getattr(b, name), equal_nan=True), name
    for name in METADATA:
        assert getattr(a, name) == getattr(b, name), name


def test_save_then_load_gives_the_same_profile(tmp_path):
    profile = toy_profile(extra={"note": "hello"})
    profile.save(tmp_path / "p.safetensors")
    assert_same(HeadProfile.load(tmp_path / "p.safetensors"), profile)


def test_same_profile_gives_identical_bytes():
    assert toy_profile().to_bytes() == toy_profile().to_bytes()


def test_bytes_load_with_plain_safetensors():
    tensors = safetensors_load(toy_profile().to_bytes())
    assert torch.equal(tensors["roles"].long(), toy_profile().roles)


def test_to_bytes_is_the_file_content(tmp_path):
    profile = toy_profile()
    profile.save(tmp_path / "p.safetensors")
    assert (tmp_path / "p.safetensors").read_bytes() == profile.to_bytes()


def test_profile_without_stability_round_trips_with_nan_and_flag(tmp_path):
    profile = toy_profile(has_stability=False)
    profile.save(tmp_path / "p.safetensors")
    loaded = HeadProfile.load(tmp_path / "p.safetensors")
    assert loaded.has_stability is False
    assert torch.isnan(loaded.stability).all()


def test_file_is_plain_safetensors_with_string_metadata(tmp_path):
    toy_profile().save(tmp_path / "p.safetensors")
    with safe_open(str(tmp_path / "p.safetensors"), framework="pt") as f:
        metadata = f.metadata()
        assert sorted(f.keys()) == ["budget_ratios", "pivots", "roles", "stability"]
        assert f.get_tensor("roles").dtype == torch.int8
    assert metadata["format"] == FORMAT_TAG and metadata["format_version"] == str(FORMAT_VERSION)
    assert json.loads(metadata["shape"]) == {"num_layers": 3, "num_attention_heads": 8,
                                             "num_key_value_heads": 4, "head_dim": 16}
    assert json.loads(metadata["role_codes"]) == {"anchor": 1, "volatile": 2, "pivot": 3, "satellite": 4}
    assert all(isinstance(v, str) for v in metadata.values())


def test_metadata_is_strict_json_even_with_nan_values():
    _, metadata = encode(toy_profile(has_stability=False))
    for key, value in metadata.items():
        if key not in ("format", "format_version"):
            json.loads(value, parse_constant=lambda c: pytest.fail(f"{key} holds {c}"))


def test_save_creates_parent_folders(tmp_path):
    toy_profile().save(tmp_path / "a" / "b" / "p.safetensors")
    assert (tmp_path / "a" / "b" / "p.safetensors").is_file()


def test_missing_file_raises_profile_not_found(tmp_path):
    with pytest.raises(ProfileNotFoundError, match="no head profile file"):
        HeadProfile.load(tmp_path / "nope.safetensors")


def test_foreign_safetensors_file_is_rejected(tmp_path):
    st_save_file({"weight": torch.zeros(2, 2)}, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ProfileError, match="not a heterocache head profile"):
        HeadProfile.load(tmp_path / "model.safetensors")


def test_corrupted_file_is_rejected(tmp_path):
    data = toy_profile().to_bytes()
    (tmp_path / "p.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ProfileError, match="not a valid safetensors file"):
        HeadProfile.load(tmp_path / "p.safetensors")


def test_json_file_is_rejected_with_a_hint_to_convert(tmp_path):
    (tmp_path / "profile.json").write_text('{"meta": {}}')
    with pytest.raises(ProfileError, match="profile convert"):
        HeadProfile.load(tmp_path / "profile.json")


def _rewrite_metadata(tmp_path, **changes):
    tensors, metadata = encode(toy_profile())
    metadata.update(changes)
    metadata = {k: v for k, v in metadata.items() if v is not None}
    st_save_file(tensors, str(tmp_path / "p.safetensors"), metadata=metadata)
    return tmp_path / "p.safetensors"


def test_newer_format_version_is_rejected(tmp_path):
    path = _rewrite_metadata(tmp_path, format_version=str(FORMAT_VERSION + 1))
    with pytest.raises(ProfileError, match="newer"):
        HeadProfile.load(path)


def test_malformed_metadata_json_is_rejected(tmp_path):
    path = _rewrite_metadata(tmp_path, calibration="{not json")
    with pytest.raises(ProfileError, match="'calibration' is not valid JSON"):
        HeadProfile.load(path)


def test_missing_shape_metadata_is_rejected(tmp_path):
    path = _rewrite_metadata(tmp_path, shape=None)
    with pytest.raises(ProfileError, match="'shape' is missing"):
        HeadProfile.load(path)


def test_metadata_shape_disagreeing_with_tensors_is_rejected(tmp_path):
    shape = {"num_layers": 5, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 16}
    path = _rewrite_metadata(tmp_path, shape=json.dumps(shape))
    with pytest.raises(ProfileError, match="num_layers=5 but the tensors have 3"):
        HeadProfile.load(path)


def test_missing_tensor_is_rejected(tmp_path):
    tensors, metadata = encode(toy_profile())
    del tensors["pivots"]
    st_save_file(tensors, str(tmp_path / "p.safetensors"), metadata=metadata)
    with pytest.raises(ProfileError, match=r"missing tensors \['pivots'\]"):
        HeadProfile.load(tmp_path / "p.safetensors")


def test_error_message_names_the_file(tmp_path):
    path = _rewrite_metadata(tmp_path, format="something-else")
    with pytest.raises(ProfileError, match=str(path)):
        HeadProfile.load(path)


def test_file_holds_no_pickle(tmp_path):
    toy_profile().save(tmp_path / "p.safetensors")
    raw = (tmp_path / "p.safetensors").read_bytes()
    header_len = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + header_len])  # the header is JSON; the rest is raw tensor bytes
    data = raw[8 + header_len:]
    assert sum(math.prod(t["shape"]) * {"I8": 1, "I32": 4, "F32": 4}[t["dtype"]]
               for k, t in header.items() if k != "__metadata__") == len(data)
