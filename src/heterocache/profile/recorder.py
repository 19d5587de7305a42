"""Online top-k recording inside the model's attention, for any model that uses SDPA.

The attention function registered as ``"heterocache_profiler"`` computes the layer output with
transformers' own ``sdpa_attention_forward`` (so the model runs exactly as with SDPA) and, while a
:class:`TopKRecorder` is active, hands it the newest query's top-k set over the prefill
positions. No attention matrix is ever materialised beyond one row per query head: memory is
O(layers × kv_heads × k) for the prefill sets plus O(steps × layers × kv_heads) overlaps.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .stats import median_over_steps, overlap, pairwise_overlap
from .topk import newest_query_attention, pooled_topk

ATTENTION_NAME = "heterocache_profiler"

_ACTIVE: ContextVar["TopKRecorder | None"] = ContextVar("heterocache_profiler_recorder", default=None)


class TopKRecorder:
    """Per-text state of a profiling run (batch of one sequence).

    Call order: (prefill forward), then ``next_step()`` before each decode forward, then
    :meth:`stability` and :attr:`similarity`.

    Args:
        num_layers: decoder layers L.
        num_kv_heads: KV heads per layer H.
        prefill_len: prompt length P (positions the sets are taken over).
        k: set size (<= P).
        decode_steps: number of decode forwards N that will be recorded.
        pool_kernel: width of the average pool (5).

    Attributes:
        similarity: float32 ``[L, H, H]`` overlap of the heads' prefill sets.
        overlaps: float32 ``[N, L, H]`` overlap of each decode step's set with the prefill set.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, prefill_len: int, k: int, decode_steps: int,
                 pool_kernel: int = 5) -> None:
        self.num_layers, self.num_kv_heads = num_layers, num_kv_heads
        self.prefill_len, self.k, self.pool_kernel = prefill_len, k, pool_kernel
        self.prefill_sets: list[torch.Tensor | None] = [None] * num_layers  # each int64 [H, k]
        self.similarity = torch.zeros(num_layers, num_kv_heads, num_kv_heads)
        self.overlaps = torch.zeros(decode_steps, num_layers, num_kv_heads)
        self._step_overlaps: list[torch.Tensor | None] = [None] * num_layers  # on the model's device
        self.step = -1  # -1: prefill
        self._seen: set[int] = set()

    def observe(self, layer: int, query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None,
                scaling: float | None) -> None:
        """Record the newest query of ``layer`` (shapes as in :func:`newest_query_attention`)."""
        if query.shape[0] != 1:
            raise ValueError(f"the profiler records one sequence at a time, got batch {query.shape[0]}")
        if key.shape[1] != self.num_kv_heads:
            raise ValueError(f"layer {layer} has {key.shape[1]} KV heads, expected {self.num_kv_heads}")
        if key.shape[2] < self.prefill_len:
            # a sliding-window cache dropped prompt keys: positions would no longer line up
            raise RuntimeError(
                f"layer {layer} sees {key.shape[2]} keys, fewer than the {self.prefill_len} prompt tokens "
                "(sliding-window attention?); use a prefill length within the window"
            )
        probs = newest_query_attention(query, key, attention_mask, scaling, self.prefill_len)[0]  # [H, P]
        sets = pooled_topk(probs, self.k, self.pool_kernel)
        if self.step < 0:
            self.prefill_sets[layer] = sets  # stays on the model's device
            self.similarity[layer] = pairwise_overlap(sets, self.prefill_len).cpu()
        else:
            # kept on the device until the step closes: one transfer per step, not per layer
            self._step_overlaps[layer] = overlap(self.prefill_sets[layer], sets, self.prefill_len)
        self._seen.add(layer)

    def next_step(self) -> None:
        """Close the current step (checking every layer reported) and open the next decode step."""
        self._close_step()
        if self.step + 1 >= self.overlaps.shape[0]:
            raise RuntimeError(f"more decode steps than the {self.overlaps.shape[0]} the recorder was sized for")
        self.step += 1
        self._seen.clear()

    def stability(self) -> torch.Tensor:
        """float32 ``[L, H]``: median over decode steps of the overlap with the prefill set."""
        self._close_step()
        if self.step + 1 != self.overlaps.shape[0]:
            raise RuntimeError(f"recorded {self.step + 1} of {self.overlaps.shape[0]} decode steps")
        return median_over_steps(self.overlaps)

    def _close_step(self) -> None:
        missing = sorted(set(range(self.num_layers)) - self._seen)
        if missing:
            where = "prefill" if self.step < 0 else f"decode step {self.step}"
            raise RuntimeError(
                f"layers {missing} reported no attention at {where}: the model does not route its attention "
                "through transformers' AttentionInterface, so it cannot be profiled online"
            )
        if self.step >= 0:
            self.overlaps[self.step] = torch.stack(self._step_overlaps).cpu()


def profiler_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, **kwargs):
    """SDPA attention that also reports the newest query to the active :class:`TopKRecorder`."""
    output = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    recorder = _ACTIVE.get()
    if recorder is not None:
        recorder.observe(module.layer_idx, query, key, attention_mask, kwargs.get("scaling"))
    return output


def register() -> None:
    """Register the attention function and its mask builder (SDPA's) under ``ATTENTION_NAME``.

    Without the mask entry a custom name receives ``attention_mask=None`` and padding is lost.
    """
    AttentionInterface.register(ATTENTION_NAME, profiler_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


register()


@contextmanager
def profiler_attention_enabled(model: torch.nn.Module) -> Iterator[None]:
    """Switch ``model`` to the profiler attention for the block and restore its own after."""
    previous = model.config._attn_implementation
    model.set_attn_implementation(ATTENTION_NAME)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


@contextmanager
def active(recorder: TopKRecorder) -> Iterator[TopKRecorder]:
    """Make ``recorder`` receive the profiler attention's reports for the block."""
    token = _ACTIVE.set(recorder)
    try:
        yield recorder
    finally:
        _ACTIVE.reset(token)
