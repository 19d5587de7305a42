"""Tensor parallelism: which global KV heads this process holds, and the few collectives the
policies need (no-ops in one process).

Under transformers' tensor parallelism (``from_pretrained(path, tp_plan="auto")`` or a
``DistributedConfig``, launched with ``torchrun``) the key and value projections are colwise
sharded: their weights are DTensors on the tensor-parallel ``DeviceMesh`` with a ``Shard(0)``
placement, and the attention of rank ``r`` of a group of ``T`` sees only the KV heads
``[r * H / T, (r + 1) * H / T)`` of the ``H`` its config names (transformers refuses head counts
that ``T`` does not divide: ``get_kv_heads_per_rank``). A cache built from the keys it is given
therefore holds those heads alone. :func:`kv_head_shard` reads the shard from the attention
module's key projection (its mesh, mesh coordinate and placement); where the weights are plain
tensors it falls back on ``torch.distributed``'s world (rank ``r`` of ``W`` holds the ``r``-th
contiguous slice); anything else is refused with :class:`TensorParallelError` rather than
guessed.

Everything a policy computes *for the whole model* (budget plans, CAKE's layer statistics,
HeteroCache's drift decisions for satellites on another rank) goes through a :class:`KVShard`'s
collectives, so the union over the ranks of what each stores is exactly what one process would
store.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

#: Attributes under which attention modules keep the projection whose output holds the keys
#: (transformers' ``get_kv_heads_per_rank`` looks for the same names).
KEY_PROJECTIONS = ("k_proj", "qkv_proj", "query_key_value")


class TensorParallelError(RuntimeError):
    """The cache cannot tell which KV heads this process holds, or the ranks disagree."""


@dataclass(frozen=True)
class KVShard:
    """The KV heads of every layer that this process holds: ``[start, stop)`` of ``num_heads``.

    Attributes:
        rank: index of this process in its tensor-parallel group (0 in one process).
        world: size of the tensor-parallel group (1 when the heads are not sharded, even if
            torch.distributed runs, e.g. data parallel).
        start, stop: the global KV-head indices held, contiguous.
        num_heads: KV heads of a layer in the whole model (the config's ``num_key_value_heads``).
        group: the ``torch.distributed`` process group of the shards (None: the default group).
        source: how the shard was found ("single", "device mesh", "torch.distributed", "given").
    """

    rank: int
    world: int
    start: int
    stop: int
    num_heads: int
    group: Any = field(default=None, compare=False)
    source: str = field(default="single", compare=False)

    def __post_init__(self):
        if not (0 <= self.start < self.stop <= self.num_heads) or not (0 <= self.rank < self.world):
            raise TensorParallelError(f"invalid KV-head shard: {self}")
        # rank_of and the cross-shard cluster layout assume transformers' equal contiguous shards.
        per = self.num_heads // self.world
        if self.num_heads % self.world or (self.start, self.stop) != (self.rank * per, (self.rank + 1) * per):
            raise TensorParallelError(
                f"KV-head shard {self.start}..{self.stop - 1} of {self.num_heads} on rank {self.rank} of {self.world}: "
                "only equal contiguous shards (rank r holds heads [r*H/world, (r+1)*H/world)) are supported"
            )

    @classmethod
    def single(cls, num_heads: int) -> "KVShard":
        """Every head in this process."""
        return cls(0, 1, 0, int(num_heads), int(num_heads))

    @classmethod
    def contiguous(cls, rank: int, world: int, num_heads: int, group=None, source: str = "given") -> "KVShard":
        """Rank ``rank`` of ``world`` holding the ``rank``-th of ``world`` equal slices (what
        transformers' colwise sharding gives)."""
        if world < 1 or num_heads % world:
            raise TensorParallelError(f"{num_heads} KV heads cannot be split evenly over {world} ranks")
        per = num_heads // world
        return cls(rank, world, rank * per, (rank + 1) * per, num_heads, group, source)

    # ---------------------------------------------------------------- heads
    @property
    def heads(self) -> range:
        """Global indices of the heads held, in the order the layer stores them."""
        return range(self.start, self.stop)

    @property
    def num_local(self) -> int:
        return self.stop - self.start

    @property
    def sharded(self) -> bool:
        return self.world > 1

    def owns(self, head: int) -> bool:
        return self.start <= head < self.stop

    def local(self, head: int) -> int:
        """Index of global head ``head`` in this process's layer (it must be held here)."""
        if not self.owns(head):
            raise IndexError(f"KV head {head} is not held by rank {self.rank} (heads {self.start}..{self.stop - 1})")
        return head - self.start

    def rank_of(self, head: int) -> int:
        """The rank holding global head ``head`` (equal contiguous shards)."""
        return head // self.num_local

    # ---------------------------------------------------------------- collectives
    def all_reduce_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the shards, in place (nothing in one process). Every rank must call
        it, in the same order, with a tensor of the same shape and dtype."""
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor

    def all_reduce_max_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Maximum of ``tensor`` over the shards, in place (nothing in one process); called by every
        rank in the same order. Stays on the device: no host read."""
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.group)
        return tensor

    def all_gather_object(self, obj) -> list:
        """``obj`` of every rank, in rank order (``[obj]`` in one process). For reports, not
        for decode steps: it pickles and reads the host."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out


def _dtensor_class():
    try:
        from torch.distributed.tensor import DTensor
    except Exception:  # pragma: no cover - torch without distributed
        return None
    return DTensor


def global_kv_heads(config) -> int | None:
    """``num_key_value_heads`` (else ``num_attention_heads``) of a config or model, read through
    its text config; None when unknown."""
    config = getattr(config, "config", config)
    if config is None:
        return None
    if hasattr(config, "get_text_config"):
        config = config.get_text_config(decoder=True)
    heads = getattr(config, "num_key_value_heads", None) or getattr(config, "num_attention_heads", None)
    if heads is None and isinstance(config, dict):
        heads = config.get("num_key_value_heads") or config.get("num_attention_heads")
    return None if heads is None else int(heads)


def _key_weight(module):
    """The DTensor weight of an attention module's key projection, or None."""
    DTensor = _dtensor_class()
    if DTensor is None or module is None:
        return None
    candidates = [module]
    if not any(hasattr(module, name) for name in KEY_PROJECTIONS) and hasattr(module, "modules"):
        candidates = list(module.modules())  # a model: its first attention module
    for mod in candidates:
        for name in KEY_PROJECTIONS:
            weight = getattr(getattr(mod, name, None), "weight", None)
            if isinstance(weight, DTensor):
                return weight
    return None


def _from_mesh(weight, num_heads: int) -> KVShard | None:
    """The shard of a colwise DTensor key projection (None: its output features are not sharded)."""
    mesh, placements = weight.device_mesh, weight.placements
    dims = [i for i, p in enumerate(placements) if p.is_shard() and getattr(p, "dim", None) in (0, -weight.dim())]
    if not dims:
        return None
    if len(dims) > 1:
        raise TensorParallelError(
            f"the key projection is sharded over {len(dims)} mesh dimensions ({placements}); heterocache "
            "handles KV heads split along one tensor-parallel dimension"
        )
    d = dims[0]
    world = mesh.size(d)
    rank = mesh.get_local_rank(d) if mesh.ndim > 1 else mesh.get_local_rank()
    group = mesh.get_group(d) if mesh.ndim > 1 else mesh.get_group()
    if num_heads % world:
        raise TensorParallelError(f"{num_heads} KV heads are not split evenly over a tensor-parallel group of {world}")
    return KVShard.contiguous(rank, world, num_heads, group, source="device mesh")


def kv_head_shard(module=None, config=None, local_heads: int | None = None) -> KVShard:
    """Which global KV heads this process holds.

    Args:
        module: an attention module (or a model: its first attention module) whose key
            projection may be a tensor-parallel DTensor; None when not at hand.
        config: the model's config (``num_key_value_heads`` of the whole model); defaults to
            ``module.config``.
        local_heads: KV heads the layer's keys actually have here (``key_states.shape[1]``),
            checked against the result.

    Returns:
        the ``KVShard``; ``KVShard.single`` when nothing is sharded.

    Raises:
        TensorParallelError: the keys hold fewer heads than the config and neither the device mesh
            nor ``torch.distributed`` says which ones, or what they say does not match.
    """
    if config is None:
        config = getattr(module, "config", None)
    num_heads = global_kv_heads(config)
    if num_heads is None:
        if local_heads is None:
            raise TensorParallelError("cannot tell the number of KV heads: no config and no keys")
        num_heads = local_heads  # nothing says the layer holds less than everything
    if local_heads is not None and local_heads == num_heads:
        # Every head is here (one process, data parallel, or FSDP, whose DTensor weights are
        # gathered before the projection runs): nothing to read from a mesh.
        return KVShard.single(num_heads)
    weight = _key_weight(module)
    shard = _from_mesh(weight, num_heads) if weight is not None else None
    if shard is None and local_heads is not None and local_heads < num_heads:
        shard = _from_world(num_heads, local_heads)
    if shard is None:
        shard = KVShard.single(num_heads)
    if local_heads is not None and local_heads != shard.num_local:
        raise TensorParallelError(
            f"this process's attention holds {local_heads} KV heads, but {shard.source} says rank {shard.rank} "
            f"of {shard.world} holds {shard.num_local} of the config's {num_heads}"
        )
    return shard


def _from_world(num_heads: int, local_heads: int) -> KVShard:
    """The fallback for plain (non-DTensor) sharded weights: rank r of torch.distributed's world
    holds the r-th contiguous slice."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise TensorParallelError(
            f"the attention holds {local_heads} of the config's {num_heads} KV heads, but torch.distributed is not "
            "initialized and its key projection is no tensor-parallel DTensor, so which heads it holds is unknown. "
            "Load the model with tp_plan='auto' under torchrun, or give the cache its shard: "
            "cache.kv_shard = KVShard.contiguous(rank, world, num_heads)"
        )
    world = dist.get_world_size()
    if local_heads * world != num_heads:
        raise TensorParallelError(
            f"the attention holds {local_heads} of the config's {num_heads} KV heads, which is not 1/{world} of them "
            f"(torch.distributed world size {world}); the tensor-parallel group is unknown. Give the cache its "
            "shard: cache.kv_shard = KVShard.contiguous(rank, world, num_heads, group)"
        )
    warnings.warn(
        f"KV heads sharded without a device mesh: assuming rank {dist.get_rank()} of {world} holds the "
        f"{dist.get_rank()}-th contiguous slice of the {num_heads} heads", stacklevel=3)
    return KVShard.contiguous(dist.get_rank(), world, num_heads, None, source="torch.distributed")
