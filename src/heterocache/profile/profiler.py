"""Offline head profiling (HeteroCache §3, arXiv 2601.13684), computed online from top-k sets.

For each calibration text: prefill up to ``prefill_tokens`` tokens, then greedy-decode
``decode_tokens`` steps. At the prefill step and at every decode step, each layer's KV heads
report the top-k positions of the newest query's attention over the prompt (see
:mod:`.topk`). Per text:

- stability ``S[l, h]`` = median over decode steps of overlap(prefill set, step set);
- similarity ``sim[l, i, j]`` = overlap of heads i and j's prefill sets.

Aggregation over texts: the per-text stability scores and similarity matrices are averaged and
the thresholds and the clustering are applied once to the means. (Clustering each text and then
voting would make a head's role depend on tie-breaking in single texts; averaging first keeps
one deterministic taxonomy whose inputs are the expected overlaps.)

Decoding always runs the full ``decode_tokens`` steps, even past an end-of-sequence token, so
every text contributes the same number of steps.
"""

from __future__ import annotations

import hashlib
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from .._compat import cache_kwarg
from .clustering import assign_roles, budget_ratios
from .head_profile import HeadProfile
from .recorder import TopKRecorder, active, profiler_attention_enabled
from .topk import effective_topk
from .validation import ModelShape, model_shape

PAPER = "HeteroCache (arXiv:2601.13684)"


@dataclass
class ProfilerSettings:
    """Settings of a profiling run; defaults are the paper's.

    Args:
        topk: size of the top-k position sets (1024).
        max_topk_fraction: cap on k as a fraction of each prompt's length (0.25); the set size
            used for a prompt of P tokens is ``min(topk, floor(max_topk_fraction * P))``.
        tau_stable: anchor if stability >= tau_stable, else volatile (0.5).
        tau_sim: heads are neighbours if their overlap >= tau_sim (0.5; the paper's
            DeepSeek-R1-Distill-Llama-8B profile uses 0.4).
        prefill_tokens: prompt tokens per text; longer texts are truncated (5000).
        decode_tokens: greedy decode steps recorded per text (100).
        pool_kernel: width of the 1-D average pool (5).
    """

    topk: int = 1024
    max_topk_fraction: float = 0.25
    tau_stable: float = 0.5
    tau_sim: float = 0.5
    prefill_tokens: int = 5000
    decode_tokens: int = 100
    pool_kernel: int = 5

    def __post_init__(self) -> None:
        for name in ("topk", "prefill_tokens", "decode_tokens", "pool_kernel"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.pool_kernel % 2 != 1:
            raise ValueError(f"pool_kernel must be odd, got {self.pool_kernel}")
        for name in ("tau_stable", "tau_sim", "max_topk_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")


@dataclass
class CalibrationStatistics:
    """Per-text statistics of a profiling run.

    Attributes:
        stability: float32 ``[texts, L, H]``.
        similarity: float32 ``[texts, L, H, H]``.
        prompt_lengths: prompt tokens of each text.
        topk_used: set size k of each text.
        tokens_sha256: hash of every prompt's token ids (identifies the calibration data exactly).
    """

    stability: torch.Tensor
    similarity: torch.Tensor
    prompt_lengths: list[int] = field(default_factory=list)
    topk_used: list[int] = field(default_factory=list)
    tokens_sha256: str = ""

    def mean_stability(self) -> torch.Tensor:
        return self.stability.mean(0)

    def mean_similarity(self) -> torch.Tensor:
        return self.similarity.mean(0)


def collect_statistics(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: Sequence[str | Sequence[int] | torch.Tensor],
    settings: ProfilerSettings | None = None,
    *,
    progress: bool = True,
) -> CalibrationStatistics:
    """Run the calibration texts through ``model`` and collect per-text statistics.

    Args:
        model: a transformers causal LM whose attention goes through AttentionInterface (Llama,
            Qwen2, Qwen3, ...); it is switched to the profiler attention for the run and back.
        tokenizer: used for texts given as strings (``add_special_tokens=True``); may be None
            when every text is already a sequence of token ids.
        texts: strings or token-id sequences.
        settings: :class:`ProfilerSettings` (paper defaults).
        progress: show a tqdm bar.
    """
    settings = settings or ProfilerSettings()
    if len(texts) == 0:
        raise ValueError("no calibration texts")
    shape = model_shape(model)
    device = next(model.parameters()).device
    stabilities, similarities, lengths, ks = [], [], [], []
    digest = hashlib.sha256()
    bar = tqdm(total=len(texts) * (1 + settings.decode_tokens), desc="profiling heads", unit="step",
               disable=not progress)
    was_training = model.training
    model.eval()
    try:
        with profiler_attention_enabled(model), torch.inference_mode():
            for text in texts:
                ids = _token_ids(text, tokenizer)[: settings.prefill_tokens]
                digest.update(ids.numpy().astype("<i8").tobytes())
                ids = ids.to(device)[None, :]
                recorder = TopKRecorder(
                    shape.num_layers, shape.num_kv_heads, prefill_len=ids.shape[1],
                    k=effective_topk(ids.shape[1], settings.topk, settings.max_topk_fraction),
                    decode_steps=settings.decode_tokens, pool_kernel=settings.pool_kernel,
                )
                with active(recorder):
                    _prefill_and_decode(model, ids, recorder, settings.decode_tokens, bar)
                stabilities.append(recorder.stability())
                similarities.append(recorder.similarity)
                lengths.append(ids.shape[1])
                ks.append(recorder.k)
    finally:
        bar.close()
        model.train(was_training)
    return CalibrationStatistics(torch.stack(stabilities), torch.stack(similarities), lengths, ks,
                                 digest.hexdigest())


def _token_ids(text: str | Sequence[int] | torch.Tensor, tokenizer: Any) -> torch.Tensor:
    if isinstance(text, str):
        if tokenizer is None:
            raise ValueError("texts given as strings need a tokenizer")
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    else:
        ids = text
    ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    if ids.numel() < 2:
        raise ValueError("a calibration text needs at least 2 tokens")
    return ids


def _prefill_and_decode(model, ids: torch.Tensor, recorder: TopKRecorder, steps: int, bar) -> None:
    """Greedy decoding with a fresh cache; the recorder sees every forward."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    # logits_to_keep=1: the prompt's full logits ([P, vocab]) would dwarf everything else.
    out = model(input_ids=ids, **cache_kwarg(model, cache), use_cache=True, logits_to_keep=1)
    bar.update(1)
    for _ in range(steps):
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        recorder.next_step()
        out = model(input_ids=token, **cache_kwarg(model, cache), use_cache=True, logits_to_keep=1)
        bar.update(1)


def profile_from_statistics(
    stats: CalibrationStatistics,
    settings: ProfilerSettings,
    shape: ModelShape,
    *,
    model_name: str,
    revision: str | None = None,
    calibration: dict[str, Any] | None = None,
) -> HeadProfile:
    """Threshold and cluster the averaged statistics into a :class:`HeadProfile`."""
    stability = stats.mean_stability().clamp(0, 1)
    roles, pivots = assign_roles(stats.mean_similarity(), stability, settings.tau_sim, settings.tau_stable)
    from .._version import __version__

    description = {
        "num_texts": int(stats.stability.shape[0]),
        "prompt_tokens": _summary(stats.prompt_lengths),
        "topk_used": _summary(stats.topk_used),
        "tokens_sha256": stats.tokens_sha256,
        "aggregation": "mean of per-text stability and similarity, then thresholds and clustering",
        **{key: value for key, value in asdict(settings).items() if key not in ("topk", "tau_stable", "tau_sim")},
        **(calibration or {}),
    }
    return HeadProfile(
        roles=roles,
        stability=stability,
        budget_ratios=budget_ratios(roles, stability),
        pivots=pivots,
        model_name=model_name,
        num_attention_heads=shape.num_attention_heads,
        head_dim=shape.head_dim,
        revision=revision,
        tau_stable=settings.tau_stable,
        tau_sim=settings.tau_sim,
        topk=settings.topk,
        calibration=description,
        source={
            "made_by": f"heterocache {__version__} profiler (online top-k, no attention matrices stored)",
            "method": PAPER,
        },
        has_stability=True,
    )


def _summary(values: list[int]) -> dict[str, float]:
    return {"min": min(values), "max": max(values), "mean": round(statistics.fmean(values), 2)}


def profile_model(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: Sequence[str | Sequence[int] | torch.Tensor],
    settings: ProfilerSettings | None = None,
    *,
    model_name: str | None = None,
    revision: str | None = None,
    calibration: dict[str, Any] | None = None,
    progress: bool = True,
    **overrides: Any,
) -> HeadProfile:
    """Profile the KV heads of ``model`` on ``texts``.

    Args:
        model, tokenizer, texts, progress: as in :func:`collect_statistics`.
        settings: :class:`ProfilerSettings`; keyword ``overrides`` (``topk=256``, ...) replace fields.
        model_name: recorded in the profile (default ``model.config.name_or_path``).
        revision: model revision recorded (default ``model.config._commit_hash`` when known).
        calibration: extra description of the calibration data recorded in the metadata.

    Returns:
        The :class:`HeadProfile` (deterministic for a given model, texts and settings).
    """
    settings = ProfilerSettings(**{**asdict(settings or ProfilerSettings()), **overrides})
    stats = collect_statistics(model, tokenizer, texts, settings, progress=progress)
    config = model.config
    return profile_from_statistics(
        stats, settings, model_shape(model),
        model_name=model_name or getattr(config, "name_or_path", None) or "unknown",
        revision=revision or getattr(config, "_commit_hash", None),
        calibration=calibration,
    )
