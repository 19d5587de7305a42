"""Counting what a decode step asks of the host: ATen ops and reads of tensor values.

On a GPU every read of a device value (``.item()``, ``int(t)``, ``bool(t)``, ``.tolist()``,
``.cpu()``, boolean-mask indexing, ``nonzero``, ``repeat_interleave`` without ``output_size``)
blocks the host until the device has drained its queue. ``HostReadCounter`` counts them on any
device, CPU included, so the rule "no host reads in the decode step" can be tested where no GPU
is: ``aten._local_scalar_dense`` and the data-dependent-shape ops through a ``TorchDispatchMode``,
and ``Tensor.tolist`` / ``.numpy`` / ``.cpu``, which dispatch nothing for a CPU tensor, by
wrapping those methods while the counter is active.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["HostReadCounter", "count_decode_steps", "count_steps"]

# Ops whose output shape depends on tensor values: the host must wait for them.
_DATA_DEPENDENT = {
    "aten.nonzero.default": "nonzero",
    "aten.masked_select.default": "masked_select",
    "aten._unique2.default": "unique",
    "aten.unique_consecutive.default": "unique",
}


def _has_bool_index(indices) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices if i is not None)


class HostReadCounter(TorchDispatchMode):
    """Context manager counting ATen ops and host reads of tensor values.

    Attributes:
        ops: ATen ops dispatched.
        reads: ``Counter`` of host reads by kind ("scalar" for ``item``/``int``/``bool``/``float``,
            "tolist", "numpy", "cpu", "bool_index", "nonzero", "repeat_interleave", ...).
        op_counts: ``Counter`` of ATen ops by name.
    """

    _WRAPPED = ("tolist", "numpy", "cpu")

    def __init__(self):
        super().__init__()
        self.ops = 0
        self.reads: Counter = Counter()
        self.op_counts: Counter = Counter()
        self._saved = {}

    @property
    def host_reads(self) -> int:
        return sum(self.reads.values())

    def __enter__(self):
        for name in self._WRAPPED:
            original = getattr(torch.Tensor, name)
            self._saved[name] = original

            def wrapper(t, *args, _name=name, _original=original, **kwargs):
                self.reads[_name] += 1
                return _original(t, *args, **kwargs)

            setattr(torch.Tensor, name, wrapper)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        self._saved.clear()
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        self.ops += 1
        self.op_counts[name] += 1
        if name == "aten._local_scalar_dense.default":
            self.reads["scalar"] += 1
        elif name in _DATA_DEPENDENT:
            self.reads[_DATA_DEPENDENT[name]] += 1
        elif name.startswith("aten.repeat_interleave.Tensor") and kwargs.get("output_size") is None:
            self.reads["repeat_interleave"] += 1
        elif name.startswith(("aten.index.Tensor", "aten.index_put")) and _has_bool_index(args[1]):
            self.reads["bool_index"] += 1
        return func(*args, **kwargs)


@torch.no_grad()
def count_steps(model, cache, token: torch.Tensor, steps: int, warmup: int = 0) -> tuple[torch.Tensor, dict]:
    """Greedy decode steps on a filled ``cache`` from ``token`` ``[B, 1]``, each one counted.

    Returns:
        ``(tokens [B, warmup + steps], counts)``; ``counts``: ``host_reads`` and ``aten_ops`` per
        step (means), ``host_ms`` (median wall time of the counted steps, the counter's own
        overhead included), ``reads_by_kind`` (totals) and ``logits`` of the last step.
    """
    from .._compat import cache_kwarg

    kw = cache_kwarg(model, cache)
    generated, reads, ops, times, kinds = [], [], [], [], Counter()
    logits = None
    for step in range(warmup + steps):
        counter = HostReadCounter()
        t = time.perf_counter()
        with counter:
            logits = model(token, **kw, use_cache=True, logits_to_keep=1).logits[:, -1]
            token = logits.argmax(-1, keepdim=True)
        elapsed = time.perf_counter() - t
        generated.append(token)
        if step >= warmup:
            reads.append(counter.host_reads)
            ops.append(counter.ops)
            times.append(elapsed)
            kinds.update(counter.reads)
    counts = {
        "host_reads": sum(reads) / len(reads),
        "aten_ops": sum(ops) / len(ops),
        "host_ms": statistics.median(times) * 1e3,
        "reads_by_kind": dict(kinds),
        "logits": logits,
    }
    return torch.cat(generated, 1), counts


@torch.no_grad()
def count_decode_steps(model, input_ids: torch.Tensor, cache, steps: int = 10, warmup: int = 2) -> dict:
    """Prefill ``input_ids`` into ``cache``, end the prompt (``RaggedCache.end_prompt``: the
    one-time compression is prefill work, not a decode step's), then run greedy decode steps,
    counting each one (``count_steps``).

    Args:
        model: a causal LM whose attention fits the cache.
        input_ids: ``[B, L]``.
        cache: a fresh cache (a transformers ``DynamicCache`` or one of ours).
        steps: decode steps counted (after ``warmup`` uncounted ones).

    Returns:
        ``count_steps``'s counts and ``tokens`` ``[B, 1 + warmup + steps]``.
    """
    from .._compat import cache_kwarg

    logits = model(input_ids, **cache_kwarg(model, cache), use_cache=True, logits_to_keep=1).logits[:, -1]
    end_prompt = getattr(cache, "end_prompt", None)  # a ragged cache; transformers' caches have none
    if end_prompt is not None:
        end_prompt()
    token = logits.argmax(-1, keepdim=True)
    tokens, counts = count_steps(model, cache, token, steps, warmup)
    return {**counts, "tokens": torch.cat([token, tokens], 1)}
