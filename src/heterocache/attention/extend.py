"""Attention of several new query tokens on a non-empty ragged store (a later turn appended to a
cached conversation). Rare, so it pads the stored part to a dense tensor and calls SDPA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..store.ragged import RaggedKVStore


def extend_attention(
    store: RaggedKVStore,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    new_valid: torch.Tensor | None,
    scaling: float,
    window: int | None = None,
    positions: torch.Tensor | None = None,
    extra: tuple | None = None,
) -> torch.Tensor:
    """Attention of q new tokens over the stored tokens plus themselves (causal).

    Args:
        store: the layer's store (tokens already cached, all in the past of the new ones).
        query: ``[B, Hq, q, D]``.
        key, value: ``[B, H, q, D]`` of the new tokens (not yet in the store).
        new_valid: optional bool ``[B, q]``: False for padding among the new tokens.
        scaling: softmax scale.
        window: a sliding layer's ``W``: query at position ``p`` sees positions ``> p - W`` only.
        positions: int ``[q]`` logical positions of the new tokens (needed with ``window``).
        extra: optional past tokens kept outside the store (``Policy.extend_extra``): ``(key
            [S, M, D], value [S, M, D], valid bool [S, M])``, visible to every new token (full
            layers only).

    Returns:
        ``[B, q, Hq, D]``.
    """
    B, Hq, q_len, D = query.shape
    H = store.num_heads
    G = Hq // H
    k_old, v_old, valid_old, pos_old = store.padded()
    if extra is not None:
        if window is not None:
            raise ValueError("extra past tokens are for full-attention layers only")
        ek, ev, evalid = extra
        M = ek.shape[1]
        k_old = torch.cat([k_old, ek.reshape(B, H, M, D).to(k_old.dtype)], dim=2)
        v_old = torch.cat([v_old, ev.reshape(B, H, M, D).to(v_old.dtype)], dim=2)
        valid_old = torch.cat([valid_old, evalid.reshape(B, H, M)], dim=2)
    k_all = torch.cat([k_old.to(key.dtype), key], dim=2)
    v_all = torch.cat([v_old.to(value.dtype), value], dim=2)
    ar = torch.arange(q_len, device=query.device)
    causal = ar[None, :] <= ar[:, None]
    old_mask = valid_old[:, :, None, :].expand(-1, -1, q_len, -1)
    if window is not None:
        causal = causal & (ar[None, :] > ar[:, None] - window)
        qpos = positions.to(pos_old.device).long()
        old_mask = old_mask & (pos_old[:, :, None, :] > qpos[None, None, :, None] - window)
    new_mask = causal[None, None].expand(B, H, q_len, q_len)
    if new_valid is not None:
        new_mask = new_mask & new_valid[:, None, None, :]
    mask = torch.cat([old_mask, new_mask], dim=-1)
    # A padding query may see nothing; let it see itself so its (ignored) output is not NaN.
    mask = _with_diagonal(mask, k_old.shape[2])
    out = F.scaled_dot_product_attention(
        query.view(B, H, G, q_len, D).reshape(B * H, G, q_len, D),
        k_all.reshape(B * H, 1, -1, D).expand(-1, G, -1, -1),
        v_all.reshape(B * H, 1, -1, D).expand(-1, G, -1, -1),
        attn_mask=mask.reshape(B * H, 1, q_len, -1),
        scale=scaling,
    )
    return out.view(B, Hq, q_len, D).transpose(1, 2)


def _with_diagonal(mask: torch.Tensor, offset: int) -> torch.Tensor:
    """Let every new token attend to itself (column ``offset + i`` for query i)."""
    q_len = mask.shape[2]
    eye = torch.eye(q_len, dtype=torch.bool, device=mask.device)
    mask = mask.clone()
    mask[..., offset:] |= eye
    return mask
