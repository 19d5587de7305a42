"""Token importance from the attention of the last prompt queries (the observation window)."""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F


def _window_probabilities(
    query: torch.Tensor, key: torch.Tensor, valid: torch.Tensor, window: int, scaling: float, chunk: int
):
    """Attention probabilities of the last ``window`` queries over all keys, one key chunk at a time.

    A two-pass softmax: pass 1 gathers each window query's max and normaliser over every chunk,
    pass 2 yields the normalised probabilities, so at most ``window x chunk`` scores per head exist at
    once (no ``L x L`` matrix, no eager attention).

    The queries are the last ``Lq`` of the prompt (``query [B, Hq, Lq, D]``, ``Lq <= L``): the
    window is at most ``Lq``. ``valid`` is ``[B, L]`` or, for heads holding their own tokens,
    ``[B, H, L]`` (``PrefillContext.key_valid``).

    Yields:
        ``(lo, hi, p)`` with ``p`` float32 ``[B, H, G, w, hi - lo]`` (``w = min(window, Lq)``; query
        ``L - w + i`` is row i); 0 for padding keys, for keys in a query's future and for padding
        queries.
    """
    B, Hq, Lq, D = query.shape
    H, L = key.shape[1], key.shape[2]
    G = Hq // H
    w = min(window, Lq, L)
    q = query[:, :, Lq - w :, :].float().reshape(B, H, G * w, D)
    q_pos = torch.arange(L - w, L, device=query.device).repeat(G)  # [G*w] position of each query row
    key_valid = valid[:, None, None, :] if valid.dim() == 2 else valid[:, :, None, :]  # [B, 1 or H, 1, L]

    def chunk_scores(lo: int, hi: int) -> torch.Tensor:
        k = key[:, :, lo:hi, :].float()
        s = torch.matmul(q, k.transpose(-1, -2)) * scaling  # [B, H, G*w, c]
        k_pos = torch.arange(lo, hi, device=query.device)
        allowed = (k_pos[None, :] <= q_pos[:, None])[None, None] & key_valid[..., lo:hi]
        return s.masked_fill(~allowed, float("-inf"))

    # Pass 1: online softmax statistics (max and normaliser) of every window query.
    row_max = torch.full((B, H, G * w), float("-inf"), device=query.device)
    row_sum = torch.zeros(B, H, G * w, device=query.device)
    for lo in range(0, L, chunk):
        s = chunk_scores(lo, min(L, lo + chunk))
        new_max = torch.maximum(row_max, s.amax(-1))
        safe = torch.nan_to_num(new_max, neginf=0.0)
        row_sum = row_sum * torch.exp(row_max - safe) + torch.exp(s - safe[..., None]).sum(-1)
        row_max = new_max
    row_max = torch.nan_to_num(row_max, neginf=0.0)
    inv_sum = 1.0 / row_sum.clamp_min(1e-30)
    # Pass 2: normalised probabilities.
    for lo in range(0, L, chunk):
        hi = min(L, lo + chunk)
        p = torch.exp(chunk_scores(lo, hi) - row_max[..., None]) * inv_sum[..., None]
        yield lo, hi, p.view(B, H, G, w, hi - lo)


def window_attention_scores(
    query: torch.Tensor,
    key: torch.Tensor,
    valid: torch.Tensor,
    window: int,
    scaling: float,
    chunk: int = 8192,
) -> torch.Tensor:
    """Attention of the last ``window`` queries over all keys, summed over those queries.

    Computed in key chunks with a two-pass softmax so that at most ``window x chunk`` scores per
    head exist at once (no ``L x L`` matrix, no eager attention).

    Args:
        query: ``[B, Hq, Lq, D]`` the prompt's last ``Lq`` queries (``Lq <= L``; all of them or the
            window's are enough).
        key: ``[B, H, L, D]`` (``Hq = H * G``).
        valid: bool ``[B, L]`` real tokens (or ``[B, H, L]`` per head).
        window: number of last queries (clamped to Lq).
        scaling: softmax scale.
        chunk: keys per chunk.

    Returns:
        float32 ``[B, Hq, L]``: for each query head, summed attention probability of each key
        (0 for padding keys and for keys in the future of a window query).
    """
    return _memoised("window", (query, key, valid), (window, float(scaling), chunk), _window_scores)


def _window_scores(query, key, valid, window, scaling, chunk) -> torch.Tensor:
    B, Hq = query.shape[:2]
    H, L = key.shape[1], key.shape[2]
    out = torch.empty(B, H, Hq // H, L, device=query.device)
    for lo, hi, p in _window_probabilities(query, key, valid, window, scaling, chunk):
        out[..., lo:hi] = p.sum(3)
    return out.reshape(B, Hq, L)


def window_attention_stats(
    query: torch.Tensor,
    key: torch.Tensor,
    valid: torch.Tensor,
    window: int,
    scaling: float,
    chunk: int = 8192,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-key moments of the attention of the last ``window`` queries (what CAKE needs).

    Same chunked two-pass softmax as ``window_attention_scores`` (no ``L x L`` matrix).

    Returns:
        float32 ``[B, Hq, L]`` each, summed over the window queries ``i`` for every key ``j``:
        ``sum_i p_ij``, ``sum_i p_ij**2`` and ``-sum_i p_ij log p_ij`` (0 where p is 0).
    """
    return _memoised("window_stats", (query, key, valid), (window, float(scaling), chunk), _window_stats)


def _window_stats(query, key, valid, window, scaling, chunk) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, Hq = query.shape[:2]
    H, L = key.shape[1], key.shape[2]
    G = Hq // H
    total = torch.empty(B, H, G, L, device=query.device)
    squares = torch.empty_like(total)
    entropy = torch.empty_like(total)
    for lo, hi, p in _window_probabilities(query, key, valid, window, scaling, chunk):
        total[..., lo:hi] = p.sum(3)
        squares[..., lo:hi] = (p * p).sum(3)
        entropy[..., lo:hi] = -torch.xlogy(p, p).sum(3)
    return total.reshape(B, Hq, L), squares.reshape(B, Hq, L), entropy.reshape(B, Hq, L)


_shared: dict | None = None
_prefixes: tuple[int, ...] = ()


@contextmanager
def shared_scores(prefixes=()):
    """Within this block, :func:`accumulated_attention`, :func:`window_attention_scores` and
    :func:`window_attention_stats` compute each result once per distinct input (the same tensors,
    the same view, the same parameters): several caches filled from one prefill forward (the
    evaluation's fan-out: H2O, SnapKV, CAKE... at three budgets) score the same prompt.

    Args:
        prefixes: prompt lengths that will also be asked for as leading slices of the same tensors
            (``query[:, :, :n]``...: a query-agnostic cache filled from the same forward). Causal
            attention makes their scores partial sums of the longer one's, so a longer call records
            them on the way; ask for the longest first.

    Blocks do not nest; results are dropped when the block ends, while its inputs are still alive.
    """
    global _shared, _prefixes
    if _shared is not None:
        raise RuntimeError("shared_scores() blocks do not nest")
    _shared, _prefixes = {}, tuple(sorted({int(n) for n in prefixes}))
    try:
        yield
    finally:
        _shared, _prefixes = None, ()


def _view_key(t: torch.Tensor, length_dim: int | None = None) -> tuple:
    """Identifies a view of a tensor; with ``length_dim``, up to its length there (a leading slice
    along that dimension has the same key)."""
    shape = tuple(n for d, n in enumerate(t.shape) if length_dim is None or d != length_dim % t.dim())
    return (t.data_ptr(), shape, t.stride(), t.dtype, t.device)


def _memoised(kind: str, tensors: tuple, params: tuple, compute):
    """``compute(*tensors, *params)``, once per distinct input inside a :func:`shared_scores` block
    (each caller gets its own copy, so in-place changes stay with it)."""
    if _shared is None:
        return compute(*tensors, *params)
    key = (kind, *(_view_key(t) for t in tensors), *params)
    if key not in _shared:
        _shared[key] = compute(*tensors, *params)
    value = _shared[key]
    return tuple(v.clone() for v in value) if isinstance(value, tuple) else value.clone()


def accumulated_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    valid: torch.Tensor,
    scaling: float,
    query_chunk: int = 512,
    max_chunk_elements: int = 1 << 26,
) -> torch.Tensor:
    """Column sums of the causal attention of every real prompt query (H2O's accumulated score).

    Computed in chunks of queries: at most ``min(query_chunk, max_chunk_elements / (B*Hq*L))``
    query rows (at least 1) are scored at once, each against the keys up to the chunk's last
    position, so the ``L x L`` matrix is never materialised (no eager attention).

    Args:
        query: ``[B, Hq, Lq, D]``: the queries of the last ``Lq`` tokens (all ``L``, or one piece
            of a prompt prefilled in pieces: the sum over the pieces is the whole prompt's);
            key: ``[B, H, L, D]`` (``Hq = H * G``) every key up to the last query.
        valid: bool ``[B, L]`` real tokens (padding queries add nothing, padding keys get 0).
        scaling: softmax scale.

    Returns:
        float32 ``[B, Hq, L]``: for each query head, the attention each key received, summed over
        the given queries.
    """
    L = key.shape[2]
    if query.shape[2] != L:  # a later piece of a prompt: not shared between caches
        return _accumulated_attention(query, key, valid, scaling, query_chunk, max_chunk_elements)[L]
    if _shared is None:
        return _accumulated_attention(query, key, valid, scaling, query_chunk, max_chunk_elements)[L]
    base = (_view_key(query, 2), _view_key(key, 2), _view_key(valid, 1), float(scaling), query_chunk,
            max_chunk_elements)
    if (base, L) not in _shared:
        marks = [n for n in _prefixes if n < L]
        computed = _accumulated_attention(query, key, valid, scaling, query_chunk, max_chunk_elements, marks)
        for n, scores in computed.items():
            _shared.setdefault((base, n), scores)
    return _shared[(base, L)].clone()


def _accumulated_attention(
    query, key, valid, scaling, query_chunk, max_chunk_elements, prefixes=()
) -> dict[int, torch.Tensor]:
    """``{L: scores}`` plus ``{n: scores of the first n tokens}`` for each ``n`` in ``prefixes``
    (``0 < n < L``). Chunk boundaries fall on every multiple of the chunk size and on each ``n``;
    a prefix's result equals a call on ``query[:, :, :n]`` up to float rounding (the rows are
    grouped into chunks differently). The queries are those of tokens ``L - Lq .. L - 1``."""
    B, Hq, Lq, D = query.shape
    H, L = key.shape[1], key.shape[2]
    G = Hq // H
    first = L - Lq  # the token of the first query
    k = key.float()
    c = max(1, min(query_chunk, max_chunk_elements // max(1, B * Hq * L)))
    marks = sorted({int(n) for n in prefixes if first < n < L})
    cuts = sorted(set(range(first, L, c)) | set(marks) | {L})
    out = torch.zeros(B, H, G, L, device=query.device)
    result: dict[int, torch.Tensor] = {}
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        n = hi - lo
        q = query[:, :, lo - first : hi - first, :].float().reshape(B, H, G * n, D)
        # Causal: queries before ``hi`` see no key at or after it; score only keys [0, hi), and
        # mask only the diagonal block (keys [lo, hi)) where a query's future begins.
        s = torch.matmul(q, k[:, :, :hi].transpose(-1, -2)).mul_(scaling)  # [B, H, G*n, hi]
        pos = torch.arange(lo, hi, device=query.device)
        future = (pos[None, :] > pos[:, None]).repeat(G, 1)  # [G*n, n]; rows: G groups of n queries
        s[..., lo:hi].masked_fill_(future, float("-inf"))
        head_valid = valid[:, :hi]
        if not bool(head_valid.all()):
            s.masked_fill_(~head_valid[:, None, None, :], float("-inf"))
        p = torch.softmax(s, dim=-1)
        if not bool(valid[:, lo:hi].all()):
            q_valid = valid[:, lo:hi].repeat(1, G)[:, None, :, None]  # [B, 1, G*n, 1]
            p = torch.where(q_valid, p, torch.zeros((), device=p.device))  # padding queries: NaN rows -> 0
        out[..., :hi] += p.view(B, H, G, n, hi).sum(3)
        if hi in marks:
            # Rows below ``hi`` saw no key at or after it: this is the prefix's own result.
            result[hi] = out[..., :hi].reshape(B, Hq, hi).clone()
    result[L] = out.reshape(B, Hq, L)
    return result


def stored_attention(store, query: torch.Tensor, scaling: float) -> torch.Tensor:
    """Attention probabilities of one new query per query head over its KV head's stored tokens.

    Reads the packed buffers in place, block by block (each block has one owner segment), with a
    segment-wise softmax: no copy of the cache, no padding to the longest head.

    Args:
        store: a ``RaggedKVStore`` (every segment holding at least one token).
        query: ``[B, Hq, 1, D]`` (query head ``h * G + g`` reads KV head ``h``).
        scaling: softmax scale.

    Returns:
        float32 ``[capacity, G]``: probability of every slot for each of its segment's G query heads
        (0 at unused slots). ``out[store.padded_index()[0]]`` gives ``[S, M, G]``.
    """
    B, Hq, _, D = query.shape
    H, bs = store.num_heads, store.block_size
    G = Hq // H
    S = store.num_segments
    owner = store.block_owner
    q = query.reshape(S, G, D).to(store.dtype)
    kb = store.k.view(-1, bs, D)
    scores = torch.bmm(q[owner], kb.transpose(1, 2)).float() * scaling  # [NB, G, bs]
    slot = store.block_offset[:, None] + torch.arange(bs, device=store.device)[None, :]
    inside = slot < store.length[owner][:, None]
    scores.masked_fill_(~inside[:, None, :], float("-inf"))
    seg_max = torch.full((S, G), float("-inf"), device=store.device)
    seg_max.scatter_reduce_(0, owner[:, None].expand(-1, G), scores.amax(-1), reduce="amax")
    seg_max = torch.nan_to_num(seg_max, neginf=0.0)
    probs = torch.exp(scores - seg_max[owner][:, :, None])
    denom = torch.zeros(S, G, device=store.device).index_add_(0, owner, probs.sum(-1))
    probs = probs / denom.clamp_min(1e-30)[owner][:, :, None]
    return probs.transpose(1, 2).reshape(-1, G)


def pool_scores(scores: torch.Tensor, kernel: int | torch.Tensor, mode: str = "avg") -> torch.Tensor:
    """1-D pooling along the token axis (stride 1, 'same' length) to keep neighbours together.

    Args:
        scores: ``[B, ..., L]``.
        kernel: odd window size (1 disables pooling), or per-row taps from :func:`row_taps`
            (bool ``[B, K]``: True on the row's window, centred), for rows pooled with
            different kernels in one call; each row then gets exactly what its own int kernel gives.
        mode: "avg" or "max".
    """
    if mode not in ("avg", "max"):
        raise ValueError(f"pooling must be 'avg' or 'max', got {mode!r}")
    taps = kernel if isinstance(kernel, torch.Tensor) else None
    width = taps.shape[-1] if taps is not None else kernel
    if width <= 1:
        return scores
    # A sum (or max) of ``width`` shifted slices: what avg_pool1d / max_pool1d compute (zero / -inf
    # padding, count_include_pad), at a fraction of their CPU cost on long rows. Per-row taps add
    # exact zeros outside a row's window, so its sum is the same floats in the same order.
    L, pad = scores.shape[-1], width // 2
    fill = 0.0 if mode == "avg" else float("-inf")
    padded = F.pad(scores, (pad, pad), value=fill)
    if taps is not None:
        off = ~taps.view(taps.shape[0], *(1,) * (scores.dim() - 2), width)
        out = torch.zeros_like(scores) if mode == "avg" else torch.full_like(scores, float("-inf"))
        for shift in range(width):
            tap = padded[..., shift : shift + L].masked_fill(off[..., shift : shift + 1], fill)
            if mode == "avg":
                out += tap
            else:
                torch.maximum(out, tap, out=out)
        return out / (~off).sum(-1, keepdim=True).to(scores.dtype) if mode == "avg" else out
    out = padded[..., 0:L].clone()
    for shift in range(1, width):
        tap = padded[..., shift : shift + L]
        if mode == "avg":
            out += tap
        else:
            torch.maximum(out, tap, out=out)
    return out / width if mode == "avg" else out


def row_taps(kernels, device) -> int | torch.Tensor:
    """The ``kernel`` argument of :func:`pool_scores` for rows pooled with ``kernels`` (host ints,
    one per row, odd): the int when they agree (the plain path), else bool taps ``[B, K]``
    (``K = max(kernels)``) on ``device``."""
    kernels = [int(k) for k in kernels]
    if len(set(kernels)) <= 1:
        return kernels[0] if kernels else 1
    width = max(kernels)
    offsets = torch.arange(width) - width // 2
    return (offsets.abs()[None, :] <= torch.tensor(kernels)[:, None] // 2).to(device)


def reduce_gqa(scores: torch.Tensor, num_heads: int, mode: str = "mean") -> torch.Tensor:
    """Query-head scores ``[B, Hq, L]`` to KV-head scores ``[B, H, L]`` (mean or max over the group)."""
    B, Hq, L = scores.shape
    grouped = scores.view(B, num_heads, Hq // num_heads, L)
    if mode == "mean":
        return grouped.mean(2)
    if mode == "max":
        return grouped.amax(2)
    raise ValueError(f"gqa_reduce must be 'mean' or 'max', got {mode!r}")


def topk_keep(scores: torch.Tensor, valid: torch.Tensor, counts: torch.Tensor, protect_last=0) -> torch.Tensor:
    """Keep mask with the ``counts`` highest-scoring real tokens per row and head.

    Args:
        scores: ``[B, H, L]``.
        valid: bool ``[B, L]`` (or ``[B, H, L]``, each head its own real tokens).
        counts: int64 ``[B, H]`` tokens to keep (<= real tokens of the row and head).
        protect_last: the last this-many real tokens of each row are kept first (the newest ones when
            the count is smaller): an int, or int64 ``[B]`` / ``[B, H]``.

    Returns:
        bool ``[B, H, L]``; kept tokens stay in their original order in the store.
    """
    B, H, L = scores.shape
    s = scores.float().clone()
    valid = valid[:, None, :] if valid.dim() == 2 else valid  # [B, 1 or H, L]
    protect = torch.as_tensor(protect_last, device=scores.device).long()
    if protect.dim() == 1:
        protect = protect[:, None]
    protect = torch.minimum(protect.expand(B, H), counts)  # never more than the count: all are kept
    if bool((protect > 0).any()):
        from_end = torch.flip(torch.cumsum(torch.flip(valid.long(), [-1]), -1), [-1])  # 1 = last real token
        protected = valid & (from_end <= protect[:, :, None])
        s = s.masked_fill(protected, float("inf"))
    s = s.masked_fill(~valid, float("-inf"))
    kmax = int(counts.max()) if counts.numel() else 0
    keep = torch.zeros(B, H, L, dtype=torch.bool, device=scores.device)
    if kmax == 0:
        return keep
    idx = s.topk(kmax, dim=-1).indices  # [B, H, kmax], best first
    take = torch.arange(kmax, device=scores.device)[None, None, :] < counts[:, :, None]
    keep.scatter_(-1, idx, take)
    return keep
