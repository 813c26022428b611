"""`TrainConfig.compile`: the decoder layers run through `torch.compile` while training.

Each layer is compiled in place (`nn.Module.compile`), so parameter names, state dicts,
checkpoints and adapters stay exactly as without compilation; all layers share one graph per
input shape, as they run the same code. The training loop's first step runs under the memory
tracker and so eagerly; the compiled layers take over from the second. Embedding, final norm
and head stay eager: the head's (B, T, vocab) logits dominate their memory, and compiling them
gains little. The fused RMSNorm / RoPE / SwiGLU kernels are torch.library ops with fake
implementations, so dynamo traces the layers through them on CUDA.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

from minift.models.switches import decoder_layers


@contextlib.contextmanager
def compiled_layers(model: nn.Module, enabled: bool):
    """Compile every decoder layer for the block; afterwards they run eagerly again."""
    if not enabled:
        yield
        return
    layers = list(decoder_layers(model, "TrainConfig.compile=True"))
    previous = [layer._compiled_call_impl for layer in layers]
    for layer in layers:
        layer._compiled_call_impl = _eager_under_dispatch_mode(layer)
    try:
        yield
    finally:
        for layer, impl in zip(layers, previous):
            layer._compiled_call_impl = impl


def _eager_under_dispatch_mode(layer: nn.Module):
    # What nn.Module.compile installs, except under a TorchDispatchMode (the memory tracker
    # watches the first step through one): dynamo cannot trace there, and a frame it fails on is
    # skipped for the rest of the process, so that step runs the layer eagerly instead.
    compiled = torch.compile(layer._call_impl)

    def call(*args, **kwargs):
        if _get_current_dispatch_mode() is not None:
            return layer._call_impl(*args, **kwargs)
        return compiled(*args, **kwargs)

    return call
