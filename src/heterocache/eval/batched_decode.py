"""Greedy decoding of many one-row caches together: one batched forward per step.

After a shared prefill (:mod:`.shared_prefill`) an evaluation holds one cache per (method, budget,
mode), each of batch 1. Decoding them one after another runs the model's weights once per cache
and token; on a CPU that weight traffic, not the attention over the cache, is most of a step.
:func:`greedy_continue_many` stacks the current token of every unfinished cache into one batch:
the projections, MLPs and LM head run once for all rows, and each row's attention is served by its
own cache (:class:`_RowRouter`), so every method keeps its own policy, eviction and refresh
exactly as in a batch-1 decode. Rows leave the batch as they finish.

The tokens are those of one :func:`~.shared_prefill.greedy_continue` per cache (tested in
float64); in float32 a batched matmul may round differently from a batch-1 one, which can flip a
near-tied greedy choice, as between any two BLAS calls.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .._compat import cache_kwarg
from ..engine import integration as _attention
from ..engine.cache import RaggedCache
from .shared_prefill import _step


@dataclass
class DecodeStart:
    """One cache to continue greedily.

    Attributes:
        cache: a filled ``RaggedCache`` or ``DynamicCache`` of batch 1.
        logits: ``[1, vocab]`` logits of its last cached position, or None when ``new_ids`` is given.
        new_ids: ``[1, q]`` prompt tokens not yet in the cache (a question after a query-agnostic
            prefill); run alone first, they give the first logits.
        max_new_tokens: at most this many tokens for this cache (stop token included).
    """

    cache: object
    logits: torch.Tensor | None = None
    new_ids: torch.Tensor | None = None
    max_new_tokens: int = 32


class _RowRouter(RaggedCache):
    """The cache a batched step is given: row ``i`` of every layer goes to ``caches[i]``.

    It stores nothing itself; being a ``RaggedCache`` makes the ``heterocache`` attention hand it
    the layer's query, key and value, which it splits by row.
    """

    def __init__(self, caches: list):
        super().__init__()
        self.caches = caches

    def attend(self, module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        self._pending = None
        if query.shape[2] != 1 or query.shape[0] != len(self.caches):
            raise RuntimeError("a row router serves single-token steps of one row per cache")
        layer_idx = module.layer_idx
        outs = []
        for row, cache in enumerate(self.caches):
            q, k, v = query[row : row + 1], key[row : row + 1], value[row : row + 1]
            if isinstance(cache, RaggedCache):
                keys, values = cache.update(k, v, layer_idx)
                _attention.set_pending(None)  # consumed here, not by the attention function
                out, _ = cache.attend(module, q, keys, values, None, scaling, dropout, **kwargs)
            else:  # DynamicCache: the whole history, exact attention
                keys, values = cache.update(k, v, layer_idx)
                out, _ = sdpa_attention_forward(module, q, keys, values, None, scaling=scaling, dropout=dropout)
            outs.append(out)
        return torch.cat(outs, dim=0), None


@torch.inference_mode()
def greedy_continue_many(model, starts: list[DecodeStart], stop: set[int], max_batch: int = 64) -> list[list[int]]:
    """Greedy tokens for every start, decoded in batches: what one ``greedy_continue`` per cache gives.

    Args:
        model: a causal LM whose attention is ``heterocache``.
        starts: the caches and how each begins (see :class:`DecodeStart`).
        stop: ids that end a generation (kept in its output).
        max_batch: at most this many rows per forward (default 64); more run in turns.

    Returns:
        the new token ids of each start, in order.
    """
    if max_batch < 1:
        raise ValueError("max_batch must be >= 1")
    logits = []
    for s in starts:
        if (s.logits is None) == (s.new_ids is None):
            raise ValueError("give exactly one of logits (prompt fully cached) or new_ids")
        if s.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        logits.append(s.logits if s.new_ids is None else _step(model, s.cache, s.new_ids))
    tokens: list[list[int]] = [[] for _ in starts]
    nxt = [int(lg.float().argmax(-1)[0]) for lg in logits]
    active = list(range(len(starts)))
    while True:
        for i in active:
            tokens[i].append(nxt[i])
        active = [i for i in active if nxt[i] not in stop and len(tokens[i]) < starts[i].max_new_tokens]
        if not active:
            return tokens
        for lo in range(0, len(active), max_batch):
            rows = active[lo : lo + max_batch]
            picks = step_rows(model, [starts[i].cache for i in rows], [nxt[i] for i in rows])
            for i, token in zip(rows, picks):
                nxt[i] = token


def step_rows(model, caches: list, tokens: list[int]) -> list[int]:
    """One batched forward of one new token per cache (``tokens[i]`` into ``caches[i]``, every cache
    of batch 1, each row attended by its own cache); returns each row's greedy next token."""
    device = next(model.parameters()).device
    ids = torch.tensor([[t] for t in tokens], device=device)
    # Rows may sit at different logical lengths (aware vs agnostic prompts): explicit positions.
    positions = torch.tensor([[c.get_seq_length()] for c in caches], device=device)
    out = model(
        input_ids=ids, position_ids=positions, **cache_kwarg(model, _RowRouter(caches)), use_cache=True,
        logits_to_keep=1,
    )
    return [int(t) for t in out.logits[:, -1].float().argmax(-1).tolist()]
