"""Profiling cost on SmolLM2-135M-Instruct (CPU): time, peak memory, and what the reference
profiler would have written to disk for the same run.

The reference implementation saves the attention matrix of every layer at every step: at the
prefill ``layers × q_heads × P × P`` float32 values, at decode step t ``layers × q_heads × 1 ×
(P + t)``. Our profiler keeps only top-k index sets and overlap scores.

Usage:  python benchmarks/profile_bench.py [--texts 2] [--prefill-tokens 2048] [--decode-tokens 32]
                                           [--topk 410] [--threads 1] [--no-baseline]
Writes benchmarks/results/profile_smollm2_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from pathlib import Path

import torch
import transformers

from heterocache._compat import cache_kwarg
from heterocache.models import load_smollm2
from heterocache.profile.calibration import default_calibration_texts
from heterocache.profile.profiler import ProfilerSettings, profile_model

OUT = Path(__file__).resolve().parent / "results" / "profile_smollm2_cpu.json"


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def current_rss_mib() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux: write 5 to /proc/self/clear_refs), so the next
    getrusage peak covers only what follows (here: profiling, not the GGUF dequantisation)."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def reference_bytes(layers: int, q_heads: int, prompts: list[int], decode: int) -> int:
    """Bytes of float32 attention matrices the reference profiler writes for these prompts."""
    total = 0
    for p in prompts:
        total += layers * q_heads * p * p * 4
        total += sum(layers * q_heads * (p + t) * 4 for t in range(1, decode + 1))
    return total


def baseline_seconds(model, tokenizer, texts, settings) -> float:
    """Same prefill + greedy decode with plain SDPA and no recording."""
    from transformers import DynamicCache

    start = time.perf_counter()
    with torch.inference_mode():
        for text in texts:
            ids = torch.tensor(tokenizer(text)["input_ids"][: settings.prefill_tokens])[None]
            cache = DynamicCache(config=model.config)
            out = model(input_ids=ids, **cache_kwarg(model, cache), use_cache=True, logits_to_keep=1)
            for _ in range(settings.decode_tokens):
                token = out.logits[:, -1].argmax(-1, keepdim=True)
                out = model(input_ids=token, **cache_kwarg(model, cache), use_cache=True, logits_to_keep=1)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=2)
    parser.add_argument("--prefill-tokens", type=int, default=2048)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--topk", type=int, default=410)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-baseline", action="store_true", help="skip the plain-SDPA timing")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rss_start = peak_rss_mib()
    start = time.perf_counter()
    model, tokenizer = load_smollm2(attn_implementation="sdpa")
    load_s = time.perf_counter() - start
    rss_loaded = peak_rss_mib()
    rss_model = current_rss_mib()
    peak_was_reset = reset_peak_rss()

    settings = ProfilerSettings(topk=args.topk, prefill_tokens=args.prefill_tokens, decode_tokens=args.decode_tokens)
    texts = default_calibration_texts(args.texts, settings.prefill_tokens, seed=0, tokenizer=tokenizer)
    start = time.perf_counter()
    profile = profile_model(model, tokenizer, texts, settings, progress=False)
    profile_s = time.perf_counter() - start
    rss_profiled = peak_rss_mib()
    base_s = None if args.no_baseline else baseline_seconds(model, tokenizer, texts, settings)

    config = model.config
    layers, q_heads, kv_heads = config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads
    prompts = [min(len(tokenizer(t)["input_ids"]), settings.prefill_tokens) for t in texts]
    k = profile.calibration["topk_used"]["max"]
    ref = reference_bytes(layers, q_heads, prompts, settings.decode_tokens)
    # Per text, at most: prefill index sets (int64) + per-step overlaps + similarity (float32).
    held = layers * kv_heads * k * 8 + settings.decode_tokens * layers * kv_heads * 4 + layers * kv_heads ** 2 * 4
    result = {
        "model": "HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1 dequantised to float32)",
        "settings": {"texts": args.texts, "calibration": "built-in generator, seed 0",
                     "prefill_tokens": settings.prefill_tokens, "decode_tokens": settings.decode_tokens,
                     "topk": settings.topk, "topk_used": k, "torch_threads": torch.get_num_threads()},
        "prompt_tokens": prompts,
        "time_s": {"load_model": round(load_s, 1), "profile": round(profile_s, 1),
                   "profile_per_text": round(profile_s / args.texts, 1),
                   "plain_sdpa_same_work": None if base_s is None else round(base_s, 1),
                   "profiler_overhead": None if base_s is None else round(profile_s / base_s - 1, 3)},
        "rss_mib": {"peak_at_start": round(rss_start), "peak_during_load": round(rss_loaded),
                    "resident_after_load": round(rss_model),
                    "peak_during_profiling": round(rss_profiled) if peak_was_reset else None,
                    "peak_added_by_profiling": round(rss_profiled - rss_model) if peak_was_reset else None,
                    "how": "resource.getrusage ru_maxrss; peak reset after loading via /proc/self/clear_refs"},
        "reference_method_bytes_written": ref,
        "reference_method_gib_written": round(ref / 2**30, 2),
        "reference_method_gib_at_paper_settings": round(
            reference_bytes(layers, q_heads, [5000] * 50, 100) / 2**30, 1),
        "our_bytes_held_per_text": held,
        "our_bytes_written": len(profile.to_bytes()),
        "profile_counts": profile.counts(),
        "environment": {"cpu_count": os.cpu_count(), "load_average_1m_at_end": round(os.getloadavg()[0], 2),
                        "torch": torch.__version__, "transformers": transformers.__version__,
                        "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")},
        "note": ("2 CPU cores shared with other jobs: times are upper bounds, and profiler_overhead "
                 "(profiling vs the same prefill + decode with plain SDPA) is within run-to-run noise"),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
