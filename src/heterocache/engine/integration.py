"""The ``heterocache`` attention function, registered with transformers on import.

transformers does not pass the cache to attention functions, so a ``RaggedCache`` announces each
``update()`` here (thread-local) with the exact key tensor it handed back. The attention function
serves the call from the ragged cache only when it receives that very tensor for that layer;
anything else (another cache, no cache, a different layer) gets plain SDPA, unchanged.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .architectures import check_architecture, check_attention_call

ATTENTION_NAME = "heterocache"

_local = threading.local()


class AttentionNotEnabledError(RuntimeError):
    """A ragged cache was used by a model whose attention is not ``heterocache``."""


@dataclass
class PendingUpdate:
    cache: object
    layer_idx: int
    key: torch.Tensor


def set_pending(pending: PendingUpdate) -> None:
    _local.pending = pending


def heterocache_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention over a ``RaggedCache`` when the call comes from its update; SDPA otherwise.

    ``scaling`` and the layer's ``sliding_window`` are honoured; softcapping, attention sinks and
    position biases are refused (``UnsupportedArchitectureError``), never dropped.

    Args:
        module: the attention module (``layer_idx``, ``num_key_value_groups``).
        query: ``[B, Hq, q, D]``; key, value: ``[B, H, kv, D]``.
        attention_mask: boolean ``[B, 1, q, kv]`` (from the sdpa mask builder) or None.

    Returns:
        ``(attn_output [B, q, Hq, D], None)``.
    """
    pending = getattr(_local, "pending", None)
    if pending is not None and pending.key is key and pending.layer_idx == getattr(module, "layer_idx", None):
        _local.pending = None
        return pending.cache.attend(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
    if kwargs.get("s_aux") is not None:  # SDPA would silently drop the sinks
        check_attention_call(module, key, value, kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


def heterocache_mask(*args, config=None, **kwargs):
    """transformers' sdpa mask, after checking the model's architecture (``config`` is what the
    mask builders pass): the first forward of a model loaded with the ``heterocache`` attention
    refuses an unsupported architecture before any layer runs.

    Raises:
        UnsupportedArchitectureError: see ``heterocache.engine.architectures``.
    """
    if config is not None:
        check_architecture(config)
    return sdpa_mask(*args, **kwargs)


def register() -> None:
    """Register the attention and its mask builder (the sdpa one) under ``"heterocache"``.

    Without the mask entry transformers would pass ``attention_mask=None`` to a custom name and
    left padding would be lost.
    """
    AttentionInterface.register(ATTENTION_NAME, heterocache_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, heterocache_mask)


def enable(model):
    """Switch an already loaded model to the ``heterocache`` attention (returns the model).

    Raises:
        UnsupportedArchitectureError: an architecture the engine cannot serve exactly (a
            ``ValueError``; see ``heterocache.engine.architectures`` and docs/models.md).
        ValueError: the model's architecture cannot switch attention implementations.
    """
    register()
    config = getattr(model, "config", None)
    if config is not None:
        check_architecture(config)
    try:
        model.set_attn_implementation(ATTENTION_NAME)
    except (ValueError, AttributeError) as err:
        raise ValueError(
            f"{type(model).__name__} cannot use the '{ATTENTION_NAME}' attention: {err}. "
            "Supported: Llama, Qwen2/2.5, Qwen3, Mistral, Phi-3, Gemma 3 (see docs/models.md)."
        ) from err
    return model


register()
