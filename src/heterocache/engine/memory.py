"""Memory accounting of a ragged cache: what sits where, against a DynamicCache of the same tokens.

Under tensor parallelism each rank's report covers the KV heads it holds (``LayerMemory.kv_heads``,
global indices); ``build_memory_report(cache, aggregate=True)`` gathers every rank's and merges
them into the whole model's (:func:`merge_reports`).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field


@dataclass
class LayerMemory:
    """Memory of one layer.

    Attributes:
        layer_idx: the layer.
        device_bytes: accelerator bytes allocated (keys, values, positions, reserved slots).
        device_used_bytes: bytes of the stored keys and values alone.
        host_bytes: bytes in host memory (e.g. pinned copies of offloaded heads).
        dynamic_bytes: what transformers' DynamicCache holds for the same tokens.
        stored_tokens: tokens per (row, head), ``[B][H]``.
        roles: role name of each KV head ("sliding" for a sliding-window layer's).
        kv_heads: the global index of each of those heads (``0..H-1`` without tensor parallelism).
        device: the device the layer's store lives on (e.g. "cuda:1" under ``device_map``).
    """

    layer_idx: int
    device_bytes: int
    device_used_bytes: int
    host_bytes: int
    dynamic_bytes: int
    stored_tokens: list[list[int]]
    roles: list[str]
    kv_heads: list[int] = field(default_factory=list)
    device: str = ""


@dataclass
class MemoryReport:
    """Bytes of a cache per layer and per head role (see ``RaggedCache.memory_report``).

    Attributes:
        layers: one ``LayerMemory`` per filled layer.
        ranks: how many tensor-parallel ranks the report covers (1: this process alone).
    """

    layers: list[LayerMemory] = field(default_factory=list)
    ranks: int = 1

    @property
    def device_bytes(self) -> int:
        return sum(layer.device_bytes for layer in self.layers)

    @property
    def device_used_bytes(self) -> int:
        return sum(layer.device_used_bytes for layer in self.layers)

    @property
    def host_bytes(self) -> int:
        return sum(layer.host_bytes for layer in self.layers)

    @property
    def dynamic_bytes(self) -> int:
        return sum(layer.dynamic_bytes for layer in self.layers)

    @property
    def ratio(self) -> float:
        """Device bytes allocated / DynamicCache bytes."""
        return self.device_bytes / self.dynamic_bytes if self.dynamic_bytes else float("nan")

    def by_role(self) -> dict[str, dict[str, int]]:
        """Per role: KV heads (counted per row), stored tokens and their key+value bytes."""
        out: dict[str, dict[str, int]] = defaultdict(lambda: {"heads": 0, "tokens": 0, "bytes": 0})
        for layer in self.layers:
            per_token = layer.device_used_bytes // max(1, sum(map(sum, layer.stored_tokens)))
            for row in layer.stored_tokens:
                for role, tokens in zip(layer.roles, row):
                    out[role]["heads"] += 1
                    out[role]["tokens"] += tokens
                    out[role]["bytes"] += tokens * per_token
        return dict(out)

    def by_device(self) -> dict[str, int]:
        """Device bytes allocated per device (layers spread over several with ``device_map``)."""
        out: dict[str, int] = defaultdict(int)
        for layer in self.layers:
            out[layer.device] += layer.device_bytes
        return dict(out)

    def to_dict(self) -> dict:
        return {
            "device_bytes": self.device_bytes,
            "device_used_bytes": self.device_used_bytes,
            "host_bytes": self.host_bytes,
            "dynamic_cache_bytes": self.dynamic_bytes,
            "ratio_to_dynamic_cache": self.ratio,
            "ranks": self.ranks,
            "by_role": self.by_role(),
            "by_device": self.by_device(),
            "layers": [vars(layer) for layer in self.layers],
        }

    def __str__(self) -> str:
        mib = 1 / 2**20
        scope = f" over {self.ranks} tensor-parallel ranks" if self.ranks > 1 else ""
        lines = [
            f"KV cache{scope}: {self.device_bytes * mib:.2f} MiB on device ({self.device_used_bytes * mib:.2f} MiB of "
            f"keys/values), {self.host_bytes * mib:.2f} MiB on host; DynamicCache would hold "
            f"{self.dynamic_bytes * mib:.2f} MiB (ratio {self.ratio:.3f})",
        ]
        for role, r in sorted(self.by_role().items()):
            lines.append(f"  {role:>10}: {r['heads']:5d} heads, {r['tokens']:9d} tokens, {r['bytes'] * mib:9.2f} MiB")
        return "\n".join(lines)


def merge_reports(reports: list[MemoryReport]) -> MemoryReport:
    """One report of the whole model from the reports of its tensor-parallel ranks (each holding
    a slice of every layer's KV heads): bytes summed per layer, heads (stored tokens, roles,
    global indices) concatenated in global head order.

    Raises:
        ValueError: the ranks filled different layers.
    """
    if len(reports) == 1:
        return reports[0]
    layer_sets = {tuple(layer.layer_idx for layer in r.layers) for r in reports}
    if len(layer_sets) != 1:
        raise ValueError(f"the ranks' reports cover different layers: {sorted(layer_sets)}")
    merged = MemoryReport(ranks=sum(r.ranks for r in reports))
    for parts in zip(*(r.layers for r in reports)):
        parts = sorted(parts, key=lambda layer: layer.kv_heads[0] if layer.kv_heads else 0)
        rows = len(parts[0].stored_tokens)
        merged.layers.append(LayerMemory(
            layer_idx=parts[0].layer_idx,
            device_bytes=sum(p.device_bytes for p in parts),
            device_used_bytes=sum(p.device_used_bytes for p in parts),
            host_bytes=sum(p.host_bytes for p in parts),
            dynamic_bytes=sum(p.dynamic_bytes for p in parts),
            stored_tokens=[[t for p in parts for t in p.stored_tokens[b]] for b in range(rows)],
            roles=[role for p in parts for role in p.roles],
            kv_heads=[h for p in parts for h in p.kv_heads],
            device=",".join(dict.fromkeys(p.device for p in parts)),
        ))
    return merged


def build_memory_report(cache, aggregate: bool = False) -> MemoryReport:
    """Walk a ``RaggedCache``'s layers (and any host copies its policy keeps).

    Args:
        aggregate: merge the reports of every tensor-parallel rank (a collective: all ranks must
            call it); a no-op without sharding.
    """
    report = MemoryReport()
    host_by_layer = cache.policy.host_bytes_per_layer()
    # Device tensors a policy keeps beside the store (e.g. Quest's page summaries).
    extra_by_layer = cache.policy.device_extra_bytes_per_layer()
    shard = cache.kv_shard
    for layer in cache.layers:
        store = layer.store
        if store is None:
            prompt = getattr(layer, "prompt", None)
            if prompt is not None and prompt.key is not None:
                report.layers.append(_open_prompt_memory(layer, prompt, shard))
            continue
        elt = store.k.element_size()
        window = layer.sliding_window
        # A sliding layer in a DynamicCache (DynamicSlidingWindowLayer) keeps its W - 1 newest tokens.
        tokens = layer.seen if window is None else min(layer.seen, window - 1)
        dynamic = store.num_rows * store.num_heads * tokens * store.head_dim * elt * 2
        idx = layer.policy_idx  # what the policy calls the layer
        if window is None:
            roles = cache.policy.head_roles(idx, store.num_heads)
        else:
            roles = ["sliding"] * store.num_heads
        heads = list(shard.heads) if shard is not None else list(range(store.num_heads))
        report.layers.append(
            LayerMemory(
                layer_idx=layer.layer_idx,
                device_bytes=store.bytes_allocated() + (int(extra_by_layer.get(idx, 0)) if window is None else 0),
                device_used_bytes=store.bytes_used(),
                host_bytes=int(host_by_layer.get(idx, 0)) if window is None else 0,
                dynamic_bytes=dynamic,
                stored_tokens=store.lengths_host().tolist(),
                roles=roles,
                kv_heads=heads,
                device=str(store.device),
            )
        )
    if aggregate and shard is not None and shard.sharded:
        return merge_reports(shard.all_gather_object(report))
    return report


def _open_prompt_memory(layer, prompt, shard) -> LayerMemory:
    """A layer whose prompt is still open (exact prefill, ``docs/prefill.md``): it holds the prompt
    so far uncompressed (role "open prompt") and the last queries its policy reads."""
    B, H, n, D = prompt.key.shape
    elt = prompt.key.element_size()
    window = getattr(layer, "sliding_window", None)
    tokens = layer.seen if window is None else min(layer.seen, window - 1)
    real = prompt.valid.sum(-1).tolist()
    return LayerMemory(
        layer_idx=layer.layer_idx,
        device_bytes=prompt.nbytes(),
        device_used_bytes=B * H * n * D * elt * 2,
        host_bytes=0,
        dynamic_bytes=B * H * tokens * D * elt * 2,
        stored_tokens=[[int(r)] * H for r in real],
        roles=["open prompt"] * H,
        kv_heads=list(shard.heads) if shard is not None else list(range(H)),
        device=str(prompt.key.device),
    )
