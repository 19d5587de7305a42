"""The host half of a decode step: which strategy a layer's decode attention takes and, from the
store's host mirrors only (never device values), its ``DecodePlan``, built once per step and layout
by a ``DecodePlanner`` and reused by every layer with that layout.

Strategies (``resolve_strategy``): ``"segments"`` (CPU default) runs SDPA on each segment's
contiguous slice, or one SDPA over a strided ``[B, H, cap, D]`` view when every segment has the
same capacity (plan "uniform"); ``"device"`` (GPU default) runs the split-K Triton kernel of
``heterocache.attention.kernels`` with a launch shape taken from the capacities, or, where Triton
cannot run, the loop-free ``"blocks"`` computation (:mod:`heterocache.attention.decode`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..store.ragged import RaggedKVStore
from . import kernels
from .kernels.settings import ENV_VAR, decode_setting
from .kernels.triton_decode import _num_sms, choose_num_splits

#: Environment variable choosing the decode strategy ("auto", "device", "segments", "blocks", "kernel";
#: "kernel" is "device" under its earlier name, "blocks" the device path's PyTorch half alone).
STRATEGIES = ("auto", "device", "segments", "blocks", "kernel")
#: Strategies whose plan depends on capacities only (lengths are read on the device).
_CAPACITY_KEYED = ("device", "kernel", "blocks")


def resolve_strategy(device: torch.device, strategy: str | None = None) -> str:
    """The decode strategy a store on ``device`` uses: "segments" (CPU: SDPA on contiguous slices,
    fastest there) or "device" (what a GPU runs: the Triton kernel, or where Triton cannot run the
    loop-free block-wise PyTorch stand-in, with launch shapes from capacities).

    Args:
        strategy: one of :data:`STRATEGIES`; None reads ``strategy=`` of ``$HETEROCACHE_DECODE`` (default
            "auto": "segments" on CPU, "device" elsewhere). ``device`` on CPU tensors takes exactly
            the CUDA path, with PyTorch standing in for the kernel (how CI covers it).

    Raises:
        ValueError: unknown strategy.
    """
    name = (strategy if strategy is not None else decode_setting("strategy")).strip().lower() or "auto"
    if name not in STRATEGIES:
        source = "strategy" if strategy is not None else f"strategy= of ${ENV_VAR}"
        raise ValueError(f"{source} must be one of {STRATEGIES}, got {name!r}")
    if name == "auto":
        return "segments" if torch.device(device).type == "cpu" else "device"
    return name


@dataclass(frozen=True)
class DecodePlan:
    """Everything the host decides about one layer's decode attention, from host values only.

    Built once per decode step for each distinct layout (``DecodePlanner``) and reused by every
    layer that has it (FlashInfer's plan/run split).

    Attributes:
        strategy: "uniform" (one SDPA over a strided ``[B, H, cap, D]`` view), "segments" (one SDPA
            per segment), "device" (kernel or block-wise stand-in), "blocks", "kernel".
        cap, length, masked: "uniform" only: the shared capacity, the longest segment, whether
            shorter segments must be masked.
        spans: "segments" only: ``(first_slot, tokens)`` per segment.
        max_len, num_splits: "device"/"kernel": launch shape from the capacities (fixed until the
            store reallocates, so a captured graph can replay it).
        backend: "device"/"kernel": the kernel backend (``kernels.resolve_backend``), resolved
            when the plan is built, not per layer; ``use_kernel`` is whether it is not "torch".
    """

    strategy: str
    cap: int = 0
    length: int = 0
    masked: bool = False
    spans: tuple = ()
    max_len: int = 0
    num_splits: int = 1
    backend: str = "torch"

    @property
    def use_kernel(self) -> bool:
        return self.backend != "torch"


def plan_decode(store: RaggedKVStore, strategy: str) -> DecodePlan:
    """The decode plan of a store for a strategy (see ``resolve_strategy``), from host mirrors."""
    if strategy in ("device", "kernel"):
        caps = store.cap_h
        max_cap = int(caps.max()) if caps.size else 0
        splits = choose_num_splits(max_cap, int(caps.sum()), _num_sms(store.device))
        backend = kernels.resolve_backend(store.device)
        return DecodePlan(strategy, max_len=max_cap, num_splits=splits, backend=backend)
    if strategy == "blocks":
        return DecodePlan("blocks")
    if strategy != "segments":
        raise ValueError(f"unknown strategy {strategy!r}")
    caps, lengths = store.cap_h, store.length_h
    if caps.size and (caps == caps[0]).all():
        n = int(lengths.max())
        return DecodePlan("uniform", cap=int(caps[0]), length=n, masked=bool((lengths != n).any()))
    return DecodePlan("segments", spans=tuple(zip(store.start_h.tolist(), lengths.tolist())))


def plan_key(store: RaggedKVStore, strategy: str) -> tuple:
    """What a plan depends on: the capacity layout (device strategies read lengths on the device)
    and, for the CPU strategies, the lengths too."""
    # The device too: under device_map layers of one layout live on different devices, whose plans
    # may differ (SM count, kernel backend).
    key = (strategy, str(store.device), store.num_rows, store.num_heads, store.cap_h.tobytes())
    return key if strategy in _CAPACITY_KEYED else key + (store.length_h.tobytes(),)


class DecodePlanner:
    """Per-cache memo of decode plans: one build per decode step and layout, reused by every
    layer with that layout. ``built`` / ``reused`` count what happened (tests, benchmarks)."""

    def __init__(self):
        self._plans: dict[tuple, DecodePlan] = {}
        self._strategies: dict[str, str] = {}  # device type -> strategy, resolved once per step
        self._backends: dict[str, str] = {}  # device type -> kernel backend, resolved once per step
        self._step = None
        self.built = 0
        self.reused = 0

    def _at_step(self, step) -> None:
        if step != self._step:
            # Length-keyed (CPU) plans are only valid for one step; capacity-keyed ones stay.
            self._plans = {k: p for k, p in self._plans.items() if k[0] in _CAPACITY_KEYED}
            if len(self._plans) > 256:
                self._plans.clear()
            self._strategies.clear()
            self._backends.clear()
            self._step = step

    def plan(self, store: RaggedKVStore, step, strategy: str | None = None) -> DecodePlan:
        """The plan of ``store`` at decode step ``step`` (any hashable that changes per step)."""
        self._at_step(step)
        if strategy is None:
            strategy = self._strategies.get(store.device.type)
            if strategy is None:
                strategy = self._strategies[store.device.type] = resolve_strategy(store.device)
        else:
            strategy = resolve_strategy(store.device, strategy)
        key = plan_key(store, strategy)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = plan_decode(store, strategy)
            self.built += 1
        else:
            self.reused += 1
        return plan

    def backend(self, device: torch.device, step) -> str:
        """The kernel backend on ``device`` (``kernels.resolve_backend``) at decode step ``step``,
        resolved once per step and device type, for the per-step selection path."""
        self._at_step(step)
        name = self._backends.get(device.type)
        if name is None:
            name = self._backends[device.type] = kernels.resolve_backend(device)
        return name
