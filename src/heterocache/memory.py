"""Memory accounting of a ragged cache: what sits where, against a DynamicCache of the same tokens."""

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
    """

    layer_idx: int
    device_bytes: int
    device_used_bytes: int
    host_bytes: int
    dynamic_bytes: int
    stored_tokens: list[list[int]]
    roles: list[str]


@dataclass
class MemoryReport:
    """Bytes of a cache per layer and per head role (see ``RaggedCache.memory_report``)."""

    layers: list[LayerMemory] = field(default_factory=list)

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

    def to_dict(self) -> dict:
        return {
            "device_bytes": self.device_bytes,
            "device_used_bytes": self.device_used_bytes,
            "host_bytes": self.host_bytes,
            "dynamic_cache_bytes": self.dynamic_bytes,
            "ratio_to_dynamic_cache": self.ratio,
            "by_role": self.by_role(),
            "layers": [vars(layer) for layer in self.layers],
        }

    def __str__(self) -> str:
        mib = 1 / 2**20
        lines = [
            f"KV cache: {self.device_bytes * mib:.2f} MiB on device ({self.device_used_bytes * mib:.2f} MiB of "
            f"keys/values), {self.host_bytes * mib:.2f} MiB on host; DynamicCache would hold "
            f"{self.dynamic_bytes * mib:.2f} MiB (ratio {self.ratio:.3f})",
        ]
        for role, r in sorted(self.by_role().items()):
            lines.append(f"  {role:>10}: {r['heads']:5d} heads, {r['tokens']:9d} tokens, {r['bytes'] * mib:9.2f} MiB")
        return "\n".join(lines)


def build_memory_report(cache) -> MemoryReport:
    """Walk a ``RaggedCache``'s layers (and any host copies its policy keeps)."""
    report = MemoryReport()
    host_by_layer = getattr(cache.policy, "host_bytes_per_layer", lambda: {})()
    # Device tensors a policy keeps beside the store (e.g. Quest's page summaries).
    extra_by_layer = getattr(cache.policy, "device_extra_bytes_per_layer", lambda: {})()
    for layer in cache.layers:
        store = layer.store
        if store is None:
            continue
        elt = store.k.element_size()
        window = getattr(layer, "sliding_window", None)
        # A sliding layer in a DynamicCache (DynamicSlidingWindowLayer) keeps its W - 1 newest tokens.
        tokens = layer.seen if window is None else min(layer.seen, window - 1)
        dynamic = store.num_rows * store.num_heads * tokens * store.head_dim * elt * 2
        idx = getattr(layer, "policy_idx", layer.layer_idx)  # what the policy calls the layer
        if window is None:
            roles = cache.policy.head_roles(idx, store.num_heads)
        else:
            roles = ["sliding"] * store.num_heads
        report.layers.append(
            LayerMemory(
                layer_idx=layer.layer_idx,
                device_bytes=store.bytes_allocated() + (int(extra_by_layer.get(idx, 0)) if window is None else 0),
                device_used_bytes=store.bytes_used(),
                host_bytes=int(host_by_layer.get(idx, 0)) if window is None else 0,
                dynamic_bytes=dynamic,
                stored_tokens=store.lengths().tolist(),
                roles=roles,
            )
        )
    return report
