"""Activation offload: checkpointed decoder-layer inputs wait for backward in host memory.

With gradient checkpointing each decoder layer keeps only its input x (B, T, hidden) for
backward; at Llama-3.1-8B, batch 1 x 80,000 tokens that is 32 x 625 MiB = 20 GiB on the device.
``ActivationOffload`` moves each layer's input to a (pinned) host buffer on a side stream right
after the layer's forward and brings it back during backward one layer ahead of its use:

    forward  layer i : side waits for main (x_i is written) -> copy x_i to host_i (side stream)
                       x_i.record_stream(side): its device memory is reused only after the copy
    backward layer i : main waits for fetch_i's event; then fetch_{i-1} starts on the side stream
                       (layer i's recompute and backward overlap the copy of layer i-1's input)

The hooks are ``torch.autograd.graph.saved_tensors_hooks`` around each checkpoint call. Under
non-reentrant checkpointing the layer's own intermediates go to the checkpoint's inner hooks,
so the outer hooks see only what the checkpoint keeps: the layer's inputs. Only x (identity
check) is moved; cos/sin/mask are shared by all layers and small.

Without CUDA the same code runs host to host with synchronous copies, so tests compare losses
and gradients bit for bit with and without offload. Host buffers are pooled per layer and
reused every step (pinned allocation is slow); ``host_bytes`` is their total. One graph at a
time is assumed for the prefetch only: a buffer is reused only once its graph released it.
"""
from __future__ import annotations

import contextlib
import weakref

import torch

from minift.placement import host_side
from minift.tracing import (
    current_stream,
    device_is_cuda,
    new_event,
    on_stream,
    record_stream,
    side_stream,
    tracing,
)


class _OffloadedInput:
    """What autograd holds instead of a layer input: the host copy and where it came from."""

    __slots__ = ("layer", "host", "device", "event", "ready", "__weakref__")

    def __init__(self, layer, host, device, event):
        self.layer, self.host, self.device, self.event = layer, host, device, event
        self.ready = None  # (device tensor, event) once prefetched


class ActivationOffload:
    """Moves checkpointed layer inputs to host memory and prefetches them back one layer ahead.

    Args:
        device: the compute device; CUDA uses a side stream and pinned buffers, anything else
            copies synchronously into ordinary host tensors.
    """

    def __init__(self, device):
        self.device = torch.device(device)
        # a planning trace of the CUDA path (minift.tracing) takes this branch with stand-in streams
        self._side = side_stream(self.device) if device_is_cuda(self.device) else None
        # Host buffers return to the pool when autograd drops what holds them (after backward),
        # so a buffer is never overwritten while a graph still needs it.
        self._free: dict[tuple, list] = {}  # (shape, dtype) -> idle host buffers
        self.host_bytes = 0  # all host buffers ever allocated (pinned on CUDA)
        # layer -> the newest saved input of that layer, for the prefetch one layer ahead
        self._latest: weakref.WeakValueDictionary = weakref.WeakValueDictionary()

    @contextlib.contextmanager
    def layer(self, index: int, x: torch.Tensor):
        """Around one checkpointed layer call whose input is ``x`` (B, T, hidden)."""
        # autograd keeps the hooks with every tensor they packed, so the hooks must not hold x
        # itself (that would keep every layer input on the device): a weak reference only
        target = weakref.ref(x)

        def pack(t):
            return self._offload(index, t) if t is target() else t

        def unpack(saved):
            return self._restore(saved) if isinstance(saved, _OffloadedInput) else saved

        del x
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield

    # ---- forward: device -> host ------------------------------------------------------------
    def _host_buffer(self, t: torch.Tensor) -> torch.Tensor:
        idle = self._free.get((tuple(t.shape), t.dtype))
        if idle:
            return idle.pop()
        self.host_bytes += t.nbytes
        with host_side():
            return torch.empty(t.shape, dtype=t.dtype, pin_memory=self._side is not None and not tracing())

    def _release(self, buf: torch.Tensor) -> None:
        self._free.setdefault((tuple(buf.shape), buf.dtype), []).append(buf)

    def _offload(self, index: int, t: torch.Tensor) -> _OffloadedInput:
        host = self._host_buffer(t)
        event = None
        if self._side is not None:
            self._side.wait_stream(current_stream(self.device))  # t is written
            with on_stream(self._side), host_side():
                host.copy_(t, non_blocking=True)
                event = new_event()
                event.record(self._side)
            record_stream(t, self._side)  # freed t is reused only after the copy ran
        else:
            with host_side():
                host.copy_(t)
        saved = _OffloadedInput(index, host, t.device, event)
        weakref.finalize(saved, self._release, host)
        self._latest[index] = saved
        return saved

    # ---- backward: host -> device, one layer ahead -------------------------------------------
    def _fetch(self, saved: _OffloadedInput) -> tuple:
        if self._side is None:
            return saved.host.to(saved.device, copy=True), None
        with on_stream(self._side):
            # the side stream runs in order: this fetch follows the offload copy of the buffer
            dev = saved.host.to(saved.device, non_blocking=True, copy=True)
            event = new_event()
            event.record(self._side)
        return dev, event

    def _restore(self, saved: _OffloadedInput) -> torch.Tensor:
        dev, event = saved.ready if saved.ready is not None else self._fetch(saved)
        saved.ready = None
        if event is not None:
            stream = current_stream(self.device)
            stream.wait_event(event)
            record_stream(dev, stream)  # allocated on the side stream, used and freed on main
        below = self._latest.get(saved.layer - 1)
        if below is not None and below.ready is None:
            below.ready = self._fetch(below)  # layer i-1's input arrives during layer i's backward
        return dev
