"""Quest-style page summaries of keys: per page of ``page_size`` tokens, the channel-wise minimum
and maximum key, and the upper bound ``sum_d max(q_d min_d, q_d max_d)`` of any query-key product
in the page. One implementation for Quest (``policy.page_selection.PageSummaries``, over a store's
segments) and HeteroCache's turn re-selection (over the full prompt keys of its compressed heads,
built at prefill before compression).
"""

from __future__ import annotations

import torch


def page_minmax(keys: torch.Tensor, valid: torch.Tensor, page_size: int,
                dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-page channel minimum and maximum of dense keys.

    Args:
        keys: ``[S, L, D]`` (any float dtype); token ``j`` of sequence ``s`` lies in page
            ``j // page_size``.
        valid: bool ``[S, L]``: which tokens count (the others are ignored).
        page_size: tokens per page.
        dtype: of the summaries (float32 for Quest; HeteroCache keeps them in the KV dtype).

    Returns:
        ``kmin, kmax [S, ceil(L / page_size), D]`` in ``dtype``; 0 for a page without valid tokens.
    """
    S, L, D = keys.shape
    pages = max(1, -(-L // page_size))
    pad = pages * page_size - L
    k = keys.float()
    v = valid.bool()
    if pad:
        k = torch.cat([k, k.new_zeros(S, pad, D)], 1)
        v = torch.cat([v, v.new_zeros(S, pad)], 1)
    v = v[..., None]
    kmin = torch.where(v, k, float("inf")).view(S, pages, page_size, D).amin(2)
    kmax = torch.where(v, k, float("-inf")).view(S, pages, page_size, D).amax(2)
    empty = ~v.view(S, pages, page_size).any(-1, keepdim=True)
    return kmin.masked_fill(empty, 0.0).to(dtype), kmax.masked_fill(empty, 0.0).to(dtype)


def page_bounds(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """Upper bound of each page's best query-key product, ``q+ . max + q- . min``: float32
    ``[S, G, P]`` for queries ``q [S, G, D]`` and summaries ``[S, P, D]``."""
    qf, lo, hi = q.float(), kmin.float(), kmax.float()
    return torch.bmm(qf.clamp(min=0), hi.transpose(1, 2)) + torch.bmm(qf.clamp(max=0), lo.transpose(1, 2))
