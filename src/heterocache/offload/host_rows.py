"""Rows of a tensor kept in host memory, gathered by indices that live on the device.

A per-step selection (ShadowKV's chunks) is computed on the accelerator; the rows it picks sit in
host memory. Copying the indices to the host first would make every decode step wait for the
device. :class:`HostRows` avoids that:

- CPU models: the rows are an ordinary CPU tensor and ``gather`` is ``index_select`` (the indices
  are CPU tensors too: nothing waits).
- CUDA models: the rows are in page-locked (pinned) memory, and ``gather`` reads them *from a CUDA
  kernel*: with unified virtual addressing (every 64-bit CUDA platform) pinned host memory is
  directly addressable by the device at its host address, so the pinned buffer is wrapped (through
  ``__cuda_array_interface__``, zero-copy) as a CUDA tensor that aliases it, and ``index_select``
  on that alias is a device kernel whose loads of the chosen rows cross the host link (PCIe or
  NVLink-C2C). Indices never leave the device and the host never blocks; the cost per call is
  the bytes of the chosen rows at the link's bandwidth (rows of ``chunk * head_dim`` contiguous
  elements, e.g. 2 KiB in bf16 for ShadowKV's 8 x 128, are read as whole cache lines), the same
  traffic as ShadowKV's own gather kernel on its pinned value cache. The alias is checked to
  point at the pinned buffer itself; where it cannot be made (no NumPy, a non-UVA platform, a
  pointer the driver does not report on the model's device) ``gather`` falls back to copying the
  indices to the host (a synchronisation per call, counted in ``sync_gathers``) and warns once.
"""

from __future__ import annotations

import warnings

import torch

__all__ = ["HostRows", "device_alias_of_pinned"]

# An integer NumPy typestr of each element size: the alias is made with it and viewed back as the
# real dtype (bfloat16 has no NumPy type).
_INT_VIEW = {1: (torch.uint8, "|u1"), 2: (torch.int16, "<i2"), 4: (torch.int32, "<i4"), 8: (torch.int64, "<i8")}


class _PinnedInterface:
    """A ``__cuda_array_interface__`` (v3) describing a contiguous pinned CPU tensor; holds it alive."""

    def __init__(self, pinned: torch.Tensor):
        typestr = _INT_VIEW[pinned.element_size()][1]
        self.tensor = pinned
        self.__cuda_array_interface__ = {
            "shape": tuple(pinned.shape),
            "typestr": typestr,
            "data": (pinned.data_ptr(), False),
            "version": 3,
            "strides": None,
        }


def device_alias_of_pinned(pinned: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """A CUDA tensor on ``device`` aliasing the contiguous pinned CPU tensor ``pinned`` (zero-copy, UVA),
    or None where the platform cannot make one. The alias keeps ``pinned`` alive."""
    device = torch.device(device)
    if device.type != "cuda" or not pinned.is_pinned() or not pinned.is_contiguous() or pinned.numel() == 0:
        return None
    if pinned.element_size() not in _INT_VIEW:
        return None
    try:
        with torch.cuda.device(device):
            alias = torch.as_tensor(_PinnedInterface(pinned), device=device)
    except (RuntimeError, TypeError, ValueError):
        return None
    if alias.data_ptr() != pinned.data_ptr() or alias.device != device:
        return None  # torch copied instead of aliasing: not zero-copy
    return alias.view(pinned.dtype)


class HostRows:
    """A 2-D tensor ``[N, W]`` in host memory (pinned when the model is on CUDA), read by row indices
    that live on the model's device.

    Args:
        rows: ``[N, W]`` on any device (copied once, at construction: a prefill, where waiting is fine).
        device: the model's device (where indices come from and gathered rows go).

    Attributes:
        host: the ``[N, W]`` CPU tensor (pinned on CUDA).
        mode: "cpu" (plain index_select), "uva" (device kernel reading pinned memory) or "sync"
            (fallback: indices copied to the host each call).
        sync_gathers: gathers that had to copy indices to the host ("sync" mode).
    """

    _warned = False

    def __init__(self, rows: torch.Tensor, device: torch.device):
        self.device = torch.device(device)
        pin = self.device.type == "cuda"
        self.host = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=pin)
        self.host.copy_(rows.detach())  # synchronous: the buffer is complete before any kernel reads it
        self.sync_gathers = 0
        self._alias = device_alias_of_pinned(self.host, self.device) if pin else None
        if self.device.type == "cpu":
            self.mode = "cpu"
        elif self.host.numel() == 0:
            self.mode = "empty"  # nothing to gather: no alias needed, nothing to warn about
        elif self._alias is not None:
            self.mode = "uva"
        else:
            self.mode = "sync"
            if not HostRows._warned:
                HostRows._warned = True
                warnings.warn(
                    "pinned host memory cannot be read from the device here (no unified addressing); host rows are "
                    "gathered after copying their indices to the host, which synchronises every decode step",
                    RuntimeWarning, stacklevel=2,
                )

    @property
    def shape(self) -> torch.Size:
        return self.host.shape

    def nbytes(self) -> int:
        return self.host.numel() * self.host.element_size()

    def gather(self, index: torch.Tensor) -> torch.Tensor:
        """Rows ``index`` (int64 ``[n]`` on the model's device) as ``[n, W]`` on the model's device."""
        if self.mode == "cpu":
            return self.host.index_select(0, index)
        if self.mode == "uva":
            return self._alias.index_select(0, index)
        if self.mode == "empty":  # no rows: only an empty index can be asked for
            return torch.empty((index.shape[0], *self.host.shape[1:]), dtype=self.host.dtype, device=self.device)
        self.sync_gathers += 1
        rows = self.host.index_select(0, index.cpu())
        return rows.pin_memory().to(self.device, non_blocking=True)

    def select(self, index) -> HostRows:
        """A new ``HostRows`` of the rows ``index`` (host int64 ``[n]``; not a decode-step operation)."""
        index = torch.as_tensor(index, dtype=torch.long).cpu()
        return HostRows(self.host.index_select(0, index), self.device)
