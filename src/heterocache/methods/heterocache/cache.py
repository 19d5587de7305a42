"""``HeteroCache``: the transformers cache of the HeteroCache method."""

from __future__ import annotations

import os
from collections import Counter

from ...engine.cache import RaggedCache
from ...engine.memory import build_memory_report
from ...profile import HeadProfile, profile_for_model
from .policy import HeteroCachePolicy


class HeteroCache(RaggedCache):
    """HeteroCache (arXiv 2601.13684) on the ragged per-head engine.

    Args:
        profile: a ``HeadProfile``, or anything ``HeadProfile.from_pretrained`` takes (a file, a
            folder, a bundled profile name such as "meta-llama/Llama-3.1-8B-Instruct", a Hub repo).
        budget: fraction of the prompt KV kept on the device, in (0, 1] (default 0.25).
        block_size, reserve: store layout (see ``RaggedCache``).
        prefill: "exact" or "bounded", how a prompt in pieces is compressed (see ``RaggedCache``).
        **params: the policy's options (``budget_tokens``, ``window``, ``kernel``,
            ``refresh_interval``, ``drift_threshold``, ``refresh``, ``offload``,
            ``inverse_stability``, ``turn_reselect``, ``pivot_offload``; see ``HeteroCachePolicy``
            and docs/heterocache.md).

    Example::

        cache = HeteroCache("HuggingFaceTB/SmolLM2-135M-Instruct", budget=0.25)
        out = model.generate(**inputs, cache=cache, max_new_tokens=64)  # past_key_values= before transformers 5.24
        print(cache.memory_report()); print(cache.stats())
    """

    def __init__(self, profile, budget: float = 0.25, block_size: int = 64, reserve: int = 128, prefill: str = "exact",
                 **params):
        if isinstance(profile, (str, os.PathLike)):
            profile = HeadProfile.from_pretrained(profile)
        super().__init__(HeteroCachePolicy(profile=profile, budget=budget, **params), block_size, reserve, prefill)

    @classmethod
    def for_model(cls, model, budget: float = 0.25, **params) -> "HeteroCache":
        """The cache for a loaded model, with its profile found by the model's name (bundled
        profiles first, then the Hub) and checked against its shape (``profile_for_model``)."""
        return cls(profile_for_model(model), budget=budget, **params)

    @property
    def profile(self) -> HeadProfile:
        return self.policy.profile

    def counters(self, aggregate: bool = False) -> dict:
        """Drift checks, refreshes (in all, and per layer and pivot), satellite refills, heads
        re-selected at turns, tokens and bytes moved, copy time (GPU); no memory walk, so a caller
        may read it at every step.

        Args:
            aggregate: under tensor parallelism, the whole model's numbers (counts summed over the
                ranks; a pivot's refreshes are counted on its own rank, keyed by its global KV
                head). A collective: every rank must call it.
        """
        policy = self.policy
        policy.synchronize()
        s = policy.stats
        mine = {
            "drift_checks": s.checks,
            "refreshes": dict(s.refreshes),
            "satellite_refills": s.satellite_refills,
            "reselected_heads": s.reselected_heads,
            "tokens_moved": s.tokens_moved,
            "bytes_moved": s.bytes_moved,
            "copy_seconds": policy.copy_seconds(),
        }
        shard = self.kv_shard
        parts = shard.all_gather_object(mine) if aggregate and shard is not None and shard.sharded else [mine]
        refreshes = Counter()
        for part in parts:
            refreshes.update(part["refreshes"])
        return {
            "drift_checks": sum(p["drift_checks"] for p in parts),
            "refreshes": sum(refreshes.values()),
            "refreshes_per_layer_pivot": {f"{layer}:{pivot}": n for (layer, pivot), n in sorted(refreshes.items())},
            "satellite_refills": sum(p["satellite_refills"] for p in parts),
            "reselected_heads": sum(p["reselected_heads"] for p in parts),
            "tokens_moved": sum(p["tokens_moved"] for p in parts),
            "bytes_moved": sum(p["bytes_moved"] for p in parts),
            "copy_seconds": sum(p["copy_seconds"] for p in parts),
            "ranks": len(parts),
        }

    def stats(self, aggregate: bool = False) -> dict:
        """:meth:`counters`, and the bytes on device and host by role (``memory_report``).

        Args:
            aggregate: under tensor parallelism, the whole model's numbers (a collective).
        """
        counters = self.counters(aggregate)
        report = build_memory_report(self, aggregate=aggregate)
        return {
            **counters,
            "device_bytes_by_role": {role: r["bytes"] for role, r in report.by_role().items()},
            "device_bytes": report.device_bytes,
            "host_bytes": report.host_bytes,
        }
