"""The Triton decode kernel under the Triton interpreter (CPU), against the PyTorch reference.

``TRITON_INTERPRET=1`` must be set before triton is imported, and pytest imports every test
module into one process, so the kernels run in a subprocess: this file, executed as a script,
is the worker. It runs every case once and prints one JSON line of errors; the tests read it.
Shapes are small (the interpreter runs each program in Python).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parents[2] / "src")
NAN = float("nan")

# name: (lengths, G, D, dtype, kernel kwargs, garbage)
CASES = {
    "mha_fp32_gemv_one_split": ([0, 1, 37, 100, 64], 1, 64, "float32", {}, NAN),
    "gqa3_d80_fp32_dot": ([5, 0, 130, 1], 3, 80, "float32", {}, 1e30),
    "gqa7_bf16_dot_4_splits": ([5, 0, 130, 64, 1], 7, 64, "bfloat16", {"num_splits": 4, "block_n": 16}, NAN),
    "gqa7_d80_fp32_dot_3_splits": ([90, 1, 0, 47], 7, 80, "float32", {"num_splits": 3, "block_n": 16}, 1e30),
    "gqa3_d80_fp16_broadcast_3_splits": ([200, 1, 0], 3, 80, "float16",
                                         {"num_splits": 3, "block_n": 16, "use_dot": False}, NAN),
    "mha_d80_bf16_5_splits": ([200, 1, 0, 33], 1, 80, "bfloat16", {"num_splits": 5, "block_n": 16}, NAN),
    "gqa3_more_splits_than_tiles": ([40, 3], 3, 64, "float32", {"num_splits": 64, "block_n": 16}, NAN),
    "gqa3_all_empty_split_path": ([0, 0], 3, 64, "float32", {"num_splits": 4, "block_n": 16}, NAN),
    "gqa3_all_empty_single_path": ([0, 0], 3, 64, "float32", {}, NAN),
    "gqa3_heuristic_splits_long": ([1500, 3, 0, 700], 3, 64, "bfloat16", {}, NAN),
    "gqa3_no_sync_args": ([150, 3, 0], 3, 64, "float32", {"num_splits": 2, "max_len": 150}, NAN),
}
TOL = {"float32": 2e-5, "bfloat16": 2e-2, "float16": 3e-3}


def _worker() -> None:
    os.environ["TRITON_INTERPRET"] = "1"
    import torch

    from heterocache.attention.kernels import ragged_decode_attention
    from heterocache.attention.kernels.ragged_decode import ragged_decode_attention_torch
    from heterocache.attention.kernels.testing import make_ragged_case
    from heterocache.attention.kernels.triton_decode import choose_num_splits, ragged_decode_attention_triton

    def compare(case, kw):
        scale = case["q"].shape[-1] ** -0.5
        out, lse = ragged_decode_attention_triton(**case, scale=scale, return_lse=True, **kw)
        ref, ref_lse = ragged_decode_attention_torch(**case, scale=scale, return_lse=True)
        fin = torch.isfinite(ref_lse)
        return {
            "err": (out.float() - ref.float()).abs().max().item() if out.numel() else 0.0,
            "lse_err": (lse - ref_lse)[fin].abs().max().item() if fin.any() else 0.0,
            "lse_inf_match": bool(torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))),
            "nan": bool(out.isnan().any() or lse.isnan().any()),
            "empty_zero": bool((out[case["seg_len"] == 0] == 0).all()),
            "dtype_ok": out.dtype == case["q"].dtype and lse.dtype == torch.float32,
        }

    results = {}
    for i, (name, (lens, G, D, dt, kw, garbage)) in enumerate(CASES.items()):
        case = make_ragged_case(lens, G, D, getattr(torch, dt), garbage=garbage, seed=i)
        results[name] = compare(case, kw)
    results["gqa3_heuristic_splits_long"]["splits"] = choose_num_splits(1500, 2203, 4)

    # Strided q and a fused [T, 2, D] KV buffer, int32 lengths.
    case = make_ragged_case([70, 0, 5], 3, 64, torch.float16, seed=99, seg_len_dtype=torch.int32)
    kv = torch.stack([case["k_buf"], case["v_buf"]], dim=1)
    case.update(q=case["q"].transpose(0, 1).contiguous().transpose(0, 1), k_buf=kv[:, 0], v_buf=kv[:, 1])
    results["strided_int32_fp16"] = compare(case, {"num_splits": 2, "block_n": 32})

    # An empty buffer (T = 0): nothing is launched, all segments are empty.
    case = make_ragged_case([0, 0], 3, 64, max_gap=0)
    out, lse = ragged_decode_attention_triton(**case, scale=0.1, return_lse=True)
    results["empty_buffer"] = {
        "T": case["k_buf"].shape[0], "zeros": bool((out == 0).all()), "neginf": bool(torch.isneginf(lse).all())
    }
    try:
        ragged_decode_attention_triton(**make_ragged_case([3], 3, 64), scale=0.1, block_n=8)
        results["bad_block_n"] = "no error"
    except ValueError as e:
        results["bad_block_n"] = str(e)

    # The dispatcher, forced to triton on CPU tensors (runs because the interpreter is on).
    case = make_ragged_case([9, 0, 20], 7, 64, seed=100)
    out = ragged_decode_attention(**case, scale=0.125, backend="triton")
    ref = ragged_decode_attention_torch(**case, scale=0.125)
    results["dispatcher_forced_triton"] = {"err": (out - ref).abs().max().item(), "nan": bool(out.isnan().any())}
    # Table mode (a per-step selection: Quest's pages): against the gather + SDPA oracle, with
    # unused entries anywhere (whole leading tiles too), a segment with none, several splits.
    from heterocache.attention.kernels.triton_decode import table_decode_attention_triton

    g = torch.Generator().manual_seed(7)
    T, S, N = 300, 4, 70
    for name, (G, D, dt, kw) in {"table_gqa3_fp32": (3, 64, torch.float32, {"block_n": 16}),
                                 "table_gqa3_fp32_3_splits": (3, 64, torch.float32, {"block_n": 16, "num_splits": 3}),
                                 "table_mha_bf16_gemv": (1, 64, torch.bfloat16, {"block_n": 16})}.items():
        k = torch.randn(T, D, generator=g).to(dt)
        v = torch.randn(T, D, generator=g).to(dt)
        q = torch.randn(S, G, D, generator=g).to(dt)
        table = torch.randint(0, T, (S, N), generator=g)
        valid = torch.rand(S, N, generator=g) < 0.6
        valid[0, :40] = False  # leading tiles with nothing valid
        valid[2] = False  # a segment that selected nothing
        out, lse = table_decode_attention_triton(q, k, v, table, valid, 0.125, return_lse=True, **kw)
        ref = torch.zeros(S, G, D)
        for s_ in range(S):
            idx = table[s_][valid[s_]]
            if idx.numel():
                p_ = torch.softmax(q[s_].float() @ k[idx].float().T * 0.125, -1)
                ref[s_] = p_ @ v[idx].float()
        results[name] = {"err": (out.float() - ref).abs().max().item(), "nan": bool(out.isnan().any()),
                         "empty_zero": bool((out[2] == 0).all()), "empty_lse": bool(torch.isneginf(lse[2]).all())}
    # Through the engine: Quest's per-step pages read by the kernel's table mode (backend forced
    # to triton, which the interpreter runs on CPU) give the tokens of the PyTorch gather path.
    from transformers import LlamaConfig, LlamaForCausalLM

    import heterocache  # noqa: F401
    from heterocache import QuestCache
    from heterocache._compat import cache_kwarg

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=96, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=6, num_key_value_heads=2)
    config._attn_implementation = "heterocache"
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(1, 128, (2, 80), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    runs = {}
    for backend in ("torch", "triton"):
        os.environ["HETEROCACHE_DECODE"] = f"backend={backend}"
        with torch.no_grad():
            cache = QuestCache(budget=0.3, dense_layers=1, page_size=8)
            runs[backend] = model.generate(ids, attention_mask=mask, **cache_kwarg(model, cache), max_new_tokens=4,
                                           do_sample=False, output_scores=True, return_dict_in_generate=True)
    os.environ.pop("HETEROCACHE_DECODE")
    # The registered op (torch.library.triton_op) the device decode path calls, eagerly.
    from heterocache.attention.kernels.ops import ragged_decode_triton

    case = make_ragged_case([9, 0, 20, 130], 3, 64, seed=101)
    out = ragged_decode_triton(case["q"], case["k_buf"], case["v_buf"], case["seg_start"], case["seg_len"],
                               0.125, 2, 130)
    ref = ragged_decode_attention_torch(**case, scale=0.125)
    results["triton_op"] = {"err": (out - ref).abs().max().item(), "nan": bool(out.isnan().any())}
    # The device decode path through the engine: the op vs the block-wise stand-in, same tokens.
    from heterocache import FullKVCache, SnapKVCache

    device_runs = {}
    for backend in ("torch", "triton"):
        os.environ["HETEROCACHE_DECODE"] = f"strategy=device,backend={backend}"
        for name, make in (("fullkv", FullKVCache), ("snapkv", lambda: SnapKVCache(budget=0.4))):
            with torch.no_grad():
                device_runs[backend, name] = model.generate(
                    ids, attention_mask=mask, **cache_kwarg(model, make()), max_new_tokens=4, do_sample=False,
                    output_scores=True, return_dict_in_generate=True)
    os.environ.pop("HETEROCACHE_DECODE")
    results["device_path_triton_op"] = {
        name: {"tokens_equal": bool(torch.equal(device_runs["torch", name].sequences,
                                                device_runs["triton", name].sequences)),
               "logit_err": max((a - b).abs().max().item() for a, b in zip(device_runs["torch", name].scores,
                                                                          device_runs["triton", name].scores))}
        for name in ("fullkv", "snapkv")}
    results["quest_engine_triton"] = {
        "tokens_equal": bool(torch.equal(runs["torch"].sequences, runs["triton"].sequences)),
        "logit_err": max((a - b).abs().max().item() for a, b in zip(runs["torch"].scores, runs["triton"].scores)),
    }
    print("RESULTS " + json.dumps(results))


@pytest.fixture(scope="module")
def results():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    line = next(l for l in res.stdout.splitlines() if l.startswith("RESULTS "))
    return json.loads(line[len("RESULTS "):])


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_reference(results, name):
    r, dt = results[name], CASES[name][3]
    assert not r["nan"], r
    assert r["err"] <= TOL[dt], r
    assert r["lse_err"] <= 1e-4, r
    assert r["lse_inf_match"] and r["empty_zero"] and r["dtype_ok"], r


def test_heuristic_spreads_a_long_segment_over_several_splits(results):
    assert results["gqa3_heuristic_splits_long"]["splits"] > 1


def test_strided_inputs_and_int32_lengths(results):
    r = results["strided_int32_fp16"]
    assert not r["nan"] and r["err"] <= TOL["float16"] and r["lse_err"] <= 1e-4, r


def test_empty_buffer_gives_zeros_without_launch(results):
    assert results["empty_buffer"] == {"T": 0, "zeros": True, "neginf": True}


def test_rejects_tiles_too_small_for_tl_dot(results):
    assert "block_n must be a power of two >= 16" in results["bad_block_n"]


def test_dispatcher_runs_triton_when_forced(results):
    r = results["dispatcher_forced_triton"]
    assert not r["nan"] and r["err"] <= 2e-5, r


@pytest.mark.parametrize("name", ["table_gqa3_fp32", "table_gqa3_fp32_3_splits", "table_mha_bf16_gemv"])
def test_table_mode_matches_the_gathered_oracle(results, name):
    r = results[name]
    tol = TOL["bfloat16"] if "bf16" in name else TOL["float32"]
    assert not r["nan"] and r["err"] <= tol and r["empty_zero"] and r["empty_lse"], r


def test_quest_through_the_engine_reads_its_pages_with_the_kernel(results):
    r = results["quest_engine_triton"]
    assert r["tokens_equal"] and r["logit_err"] <= 1e-4, r


def test_the_registered_triton_op_matches_the_reference(results):
    r = results["triton_op"]
    assert not r["nan"] and r["err"] <= 2e-5, r


@pytest.mark.parametrize("name", ["fullkv", "snapkv"])
def test_the_device_path_through_the_triton_op_gives_the_stand_ins_tokens(results, name):
    r = results["device_path_triton_op"][name]
    assert r["tokens_equal"] and r["logit_err"] <= 1e-4, r


def test_choose_num_splits():
    pytest.importorskip("triton")
    from heterocache.attention.kernels.triton_decode import MIN_TOKENS_PER_SPLIT, choose_num_splits

    assert choose_num_splits(0, 0, 132) == 1
    assert choose_num_splits(100, 800, 132) == 1  # short segments: one split each
    one_m = choose_num_splits(1 << 20, 1 << 20, 132)
    assert 132 <= one_m <= 1024  # a lone 1M-token segment spread over the whole GPU
    # 64 x 128K: enough programs already, few splits each; chunks never below the minimum.
    many = choose_num_splits(1 << 17, 64 << 17, 132)
    assert 4 <= many <= 32 and (1 << 17) / many >= MIN_TOKENS_PER_SPLIT
    # One long and many short segments: the long one still gets many splits.
    assert choose_num_splits(1 << 20, (1 << 20) + 63 * 1000, 132) >= 256


if __name__ == "__main__":
    _worker()
