"""Where a tensor is meant to live: code that moves tensors to host memory on purpose (activation
offload, optimizer paging) creates them inside `host_side()`, and a running MemoryTracker files
them as host memory even when the compute device is the CPU. The optimizer and the model mark
their host tensors here without importing the accounting that reads the mark."""
from __future__ import annotations

import contextlib
import contextvars
from typing import Optional

import torch

# True while code moves tensors to host memory on purpose (offload, paging): what it creates is
# host memory even when the "device" is the CPU.
_HOST_SIDE = contextvars.ContextVar("minift_host_side", default=False)


@contextlib.contextmanager
def host_side():
    """Tensors created inside are counted by a running MemoryTracker as host memory."""
    token = _HOST_SIDE.set(True)
    try:
        yield
    finally:
        _HOST_SIDE.reset(token)


def on_host_side() -> bool:
    """True inside a `host_side()` block."""
    return _HOST_SIDE.get()


def default_device(requested: Optional[str] = None) -> torch.device:
    """`requested` (e.g. TrainConfig.device) when given, else CUDA when available, else the CPU."""
    if requested is not None:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
