"""Tensor parallelism: ``torchrun --nproc_per_node 2`` (gloo, CPU) with transformers'
``tp_plan="auto"`` against one process, for every method.

Oracle: the single-process run of the same float64 model (tiny Llama and Qwen2, 4 KV heads, two
ranks of 2): the greedy tokens, the positions stored by every (layer, global KV head, row), the
aggregated memory report and, for HeteroCache with a profile whose clusters cross the shards, the
aggregated refresh statistics must be equal. float64 keeps the ranks' different reduction order
(row-parallel projections summed by an all-reduce) far from flipping a token or a top-k choice.

The worker is ``tests/engine/tp_cases.py``; the whole module is marked ``multiprocess``
(``-m "not multiprocess"`` deselects it) and skipped where torch.distributed or gloo is missing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import tp_cases
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

pytestmark = [pytest.mark.multiprocess, pytest.mark.usefixtures("one_thread")]

REPO = Path(__file__).resolve().parents[2]
SHAPE = dict(vocab_size=128, hidden_size=128, intermediate_size=128, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, max_position_embeddings=256)  # head_dim 16
MODELS = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
CASE_NAMES = [name for name, _, _ in tp_cases.CASES]


def _gloo_available() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_gloo_available()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(single-process results, two-rank results), per model and case."""
    if not _gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available")
    root = tmp_path_factory.mktemp("tp")
    dirs = []
    for name, (config_cls, model_cls) in MODELS.items():
        torch.manual_seed(0)
        model = model_cls(config_cls(**SHAPE)).to(torch.float64).eval()
        model.save_pretrained(root / name)
        dirs.append(str(root / name))
    out = root / "tp.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           str(Path(__file__).resolve().parent / "tp_cases.py"), *dirs, "--out", str(out)]
    # Start the two ranks, then compute the reference here while they run.
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        single = {Path(d).name: tp_cases.run_all(tp_cases.load(d, tensor_parallel=False)) for d in dirs}
        log, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, log[-4000:]
    return single, json.loads(out.read_text())


def _both(runs, model, case):
    single, tp = runs
    return json.loads(json.dumps(single[model][case])), tp[model][case]  # the same JSON types


@pytest.mark.parametrize("case", CASE_NAMES)
@pytest.mark.parametrize("model", list(MODELS))
def test_greedy_tokens_equal_the_single_process_run(runs, model, case):
    one, two = _both(runs, model, case)
    assert two["tokens"] == one["tokens"]


@pytest.mark.parametrize("case", CASE_NAMES)
@pytest.mark.parametrize("model", list(MODELS))
def test_stored_positions_per_layer_and_global_kv_head_equal_the_single_process_run(runs, model, case):
    one, two = _both(runs, model, case)
    assert list(two["stored"]) == list(one["stored"])  # every (layer, global head), once
    for key in one["stored"]:
        assert two["stored"][key] == one["stored"][key], key


@pytest.mark.parametrize("case", CASE_NAMES)
def test_aggregated_memory_report_is_the_whole_models(runs, case):
    one, two = _both(runs, "llama", case)
    assert one["report"]["ranks"] == 1 and two["report"]["ranks"] == 2
    for field in ("stored_tokens", "roles", "kv_heads", "device_used_bytes", "host_bytes", "dynamic_bytes"):
        assert two["report"][field] == one["report"][field], field
    assert two["report"]["kv_heads"][0] == [0, 1, 2, 3]


@pytest.mark.parametrize("case", ["heterocache", "heterocache-window", "heterocache-keys",
                                  "heterocache-pivot-offload"])
@pytest.mark.parametrize("model", list(MODELS))
def test_heterocache_refreshes_across_shards_as_one_process_does(runs, model, case):
    one, two = _both(runs, model, case)
    assert two["stats"]["ranks"] == 2
    if case in ("heterocache-keys", "heterocache-pivot-offload"):
        assert one["stats"]["reselected_heads"] > 0
    for field in ("drift_checks", "refreshes", "refreshes_per_layer_pivot", "satellite_refills", "tokens_moved",
                  "bytes_moved", "reselected_heads"):
        assert two["stats"][field] == one["stats"][field], field
    if case == "heterocache-pivot-offload":  # no clusters: nothing checked or refreshed by a pivot
        assert one["stats"]["drift_checks"] == one["stats"]["refreshes"] == 0
    if case == "heterocache":  # the second turn refreshes every pivot
        # So the clusters that cross the shards were refreshed: layer 0's pivot 0 (a satellite on
        # each rank) and layer 1's pivot 3 (rank 1), whose satellite is on rank 0.
        refreshed = one["stats"]["refreshes_per_layer_pivot"]
        assert refreshed.get("0:0", 0) > 0 and refreshed.get("1:3", 0) > 0, refreshed
        assert one["stats"]["satellite_refills"] > 0


@pytest.mark.parametrize("model", list(MODELS))
def test_cake_layer_budgets_agree_across_ranks(runs, model):
    one, two = _both(runs, model, "cake")
    assert len(two["layer_budgets"]) == 2
    assert two["layer_budgets"][0] == two["layer_budgets"][1] == one["layer_budgets"][0]
    # Not the uniform split: the test would not see a rank deciding from its own heads otherwise.
    assert len(set(one["layer_budgets"][0][0])) > 1
