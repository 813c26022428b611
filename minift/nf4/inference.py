"""NF4 matmuls outside autograd (decoding), and an opt-in cache of dequantized weights.

Under ``torch.no_grad()`` an ``NF4Linear`` needs no autograd context, so its forward comes here:

* CUDA, at most 16 rows of x (a decoding step): the fused Triton kernel ``minift.kernels.nf4_gemv``
  reads the packed weight and never writes the dequantized (out, in) matrix;
* CPU, at most 16 rows: the weight is dequantized into one scratch buffer per thread, device and
  dtype, reused by every layer (no allocation per layer and token), then one matmul; generation
  drops the buffers when it ends (``release_scratch``);
* otherwise, and inside ``nf4_inference_cache``: as in training, or from the cached matrix.

Every path gives the values training's forward gives (the CPU and cached paths the same bits;
the kernel the same dequantized tile, summed in another order). Gradients never come here.
"""
from __future__ import annotations

import contextlib
import logging
import threading
from typing import Iterator

import torch
from torch import nn

from minift.kernels import HAS_TRITON
from minift.nf4.format import NF4Weight
from minift.nf4.quantize import dequantize_nf4
from minift.tracing import is_fake, on_cuda

if HAS_TRITON:
    from minift.kernels.nf4_gemv import nf4_gemv, supported

logger = logging.getLogger(__name__)

SMALL_M = 16  # rows of x up to which the decoding paths apply (tokens of a decoding step)
_scratch = threading.local()  # (device, dtype) -> flat buffer, grown to the largest weight seen


def _buffer(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    buffers = _scratch.__dict__.setdefault("buffers", {})
    buf = buffers.get((device, dtype))
    if buf is None or buf.numel() < numel:
        buf = buffers[(device, dtype)] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


def release_scratch() -> None:
    """Drop this thread's dequantization scratch buffers (`minift.models.generation.generate` does
    at its end: the buffers live for one generation, not for the process)."""
    _scratch.__dict__.pop("buffers", None)


def scratch_bytes() -> int:
    """Bytes held by this thread's dequantization scratch buffers (one weight's worth per dtype)."""
    return sum(b.nbytes for b in _scratch.__dict__.get("buffers", {}).values())


def linear_no_grad(x: torch.Tensor, q: NF4Weight, bias: torch.Tensor | None, dtype: torch.dtype,
                   cached: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ dequant(q).T + bias`` in ``dtype`` without autograd; ``cached``: the dequantized weight
    kept by ``nf4_inference_cache`` (used when its dtype and device match)."""
    b = None if bias is None else bias.to(dtype)
    x = x.to(dtype)
    if cached is not None and cached.dtype == dtype and cached.device == x.device:
        return nn.functional.linear(x, cached, b)
    rows = x.numel() // max(q.shape[-1], 1)
    if rows <= SMALL_M:
        # a CUDA trace takes the kernel's launcher too: it allocates its workspace and output, and
        # launches nothing on fake tensors
        if HAS_TRITON and on_cuda(q.packed) and supported(x, q.shape, q.blocksize):
            y = nf4_gemv(x, q.packed, q.absmax, q.code, q.shape, q.blocksize, nested_absmax=q.nested_absmax,
                         nested_code=q.nested_code, offset=q.offset, nested_blocksize=q.nested_blocksize)
            return y if b is None else y + b
        if q.packed.device.type == "cpu" and not is_fake(x):  # the scratch buffer outlives a trace
            w = dequantize_nf4(q, dtype, out=_buffer(q.numel, dtype, x.device).view(q.shape))
            return nn.functional.linear(x, w, b)
    return nn.functional.linear(x, dequantize_nf4(q, dtype), b)


@contextlib.contextmanager
def nf4_inference_cache(model: nn.Module, dtype: torch.dtype | None = None) -> Iterator[dict]:
    """Keep every ``NF4Linear`` of ``model`` dequantized while the block runs (no-grad forwards only).

    Decoding then runs at the speed of a full-precision model, at the memory of one: the block
    holds ``report["bytes"]`` more (4 bytes a weight value in float32, 2 in bf16 / fp16), freed on
    exit. Training forwards inside the block still dequantize per use (gradients unchanged).

    Args:
        model: any module; its ``NF4Linear`` layers are cached.
        dtype: dtype of the cached weights; default each layer's ``compute_dtype``, else the
            dtype it was quantized from (the dtype its forward picks for inputs of that dtype).

    Yields:
        ``{"layers": n, "bytes": b, "dtype": {"float32": layers, ...}}``, filled before the block runs.
    """
    from minift.nf4.linear import NF4Linear  # linear.py imports this module for linear_no_grad

    layers = [m for m in model.modules() if isinstance(m, NF4Linear)]
    report = {"layers": len(layers), "bytes": 0, "dtype": {}}
    try:
        for layer in layers:
            dt = dtype or layer.compute_dtype or layer.weight_dtype
            layer._inference_weight = layer.dequantize(dt)
            report["bytes"] += layer._inference_weight.nbytes
            name = str(dt).removeprefix("torch.")
            report["dtype"][name] = report["dtype"].get(name, 0) + 1
        logger.info("nf4_inference_cache: %d layers dequantized, %d bytes", len(layers), report["bytes"])
        yield report
    finally:
        for layer in layers:
            layer._inference_weight = None
