"""Triton kernel: NF4 (optionally double-quantized) -> bf16 / fp16 / fp32 in one pass.

Each program reads BLOCK // 2 packed bytes, decodes their block scales in registers (8-bit code
-> ``nested_code[code] * nested_absmax[block // nested_blocksize] + offset``), looks both nibbles
up in the 16 NF4 levels, multiplies in fp32, rounds once to the output dtype and writes BLOCK
contiguous elements. Nothing but the output is written to memory, so the traffic is n / 2 bytes in, n *
itemsize bytes out, plus the (cached) scales. The pure-torch reference is
``minift.nf4._dequantize_reference``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 1024  # output elements per program: 512 bytes in, 2 KiB of bf16 out


@triton.jit
def _round_to_bf16(x):
    # fp32 -> bf16, round to nearest, ties to even, done on the bits (values are finite). An
    # explicit integer version because Triton's interpreter truncates in `.to(tl.bfloat16)`
    # while GPUs and torch round; this way both give torch's answer.
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + (((bits >> 16) & 1) + 0x7FFF)
    return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _nf4_dequant_kernel(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, code_ptr, out_ptr,
                        offset, n, BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
                        DOUBLE_QUANT: tl.constexpr, OUT_BF16: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # int64 offsets: weights may pass 2**31 elements
    byte_idx = pid * (BLOCK // 2) + tl.arange(0, BLOCK // 2)  # (BLOCK/2,)
    in_range = byte_idx < (n + 1) // 2
    byte = tl.load(packed_ptr + byte_idx, mask=in_range, other=0).to(tl.int32)
    # Both nibbles of a byte sit in the same absmax block because every blocksize is even.
    blk = (byte_idx * 2) // BLOCKSIZE
    if DOUBLE_QUANT:
        absmax_code = tl.load(absmax_ptr + blk, mask=in_range, other=0).to(tl.int32)
        nested = tl.load(nested_absmax_ptr + blk // NESTED_BLOCKSIZE, mask=in_range, other=0.0)
        scale = tl.load(nested_code_ptr + absmax_code) * nested + offset
    else:
        scale = tl.load(absmax_ptr + blk, mask=in_range, other=0.0)
    hi = tl.load(code_ptr + (byte >> 4)) * scale  # element 2k
    lo = tl.load(code_ptr + (byte & 15)) * scale  # element 2k + 1
    vals = tl.interleave(hi, lo)  # (BLOCK,) in memory order
    out_idx = pid * BLOCK + tl.arange(0, BLOCK)
    if OUT_BF16:
        vals = _round_to_bf16(vals)
    tl.store(out_ptr + out_idx, vals.to(out_ptr.dtype.element_ty), mask=out_idx < n)


def _check_inputs(packed, absmax, code, blocksize, nested_absmax, nested_code, offset, nested_blocksize):
    if packed.dtype != torch.uint8:
        raise TypeError(f"nf4_dequantize: packed must be uint8, got {packed.dtype}")
    if blocksize % 2 or blocksize <= 0:
        raise ValueError(f"nf4_dequantize: blocksize must be a positive even number, got {blocksize}")
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
    grid = (triton.cdiv(n, _BLOCK),)
    _nf4_dequant_kernel[grid](
        packed.reshape(-1), absmax, nested_absmax if double_quant else absmax,
        nested_code if double_quant else code, code, out, float(offset) if double_quant else 0.0, n,
        BLOCKSIZE=blocksize, NESTED_BLOCKSIZE=nested_blocksize, DOUBLE_QUANT=double_quant,
        OUT_BF16=dtype == torch.bfloat16, BLOCK=_BLOCK,
        # No fused multiply-add: the reference rounds the product and the sum separately.
        enable_fp_fusion=False,
    )
    return out
