"""Memory of a prompt prefilled in pieces: one piece, exact chunked and bounded prefill
(``docs/prefill.md``), on Llama-3.1-8B's attention shapes.

    python benchmarks/chunked_prefill.py --lengths 4096,8192,16384 --chunk 512 \\
        --methods snapkv,heterocache --budget 0.25 --out benchmarks/results/chunked_prefill_llama8b_cuda.json

The model is a random 2-layer Llama with Llama-3.1-8B's attention (hidden 4096, 32 query heads,
8 KV heads, head_dim 128; a small MLP and vocabulary: the KV and attention are what is measured);
HeteroCache gets a profile of that shape (``heterocache.profile.testing.tiny_profile``). Every
(method, mode, length) runs in its own process, so each peak is its own:

- ``kept_device_bytes`` / ``kept_host_bytes``: ``memory_report()`` after the first decode step
  (the prompt ended);
- ``cache_peak_device_bytes``: the largest ``memory_report().device_bytes`` after any forward call
  (each piece and the first step): what the cache itself held at worst;
- ``peak_bytes``: ``torch.cuda.max_memory_allocated`` on CUDA (reset after the model loads; the
  weights, ``weight_bytes``, included); on CPU the process's peak resident set (``ru_maxrss``)
  minus its resident set before the prefill (``rss_before_bytes``); 0 when loading the model peaked
  higher (the tiny sizes).

Modes: ``one_piece`` (``generate()`` without chunks), ``exact`` (``prefill_chunk_size=--chunk``)
and ``bounded`` (the same with ``prefill="bounded"``). Each run generates 2 tokens.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

MODES = ("one_piece", "exact", "bounded")


def build_model(device: str, dtype: str, layers: int = 2):
    """A random Llama with Llama-3.1-8B's attention shapes, in eval mode on ``device``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import heterocache  # noqa: F401  (registers the attention)

    config = LlamaConfig(
        vocab_size=1024, hidden_size=4096, intermediate_size=1024, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
        rope_theta=500000.0,
    )
    config._attn_implementation = "heterocache"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(getattr(torch, dtype)).eval()
    return model


def make(method: str, budget: float, model, mode: str):
    from heterocache import make_cache
    from heterocache.profile.testing import tiny_profile

    cfg = model.config
    extra = {}
    if method == "heterocache":
        extra["profile"] = tiny_profile(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.num_attention_heads,
                                        cfg.head_dim)
    return make_cache(method, budget, model, prefill="bounded" if mode == "bounded" else "exact", **extra)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def run_one(method: str, mode: str, length: int, chunk: int, budget: float, device: str, dtype: str) -> dict:
    """One (method, mode, length) in this process."""
    import torch

    from heterocache._compat import cache_kwarg

    model = build_model(device, dtype)
    cache = make(method, budget, model, mode)
    ids = torch.randint(1, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    peaks = []
    hook = model.register_forward_hook(lambda *_: peaks.append(cache.memory_report().device_bytes))
    cuda = device.startswith("cuda")
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss_before = _rss_bytes()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwarg(model, cache), max_new_tokens=2,
                             do_sample=False, prefill_chunk_size=None if mode == "one_piece" else chunk)
    hook.remove()
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before)
    report = cache.memory_report()
    return {
        "method": method, "mode": mode, "length": length, "chunk": None if mode == "one_piece" else chunk,
        "budget": budget, "device": device, "dtype": dtype,
        "kept_device_bytes": report.device_bytes, "kept_host_bytes": report.host_bytes,
        "dynamic_cache_bytes": report.dynamic_bytes,
        "cache_peak_device_bytes": max(peaks) if peaks else 0,
        "peak_bytes": peak, "peak_kind": "cuda_max_allocated" if cuda else "cpu_rss_over_baseline",
        "weight_bytes": weight_bytes, "rss_before_bytes": None if cuda else rss_before,
        "tokens": out[0, length:].tolist(),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="4096,8192,16384", help="prompt lengths (comma-separated)")
    p.add_argument("--chunk", type=int, default=512, help="prefill_chunk_size of the chunked modes")
    p.add_argument("--methods", default="snapkv,heterocache")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--budget", type=float, default=0.25)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--out", type=Path, default=None, help="JSON file (default: print only)")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child process: one run, JSON out
    args = p.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if args.one:
        print(json.dumps(run_one(args.methods, args.modes, int(args.lengths), args.chunk, args.budget, args.device,
                                 args.dtype)))
        return 0
    runs = []
    for length in (int(n) for n in args.lengths.split(",")):
        for method in args.methods.split(","):
            for mode in args.modes.split(","):
                cmd = [sys.executable, __file__, "--one", "--lengths", str(length), "--methods", method, "--modes",
                       mode, "--chunk", str(args.chunk), "--budget", str(args.budget), "--device", args.device,
                       "--dtype", args.dtype]
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode:
                    raise SystemExit(f"{method} {mode} {length} failed:\n{done.stderr[-3000:]}")
                r = json.loads(done.stdout.strip().splitlines()[-1])
                runs.append(r)
                mib = 2**-20
                print(f"{method:12s} {mode:9s} {length:6d}: kept {r['kept_device_bytes'] * mib:8.1f} MiB "
                      f"(+{r['kept_host_bytes'] * mib:.1f} host), cache peak {r['cache_peak_device_bytes'] * mib:8.1f}"
                      f" MiB, peak {r['peak_bytes'] * mib:8.1f} MiB ({r['peak_kind']})", flush=True)
    if args.out is not None:
        import torch

        from heterocache.bench.cli import machine_info

        args.out.parent.mkdir(parents=True, exist_ok=True)
        record = {"machine": machine_info(torch.device(args.device)),
                  "args": {k: str(v) for k, v in vars(args).items()}, "runs": runs}
        args.out.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
