"""The Triton decode kernel on CUDA at real shapes, against the PyTorch reference (fp32 math).

Skipped without CUDA or triton. Shapes: GQA group 4, head_dim 128, bf16, 8..64 segments,
lengths up to 128K (one test at 1M), NaN in every unused slot.
"""

from __future__ import annotations

import pytest
import torch

from heterocache.attention.kernels import ragged_decode_attention, resolve_backend
from heterocache.attention.kernels.ragged_decode import ragged_decode_attention_torch
from heterocache.attention.kernels.testing import make_ragged_case

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 3e-3}


@pytest.fixture(scope="module")
def tri():
    pytest.importorskip("triton")
    from heterocache.attention.kernels.triton_decode import ragged_decode_attention_triton

    return ragged_decode_attention_triton


def check(tri, lengths, G=4, D=128, dtype=torch.bfloat16, seed=0, **kw):
    case = make_ragged_case(lengths, G, D, dtype, "cuda", seed=seed)
    scale = D**-0.5
    out, lse = tri(**case, scale=scale, return_lse=True, **kw)
    ref, ref_lse = ragged_decode_attention_torch(**case, scale=scale, return_lse=True)
    torch.cuda.synchronize()
    assert out.dtype == dtype and not out.isnan().any() and not lse.isnan().any()
    torch.testing.assert_close(out.float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])
    fin = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[fin], ref_lse[fin], atol=1e-3, rtol=1e-4)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    return out, lse


@pytest.mark.parametrize("S", [8, 64])
def test_uniform_long_segments(tri, S):
    check(tri, [32768 if S == 64 else 131072] * S, seed=S)


@pytest.mark.parametrize("S", [8, 32, 64])
def test_ragged_lengths_up_to_128k(tri, S):
    g = torch.Generator().manual_seed(S)
    lens = torch.randint(0, 131072, (S,), generator=g)
    lens[0], lens[1], lens[2] = 0, 1, 131072
    check(tri, lens.tolist(), seed=S)


def test_one_long_segment_among_short_ones(tri):
    check(tri, [1 << 20] + [37] * 15, seed=7)


@pytest.mark.parametrize("num_splits", [1, 3, 17, 500])
def test_forced_split_counts(tri, num_splits):
    check(tri, [20000, 5, 0, 12345, 64, 65, 1, 8191], num_splits=num_splits, seed=num_splits)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("G,D", [(1, 128), (4, 128), (8, 64), (7, 80), (16, 128), (4, 256)])
def test_dtypes_groups_and_head_dims(tri, dtype, G, D):
    check(tri, [3000, 0, 1, 777, 4096, 129], G=G, D=D, dtype=dtype, seed=G * D)


@pytest.mark.parametrize("use_dot", [True, False])
def test_dot_and_broadcast_paths(tri, use_dot):
    check(tri, [9000, 17, 0, 2048], G=4, use_dot=use_dot)


def test_no_host_sync_under_cuda_graph(tri):
    case = make_ragged_case([5000, 3, 0, 4096], 4, 128, torch.bfloat16, "cuda", seed=11)
    ref = ragged_decode_attention_torch(**case, scale=0.1)
    kw = dict(scale=0.1, num_splits=8, max_len=5000)
    tri(**case, **kw)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = tri(**case, **kw)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_the_triton_op_compiles_without_a_graph_break(tri, backend):
    """``heterocache::ragged_decode_triton`` (a ``torch.library.triton_op``) traced whole by
    ``torch.compile(fullgraph=True)``: the compiled call gives the eager result."""
    import torch._dynamo

    from heterocache.attention.kernels.ops import ragged_decode_triton

    torch._dynamo.reset()
    case = make_ragged_case([3000, 7, 0, 1024], 4, 128, torch.bfloat16, "cuda", seed=13)
    args = (case["q"], case["k_buf"], case["v_buf"], case["seg_start"], case["seg_len"], 0.1, 4, 3000)
    compiled = torch.compile(ragged_decode_triton, fullgraph=True, backend=backend)
    out = compiled(*args)
    ref = ragged_decode_attention_torch(**case, scale=0.1)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


def test_dispatcher_auto_uses_triton_on_cuda(tri, monkeypatch):
    monkeypatch.delenv("HETEROCACHE_DECODE", raising=False)
    assert resolve_backend(torch.device("cuda")) == "triton"
    case = make_ragged_case([100, 0, 5], 4, 128, torch.bfloat16, "cuda", seed=12)
    out = ragged_decode_attention(**case, scale=0.1)
    ref = ragged_decode_attention_torch(**case, scale=0.1)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


def test_flash_backend_matches_reference():
    from heterocache.attention.kernels.flash_decode import HAS_FLASH_ATTN, ragged_decode_attention_flash

    if not HAS_FLASH_ATTN:
        pytest.skip("flash-attn not installed")
    for shuffle in (False, True):
        case = make_ragged_case([3000, 1, 0, 700], 4, 128, torch.bfloat16, "cuda", shuffle=shuffle,
                                max_gap=0 if not shuffle else 7)
        out, lse = ragged_decode_attention_flash(**case, scale=0.1, return_lse=True)
        ref, ref_lse = ragged_decode_attention_torch(**case, scale=0.1, return_lse=True)
        torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
        fin = torch.isfinite(ref_lse)
        torch.testing.assert_close(lse[fin], ref_lse[fin], atol=1e-3, rtol=1e-4)
