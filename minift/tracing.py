"""Planning traces: the real training step run on fake tensors (shapes and dtypes, no storage).

`minift.estimate_memory` builds the model under ``torch._subclasses.FakeTensorMode`` and runs the
step ``minift.train`` runs, while the MemoryTracker counts every tensor. Two things differ from a
real step, and the code asks this module about both:

* **Which device's code path.** Fake tensors live on the CPU (a CUDA build of torch fails in
  autograd's backward without a GPU), so a trace of the CUDA path selects it explicitly:
  ``on_cuda(t)`` is True for real CUDA tensors and, inside ``planning("cuda")``, for fake ones.
  Every branch that picks a kernel, Flex attention, pinned-host offload or paging streams asks it
  instead of ``t.is_cuda``; the kernels themselves are not launched in a trace (their custom ops'
  fake implementations allocate what the kernels return).
* **Values.** A fake tensor has no values, so code that reads one (a finiteness check, a count of
  scored tokens) asks ``known(t, assume)`` (``known_all`` for several at once): the value for a
  real tensor, ``assume`` in a trace, chosen as the case that holds the most memory (every chunk
  scored, every gradient finite). Reading a device value on CUDA waits for the device (a
  host-device sync), so the training step reads the device once a step (docs/training.md);
  tests/sync_counter.py counts these reads in a trace of the CUDA path.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Optional

import torch

# The device whose code path a running trace takes ("cuda" or "cpu"); None outside a trace.
_TARGET: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("minift_trace_target", default=None)


def is_fake(t) -> bool:
    """Whether ``t`` is a fake tensor (a planning trace's; no storage behind it)."""
    from torch._subclasses.fake_tensor import FakeTensor
    return isinstance(t, FakeTensor) or isinstance(getattr(t, "data", None), FakeTensor)


@contextlib.contextmanager
def planning(device: str):
    """Inside, fake tensors take ``device``'s code path ("cuda" or "cpu")."""
    if device not in ("cuda", "cpu"):
        raise ValueError(f"planning device must be 'cuda' or 'cpu', got {device!r}")
    token = _TARGET.set(device)
    try:
        yield
    finally:
        _TARGET.reset(token)


def planned_device() -> Optional[str]:
    """The device a running trace plans for, or None outside a trace."""
    return _TARGET.get()


def on_cuda(t) -> bool:
    """Whether ``t`` takes the CUDA code path: a CUDA tensor, or a fake one in a CUDA trace."""
    return t.is_cuda or (_TARGET.get() == "cuda" and is_fake(t))


def device_is_cuda(device) -> bool:
    """``on_cuda`` for a device: CUDA, or the CPU standing in for it in a CUDA trace."""
    return torch.device(device).type == "cuda" or (_TARGET.get() == "cuda")


def tracing() -> bool:
    """True inside a planning trace."""
    return _TARGET.get() is not None


def known(value, assume):
    """A value read from tensors, as a Python number or bool.

    ``value`` is a 0-d tensor (its ``.item()``) or a function of no arguments returning a tensor
    or a number. The function is a read on the host: it runs with every dispatch mode switched
    off, so neither a fake mode nor a MemoryTracker sees it, and values read from real inputs (a
    trace's token ids and labels are real) come out exact. A value that depends on fake tensors
    (weights, activations) has none, and ``assume`` is returned instead.
    """
    from torch._subclasses.fake_tensor import DataDependentOutputException
    from torch.utils._python_dispatch import _disable_current_modes
    if not callable(value):
        if isinstance(value, torch.Tensor):
            return assume if is_fake(value) else value.item()
        return value
    try:
        with _disable_current_modes():
            out = value()
            if isinstance(out, torch.Tensor):
                return assume if is_fake(out) else out.item()
            return out
    except DataDependentOutputException:
        return assume


def known_all(values, assume) -> list:
    """Python floats for ``values`` (0-d tensors or numbers), the tensors of one device read
    together: one host-device sync for all of them, where ``known`` on each would wait once per
    tensor. A tensor without values (a planning trace's) gives ``assume``; numbers pass through.

    Every tensor is converted to float64 on its device first (exact for float32, bfloat16 and
    integer counts), so a value reads exactly as ``float(t)`` would.
    """
    out = list(values)
    by_device: dict = {}
    for i, v in enumerate(values):
        if isinstance(v, torch.Tensor):
            by_device.setdefault(v.device, []).append(i)
    for index in by_device.values():
        tensors = [values[i].detach().reshape(()) for i in index]
        stacked = torch.stack([t.double() for t in tensors])
        if is_fake(stacked):  # a trace: real tensors among them are host values, read as such
            read = [assume if is_fake(t) else known(lambda t=t: t.double(), assume) for t in tensors]
        else:
            read = stacked.tolist()  # the one sync
        for i, x in zip(index, read):
            out[i] = x
    return out


@contextlib.contextmanager
def host_read():
    """Work on host batches (slicing a micro-batch into ranks' rows, counting tokens): run with
    every dispatch mode off, so a planning trace keeps the batch real (its values readable by
    `known`) and a MemoryTracker does not count host bookkeeping as device memory."""
    from torch.utils._python_dispatch import _disable_current_modes
    with _disable_current_modes():
        yield


class _NoStream:
    """Stands in for a CUDA stream or event in a trace of the CUDA path: ordering is all it
    gives, and a trace has nothing to order."""

    def wait_stream(self, *args):
        pass

    def wait_event(self, *args):
        pass

    def record(self, *args):
        pass

    def synchronize(self):
        pass


def side_stream(device):
    """A CUDA side stream on ``device``; in a trace of the CUDA path, a stand-in."""
    if tracing():
        return _NoStream()
    return torch.cuda.Stream(device)


def new_event():
    """A CUDA event; in a trace, a stand-in."""
    return _NoStream() if tracing() else torch.cuda.Event()


@contextlib.contextmanager
def on_stream(stream):
    """``torch.cuda.stream(stream)``; nothing in a trace."""
    if isinstance(stream, _NoStream):
        yield
    else:
        with torch.cuda.stream(stream):
            yield


def current_stream(device):
    """``torch.cuda.current_stream(device)``; a stand-in in a trace."""
    return _NoStream() if tracing() else torch.cuda.current_stream(device)


def record_stream(t, stream) -> None:
    """``t.record_stream(stream)``; nothing in a trace (a fake tensor has no allocation)."""
    if not isinstance(stream, _NoStream):
        t.record_stream(stream)
