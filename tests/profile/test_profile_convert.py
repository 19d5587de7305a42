"""Converting the profiles published with the reference code (ponytaill/HeteroCache, data/clusters)."""

import json
from pathlib import Path

import pytest
import torch

from heterocache.profile import HeadProfile, ProfileError, Role
from heterocache.profile.convert import convert_upstream, parse_upstream_settings

# The published files themselves, carried as fixtures (tests/fixtures/upstream-profiles/README.md).
UPSTREAM = Path(__file__).resolve().parents[1] / "fixtures" / "upstream-profiles"
LLAMA = UPSTREAM / "Head_Analysis_llama-3.1-8b-instruct_topk1024_th0.5_sim0.5_step5000.json"
DEEPSEEK = UPSTREAM / "Head_Analysis_deepseek-r1-distill-llama-8b_topk1024_th0.5_sim0.4_step5000.json"
QWEN = UPSTREAM / "Head_Analysis_qwen2.5-14b-instruct_topk1024_th0.4_sim0.5_step5000.json"

MODELS = {  # file: (model name, layers, query heads, KV heads, head_dim)
    LLAMA: ("meta-llama/Llama-3.1-8B-Instruct", 32, 32, 8, 128),
    DEEPSEEK: ("deepseek-ai/DeepSeek-R1-Distill-Llama-8B", 32, 32, 8, 128),
    QWEN: ("Qwen/Qwen2.5-14B-Instruct", 48, 40, 8, 128),
}

def convert(path, **changes):
    name, layers, q_heads, kv_heads, head_dim = MODELS[path]
    kwargs = dict(model_name=name, num_layers=layers, num_attention_heads=q_heads, num_kv_heads=kv_heads,
                  head_dim=head_dim)
    kwargs.update(changes)
    return convert_upstream(path, **kwargs)


def published_counts(path):
    meta = json.loads(path.read_text())["meta"]
    return {Role.parse(name).label: n for name, n in meta["counts"].items()}


@pytest.mark.parametrize("path", list(MODELS), ids=lambda p: p.name.split("_")[2])
def test_converted_counts_equal_the_published_counts(path):
    assert convert(path).counts() == published_counts(path)


def test_llama_counts_are_the_papers():
    assert convert(LLAMA).counts() == {"anchor": 10, "volatile": 17, "pivot": 33, "satellite": 196}


@pytest.mark.parametrize("path", list(MODELS), ids=lambda p: p.name.split("_")[2])
def test_roles_and_shape_follow_the_json_matrices(path):
    data = json.loads(path.read_text())
    profile = convert(path)
    code_to_role = {code: Role.parse(name) for name, code in data["meta"]["type_map"].items()}
    expected = torch.tensor([[code_to_role[c] for c in row] for row in data["classification_matrix"]])
    assert torch.equal(profile.roles, expected)
    assert (profile.num_layers, profile.num_kv_heads) == (len(data["classification_matrix"]), 8)


def test_qwen_older_role_names_are_mapped():
    profile = convert(QWEN)
    assert profile.counts() == {"anchor": 37, "volatile": 25, "pivot": 55, "satellite": 267}
    assert profile.extra["upstream_type_map"]["Similar_Member"] == 4


def test_pivots_come_from_the_leader_member_relations():
    profile = convert(LLAMA)
    relations = json.loads(LLAMA.read_text())["leader_member_relations"]
    assert profile.clusters(0) == {int(k): v for k, v in relations[0].items()}
    for layer, clusters in enumerate(relations):
        assert profile.clusters(layer) == {int(k): sorted(v) for k, v in clusters.items()}


def test_budget_ratios_are_kept_and_full_heads_become_nan():
    data = json.loads(LLAMA.read_text())
    profile = convert(LLAMA)
    allocation = torch.tensor(data["allocation_matrix"])
    full = ~profile.compressed_mask()
    assert torch.isnan(profile.budget_ratios[full]).all() and (allocation[full] == -1).all()
    assert torch.allclose(profile.budget_ratios[~full], allocation[~full])
    assert profile.budget_ratios[~full].mean().item() == pytest.approx(1.0, abs=1e-5)


def test_converted_profiles_have_no_stability_and_say_so():
    profile = convert(LLAMA)
    assert profile.has_stability is False and torch.isnan(profile.stability).all()


def test_source_is_attributed():
    source = convert(DEEPSEEK).source
    assert source["repository"] == "ponytaill/HeteroCache" and source["license"] == "Apache-2.0"
    assert source["converted_from"] == f"data/clusters/{DEEPSEEK.name}"


def test_settings_come_from_the_file_name():
    assert parse_upstream_settings(DEEPSEEK.name) == {"topk": 1024, "tau_stable": 0.5, "tau_sim": 0.4,
                                                      "reference_step": 5000}
    profile = convert(QWEN)
    assert (profile.topk, profile.tau_stable, profile.tau_sim) == (1024, 0.4, 0.5)


def test_settings_can_be_overridden():
    assert convert(LLAMA, tau_sim=0.45).tau_sim == 0.45


def test_wrong_layer_count_is_rejected():
    with pytest.raises(ProfileError, match="the JSON matrices have 32 layers, but 30 were given"):
        convert(LLAMA, num_layers=30)


def test_wrong_kv_head_count_is_rejected():
    with pytest.raises(ProfileError, match="have 8 KV heads, but 4 were given"):
        convert(LLAMA, num_kv_heads=4)


def edited_copy(tmp_path, edit):
    data = json.loads(LLAMA.read_text())
    edit(data)
    path = tmp_path / LLAMA.name
    path.write_text(json.dumps(data))
    MODELS[path] = MODELS[LLAMA]
    return path


def test_counts_disagreeing_with_meta_are_rejected(tmp_path):
    path = edited_copy(tmp_path, lambda d: d["meta"]["counts"].update(anchor=11))
    with pytest.raises(ProfileError, match="differ from meta.counts"):
        convert(path)


def test_unknown_role_code_in_the_json_is_rejected(tmp_path):
    path = edited_copy(tmp_path, lambda d: d["classification_matrix"][3].__setitem__(2, 9))
    with pytest.raises(ProfileError, match="unknown role code 9 at layer 3, KV head 2"):
        convert(path)


def test_satellite_listed_under_two_pivots_is_rejected(tmp_path):
    def edit(d):
        d["leader_member_relations"][0]["1"] = [0]  # head 0 of layer 0 is already under pivot 5
    with pytest.raises(ProfileError, match="listed under two pivots"):
        convert(edited_copy(tmp_path, edit))


def test_a_file_that_is_not_a_published_profile_is_rejected(tmp_path):
    (tmp_path / "x.json").write_text('{"hello": 1}')
    MODELS[tmp_path / "x.json"] = MODELS[LLAMA]
    with pytest.raises(ProfileError, match="not a published HeteroCache profile"):
        convert(tmp_path / "x.json")


def test_cli_convert_writes_a_loadable_profile(tmp_path, capsys):
    from heterocache.profile.cli import main

    out = tmp_path / "llama.safetensors"
    assert main(["convert", str(LLAMA), "--out", str(out), "--model-name", "meta-llama/Llama-3.1-8B-Instruct",
                 "--num-attention-heads", "32", "--head-dim", "128", "--num-layers", "32"]) == 0
    assert HeadProfile.load(out).counts()["satellite"] == 196
