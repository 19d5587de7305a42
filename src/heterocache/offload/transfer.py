"""The one path by which host KV (``host_kv.HostKV``) reaches the device asynchronously, for every
method that keeps KV off the device: staged rows written into store slots (HeteroCache's refills and
turn re-selections: ``write``), staged rows copied to fresh device tensors (a turn's prompt keys:
``fetch``), or a gather that reads pinned host memory from the device (OmniKV's offloaded layers:
``run``).

Without CUDA the copy is a plain synchronous write (the path CI exercises). On CUDA it is issued
on a side stream, after the main stream's work so far (so the store is not overwritten while the
current step still reads it), and an event marks its end. The main stream waits on that event
exactly where the layer's KV is next read (``wait(layer)`` at the start of the layer's next
attention), so the copy overlaps the following layers and a decode step never reads a
half-refreshed head. Host staging buffers stay referenced until their event has completed, so
nothing reuses them while a copy is in flight.
"""

from __future__ import annotations

import time

import torch

from ..store.ragged import RaggedKVStore


class RefreshTransfer:
    """Moves host KV to the device (store slots, fresh tensors or a device-side gather),
    asynchronously on CUDA.

    One per device: layers spread over several devices (``device_map``) each use the transfer,
    side stream and events of their own device.

    Args:
        device: the stores' device.
        asynchronous: use a side stream on CUDA (default True; False = synchronous copies).
    """

    def __init__(self, device: torch.device, asynchronous: bool = True):
        self.device = torch.device(device)
        self.asynchronous = asynchronous and self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.asynchronous else None
        self._pending: dict[int, torch.cuda.Event] = {}
        self._in_flight: list[tuple[torch.cuda.Event, tuple]] = []
        self._timed: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self.wait_s = 0.0  # host time spent blocked on copies (synchronous mode / explicit syncs)

    def write(self, layer_idx: int, store: RaggedKVStore, slots: torch.Tensor, k_host, v_host, pos=None) -> None:
        """Write ``k_host, v_host [n, D]`` into ``store`` slots ``slots`` (int64 ``[n]``, device),
        and the slots' logical positions ``pos`` (int32 ``[n]`` device, optional) with them."""
        if store.device != self.device:
            raise ValueError(f"a transfer for {self.device} cannot write into a store on {store.device}")
        if not self.asynchronous:
            store.k[slots] = k_host.to(store.device, store.dtype)
            store.v[slots] = v_host.to(store.device, store.dtype)
            if pos is not None:
                store.pos[slots] = pos
            return
        main = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(main)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        # On the store's device, whichever is current (device_map spreads layers over devices).
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            start.record(self.stream)
            k_dev = k_host.to(self.device, non_blocking=True)
            v_dev = v_host.to(self.device, non_blocking=True)
            store.k[slots] = k_dev.to(store.dtype)
            store.v[slots] = v_dev.to(store.dtype)
            if pos is not None:
                store.pos[slots] = pos
            end.record(self.stream)
        for t in (slots, store.k, store.v, store.pos) + (() if pos is None else (pos,)):
            t.record_stream(self.stream)  # allocations of the main stream used on the side stream
        self._pending[layer_idx] = end
        self._in_flight.append((end, (k_host, v_host, k_dev, v_dev, slots)))
        self._timed.append((start, end))
        self._in_flight = [(e, keep) for e, keep in self._in_flight if not e.query()]

    def fetch(self, layer_idx: int, *host: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Copy host tensors (pinned, for an asynchronous copy) to fresh device tensors, on the side
        stream on CUDA; ``wait(layer_idx)`` makes the main stream wait for them before they are read.

        Returns:
            the device tensors, in order (plain synchronous copies without CUDA).
        """
        if not self.asynchronous:
            return tuple(t.to(self.device) for t in host)
        main = torch.cuda.current_stream(self.device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            start.record(self.stream)
            out = tuple(t.to(self.device, non_blocking=True) for t in host)
            end.record(self.stream)
        for t in out:
            t.record_stream(main)  # allocated on the side stream, read on the main one
        self._pending[layer_idx] = end
        self._in_flight.append((end, host))
        self._timed.append((start, end))
        self._in_flight = [(e, keep) for e, keep in self._in_flight if not e.query()]
        return out

    def run(self, layer_idx: int, fn, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``fn(*inputs)`` (device tensors out, e.g. a gather from pinned host memory through its
        device alias) on the side stream, after the main stream's work so far (which made the
        inputs), so it overlaps the layers that follow; ``wait(layer_idx)`` makes the main stream
        wait for it before the outputs are read.

        Returns:
            ``fn``'s outputs, in order (computed at once without CUDA).
        """
        if not self.asynchronous:
            return tuple(fn(*inputs))
        main = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(main)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            start.record(self.stream)
            out = tuple(fn(*inputs))
            end.record(self.stream)
        for t in inputs:
            t.record_stream(self.stream)  # made on the main stream, read on the side one
        for t in out:
            t.record_stream(main)  # made on the side stream, read on the main one
        self._pending[layer_idx] = end
        self._timed.append((start, end))
        return out

    def wait(self, layer_idx: int) -> None:
        """Make the main stream wait for the layer's outstanding copies (no host blocking)."""
        event = self._pending.pop(layer_idx, None)
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    def synchronize(self) -> None:
        """Block the host until every copy has finished (e.g. before timing or inspection)."""
        if self.stream is not None:
            t = time.perf_counter()
            self.stream.synchronize()
            self.wait_s += time.perf_counter() - t
            self._pending.clear()
            self._in_flight.clear()

    def copy_seconds(self) -> float:
        """GPU time spent in refresh copies so far (0 without CUDA)."""
        if not self._timed:
            return 0.0
        self.synchronize()
        return sum(s.elapsed_time(e) for s, e in self._timed) / 1e3
