"""Triton kernel: NF4 (optionally double-quantized) -> bf16 / fp16 / fp32 in one pass.

Each program reads BLOCK // 2 packed bytes, decodes the scale of each absmax block it covers once
(8-bit code -> ``nested_code[code] * nested_absmax[block // nested_blocksize] + offset``), looks
both nibbles up in the 16 NF4 levels, multiplies in fp32, rounds once to the output dtype and
writes BLOCK contiguous elements. Nothing but the output is written to memory, so the traffic is
n / 2 bytes in, n * itemsize bytes out, plus the (cached) scales. The pure-torch reference is
``minift.nf4.quantize._dequantize_reference``.

A program of 4 warps takes 2 KiB of packed bytes: 16 per thread, one 128-bit load each
(``ld.global.v4.b32``), and 32 outputs per thread. Compiled, bf16 is rounded by the hardware
(``cvt.rn.bf16x2.f32``, two values an instruction) instead of on the bits; same results, see
``minift.kernels.common.to_bf16``. tests/kernel_compile.py records the loads, stores, conversions
and registers (docs/kernels.md).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from minift.kernels.common import compiled, device_guard, launch, program_offsets, to_bf16

_BLOCK = 4096  # output elements per program: 2 KiB in, 8 KiB of bf16 out
_WARPS = 4  # 128 threads: 16 packed bytes and 32 outputs a thread


@triton.jit
def _block_scales(absmax_ptr, nested_absmax_ptr, nested_code_ptr, blk, valid, offset,
                  NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr):
    """The float32 scale of absmax block(s) ``blk``: ``nested_code[code] * nested + offset``."""
    if DOUBLE_QUANT:
        absmax_code = tl.load(absmax_ptr + blk, mask=valid, other=0).to(tl.int32)
        nested = tl.load(nested_absmax_ptr + blk // NESTED_BLOCKSIZE, mask=valid, other=0.0)
        scale = tl.load(nested_code_ptr + absmax_code) * nested + offset
    else:
        scale = tl.load(absmax_ptr + blk, mask=valid, other=0.0)
    return scale


@triton.jit
def _nf4_dequant_kernel(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, code_ptr, out_ptr,
                        offset, n, n_bytes, n_blocks, BLOCKSIZE: tl.constexpr,
                        NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                        OUT_BF16: tl.constexpr, HW_BF16: tl.constexpr, BLOCK: tl.constexpr):
    # n_bytes is passed, not derived as (n + 1) // 2 here: Triton specialises an argument that is a
    # multiple of 16, so the byte mask is known to be 16-aligned and the loads vectorise.
    pid, byte_idx = program_offsets(BLOCK // 2)  # int64: weights may pass 2**31 elements
    byte = tl.load(packed_ptr + byte_idx, mask=byte_idx < n_bytes, other=0).to(tl.int32)
    hi = tl.load(code_ptr + (byte >> 4))  # (BLOCK/2,) level of element 2k
    lo = tl.load(code_ptr + (byte & 15))  # level of element 2k + 1
    # One scale per absmax block, not per byte: a block covers BLOCKSIZE / 2 >= 16 bytes.
    if BLOCKSIZE >= BLOCK:  # the whole program sits inside one block (BLOCK divides BLOCKSIZE)
        scale = _block_scales(absmax_ptr, nested_absmax_ptr, nested_code_ptr,
                              (pid * BLOCK) // BLOCKSIZE, True, offset, NESTED_BLOCKSIZE,
                              DOUBLE_QUANT)
        hi = hi * scale
        lo = lo * scale
    else:  # BLOCK / BLOCKSIZE blocks: scales (NB,) broadcast over rows of BLOCKSIZE / 2 bytes
        NB: tl.constexpr = BLOCK // BLOCKSIZE
        blk = pid * NB + tl.arange(0, NB)
        scale = _block_scales(absmax_ptr, nested_absmax_ptr, nested_code_ptr, blk, blk < n_blocks,
                              offset, NESTED_BLOCKSIZE, DOUBLE_QUANT)
        hi = tl.reshape(tl.reshape(hi, (NB, BLOCKSIZE // 2)) * scale[:, None], (BLOCK // 2,))
        lo = tl.reshape(tl.reshape(lo, (NB, BLOCKSIZE // 2)) * scale[:, None], (BLOCK // 2,))
    vals = tl.interleave(hi, lo)  # (BLOCK,) in memory order
    out_idx = pid * BLOCK + tl.arange(0, BLOCK)
    if OUT_BF16:
        vals = to_bf16(vals, HW_BF16)
    tl.store(out_ptr + out_idx, vals.to(out_ptr.dtype.element_ty), mask=out_idx < n)


def _check_inputs(packed, absmax, code, blocksize, nested_absmax, nested_code, offset, nested_blocksize):
    if packed.dtype != torch.uint8:
        raise TypeError(f"nf4_dequantize: packed must be uint8, got {packed.dtype}")
    # a power of two >= 2: both nibbles of a byte share a block, and blocks tile a program
    if blocksize < 2 or blocksize & (blocksize - 1):
        raise ValueError(f"nf4_dequantize: blocksize must be a power of two >= 2, got {blocksize}")
    if isinstance(nested_blocksize, bool) or not isinstance(nested_blocksize, int) or nested_blocksize <= 0:
        raise ValueError(f"nf4_dequantize: nested_blocksize must be a positive int, got {nested_blocksize!r}")
    if code.numel() != 16:
        raise ValueError(f"nf4_dequantize: code must hold 16 levels, got {code.numel()}")
    if nested_absmax is not None:
        if nested_code is None or offset is None:
            raise ValueError("nf4_dequantize: nested_absmax needs nested_code and offset as well")
        if absmax.dtype != torch.uint8:
            raise TypeError(f"nf4_dequantize: double-quantized absmax must be uint8, got {absmax.dtype}")
    elif absmax.dtype != torch.float32:
        raise TypeError(f"nf4_dequantize: absmax must be float32 without double quantization, got {absmax.dtype}")


def nf4_dequantize(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, shape, blocksize: int,
                   dtype: torch.dtype, out: torch.Tensor | None = None, *, nested_absmax=None,
                   nested_code=None, offset=None, nested_blocksize: int = 256) -> torch.Tensor:
    """Launch the dequantization; returns ``out`` (allocated when None) with ``shape``.

    Args:
        packed: uint8 packed nibbles, ceil(n / 2) bytes. absmax: per-block scales (uint8 codes
            when ``nested_absmax`` is given, else float32). code: 16 float32 NF4 levels.
        shape: output shape. blocksize: elements per absmax block. dtype: output dtype.
        out: optional contiguous buffer of ``shape`` / ``dtype`` on the same device.
        nested_absmax, nested_code, offset: the double-quantization state, or None.
        nested_blocksize: absmax codes per nested scale (``NF4Weight.nested_blocksize``; 256 in
            everything bitsandbytes writes, but its quant state may carry another value).
    """
    _check_inputs(packed, absmax, code, blocksize, nested_absmax, nested_code, offset, nested_blocksize)
    shape = torch.Size(shape)
    n = shape.numel()
    if packed.numel() != (n + 1) // 2:
        raise ValueError(f"nf4_dequantize: {packed.numel()} packed bytes do not fit shape {tuple(shape)}")
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=packed.device)
    elif tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != packed.device:
        raise ValueError(f"nf4_dequantize: out is {tuple(out.shape)} {out.dtype} on {out.device}, "
                         f"expected {tuple(shape)} {dtype} on {packed.device}")
    elif not out.is_contiguous():
        raise ValueError("nf4_dequantize: out must be contiguous")
    double_quant = nested_absmax is not None
    if n == 0:
        return out
    grid = (triton.cdiv(n, _BLOCK),)
    with device_guard(packed.device):
        launch(_nf4_dequant_kernel, grid)(
            packed.reshape(-1), absmax, nested_absmax if double_quant else absmax,
            nested_code if double_quant else code, code, out, float(offset) if double_quant else 0.0,
            n, packed.numel(), triton.cdiv(n, blocksize),
            BLOCKSIZE=blocksize, NESTED_BLOCKSIZE=nested_blocksize, DOUBLE_QUANT=double_quant,
            OUT_BF16=dtype == torch.bfloat16, HW_BF16=compiled(_nf4_dequant_kernel), BLOCK=_BLOCK,
            num_warps=_WARPS,
            # No fused multiply-add: the reference rounds the product and the sum separately.
            enable_fp_fusion=False,
        )
    return out
