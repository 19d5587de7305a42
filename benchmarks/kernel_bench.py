"""Decode-attention kernel benchmark: Triton split-K kernel vs PyTorch reference vs dense SDPA.

For each (scenario, segments S, length L) it times one decode step of one layer over a packed
ragged KV store (GQA group G, head_dim D), reports the achieved bandwidth (bytes of K + V read /
time) and its fraction of the measured device-to-device copy bandwidth, and checks the outputs
against each other. Scenarios: ``uniform`` (every segment holds L tokens; the dense baseline is
a zero-copy view) and ``ragged`` (lengths uniform in [L/8, L], one segment at L; the dense
baseline is padded to L with a mask, i.e. what a dense cache would have to store and read).

Writes ``benchmarks/results/kernel_<gpu-name>.json``. Needs CUDA and triton; on CPU it exits
with a message. Usage (from the repo root)::

    PYTHONPATH=src python benchmarks/kernel_bench.py                # full sweep, 8K..1M
    PYTHONPATH=src python benchmarks/kernel_bench.py --tune         # + launch-parameter sweep
    PYTHONPATH=src python benchmarks/kernel_bench.py --lengths 8192 131072 --segments 8
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 131072, 524288, 1048576])
    p.add_argument("--segments", type=int, nargs="+", default=[8, 32], help="S = batch * kv_heads")
    p.add_argument("--group", type=int, default=4, help="G query heads per KV head")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--scenarios", nargs="+", default=["uniform", "ragged"], choices=["uniform", "ragged"])
    p.add_argument("--reference-max-tokens", type=int, default=1 << 25,
                   help="skip the PyTorch reference above this many stored tokens (it is slow)")
    p.add_argument("--mem-fraction", type=float, default=0.7, help="skip configs needing more of the free memory")
    p.add_argument("--tune", action="store_true", help="also sweep block_n / num_warps / num_stages / num_splits")
    p.add_argument("--rep-ms", type=int, default=200, help="timing window per measurement")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/kernel_<gpu>.json)")
    return p.parse_args()


def bench_ms(fn, rep_ms: int) -> float:
    """Median time of ``fn`` in ms (triton's do_bench: flushes L2 between runs)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=max(25, rep_ms // 4), rep=rep_ms, return_mode="median"))


def copy_bandwidth_gbps(rep_ms: int) -> float:
    """Device-to-device copy bandwidth, counting read + write bytes (GB/s, 1e9)."""
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src), rep_ms)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n / (ms * 1e-3) / 1e9


def build_store(lengths: torch.Tensor, D: int, dtype: torch.dtype, slack: int):
    """Packed K/V with every segment followed by ``slack`` unused slots (the store's reserve)."""
    caps = lengths + slack
    seg_start = torch.cumsum(caps, 0) - caps
    T = int(caps.sum())
    k_buf = torch.empty(T, D, dtype=dtype, device="cuda").normal_()
    v_buf = torch.empty(T, D, dtype=dtype, device="cuda").normal_()
    return k_buf, v_buf, seg_start.to("cuda"), lengths.to("cuda")


def run_config(args, scenario: str, S: int, L: int, copy_bw: float) -> dict:
    from heterocache.attention.kernels.ragged_decode import ragged_decode_attention_torch
    from heterocache.attention.kernels.triton_decode import (
        _num_sms,
        choose_num_splits,
        ragged_decode_attention_triton,
    )

    G, D = args.group, args.head_dim
    dtype = getattr(torch, args.dtype)
    elt = torch.finfo(dtype).bits // 8
    g = torch.Generator().manual_seed(S * 7919 + L)
    if scenario == "uniform":
        lengths = torch.full((S,), L, dtype=torch.long)
    else:
        lengths = torch.randint(max(1, L // 8), L + 1, (S,), generator=g)
        lengths[0] = L
    total = int(lengths.sum())
    kv_bytes = 2 * total * D * elt
    dense_bytes = 0 if scenario == "uniform" else 2 * S * L * D * elt
    need = kv_bytes + dense_bytes + (S * 128 * D * elt * 2)
    free, _ = torch.cuda.mem_get_info()
    row = {"scenario": scenario, "S": S, "L": L, "G": G, "D": D, "dtype": args.dtype,
           "total_tokens": total, "kv_bytes": kv_bytes}
    if need > args.mem_fraction * free:
        row["skipped"] = f"needs {need / 2**30:.1f} GiB, free {free / 2**30:.1f} GiB"
        return row

    # Uniform: no slack, so the dense baseline is a view of the same memory.
    k_buf, v_buf, seg_start, seg_len = build_store(lengths, D, dtype, slack=0 if scenario == "uniform" else 128)
    q = torch.randn(S, G, D, dtype=dtype, device="cuda")
    scale = D**-0.5
    max_len = int(lengths.max())
    splits = choose_num_splits(max_len, total, _num_sms(q.device))
    row["num_splits"] = splits

    # Launch with precomputed splits / max_len, as a decode loop would (no host sync per call).
    def tri():
        return ragged_decode_attention_triton(q, k_buf, v_buf, seg_start, seg_len, scale, num_splits=splits,
                                              max_len=max_len)

    out_tri = tri()
    row["triton_ms"] = bench_ms(tri, args.rep_ms)

    if scenario == "uniform":
        kd = k_buf.view(S, 1, L, D)
        vd = v_buf.view(S, 1, L, D)
        mask = None
    else:
        idx = seg_start[:, None] + torch.minimum(torch.arange(L, device="cuda")[None, :], seg_len[:, None] - 1)
        kd = k_buf[idx].unsqueeze(1)  # [S, 1, L, D], padded (padding repeats the last token)
        vd = v_buf[idx].unsqueeze(1)
        mask = (torch.arange(L, device="cuda")[None, :] < seg_len[:, None]).view(S, 1, 1, L)
    qd = q.view(S, 1, G, D)  # the G query heads of one KV head as G queries of one head

    def sdpa():
        return F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, scale=scale)

    try:
        out_sdpa = sdpa().view(S, G, D)
        row["sdpa_ms"] = bench_ms(sdpa, args.rep_ms)
        row["max_abs_diff_triton_vs_sdpa"] = (out_tri.float() - out_sdpa.float()).abs().max().item()
    except RuntimeError as e:  # e.g. out of memory
        row["sdpa_error"] = str(e).splitlines()[0]
    del kd, vd
    torch.cuda.empty_cache()

    if total <= args.reference_max_tokens:
        def ref():
            return ragged_decode_attention_torch(q, k_buf, v_buf, seg_start, seg_len, scale)

        try:
            out_ref = ref()
            row["torch_ms"] = bench_ms(ref, args.rep_ms)
            row["max_abs_diff_triton_vs_torch"] = (out_tri.float() - out_ref.float()).abs().max().item()
        except RuntimeError as e:
            row["torch_error"] = str(e).splitlines()[0]
    else:
        row["torch_skipped"] = f"total tokens {total} > --reference-max-tokens"

    for name in ("triton", "sdpa", "torch"):
        if f"{name}_ms" in row:
            # Bandwidth always counts the K + V bytes the ragged store holds (the useful bytes),
            # so a dense baseline that reads padding shows as a lower useful bandwidth.
            gbps = kv_bytes / (row[f"{name}_ms"] * 1e-3) / 1e9
            row[f"{name}_GBps"] = gbps
            row[f"{name}_frac_of_copy_bw"] = gbps / copy_bw
    del k_buf, v_buf
    torch.cuda.empty_cache()
    return row


def tune(args, copy_bw: float) -> list[dict]:
    """Launch-parameter sweep at S=8, L=128K (uniform) and S=1, L=1M."""
    from heterocache.attention.kernels.triton_decode import (
        _num_sms,
        choose_num_splits,
        ragged_decode_attention_triton,
    )

    G, D, dtype = args.group, args.head_dim, getattr(torch, args.dtype)
    rows = []
    for S, L in ((8, 131072), (1, 1 << 20), (32, 8192)):
        lengths = torch.full((S,), L, dtype=torch.long)
        k_buf, v_buf, seg_start, seg_len = build_store(lengths, D, dtype, slack=0)
        q = torch.randn(S, G, D, dtype=dtype, device="cuda")
        kv_bytes = 2 * S * L * D * torch.finfo(dtype).bits // 8
        auto = choose_num_splits(L, S * L, _num_sms(q.device))
        for splits in sorted({max(1, auto // 4), max(1, auto // 2), auto, auto * 2}):
            for block_n in (32, 64, 128):
                for warps in (4, 8):
                    for stages in (2, 3, 4):
                        kw = dict(num_splits=splits, max_len=L, block_n=block_n, num_warps=warps, num_stages=stages)
                        try:
                            ms = bench_ms(lambda: ragged_decode_attention_triton(q, k_buf, v_buf, seg_start,
                                                                                 seg_len, 0.1, **kw),
                                          args.rep_ms // 2)
                        except Exception as e:  # a config that does not compile (shared memory)
                            rows.append({"S": S, "L": L, **kw, "error": str(e).splitlines()[0][:200]})
                            continue
                        gbps = kv_bytes / (ms * 1e-3) / 1e9
                        rows.append({"S": S, "L": L, **kw, "auto_splits": auto, "ms": ms, "GBps": gbps,
                                     "frac_of_copy_bw": gbps / copy_bw})
        best = min((r for r in rows if (r["S"], r["L"]) == (S, L) and "ms" in r), key=lambda r: r["ms"])
        print(f"tune S={S} L={L}: best {best}", flush=True)
        del k_buf, v_buf
        torch.cuda.empty_cache()
    return rows


def main() -> int:
    args = parse_args()
    if not torch.cuda.is_available():
        print("kernel_bench.py needs a CUDA GPU (and triton); none is available here. "
              "Run it on a GPU machine: PYTHONPATH=src python benchmarks/kernel_bench.py", file=sys.stderr)
        return 1
    try:
        import triton
    except ImportError:
        print("kernel_bench.py needs triton (pip install triton)", file=sys.stderr)
        return 1

    gpu = torch.cuda.get_device_name()
    slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")
    out_path = args.out or ROOT / "benchmarks" / "results" / f"kernel_{slug}.json"
    copy_bw = copy_bandwidth_gbps(args.rep_ms)
    print(f"{gpu}: device-to-device copy {copy_bw:.0f} GB/s (read + write)", flush=True)

    results = []
    t0 = time.time()
    for scenario in args.scenarios:
        for S in args.segments:
            for L in args.lengths:
                row = run_config(args, scenario, S, L, copy_bw)
                results.append(row)
                if "skipped" in row:
                    print(f"{scenario:7s} S={S:3d} L={L:8d}  skipped: {row['skipped']}", flush=True)
                    continue
                cols = [f"{n} {row[n + '_ms']:8.3f} ms {row[n + '_GBps']:6.0f} GB/s ({row[n + '_frac_of_copy_bw']:.0%})"
                        for n in ("triton", "torch", "sdpa") if n + "_ms" in row]
                print(f"{scenario:7s} S={S:3d} L={L:8d} splits={row['num_splits']:4d} | " + " | ".join(cols),
                      flush=True)
    tune_rows = tune(args, copy_bw) if args.tune else []

    report = {
        "gpu": gpu,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "copy_bandwidth_GBps": copy_bw,
        "bandwidth_note": "GBps = bytes of K+V held by the ragged store / time; copy bandwidth counts read + write",
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "results": results,
        "tune": tune_rows,
        "wall_s": time.time() - t0,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=2))
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
