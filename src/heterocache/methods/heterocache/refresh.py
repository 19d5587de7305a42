"""HeteroCache's drift-triggered refresh: every ``refresh_interval`` decode steps each pivot scores
the buffered queries against its full prompt keys; if the median overlap of their top-k sets with
its reference set falls below ``drift_threshold``, the reference set moves to the newest step's and
the pivot's satellites get their prompt slots refilled, from host memory, with the positions the
pivot now attends to most.

A decode-time decision travels to the host without a wait and is acted on ``_decision_lag`` steps
later (``config.DECISION_LAG``), so a decode step reads no device value on the host.

``DriftRefresh`` is one part of ``HeteroCachePolicy`` (``policy.py``); the drift scores themselves
are in ``drift.py``, the host-to-device writes in ``host_copies.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ...store.ragged import RaggedKVStore
from .drift import membership, set_overlap, topk_sets
from .state import LayerState


@dataclass
class Decision:
    """A drift check's outcome, on its way to the host without blocking it."""

    due: int  # policy step at which the host acts on it
    host: torch.Tensor  # int64: drifted [B * P] then refill indices [B * Ns * nmax] (pinned on CUDA;
    # the copy's target, kept referenced until the host has read it through ``view``)
    view: np.ndarray  # the same memory as NumPy
    event: object  # CUDA event recorded after the copy (None off CUDA)
    scores: torch.Tensor  # float32 [B, P, Lmax] each pivot's newest scores (device)
    nmax: int
    skip: np.ndarray | None = None  # bool [B, Ns]: satellites not to refill (re-chosen on their own)


class DriftRefresh:
    """Drift checks of the pivots and refills of their satellites, for ``HeteroCachePolicy``."""

    def before_attention(self, layer_idx: int) -> None:
        if layer_idx == self._first_layer:
            self._step += 1
            self._act_on_due_decisions()
        transfer = self._layer_transfer.get(layer_idx)
        if transfer is not None:
            transfer.wait(layer_idx)

    def on_decode(self, layer_idx: int, store: RaggedKVStore, query: torch.Tensor, scaling: float) -> None:
        state = self._layers.get(layer_idx)
        if state is None or not state.active or not self.refresh:
            return
        state.queries.append(query[:, :, -1, :])
        if len(state.queries) >= self.refresh_interval:
            self.check_drift(layer_idx, store, scaling, defer=self._decision_lag > 0)

    def check_drift(self, layer_idx: int, store: RaggedKVStore, scaling: float, force: bool = False,
                    defer: bool = False, skip: np.ndarray | None = None) -> list:
        """Score the buffered queries of every pivot and row at once; refresh the satellites of the
        pivots that drifted.

        One batched computation for the layer (no loop over pivots or rows): the pivots' prompt
        keys gathered with a host-planned index, their pooled attention, top-k sets, overlaps with
        the reference sets and the median over the buffered steps, all on the device; the
        reference sets of drifted pivots move on the device too. The decision and the satellites'
        refill indices then go to the host in one copy.

        Under tensor parallelism each rank scores the pivots it holds; where a satellite sits on
        another rank than its pivot, one all-reduce per check carries the layer's drift flags and
        those satellites' refill indices (``clusters.ClusterLayout``). Every rank must then run the
        check of that layer at the same step, which it does: the step counts are the same everywhere.

        Args:
            force: refresh as if every pivot had drifted (testing, stress runs, a new turn).
            defer: the decode step's mode: the copy is non-blocking (pinned memory and an event on
                CUDA) and the host acts on it ``_decision_lag`` steps later, so nothing waits for
                the device. False: act now (reads the device; returns what was refreshed).
            skip: bool ``[B, Ns]`` (host): satellites not to refill (a new turn re-chose them).

        Returns:
            ``[(row, pivot), ...]`` refreshed by this process (pivots by their global KV head;
            empty when deferred).
        """
        state = self._layers[layer_idx]
        if not state.queries:
            return []
        Q = torch.stack(state.queries)  # [T, B, Hq, D]
        state.queries.clear()
        T, B, Hq, D = Q.shape
        P, G = len(state.pivots), Hq // store.num_heads
        layout = state.layout
        if P == 0 and not layout.exchange:
            return []
        Lmax = int(state.prompt_tokens.max()) if B else 0
        nmax = int(min(state.sat_tokens_all.max(), Lmax)) if state.sat_tokens_all.size else 0
        if P:
            q = Q.view(T, B, store.num_heads, G, D)[:, :, state.pivots].permute(1, 2, 0, 3, 4)  # [B, P, T, G, D]
            scores = self._pivot_scores(state, store, q, scaling)  # [B, P, T, Lmax]
            tops, in_set = topk_sets(scores, state.k_dev, int(state.k.max()))
            self.stats.checks += B * P
            drifted = set_overlap(tops, in_set, state.reference, state.k_dev).median(-1).values < self.drift_threshold
            if force:
                drifted = torch.ones_like(drifted)
            newest = membership(tops[:, :, -1], in_set[:, :, -1], state.reference.shape[-1])
            state.reference = torch.where(drifted[..., None], newest, state.reference)
            last = scores[:, :, -1]  # [B, P, Lmax]
            refill = self._refill_indices(state, last, nmax)  # [B, targets, nmax]
            drifted = drifted.long()
        else:  # this rank holds none of the layer's pivots, only satellites of pivots elsewhere
            last = None
            drifted = torch.zeros(B, 0, dtype=torch.long, device=store.device)
            refill = torch.zeros(B, 0, nmax, dtype=torch.long, device=store.device)
        if len(layout.own) != len(layout.pivots):  # the layer's drift flags, ours filled in
            drifted = torch.zeros(B, len(layout.pivots), dtype=torch.long,
                                  device=store.device).index_copy_(1, state.index.own, drifted)
        if layout.exchange:
            drifted, refill = self._exchange(state, drifted, refill, nmax)
        packed = torch.cat([drifted.reshape(-1), refill.reshape(-1)])
        decision = self._send_to_host(packed, last, nmax, store.device)
        decision.skip = skip
        if defer:
            state.pending.append(decision)
            return []
        return self._refill(layer_idx, store, state, decision)

    def _refill_indices(self, state: LayerState, last: torch.Tensor, nmax: int) -> torch.Tensor:
        """Prompt indices each satellite whose pivot this process holds (``layout.targets``)
        would be refilled with: the top ``sat_tokens`` of its pivot's newest scores, ascending,
        padded with ``Lmax``: int64 ``[B, targets, nmax]`` (``nmax``: the most prompt slots of
        any satellite of the layer, the same on every rank)."""
        B, Lmax = last.shape[0], last.shape[-1]
        targets = len(state.layout.targets)
        if nmax == 0 or targets == 0:
            return last.new_zeros(B, targets, nmax, dtype=torch.long)
        sat_scores = last.index_select(1, state.index.target_pivot)  # [B, targets, Lmax]
        top = sat_scores.topk(nmax, dim=-1).indices
        keep = torch.arange(nmax, device=top.device) < state.target_tokens_dev[:, :, None]
        return torch.where(keep, top, Lmax).sort(-1).values

    def _exchange(self, state: LayerState, drifted: torch.Tensor, refill: torch.Tensor,
                  nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Tensor parallel: sum over the shards the layer's drift flags ``[B, P]`` (each rank's
        own pivots filled in) and the refill indices of the satellites held by another rank than
        their pivot (written by the pivot's rank): one all-reduce of ``B * (P + Nx * nmax)``
        int64. Returns the layer's drift flags and the refill indices of this rank's satellites
        ``[B, Ns, nmax]``."""
        layout, index = state.layout, state.index
        B, P, Nx = drifted.shape[0], drifted.shape[1], len(layout.cross)
        buf = torch.zeros(B, P + Nx * nmax, dtype=torch.long, device=drifted.device)
        buf[:, :P] = drifted
        cross = buf[:, P:].view(B, Nx, nmax)
        if len(layout.cross_src):
            cross.index_copy_(1, index.cross_dst, refill.index_select(1, index.cross_src))
        self.kv_shard.all_reduce_sum_(buf)
        if index.local_src is None:  # this rank's satellites all have their pivot here
            return buf[:, :P], refill
        return buf[:, :P], torch.cat([refill, cross], 1).index_select(1, index.local_src)

    def _send_to_host(self, packed: torch.Tensor, last, nmax: int, device) -> Decision:
        """Copy ``packed`` into host memory without blocking (pinned + event on CUDA)."""
        due = self._step + self._decision_lag
        if device.type != "cuda":
            view = np.empty(packed.shape, np.int64)
            host = torch.from_numpy(view)
            host.copy_(packed)
            return Decision(due, host, view, None, last, nmax)
        host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
        host.copy_(packed, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(device))
        return Decision(due, host, host.numpy(), event, last, nmax)

    def _act_on_due_decisions(self) -> None:
        """Refill what the decisions that are due ask for (start of a step, so the copies overlap
        the layers that run before each refreshed one)."""
        for layer_idx, state in self._layers.items():
            while state.pending and state.pending[0].due <= self._step:
                self._refill(layer_idx, self._stores[layer_idx], state, state.pending.pop(0))

    def scores_at_refresh(self, layer: int, row: int, pivot: int) -> torch.Tensor:
        """Pivot ``pivot``'s (its KV head) pooled prompt scores ``[prompt tokens]`` in row ``row``
        at the latest drift check of model layer ``layer`` that refreshed satellites (inspection).

        Raises:
            KeyError: that layer never refreshed; ValueError: ``pivot`` is not one of its pivots.
        """
        scores, pivots, prompt = self.last_pivot_scores[layer]
        i = int(np.nonzero(pivots == pivot)[0][0]) if (pivots == pivot).any() else None
        if i is None:
            raise ValueError(f"KV head {pivot} is not a pivot this process scores in layer {layer}")
        return scores[row, i, : int(prompt[row])]

    def flush(self) -> None:
        """Act on every decision still in flight now (waits for the device): tests, inspection,
        row changes."""
        for layer_idx, state in self._layers.items():
            while state.pending:
                self._refill(layer_idx, self._stores[layer_idx], state, state.pending.pop(0))

    def _refill(self, layer_idx: int, store: RaggedKVStore, state: LayerState, decision: Decision) -> list:
        """Refill the satellites of the drifted pivots with their pivot's current top positions:
        one host gather and one (asynchronous on CUDA) copy for the whole layer. Refreshes are
        counted where the pivot is (under tensor parallelism: once over the ranks)."""
        if decision.event is not None and not decision.event.query():
            self.stats.late_decisions += 1
            decision.event.synchronize()
        layout = state.layout
        B, P, Ns = len(state.prompt_tokens), len(layout.pivots), len(state.satellites)
        drifted = decision.view[: B * P].reshape(B, P).astype(bool)
        idx = decision.view[B * P :].reshape(B, Ns, decision.nmax)
        # Host bookkeeping only (NumPy): which (row, pivot) drifted, counted per pivot.
        rows_d, own_d = np.nonzero(drifted[:, layout.own])
        pivots_d = np.asarray(layout.pivots, np.int64)[np.asarray(layout.own, np.int64)[own_d]]
        refreshed = list(zip(rows_d.tolist(), pivots_d.tolist()))
        heads, counts = np.unique(pivots_d, return_counts=True)
        self.stats.refreshes.update({(state.model_layer, int(h)): int(c) for h, c in zip(heads, counts)})
        if len(rows_d):  # the layer's scores once (device), for inspection: ``scores_at_refresh``
            own_pivots = np.asarray(layout.pivots, np.int64)[np.asarray(layout.own, np.int64)]
            self.last_pivot_scores[state.model_layer] = (decision.scores, own_pivots, state.prompt_tokens.copy())
        # Satellites of a drifted pivot that do not already hold their whole prompt.
        due = drifted[:, state.sat_pivot] & (state.sat_tokens < state.prompt_tokens[:, None])  # [B, Ns]
        if decision.skip is not None:
            due &= ~decision.skip
        rows_h, sat_h = np.nonzero(due)
        if not len(rows_h):
            return refreshed
        heads_h = np.asarray(state.satellites, np.int64)[sat_h]
        self._write_from_host(layer_idx, store, state, rows_h, heads_h, idx[rows_h, sat_h],
                              state.sat_tokens[rows_h, sat_h])
        self.stats.satellite_refills += len(rows_h)
        return refreshed
