"""One prefill forward for many caches: how the evaluation runs N methods on one prompt.

Every method on the ragged engine sees the same prefill: the model attends the whole prompt
exactly and the cache only decides afterwards what to keep. An evaluation of N methods x 2 modes
on one prompt can therefore run the model over the prompt once and give each layer's queries,
keys and values to all the caches (``RaggedCache.ingest_prefill``; ``DynamicCache.update``). A
query-agnostic cache receives the context tokens only (causal attention makes them the same
tensors as a context-only forward would give), a query-aware cache the whole prompt. Each cache
then decodes on its own (:func:`greedy_continue`), exactly as ``generate()`` would greedily.

A long prompt's prefill costs far more than a short answer's decode steps, so sharing it divides
the cost of an evaluation grid by about the number of (method, budget, mode) cells.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .._compat import cache_kwarg
from ..engine.cache import RaggedCache
from ..engine.integration import ATTENTION_NAME
from ..engine.prompt import key_validity
from ..policy.scoring import shared_scores


@dataclass
class PrefillTarget:
    """A cache to fill and how many leading prompt tokens it receives (``0 < tokens <= prompt``)."""

    cache: object
    tokens: int


def model_shares_prefill(model) -> bool:
    """Whether ``model`` runs the ``heterocache`` attention (through which the fan-out works)."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None) == ATTENTION_NAME


def supports_shared_prefill(model, cache) -> bool:
    """Whether :func:`prefill_many` can fill ``cache`` for ``model``: a ragged cache or a
    ``DynamicCache`` (or subclass), on a model that runs the ``heterocache`` attention."""
    return model_shares_prefill(model) and isinstance(cache, (RaggedCache, DynamicCache))


class _FanOutCache(RaggedCache):
    """Stores nothing: attends the prompt exactly (SDPA) and passes each layer's tensors on."""

    def __init__(self, targets: list[PrefillTarget]):
        super().__init__()
        self.targets = targets

    def attend(self, module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        self._pending = None
        if self.layers[module.layer_idx].store is not None or query.shape[2] != key.shape[2]:
            raise RuntimeError("a fan-out cache serves exactly one prefill")
        out, _ = sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        valid = key_validity(attention_mask, key)
        if valid is None:  # one tensor for every target, so that shared scores can be recognised
            valid = torch.ones(key.shape[0], key.shape[2], dtype=torch.bool, device=key.device)
        config = getattr(module, "config", None)
        pos = kwargs.get("position_ids")  # the RoPE positions, for methods that undo RoPE
        # e.g. H2O at several budgets and both modes: its prompt scores computed once, the context's
        # recorded on the way (longest targets first)
        with shared_scores(prefixes={t.tokens for t in self.targets}):
            for target in sorted(self.targets, key=lambda t: -t.tokens):
                n = target.tokens
                q, k, v = query[:, :, :n], key[:, :, :n], value[:, :, :n]
                if isinstance(target.cache, RaggedCache):
                    target.cache.ingest_prefill(module.layer_idx, q, k, v, valid[:, :n], scaling, config,
                                                None if pos is None else pos[..., :n], module=module)
                else:
                    target.cache.update(k, v, module.layer_idx)
        return out, None


@torch.inference_mode()
def prefill_many(model, input_ids: torch.Tensor, targets: list[PrefillTarget]) -> torch.Tensor:
    """Run ``input_ids`` ``[1, T]`` through ``model`` once and fill every target cache.

    Args:
        model: a causal LM whose attention is ``heterocache``.
        input_ids: the prompt, ``[1, T]`` (one row, no padding).
        targets: empty caches, each with the number of leading tokens it receives.

    Returns:
        the logits at the last prompt position, ``[1, vocab]`` (the first answer token of a cache
        that received all ``T`` tokens).

    Raises:
        ValueError: a target the fan-out cannot fill, or a token count outside ``[1, T]``.
    """
    T = input_ids.shape[1]
    for target in targets:
        if not supports_shared_prefill(model, target.cache):
            raise ValueError(
                f"cannot fill a {type(target.cache).__name__} from a shared prefill (needs a RaggedCache or "
                f"DynamicCache and a model with the {ATTENTION_NAME!r} attention)"
            )
        if not 0 < target.tokens <= T:
            raise ValueError(f"a target takes {target.tokens} tokens of a {T}-token prompt")
    fan_out = _FanOutCache(targets)
    out = model(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        **cache_kwarg(model, fan_out),
        use_cache=True,
        logits_to_keep=1,
    )
    return out.logits[:, -1]


def eos_ids(model, tokenizer) -> set[int]:
    """The ids that end a generation: the model's generation config's, else the tokenizer's."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}


@torch.inference_mode()
def greedy_continue(
    model, cache, max_new_tokens: int, stop: set[int], logits: torch.Tensor | None = None,
    new_ids: torch.Tensor | None = None,
) -> list[int]:
    """Greedy tokens from a filled cache: what ``generate(do_sample=False)`` produces after it.

    Args:
        model: the causal LM.
        cache: a cache holding the tokens so far.
        max_new_tokens: at most this many tokens (the stop token included when reached).
        stop: ids that end the generation (kept in the output, as ``generate`` does).
        logits: ``[1, vocab]`` logits of the last cached position (when ``new_ids`` is None).
        new_ids: ``[1, q]`` prompt tokens not yet in the cache (a question after a
            query-agnostic prefill); they are run first and give the first logits.

    Returns:
        the new token ids.
    """
    if (logits is None) == (new_ids is None):
        raise ValueError("give exactly one of logits (prompt fully cached) or new_ids")
    if new_ids is not None:
        logits = _step(model, cache, new_ids)
    tokens: list[int] = []
    device = next(model.parameters()).device
    while True:
        token = int(logits.float().argmax(-1)[0])
        tokens.append(token)
        if token in stop or len(tokens) >= max_new_tokens:
            return tokens
        logits = _step(model, cache, torch.tensor([[token]], device=device))


def _step(model, cache, ids: torch.Tensor) -> torch.Tensor:
    past = cache.get_seq_length()
    mask = torch.ones(1, past + ids.shape[1], dtype=torch.long, device=ids.device)
    out = model(input_ids=ids, attention_mask=mask, **cache_kwarg(model, cache), use_cache=True, logits_to_keep=1)
    return out.logits[:, -1]
