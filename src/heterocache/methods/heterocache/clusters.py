"""Which rank decides and which refills, for one layer's clusters under tensor parallelism.

Each rank holds a contiguous slice of every layer's KV heads (``heterocache.engine.parallel``). A
profile's clusters may cross the shards (the profiler never sees the tensor-parallel layout): then
the pivot's rank computes the refill indices of its satellites elsewhere, and one all-reduce per
drift check of such a layer carries the layer's drift flags and those indices to every rank. Layers
whose clusters stay within a shard exchange nothing. In one process every list here is the layer's
own, in the profile's order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...engine.parallel import KVShard
from ...store.ragged import to_device


@dataclass
class ClusterLayout:
    """Who decides and who refills, for one layer's clusters (host values built at prefill from
    the profile and the ``KVShard``; the same lists on every rank).

    A pivot's drift check runs on the rank holding the pivot (its queries and full prompt keys
    are there); a satellite's refill runs on the rank holding the satellite (its host copy and
    store slots are there). When the two differ (a *cross* satellite: the profile clustered
    heads that tensor parallelism put on different ranks) the decision travels: after each check
    every rank sums over the shards one buffer with the drift flag of every pivot of the layer
    and the refill indices of every cross satellite, each written by its pivot's rank and zero
    elsewhere (one all-reduce of ``B * (P + Nx * nmax)`` int64 per checked layer). Each rank then
    refills exactly what one process would.

    Attributes:
        pivots: global heads of the layer's pivots (the profile's order).
        satellites: global heads of its satellites (pivot after pivot, ascending); ``sat_pivot``
            the index of each one's pivot in ``pivots``.
        own: indices (into ``pivots``) of the pivots this rank holds: the ones it scores.
        targets: indices (into ``satellites``) of the satellites whose pivot this rank holds (it
            computes their refill indices); ``target_pivot`` the index (into ``own``) of that pivot.
        local: indices (into ``satellites``) of the satellites this rank stores.
        cross: indices (into ``satellites``) of the satellites on another rank than their pivot;
            empty in one process or when the profile's clusters stay within the shards.
        local_src: each local satellite's row in ``cat([target refills, cross refills])``; None
            when the local satellites are exactly the targets (no exchange).
        cross_src, cross_dst: the targets that are cross satellites, as rows of the target refills
            and of the cross refills.
    """

    pivots: list[int]
    satellites: list[int]
    sat_pivot: list[int]
    own: list[int]
    targets: list[int]
    target_pivot: list[int]
    local: list[int]
    cross: list[int]
    local_src: list[int] | None
    cross_src: list[int]
    cross_dst: list[int]

    @property
    def exchange(self) -> bool:
        """Whether the layer's decisions cross the ranks (every rank then joins its collective)."""
        return bool(self.cross)

    @classmethod
    def build(cls, clusters: dict[int, list[int]], shard: KVShard) -> "ClusterLayout":
        """The layout of ``clusters`` (pivot -> its satellites, global heads) over ``shard``."""
        pivots = list(clusters)
        satellites, sat_pivot = [], []
        for i, p in enumerate(pivots):
            satellites.extend(clusters[p])
            sat_pivot.extend([i] * len(clusters[p]))
        own = [i for i, p in enumerate(pivots) if shard.owns(p)]
        own_index = {i: n for n, i in enumerate(own)}
        targets = [j for j, i in enumerate(sat_pivot) if i in own_index]
        local = [j for j, s in enumerate(satellites) if shard.owns(s)]
        cross = [j for j, s in enumerate(satellites) if shard.rank_of(s) != shard.rank_of(pivots[sat_pivot[j]])]
        t_index = {j: n for n, j in enumerate(targets)}
        x_index = {j: n for n, j in enumerate(cross)}
        local_src = None if local == targets else [t_index[j] if j in t_index else len(targets) + x_index[j]
                                                   for j in local]
        return cls(pivots, satellites, sat_pivot, own, targets, [own_index[sat_pivot[j]] for j in targets], local,
                   cross, local_src, [t_index[j] for j in cross if j in t_index],
                   [x_index[j] for j in cross if j in t_index])


@dataclass
class LayoutIndex:
    """A ``ClusterLayout``'s index lists as device tensors (built once per prefill, so a check
    copies no index to the device)."""

    own: torch.Tensor
    target_pivot: torch.Tensor
    local_src: torch.Tensor | None
    cross_src: torch.Tensor
    cross_dst: torch.Tensor

    @classmethod
    def of(cls, layout: ClusterLayout, device: torch.device) -> "LayoutIndex":
        return cls(to_device(layout.own, device), to_device(layout.target_pivot, device),
                   None if layout.local_src is None else to_device(layout.local_src, device),
                   to_device(layout.cross_src, device), to_device(layout.cross_dst, device))
