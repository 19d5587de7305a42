"""The HeteroCache policy (arXiv 2601.13684): role-aware budgets, host-resident satellites and
drift-triggered refresh.

Per KV head, from the profile:
- volatile and pivot heads keep their full KV (pivots are compressed too with ``pivot_offload``);
- anchor and satellite heads keep a share of the budget (inverse-stability ratios), chosen at
  prefill by the attention of the last prompt queries (pooled, max over the GQA group):
  ``prefill.py``;
- satellites also leave their full prompt KV in host memory, and so do anchors when a new turn
  re-chooses them (``turn_reselect="own"``, the default): ``host_copies.py``; a new turn re-chooses
  every compressed head's tokens from the turn's own queries: ``turns.py``;
- every ``refresh_interval`` decode steps each pivot scores the buffered queries against its full
  prompt keys; if the median overlap of their top-k sets with its reference set falls below
  ``drift_threshold``, the pivot's satellites get their prompt slots refilled from host memory:
  ``refresh.py`` (scores in ``drift.py``).

The options, their validation and the internal constants are in ``config.py``; the budget plan's
arithmetic in ``plan.py``; the per-layer state in ``state.py``.

Tensor parallel (``heterocache.engine.parallel``): each rank holds a contiguous slice of every layer's KV
heads. The budget plan is the whole model's, each rank keeping its heads' columns; a pivot is
scored on its rank, a satellite refilled on its own; clusters that cross the shards exchange their
decisions (``clusters.py``). The ranks together then store exactly what one process stores.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ...engine.parallel import KVShard, TensorParallelError
from ...policy.base import Policy
from ...profile import Role
from .config import ASYNCHRONOUS, DECISION_LAG, TURN_WINDOW, HeteroCacheOptions
from .host_copies import HostOffload
from .prefill import PrefillSelection
from .refresh import DriftRefresh
from .state import LayerState, RefreshStats
from .turns import TurnReselection


@dataclass
class HeteroCachePolicy(PrefillSelection, DriftRefresh, TurnReselection, HostOffload, HeteroCacheOptions, Policy):
    """HeteroCache as a policy on the ragged engine.

    Args: the options of ``config.HeteroCacheOptions`` (``profile``, ``budget``, ``budget_tokens``,
    ``window``, ``kernel``, ``refresh_interval``, ``drift_threshold``, ``refresh``, ``offload``,
    ``inverse_stability``, ``turn_reselect``, ``pivot_offload``; docs/heterocache.md).

    Internal constants, read through the instance so that a test or a study may set them on one
    policy (they are not options: ``config.py`` says why each is fixed): ``_decision_lag``
    (``DECISION_LAG`` = 2), ``_turn_window`` (``TURN_WINDOW`` = 32), ``_asynchronous``
    (``ASYNCHRONOUS`` = True; read when a layer's first host copy is made).
    """

    name = "heterocache"
    bounded_prefill = True
    # crop() (assisted decoding) would leave buffered drift queries, decisions in flight and
    # refilled satellites describing tokens that were rolled back: refused, not silently stale.
    croppable = False
    _decision_lag = DECISION_LAG
    _turn_window = TURN_WINDOW
    _asynchronous = ASYNCHRONOUS

    def __post_init__(self):
        self._check_options()
        roles = self.profile.roles
        pivots = roles == Role.PIVOT
        self.full = (roles == Role.VOLATILE) | (pivots & (not self.pivot_offload))
        self.ratios = self._budget_ratios() if self.inverse_stability else torch.ones(roles.shape)
        # Compressed heads with a host copy of their full prompt KV (the ones a turn can re-choose).
        self.host_copy = (((roles == Role.SATELLITE) & self.offload) | ((roles == Role.ANCHOR) & self.anchor_host_copy)
                          | (pivots & self.pivot_offload))
        # The layers this policy compresses (model indices) and the plan's inputs restricted to them:
        # every layer until the model's config says some are sliding (their KV is outside the budget).
        self._set_compressible(range(self.profile.num_layers))
        self._checked_fit = False
        self.stats = RefreshStats()
        self._layers: dict[int, LayerState] = {}
        self._stores = {}
        self._transfers = {}  # one RefreshTransfer per device (device_map spreads layers)
        self._layer_transfer = {}
        self._step = 0  # forward passes seen (counted at the first layer)
        self._first_layer: int | None = None
        # model layer -> (scores [B, P_own, Lmax] device, the pivots' heads, prompt tokens) at its last refresh
        self.last_pivot_scores: dict[int, tuple] = {}

    def bind_kv_shard(self, shard: KVShard) -> None:
        """Tensor parallel: this process holds the KV heads ``shard.heads`` of every layer. The
        plan stays the whole model's (each rank keeps its slice of it); clusters whose pivot and
        satellites sit on different ranks exchange their drift decisions (``clusters.ClusterLayout``).

        Raises:
            TensorParallelError: the profile describes another number of KV heads per layer.
        """
        if shard.sharded and shard.num_heads != self.profile.num_kv_heads:  # one process: validate_for says
            raise TensorParallelError(
                f"the profile describes {self.profile.num_kv_heads} KV heads per layer, the model has "
                f"{shard.num_heads} (this process holds {shard.num_local} of them: "
                f"heads {shard.start}..{shard.stop - 1})"
            )
        super().bind_kv_shard(shard)

    @property
    def prompt_queries(self) -> int:
        """The last prompt queries the prefill reads: the selection's window (the pivots' last
        query is among them)."""
        return self.window

    @property
    def bounded_prompt_copy(self) -> bool:
        """Heads with a host copy of their full prompt need the whole prompt at its end."""
        return bool(self.host_copy.any())

    def _shard(self) -> KVShard:
        """The KV heads this process holds (every head of the profile when no shard was bound)."""
        if self.kv_shard is None:
            return KVShard.single(self.profile.num_kv_heads)
        return self.kv_shard

    @property
    def kv_heads(self) -> range:
        """Global KV heads this process holds (all the profile's without tensor parallelism)."""
        return self._shard().heads

    def head_roles(self, layer_idx: int, num_heads: int) -> list[str]:
        """Roles of the heads of a compressible layer that this process holds (``layer_idx``:
        the policy's index of the layer)."""
        heads = self.kv_heads
        return [Role(int(r)).label for r in self.profile.roles[self.model_layers[layer_idx], heads.start:heads.stop]]

    def select_rows(self, rows: torch.Tensor) -> None:
        self.flush()
        rows_h = np.asarray(torch.as_tensor(rows).cpu(), np.int64).reshape(-1)
        for layer_idx, state in self._layers.items():
            state.select_rows(rows_h, self._stores[layer_idx].device)
        self.last_pivot_scores.clear()

    def reset(self) -> None:
        self._layers.clear()
        self._stores.clear()
        self.last_pivot_scores.clear()
        self.stats = RefreshStats()
        self._transfers.clear()
        self._layer_transfer.clear()
        self._step = 0
        self._first_layer = None
