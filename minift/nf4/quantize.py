"""NF4 weights with double quantization, laid out byte for byte like bitsandbytes.

A weight of n elements is cut into blocks of ``blocksize`` consecutive elements (row-major
order; the last block may be partial). Each element becomes the 4-bit index of the nearest of the
16 NF4 levels after dividing by its block's absmax; two indices share a byte, the even element in
the high nibble. With double quantization the fp32 absmaxes lose their mean (``offset``) and are
themselves quantized to 8 bits with the signed dynamic map in blocks of 256, keeping one fp32
scale per 256 blocks (``nested_absmax``). `minift.nf4.format` holds the stored form (`NF4Weight`,
bitsandbytes' state-dict names); docs/qlora.md shows the byte layout.

The rounding rules below reproduce bitsandbytes 0.50 on CPU exactly (tests/test_nf4.py holds the
proof), so packed checkpoints interoperate both ways. This module is also the pure-torch
reference of the Triton dequantization kernel in ``minift.kernels.nf4``.
"""
from __future__ import annotations

import functools
from dataclasses import replace

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily

from minift.kernels import HAS_TRITON
from minift.nf4.dequant import dequantize_packed
from minift.nf4.format import FLOAT_DTYPES, NESTED_BLOCKSIZE, SUPPORTED_BLOCKSIZES, NF4Weight
from minift.quantmaps import dynamic_map, nf4_code
from minift.tracing import known, on_cuda

if HAS_TRITON:  # the CUDA path; the torch reference below serves everywhere else
    from minift.kernels.nf4 import nf4_dequantize

_LUT_SIZE = 65536  # grid points over [-1, 1] used to pick an 8-bit code (bitsandbytes' CPU rule)


# ---------------------------------------------------------------------------------- checks


def check_blocksize(blocksize, what: str = "quantize_nf4") -> None:
    """Raise unless ``blocksize`` is an int (not a bool) in ``SUPPORTED_BLOCKSIZES``."""
    # 64.0 == 64 would pass the membership test and then fail deep inside as a slice index
    if isinstance(blocksize, bool) or not isinstance(blocksize, int):
        raise TypeError(f"{what}: blocksize must be an int, got {blocksize!r} ({type(blocksize).__name__})")
    if blocksize not in SUPPORTED_BLOCKSIZES:
        raise ValueError(f"{what}: unsupported blocksize {blocksize!r}; use one of {SUPPORTED_BLOCKSIZES}")


def check_weight(w, what: str = "quantize_nf4", name: str = "w") -> None:
    """Raise unless ``w`` is a non-empty, finite float32 / bfloat16 / float16 tensor.

    Messages read ``"{what}: {name} ..."``, so callers can name the layer the tensor belongs to.
    """
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{what}: {name} must be a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{what}: {name} must be float32, bfloat16 or float16, got dtype {w.dtype}")
    if w.numel() == 0:
        raise ValueError(f"{what}: {name} is empty (shape {tuple(w.shape)})")
    if not known(lambda: torch.isfinite(w).all(), True):  # a fake weight (a planning trace) passes
        bad = int((~torch.isfinite(w)).sum())
        raise ValueError(f"{what}: {name} holds {bad} NaN/Inf value(s); they would poison the block absmax")


# -------------------------------------------------------------------------------- quantize


def _quantize_4bit(flat: torch.Tensor, blocksize: int, code: torch.Tensor):
    """flat (n,) float32 -> (packed (ceil(n/2), 1) uint8, absmax (n_blocks,) float32)."""
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].view(-1, blocksize)  # (n_full, blocksize)
    absmax = blocks.abs().amax(dim=1) if full else flat.new_zeros(0)
    # bitsandbytes multiplies full blocks by the reciprocal but divides the tail block; the two
    # differ in the last bit, so both are kept. The 1e-38 floor keeps all-zero blocks finite.
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38)).view(-1, 1)).clamp(-1, 1).reshape(-1)
    if full < n:
        tail_max = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max.view(1)])
        scaled = torch.cat([scaled, (flat[full:] / tail_max).clamp(-1, 1)])
    if n % 2:  # the pad element is 0.0 -> level 7, the low nibble of the last byte
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    # Nearest level; a value exactly on a midpoint goes to the lower level (bucketize, right=False).
    midpoints = (code[:-1] + code[1:]) / 2
    idx = torch.bucketize(scaled, midpoints, out_int32=True).to(torch.uint8)
    packed = (idx[0::2] << 4) | idx[1::2]
    return packed.view(-1, 1), absmax


@functools.lru_cache(maxsize=4)
def _code_lut(device_str: str) -> torch.Tensor:
    # bitsandbytes' CPU 8-bit quantizer snaps the normalized value to one of 65536 evenly spaced
    # grid points over [-1, 1] and takes that point's nearest code (ties to the lower code), so a
    # value within half a grid step of a midpoint may land one code away from the exact nearest.
    with unset_fake_temporarily():  # cached: real even when first built in a planning trace
        code = dynamic_map(True)
        midpoints = 0.5 * (code[:-1] + code[1:])
        grid = torch.arange(_LUT_SIZE, dtype=torch.float32) * 2.0 / float(_LUT_SIZE - 1) + -1.0
        return torch.searchsorted(midpoints, grid).to(torch.uint8).to(device_str)


def _quantize_8bit(flat: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE):
    """flat (n,) float32 in any range -> (codes (n,) uint8, absmax (n_blocks,) float32)."""
    n = flat.numel()
    n_blocks = -(-n // blocksize)
    padded = torch.nn.functional.pad(flat, (0, n_blocks * blocksize - n)).view(n_blocks, blocksize)
    absmax = padded.abs().amax(dim=1)  # padding zeros never raise a max of absolute values
    inv = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))  # zero block -> 0, not inf
    normed = (padded * inv.view(-1, 1)).clamp(-1, 1)
    grid_idx = (((normed + 1.0) * 0.5) * float(_LUT_SIZE - 1) + 0.5).to(torch.int64)  # truncation
    codes = _code_lut(str(flat.device))[grid_idx]
    codes = torch.where((absmax == 0).view(-1, 1), torch.zeros_like(codes), codes)  # zero block
    return codes.reshape(-1)[:n], absmax


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    """Quantize a floating tensor to NF4 (bit-identical to bitsandbytes' ``quantize_4bit``).

    Args:
        w: float32 / bfloat16 / float16 tensor of any shape; finite, non-empty.
        blocksize: elements per absmax block, one of 32, 64, ..., 4096.
        double_quant: quantize the absmaxes to 8 bits (bitsandbytes' ``compress_statistics``).

    Returns:
        An ``NF4Weight`` on ``w``'s device.
    """
    check_blocksize(blocksize)
    check_weight(w)
    code = nf4_code(w.device)
    flat = w.detach().reshape(-1).float()
    packed, absmax = _quantize_4bit(flat, blocksize, code)
    q = NF4Weight(packed=packed, absmax=absmax, shape=torch.Size(w.shape), dtype=w.dtype,
                  blocksize=blocksize, code=code)
    return double_quantize(q) if double_quant else q


def double_quantize(q: NF4Weight, nested_blocksize: int = NESTED_BLOCKSIZE) -> NF4Weight:
    """Quantize the float32 absmaxes of a single-quantized weight to 8 bits (double quantization).

    The absmaxes lose their mean (``offset``), then are quantized with the signed dynamic map in
    blocks of ``nested_blocksize``, keeping one float32 scale per block (bitsandbytes'
    ``compress_statistics``). The packed nibbles are shared with ``q``, not copied.

    Args:
        q: an ``NF4Weight`` with float32 absmaxes (``q.double_quant`` False).
        nested_blocksize: absmax codes per float32 scale; bitsandbytes writes 256 and reads any
            supported block size.

    Returns:
        A new ``NF4Weight`` whose ``absmax`` holds uint8 codes into ``nested_code``.
    """
    if not isinstance(q, NF4Weight):
        raise TypeError(f"double_quantize: q must be an NF4Weight, got {type(q).__name__}")
    if q.double_quant:
        raise ValueError("double_quantize: q is already double-quantized (its absmax holds 8-bit codes)")
    check_blocksize(nested_blocksize, "double_quantize")
    offset = q.absmax.mean()  # same reduction as bitsandbytes, so the same fp32 value
    codes, nested_absmax = _quantize_8bit(q.absmax - offset, nested_blocksize)
    return replace(q, absmax=codes, nested_absmax=nested_absmax, nested_code=dynamic_map(True, q.device),
                   offset=float(known(offset, 0.0)), nested_blocksize=nested_blocksize)


# ------------------------------------------------------------------------------ dequantize


def absmax_fp32(q: NF4Weight) -> torch.Tensor:
    """Per-block absmax as float32 (n_blocks,); decodes the 8-bit codes when double-quantized."""
    if not q.double_quant:
        return q.absmax.float()
    scale = q.nested_absmax.repeat_interleave(q.nested_blocksize)[: q.absmax.numel()]
    # Two roundings (product, then sum), never a fused multiply-add: that is what bitsandbytes does.
    return q.nested_code[q.absmax.long()] * scale + q.offset


def _dequantize_reference(q: NF4Weight, dtype: torch.dtype) -> torch.Tensor:
    n = q.numel
    nibbles = torch.stack([q.packed.view(-1) >> 4, q.packed.view(-1) & 15], dim=1).view(-1)[:n]
    scale = absmax_fp32(q).repeat_interleave(q.blocksize)[:n]
    # The product is formed in fp32 and rounded once to the output dtype (as bitsandbytes does).
    return (q.code[nibbles.long()] * scale).to(dtype).view(q.shape)


def check_out(out: torch.Tensor, q: NF4Weight, dtype: torch.dtype) -> None:
    """Raise if a caller-provided output buffer cannot hold ``q`` dequantized to ``dtype``."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
    if tuple(out.shape) != tuple(q.shape):
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {tuple(q.shape)}")
    if out.dtype != dtype:
        raise ValueError(f"out has dtype {out.dtype}, expected {dtype}")
    if out.device != q.device:
        raise ValueError(f"out is on {out.device}, the weight is on {q.device}")
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")


def _use_kernel(q: NF4Weight) -> bool:
    """Whether ``dequantize_nf4`` runs the Triton kernel (CUDA tensors with Triton installed)."""
    return on_cuda(q.packed) and HAS_TRITON


def dequantize_nf4(q: NF4Weight, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Undo ``quantize_nf4``: a tensor of the original shape (equal to bitsandbytes' output).

    Args:
        q: the quantized weight.
        dtype: output dtype (float32, bfloat16 or float16); default the original dtype.
        out: optional preallocated contiguous buffer of the right shape, dtype and device
            (lets one buffer serve every layer).

    Returns:
        ``out`` if given, else a new tensor.
    """
    if not isinstance(q, NF4Weight):
        raise TypeError(f"dequantize_nf4: q must be an NF4Weight, got {type(q).__name__}")
    dtype = q.dtype if dtype is None else dtype
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dequantize_nf4: dtype must be float32, bfloat16 or float16, got {dtype}")
    if out is not None:
        check_out(out, q, dtype)
    if _use_kernel(q):
        return nf4_dequantize(q.packed, q.absmax, q.code, q.shape, q.blocksize, dtype, out=out,
                              nested_absmax=q.nested_absmax, nested_code=q.nested_code, offset=q.offset,
                              nested_blocksize=q.nested_blocksize)
    if q.packed.device.type == "cpu":  # the reference's bits, a table gather per byte
        return dequantize_packed(q.packed, absmax_fp32(q), q.code, q.shape, q.blocksize, dtype, out)
    result = _dequantize_reference(q, dtype)
    return result if out is None else out.copy_(result)
