"""HeteroCache at a new turn (several tokens at once, e.g. the question after a compressed
document), before the turn is attended:

- with ``turn_reselect="own"`` every compressed head with a host copy re-chooses its prompt slots
  from the attention of the turn's last ``_turn_window`` queries (``config.TURN_WINDOW``) of that
  head over its full prompt keys, i.e. what a query-aware prefill would have kept with the turn as
  its question;
- every pivot's satellites not so re-chosen are refilled with what the turn's last query of their
  pivot attends to most, drifted or not: a new turn is a new retrieval, and the drift test (median
  overlap of top-``base`` sets) rarely fires when ``base`` is a large part of the prompt.

The paper decodes a single turn; a single turn (a prompt, then one token per step) never reaches
this code. ``TurnReselection`` is one part of ``HeteroCachePolicy`` (``policy.py``).
"""

from __future__ import annotations

import numpy as np
import torch

from ...policy.scoring import pool_scores
from ...store.ragged import RaggedKVStore
from .state import LayerState


class TurnReselection:
    """What ``HeteroCachePolicy`` does at a new turn."""

    def before_extend(self, layer_idx: int, store: RaggedKVStore, query: torch.Tensor, scaling: float) -> None:
        if self.turn_reselect == "own":
            self.reselect_turn(layer_idx, store, query, scaling)
        self._refresh_at_turn(layer_idx, store, query, scaling)

    def reselect_turn(self, layer_idx: int, store: RaggedKVStore, query: torch.Tensor,
                      scaling: float | None = None) -> np.ndarray:
        """``turn_reselect="own"``: every re-chosen head of the layer takes, for its prompt slots,
        the top tokens of the attention of its own queries of the turn (``query [B, Hq, q, D]``,
        its last ``_turn_window``) over its full prompt keys, copied from host memory in order of
        position.

        One batched computation for the layer on the device (scores, ranking, token picks for
        every row and head), one copy of the picks to the host (a new turn, not a decode step),
        one host gather and one (asynchronous on CUDA) copy into the store.

        Args:
            scaling: softmax scale (default ``D ** -0.5``).

        Returns:
            int64 ``[B, Nr, nmax]`` (host): the prompt indices (the host copy's, i.e. the j-th
            real token) each re-chosen head now holds, ascending, padded with ``Lmax``; heads not
            re-chosen in a row hold ``Lmax`` only.
        """
        state = self._layers.get(layer_idx)
        if state is None or state.turn is None:
            return np.zeros((0, 0, 0), np.int64)
        # Decode-time decisions still in flight were made on the queries before this turn:
        # superseded, or they would overwrite what is chosen here.
        state.pending.clear()
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        W = min(self._turn_window, query.shape[2])
        picks = self._turn_picks(layer_idx, state, store, query[:, :, -W:, :], scale).cpu().numpy()
        self._write_picks(layer_idx, store, state, picks)
        return picks

    def _turn_picks(self, layer_idx: int, state: LayerState, store: RaggedKVStore, query: torch.Tensor,
                    scaling: float) -> torch.Tensor:
        """int64 ``[B, Nr, nmax]`` the prompt indices each re-chosen head would hold (ascending,
        padded with ``Lmax``): the top tokens of the attention of queries ``[B, Hq, W, D]`` over the
        head's full prompt keys (host copy, staged and copied to the device for this call through
        the layer's transfer), pooled and maxed over the group as the prefill selection scores."""
        B, Hq, W, D = query.shape
        H, turn, host = store.num_heads, state.turn, state.host
        G, Lmax = Hq // H, state.prompt_pos.shape[1]
        dev = query.device
        # Every host segment holds Lmax rows: the re-chosen heads' keys read as [B, Nr, Lmax, D].
        segments = host.segment_of(np.arange(B)[:, None], np.asarray(turn.heads, np.int64)[None, :]).reshape(-1)
        (staged,) = host.stage(host.rows_of(segments), values=False)
        transfer = self._layer_transfer[layer_idx]
        (keys,) = transfer.fetch(layer_idx, staged)
        transfer.wait(layer_idx)
        keys = keys.view(B, len(turn.heads), Lmax, D).float()
        q = query.view(B, H, G, W, D).index_select(1, turn.heads_dev).float()  # [B, Nr, G, W, D]
        logits = torch.einsum("brgwd,brld->brgwl", q, keys) * scaling
        valid = torch.arange(Lmax, device=dev) < turn.prompt_dev[:, None]  # [B, Lmax]
        logits = logits.masked_fill(~valid[:, None, None, None, :], float("-inf"))
        probs = torch.softmax(logits, -1).sum(3)  # [B, Nr, G, Lmax]
        scores = pool_scores(probs, state.kernel, "avg").amax(2)  # [B, Nr, Lmax]
        scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
        nmax = turn.nmax
        top = scores.topk(nmax, dim=-1).indices
        keep = torch.arange(nmax, device=dev) < turn.counts_dev[..., None]
        return torch.where(keep, top, Lmax).sort(-1).values

    def _write_picks(self, layer_idx: int, store: RaggedKVStore, state: LayerState, picks: np.ndarray) -> None:
        """Host half: copy the picked prompt tokens ``picks [B, Nr, nmax]`` (host) of the
        re-chosen (row, head) pairs from host memory into their prompt slots, in order (one host
        gather and one copy for the layer)."""
        turn = state.turn
        rows_h, sel_h = np.nonzero(turn.marks[:, turn.heads])
        if not len(rows_h):
            return
        heads_h = np.asarray(turn.heads, np.int64)[sel_h]
        self._write_from_host(layer_idx, store, state, rows_h, heads_h, picks[rows_h, sel_h],
                              state.plan[rows_h, heads_h])
        self.stats.reselected_heads += len(rows_h)

    def _refresh_at_turn(self, layer_idx: int, store: RaggedKVStore, query: torch.Tensor, scaling: float) -> None:
        """Refill every pivot's satellites before the turn's answer is decoded rather than
        ``refresh_interval`` tokens into it: the turn's last ``refresh_interval`` queries are
        drift-checked at once and every pivot refreshed as if it had drifted (its reference set
        moves to the turn's last query). The drift scores read only the prompt's slots. Not a
        decode step: acted on at once (host reads allowed); decisions of earlier decode steps still
        in flight are superseded. Satellites the turn re-chose on their own are not refilled."""
        state = self._layers.get(layer_idx)
        if state is None or not state.active or not self.refresh:
            return
        state.pending.clear()
        state.queries.clear()
        state.queries.extend(query[:, :, -i, :] for i in range(min(self.refresh_interval, query.shape[2]), 0, -1))
        skip = state.turn.marks[:, state.satellites] if state.turn is not None else None
        self.check_drift(layer_idx, store, scaling, force=True, skip=skip)
