"""One greedy answer for one prompt, in either evaluation mode.

- ``query_aware``: the whole prompt (context and question) is prefilled by ``generate()``, so a
  compression method sees the question while it chooses what to keep.
- ``query_agnostic``: the context alone is prefilled first (one forward pass; the method
  compresses it without knowing the question), then ``generate()`` receives the full prompt ids
  and the same cache; transformers feeds only the uncached question ids. This is the multi-turn
  situation (one document, many questions) where methods that refresh their selection while
  decoding should pay off.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .._compat import cache_kwarg
from .prompting import EncodedPrompt
from .setup import MODES, canonical_mode  # noqa: F401  (defined there, without torch)


@dataclass(frozen=True)
class Generation:
    """What one generation produced.

    Attributes:
        text: decoded new tokens (special tokens skipped).
        new_tokens: number of generated tokens.
        prefill_seconds: time of the context-only prefill (0 in query-aware mode).
        seconds: wall time of the whole call, prefill included.
    """

    text: str
    new_tokens: int
    prefill_seconds: float
    seconds: float


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _sync(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock timings cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def prefill(model, input_ids: torch.Tensor, cache, chunk_size: int | None = None) -> None:
    """Prefill a context: run ``input_ids`` ``[1, C]`` through ``model`` into ``cache`` (only the
    last logits are kept), then end the prompt (``RaggedCache.end_prompt``), so that what comes
    next (the question) is a new turn, compressed or not as the method does with turns.

    Args:
        chunk_size: run the context in pieces of this many tokens, as
            ``generate(prefill_chunk_size=...)`` does (default None: one forward).
    """
    from ..engine.cache import RaggedCache

    total = input_ids.shape[1]
    step = total if chunk_size is None else chunk_size
    for lo in range(0, total, step):
        hi = min(total, lo + step)
        kwargs = dict(input_ids=input_ids[:, lo:hi], attention_mask=torch.ones_like(input_ids[:, :hi]),
                      use_cache=True, **cache_kwarg(model, cache))
        try:
            # A [1, C, vocab] logits tensor would dwarf the KV cache at long C: keep the last row only.
            model(**kwargs, logits_to_keep=1)
        except TypeError as err:
            if "logits_to_keep" not in str(err):
                raise
            model(**kwargs)  # an architecture without logits_to_keep
    if isinstance(cache, RaggedCache):
        cache.end_prompt()


@torch.inference_mode()
def generate_answer(
    model, tokenizer, prompt: EncodedPrompt, cache, mode: str, max_new_tokens: int,
    prefill_chunk_size: int | None = None,
) -> Generation:
    """Greedy answer to ``prompt`` with ``cache`` (fresh, empty) in ``mode``.

    Args:
        model: a causal LM.
        tokenizer: decodes the reply; its pad/eos id is passed to ``generate``.
        prompt: token ids with the context length.
        cache: the KV cache to fill (a ``transformers.Cache``).
        mode: ``"query_aware"`` or ``"query_agnostic"``.
        max_new_tokens: generation limit (generation also stops at EOS).
        prefill_chunk_size: prefill in pieces of this many tokens (``docs/prefill.md``): the whole
            prompt (query-aware, ``generate(prefill_chunk_size=...)``) or the context
            (query-agnostic; the question is then one turn). Default None: one piece.
    """
    mode = canonical_mode(mode)
    device = _device(model)
    ids = torch.tensor([prompt.input_ids], dtype=torch.long, device=device)
    _sync(device)
    start = time.perf_counter()
    prefill_seconds = 0.0
    if mode == "query_agnostic":
        prefill(model, ids[:, : prompt.context_len], cache, chunk_size=prefill_chunk_size)
        _sync(device)
        prefill_seconds = time.perf_counter() - start
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        **cache_kwarg(model, cache),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad,
        prefill_chunk_size=prefill_chunk_size if mode == "query_aware" else None,
    )
    _sync(device)
    seconds = time.perf_counter() - start
    new = out[0, ids.shape[1] :]
    return Generation(
        tokenizer.decode(new, skip_special_tokens=True), int(new.numel()), prefill_seconds, seconds
    )
