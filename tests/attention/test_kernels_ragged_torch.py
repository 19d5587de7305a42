"""The PyTorch ragged decode attention against a dense masked oracle, and the backend dispatcher.

Oracle: every segment copied into a padded ``[S, maxlen, D]`` float64 tensor, scores of padding
set to -inf, ``torch.softmax``; empty segments give zeros and lse -inf.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from heterocache.attention.kernels import ragged_decode_attention, resolve_backend
from heterocache.attention.kernels.ragged_decode import ragged_decode_attention_torch
from heterocache.attention.kernels.testing import make_ragged_case

SRC = str(Path(__file__).resolve().parents[2] / "src")
LENGTHS = [0, 1, 2, 63, 64, 65, 130, 7, 1, 0, 200, 33]  # 0 and 1, tile edges, very unequal


def dense_oracle(q, k_buf, v_buf, seg_start, seg_len, scale):
    """Padded dense attention in float64: (out [S, G, D] fp64, lse [S, G] fp64)."""
    S, G, D = q.shape
    lens = [int(x) for x in seg_len]
    Lmax = max(lens + [1])
    kd = torch.zeros(S, Lmax, D, dtype=torch.float64)
    vd = torch.zeros(S, Lmax, D, dtype=torch.float64)
    for s, n in enumerate(lens):
        a = int(seg_start[s])
        kd[s, :n] = k_buf[a : a + n].double()
        vd[s, :n] = v_buf[a : a + n].double()
    valid = torch.arange(Lmax)[None, :] < torch.tensor(lens)[:, None]  # [S, Lmax]
    scores = torch.einsum("sgd,snd->sgn", q.double(), kd) * scale
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all -inf rows (empty) -> NaN -> 0
    out = torch.einsum("sgn,snd->sgd", probs, vd)
    lse = torch.logsumexp(scores, dim=-1)  # -inf for empty segments
    return out, lse


def tolerance(dtype):
    return {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}[dtype]


def run_both(case, **kw):
    scale = case["q"].shape[-1] ** -0.5
    out, lse = ragged_decode_attention_torch(**case, scale=scale, return_lse=True, **kw)
    ref_out, ref_lse = dense_oracle(**case, scale=scale)
    return out, lse, ref_out, ref_lse


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D", [64, 80])
@pytest.mark.parametrize("G", [1, 3, 7])
def test_matches_dense_oracle_with_huge_garbage(G, D, dtype):
    huge = 1e30 if dtype != torch.float16 else 6e4  # dominates any softmax it leaks into
    case = make_ragged_case(LENGTHS, G, D, dtype, garbage=huge, seed=G * 100 + D)
    out, lse, ref_out, ref_lse = run_both(case)
    assert out.dtype == dtype and out.shape == (len(LENGTHS), G, D)
    torch.testing.assert_close(out.double(), ref_out, atol=tolerance(dtype), rtol=tolerance(dtype))
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_never_reads_nan_garbage(dtype):
    case = make_ragged_case(LENGTHS, 3, 64, dtype, garbage=float("nan"), seed=1)
    out, lse, ref_out, ref_lse = run_both(case)
    assert not out.isnan().any() and not lse.isnan().any()
    torch.testing.assert_close(out.double(), ref_out, atol=tolerance(dtype), rtol=tolerance(dtype))


def test_empty_segment_gives_zeros_and_neg_inf_lse():
    case = make_ragged_case([0, 5, 0], 2, 64, seed=2)
    out, lse = ragged_decode_attention_torch(**case, scale=0.125, return_lse=True)
    assert torch.equal(out[0], torch.zeros(2, 64)) and torch.equal(out[2], torch.zeros(2, 64))
    assert torch.isneginf(lse[[0, 2]]).all() and torch.isfinite(lse[1]).all()


def test_all_segments_empty():
    case = make_ragged_case([0, 0, 0], 4, 80, seed=3)
    out, lse = ragged_decode_attention_torch(**case, scale=0.1, return_lse=True)
    assert torch.equal(out, torch.zeros(3, 4, 80)) and torch.isneginf(lse).all()


def test_no_segments():
    case = make_ragged_case([], 4, 64)
    assert ragged_decode_attention_torch(**case, scale=0.1).shape == (0, 4, 64)


def test_lse_lets_two_halves_merge_into_the_whole():
    # Segment s split into its first and second half as two separate segments of another call:
    # merging the halves by their lse must give the whole segment's attention.
    lens = [50, 1, 200]
    case = make_ragged_case(lens, 3, 64, shuffle=False, max_gap=0, seed=4)
    whole, lse_whole = ragged_decode_attention_torch(**case, scale=0.125, return_lse=True)
    first = torch.tensor([n // 2 for n in lens])
    halves = [
        dict(case, seg_start=case["seg_start"], seg_len=first),
        dict(case, seg_start=case["seg_start"] + first, seg_len=torch.tensor(lens) - first),
    ]
    (o1, l1), (o2, l2) = (ragged_decode_attention_torch(**h, scale=0.125, return_lse=True) for h in halves)
    lse = torch.logaddexp(l1, l2)
    merged = o1 * torch.exp(l1 - lse)[..., None] + o2 * torch.exp(l2 - lse)[..., None]
    torch.testing.assert_close(merged, whole, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, lse_whole)


def test_int32_lengths_give_the_same_result():
    a = make_ragged_case(LENGTHS, 3, 64, seed=5)
    b = dict(a, seg_len=a["seg_len"].to(torch.int32))
    assert torch.equal(ragged_decode_attention_torch(**a, scale=0.1), ragged_decode_attention_torch(**b, scale=0.1))


@pytest.mark.parametrize("block_size,max_chunk_tokens", [(16, 16), (64, 128), (1, 7), (256, 1 << 20)])
def test_blocking_and_chunking_do_not_change_the_result(block_size, max_chunk_tokens):
    case = make_ragged_case(LENGTHS, 3, 80, seed=6)
    out, lse, ref_out, ref_lse = run_both(case, block_size=block_size, max_chunk_tokens=max_chunk_tokens)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)


def test_strided_inputs():
    case = make_ragged_case(LENGTHS, 3, 64, seed=7)
    S, T = len(LENGTHS), case["k_buf"].shape[0]
    kv = torch.stack([case["k_buf"], case["v_buf"]], dim=1)  # fused [T, 2, D] buffer
    q_t = case["q"].transpose(0, 1).contiguous().transpose(0, 1)  # same values, other strides
    strided = dict(case, q=q_t, k_buf=kv[:, 0], v_buf=kv[:, 1])
    assert not strided["k_buf"].is_contiguous() and not q_t.is_contiguous() and T > 0 and S > 0
    torch.testing.assert_close(
        ragged_decode_attention_torch(**strided, scale=0.1), ragged_decode_attention_torch(**case, scale=0.1)
    )


def test_output_dtype_follows_q():
    case = make_ragged_case([3, 4], 2, 64, dtype=torch.bfloat16, seed=8)
    case["q"] = case["q"].float()
    assert ragged_decode_attention_torch(**case, scale=0.1).dtype == torch.float32


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda c: c.update(q=c["q"][0]), "q must be"),
        (lambda c: c.update(k_buf=c["k_buf"][:, :32]), "k_buf and v_buf"),
        (lambda c: c.update(seg_len=c["seg_len"][:1]), r"seg_start and seg_len must be \[2\]"),
        (lambda c: c.update(seg_start=c["seg_start"].int()), "int64"),
        (lambda c: c.update(v_buf=c["v_buf"].half()), "k and v alike"),
    ],
)
def test_rejects_inputs_outside_the_contract(change, match):
    case = make_ragged_case([3, 4], 2, 64, seed=9)
    change(case)
    with pytest.raises(ValueError, match=match):
        ragged_decode_attention_torch(**case, scale=0.1)


# ------------------------------------------------------------------------------- dispatcher


def test_auto_picks_torch_on_cpu(monkeypatch):
    monkeypatch.delenv("HETEROCACHE_DECODE", raising=False)
    assert resolve_backend(torch.device("cpu")) == "torch"
    case = make_ragged_case(LENGTHS, 3, 64, seed=10)
    torch.testing.assert_close(ragged_decode_attention(**case, scale=0.1),
                               ragged_decode_attention_torch(**case, scale=0.1))


def test_auto_would_pick_triton_on_cuda(monkeypatch):
    import heterocache.attention.kernels as kernels

    monkeypatch.delenv("HETEROCACHE_DECODE", raising=False)
    monkeypatch.setattr(kernels, "triton_available", lambda: True)
    assert kernels.resolve_backend(torch.device("cuda", 0)) == "triton"
    monkeypatch.setattr(kernels, "triton_available", lambda: False)
    assert kernels.resolve_backend(torch.device("cuda", 0)) == "torch"


def test_env_var_selects_backend_and_argument_overrides_it(monkeypatch):
    monkeypatch.setenv("HETEROCACHE_DECODE", "backend=Triton")
    assert resolve_backend(torch.device("cpu")) == "triton"
    assert resolve_backend(torch.device("cpu"), "torch") == "torch"
    monkeypatch.setenv("HETEROCACHE_DECODE", "strategy=device,backend=torch")
    assert resolve_backend(torch.device("cuda", 0)) == "torch"


def test_unknown_backend_is_an_error(monkeypatch):
    monkeypatch.setenv("HETEROCACHE_DECODE", "backend=cutlass")
    with pytest.raises(ValueError, match="backend= of .HETEROCACHE_DECODE"):
        resolve_backend(torch.device("cpu"))
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend(torch.device("cpu"), "fast")


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="interpreter would run it")
def test_forced_triton_on_cpu_says_why_it_cannot_run():
    pytest.importorskip("triton")
    case = make_ragged_case([3], 1, 64)
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        ragged_decode_attention(**case, scale=0.1, backend="triton")


def test_forced_flash_without_flash_attn_raises_import_error():
    from heterocache.attention.kernels.flash_decode import HAS_FLASH_ATTN

    if HAS_FLASH_ATTN:
        pytest.skip("flash-attn is installed")
    with pytest.raises(ImportError, match="flash-attn"):
        ragged_decode_attention(**make_ragged_case([3], 1, 64), scale=0.1, backend="flash")


_NO_TRITON = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ImportError("blocked for the test")
sys.meta_path.insert(0, Block())
import torch
import heterocache.attention.kernels as K
from heterocache.attention.kernels import triton_decode
from heterocache.attention.kernels.testing import make_ragged_case
assert not triton_decode.HAS_TRITON
K.triton_available = lambda: False  # find_spec is blocked too, but be explicit
out = K.ragged_decode_attention(**make_ragged_case([3, 0], 2, 64), scale=0.1)
assert out.shape == (2, 2, 64)
try:
    triton_decode.ragged_decode_attention_triton(**make_ragged_case([3], 1, 64), scale=0.1)
except ImportError as e:
    print("OK", e)
"""


def test_package_works_without_triton():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, "-c", _NO_TRITON], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("OK") and "pip install triton" in res.stdout
