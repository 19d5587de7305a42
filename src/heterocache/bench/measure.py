"""Measuring decode speed and KV memory of any cache on one prompt (used by benchmarks/ and the demo)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from transformers import Cache, DynamicCache

from .._compat import cache_kwarg
from ..engine.cache import RaggedCache


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


def host_bytes(cache: Cache) -> int:
    """Host (CPU) bytes of a ragged cache's offloaded copies; 0 for other caches."""
    if hasattr(cache, "memory_report"):
        return cache.memory_report().host_bytes
    return 0


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
    replicate: int = 1,
) -> dict:
    """Prefill ``input_ids`` into a fresh cache, then decode greedily, timing every step.

    Args:
        model: a causal LM (its attention must fit the cache: "heterocache" for ours).
        input_ids: ``[B, L]`` prompt.
        make_cache: returns a fresh cache (e.g. ``DynamicCache`` or ``lambda: SnapKVCache(0.25)``).
        new_tokens: decode steps timed (after ``warmup`` untimed ones).
        warmup: decode steps not timed.
        replicate: after prefill, repeat every row this many times (``batch_repeat_interleave``) and
            decode ``B * replicate`` rows: the decode work and KV of that many rows without the
            prefill activations of ``B * replicate * L`` tokens (how large batches fit at 128K).

    Returns:
        dict with ``prefill_s``, ``decode_ms_per_token`` (median step), ``decode_ms_mean``,
        ``tokens_per_s`` (batch rows / median step), ``kv_bytes`` after prefill and at the end,
        ``host_bytes_end``, ``peak_device_bytes`` (CUDA only, prefill included), HeteroCache's
        ``refreshes`` and ``refreshes_per_step`` (None for other caches), and ``tokens`` (the
        greedy continuation ``[B, 1 + warmup + new_tokens]``, to check methods against each other).
    """
    device = input_ids.device
    cache = make_cache()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    t0 = time.perf_counter()
    # logits of the last position only: a 128K-token prompt's full logits would not fit
    logits = model(input_ids, **cache_kwarg(model, cache), use_cache=True, logits_to_keep=1).logits[:, -1]
    if hasattr(cache, "end_prompt"):  # the prompt's compression is prefill work (docs/prefill.md)
        cache.end_prompt()
    _sync(device)
    prefill_s = time.perf_counter() - t0
    token = logits.argmax(-1, keepdim=True)
    if replicate > 1:
        cache.batch_repeat_interleave(replicate)
        token = token.repeat_interleave(replicate, dim=0)
    kv_after_prefill = kv_bytes(cache)
    generated = [token]
    times = []
    for step in range(warmup + new_tokens):
        _sync(device)
        t = time.perf_counter()
        logits = model(token, **cache_kwarg(model, cache), use_cache=True, logits_to_keep=1).logits[:, -1]
        token = logits.argmax(-1, keepdim=True)
        _sync(device)
        if step >= warmup:
            times.append(time.perf_counter() - t)
        generated.append(token)
    median = statistics.median(times)
    stats = cache.stats() if isinstance(cache, RaggedCache) else {}
    return {
        "prompt_tokens": int(input_ids.shape[1]),
        "batch": int(token.shape[0]),
        "prefill_s": prefill_s,
        "decode_ms_per_token": median * 1e3,
        "decode_ms_mean": statistics.fmean(times) * 1e3,
        "tokens_per_s": token.shape[0] / median,
        "kv_bytes_after_prefill": kv_after_prefill,
        "kv_bytes_end": kv_bytes(cache),
        "host_bytes_end": host_bytes(cache),
        "peak_device_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "decode_steps": warmup + new_tokens,
        "refreshes": stats.get("refreshes"),
        "refreshes_per_step": None if "refreshes" not in stats else stats["refreshes"] / (warmup + new_tokens),
        "copy_seconds": stats.get("copy_seconds"),
        "bytes_moved": stats.get("bytes_moved"),
        "tokens": torch.cat(generated, 1).tolist(),
    }


def dynamic_cache() -> DynamicCache:
    return DynamicCache()


PROSE_WORDS = (
    "river valley stone bridge harbour village library winter autumn bread mountain forest road teacher "
    "council market garden lantern window morning evening story song travel letter silver copper field"
).split()


def prompt_ids(tokenizer, length: int, batch: int = 1, seed: int = 0, vocab_size: int | None = None) -> torch.Tensor:
    """``[batch, length]`` prompt token ids: seeded pseudo-prose through ``tokenizer``, or uniform
    random ids below ``vocab_size`` when there is no tokenizer (random-weight models)."""
    if tokenizer is None:
        g = torch.Generator().manual_seed(seed)
        return torch.randint(3, vocab_size, (batch, length), generator=g)
    import random

    rows = []
    for row in range(batch):
        rng, text = random.Random(seed + row), []
        while True:
            text.append(" ".join(rng.choice(PROSE_WORDS) for _ in range(rng.randint(6, 14))).capitalize() + ".")
            if len(text) % 50 == 0:
                ids = tokenizer(" ".join(text), return_tensors="pt").input_ids
                if ids.shape[1] >= length:
                    rows.append(ids[0, :length])
                    break
    return torch.stack(rows)


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeats: int = 5) -> float | None:
    """Measured device-memory bandwidth in bytes/s (a device-to-device copy reads and writes each
    byte), the best of ``repeats``; None off CUDA."""
    if torch.device(device).type != "cuda":
        return None
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats + 1):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    del src, dst
    return 2 * nbytes / best


def weight_bytes_read_per_step(model) -> int:
    """Weight bytes one decode step reads: every parameter except an untied input-embedding table
    (only the batch's rows of it are gathered)."""
    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    tied = output is not None and output.weight.data_ptr() == embedding.data_ptr()
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return total if tied else total - embedding.numel() * embedding.element_size()
