"""Measuring decode speed and KV memory of any cache on one prompt (used by benchmarks/ and the demo)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from transformers import Cache, DynamicCache


def kv_bytes(cache: Cache) -> int:
    """Accelerator bytes a cache holds: its memory report for ours, the key/value tensors otherwise."""
    if hasattr(cache, "memory_report"):
        return cache.memory_report().device_bytes
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure_decode(
    model,
    input_ids: torch.Tensor,
    make_cache: Callable[[], Cache],
    new_tokens: int = 32,
    warmup: int = 3,
) -> dict:
    """Prefill ``input_ids`` into a fresh cache, then decode greedily, timing every step.

    Args:
        model: a causal LM (its attention must fit the cache: "heterocache" for ours).
        input_ids: ``[B, L]`` prompt.
        make_cache: returns a fresh cache (e.g. ``DynamicCache`` or ``lambda: SnapKVCache(0.25)``).
        new_tokens: decode steps timed (after ``warmup`` untimed ones).
        warmup: decode steps not timed.

    Returns:
        dict with ``prefill_s``, ``decode_ms_per_token`` (median step), ``decode_ms_mean``,
        ``tokens_per_s`` (batch rows / median step), ``kv_bytes`` after prefill and at the end,
        and ``tokens`` (the greedy continuation, to check methods against each other).
    """
    device = input_ids.device
    cache = make_cache()
    _sync(device)
    t0 = time.perf_counter()
    logits = model(input_ids, past_key_values=cache, use_cache=True).logits[:, -1]
    _sync(device)
    prefill_s = time.perf_counter() - t0
    kv_after_prefill = kv_bytes(cache)
    token = logits.argmax(-1, keepdim=True)
    generated = [token]
    times = []
    for step in range(warmup + new_tokens):
        _sync(device)
        t = time.perf_counter()
        logits = model(token, past_key_values=cache, use_cache=True).logits[:, -1]
        token = logits.argmax(-1, keepdim=True)
        _sync(device)
        if step >= warmup:
            times.append(time.perf_counter() - t)
        generated.append(token)
    median = statistics.median(times)
    return {
        "prompt_tokens": int(input_ids.shape[1]),
        "batch": int(input_ids.shape[0]),
        "prefill_s": prefill_s,
        "decode_ms_per_token": median * 1e3,
        "decode_ms_mean": statistics.fmean(times) * 1e3,
        "tokens_per_s": input_ids.shape[0] / median,
        "kv_bytes_after_prefill": kv_after_prefill,
        "kv_bytes_end": kv_bytes(cache),
        "tokens": torch.cat(generated, 1).tolist(),
    }


def dynamic_cache() -> DynamicCache:
    return DynamicCache()
