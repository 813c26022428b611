"""Blockwise 8-bit dynamic quantization and the pure-torch AdamW step on 8-bit states.

This is the reference for ``minift.kernels.adamw8bit`` (the CPU path and the test oracle), written
op by op in the same order and precision as the kernel so both give the same bits in Triton's
interpreter. Method: "8-bit Optimizers via Block-wise Quantization" (Dettmers et al., 2022):
a tensor is cut into blocks of 256 elements; each block stores one float32 absmax and, per
element, the uint8 index of the map entry nearest to ``x / absmax``.

The step, per element, all in float32 (``p`` is the parameter, ``g`` its gradient)::

    m = dequant(m8) ; v = dequant(v8)                 # signed map for m, unsigned for v
    m = m * beta1 + g * (1 - beta1)
    v = v * beta2 + (g * g) * (1 - beta2)
    p = p * (1 - lr * weight_decay)                    # decoupled decay first, as torch AdamW
    p = p - (m / (sqrt(v) * (1 / sqrt(1 - beta2**t)) + eps)) * (lr / (1 - beta1**t))
    m8 = quant(m) ; v8 = quant(v)                      # fresh absmax per block

The bias correction of v is a multiplication by ``1 / sqrt(1 - beta2**t)`` (computed on the host
in float64, rounded once to float32), not a division by ``sqrt(1 - beta2**t)``: torch on CUDA
turns a division by a Python scalar into a multiplication by its reciprocal while the CPU
divides, so only the multiplication gives the same bits on CPU, on CUDA and in the kernel.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

BLOCK = 256  # elements per absmax block (the paper's block size; also the kernel's program size)

# Constants of the integer hash behind stochastic rounding (shared with the kernel).
_GOLDEN = 0x9E3779B1
_MUL1, _MUL2 = 0x7FEB352D, 0x846CA68B
_MASK32 = 0xFFFFFFFF


def num_blocks(n: int) -> int:
    """Number of absmax blocks for ``n`` elements."""
    return (n + BLOCK - 1) // BLOCK


def nearest_code(y: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index (uint8) of the entry of the sorted ``code`` nearest to each value of ``y``.

    Ties go to the lower entry. ``lo`` is the last entry <= y (clamped to [0, 255]), exactly what
    the kernel's 8-step binary search finds, so both pick the same index.
    """
    lo = (torch.searchsorted(code, y, right=True) - 1).clamp(0, code.numel() - 1)
    hi = (lo + 1).clamp(max=code.numel() - 1)
    take_hi = (code[hi] - y) < (y - code[lo])
    return torch.where(take_hi, hi, lo).to(torch.uint8)


def quantize_blockwise(x: torch.Tensor, code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a float tensor to (codes uint8 (n,), absmax float32 (ceil(n/256),)).

    Args:
        x: any shape; read as float32 and flattened.
        code: the 256-entry sorted map (``minift.quantmaps.dynamic_map``) on x's device.
    """
    flat = x.detach().reshape(-1).float()
    n = flat.numel()
    padded = torch.nn.functional.pad(flat, (0, num_blocks(n) * BLOCK - n))  # zero tail
    blocks = padded.view(-1, BLOCK)  # (n_blocks, 256)
    absmax = blocks.abs().amax(dim=1)
    # An all-zero block keeps absmax 0 and divides by 1 so it stores exact zeros, not NaN.
    scale = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    codes = nearest_code(blocks / scale[:, None], code)
    return codes.reshape(-1)[:n].contiguous(), absmax


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Inverse of ``quantize_blockwise``: float32 (n,) = code[codes] * absmax of the block."""
    n = codes.numel()
    block_scale = absmax.repeat_interleave(BLOCK)[:n]  # (n,)
    return code[codes.long()] * block_scale


@dataclass(frozen=True)
class StepScalars:
    """Per-step scalars, computed once on the host in float64 and read as float32 by the math."""

    beta1: float
    one_minus_beta1: float  # rounded once from float64, as the kernel receives it
    beta2: float
    one_minus_beta2: float
    eps: float
    decay: float  # 1 - lr * weight_decay
    step_size: float  # lr / (1 - beta1**t)
    inv_bc2_sqrt: float  # 1 / sqrt(1 - beta2**t)
    seed: int  # stochastic-rounding seed for this step and tensor, in [0, 2**31)

    @classmethod
    def make(cls, lr, beta1, beta2, eps, weight_decay, step, seed=0):
        return cls(beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps, 1.0 - lr * weight_decay, lr / (1.0 - beta1**step),
                   1.0 / math.sqrt(1.0 - beta2**step), int(seed))


def adamw_math(p, g, m, v, s: StepScalars):
    """The AdamW update on float32 tensors; returns new (p, m, v). Order as in the module doc."""
    m = m * s.beta1 + g * s.one_minus_beta1
    v = v * s.beta2 + (g * g) * s.one_minus_beta2
    p = p * s.decay
    # sqrt in float64, rounded once to float32: the correctly rounded float32 sqrt, as CUDA and
    # the kernel's sqrt_rn give. torch's float32 sqrt on an AVX-512 CPU is not always: for
    # v = 3.9696565e-06 it returned 0.0019923995714634657, one ulp below 0.0019923998042941093.
    root = torch.sqrt(v.double()).float()
    denom = root * s.inv_bc2_sqrt + s.eps  # a product, never "/ scalar": see the module doc
    p = p - (m / denom) * s.step_size
    return p, m, v


def hash_bits(offsets: torch.Tensor, seed: int) -> torch.Tensor:
    """16 pseudo-random bits per element offset (int64 tensor), a pure function of (offset, seed).

    The integer hash "lowbias32" (C. Wellons) on uint32 words, emulated in int64 with masks; the
    kernel computes the same hash on uint32, so stochastic rounding is reproducible and equal.
    """
    x = (offsets * _GOLDEN + seed) & _MASK32
    x = x ^ (x >> 16)
    x = (x * _MUL1) & _MASK32
    x = x ^ (x >> 15)
    x = (x * _MUL2) & _MASK32
    x = x ^ (x >> 16)
    return x & 0xFFFF


def round_to_param(p32: torch.Tensor, dtype: torch.dtype, seed: int, offset: int, stochastic: bool):
    """Cast the updated float32 weights to the parameter dtype.

    Stochastic rounding (bf16 only): add 16 random bits below the bf16 mantissa, then truncate. The
    float32 bit pattern is sign-magnitude, so this rounds the magnitude up with probability equal
    to the dropped fraction, for either sign: small updates survive on average.
    """
    if not (stochastic and dtype == torch.bfloat16):
        return p32.to(dtype)
    offsets = torch.arange(offset, offset + p32.numel(), device=p32.device, dtype=torch.int64)
    bits = (p32.view(torch.int32).to(torch.int64) & _MASK32) + hash_bits(offsets, seed)  # uint32
    bits = bits & 0xFFFF0000
    bits = torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32)  # back to signed int32
    return bits.view(torch.float32).to(dtype)  # exact: the low 16 bits are zero


def adamw8bit_step_reference(p, g, m_codes, m_absmax, v_codes, v_absmax, map_m, map_v,
                             s: StepScalars, offset: int = 0, stochastic: bool = False) -> None:
    """One AdamW step on a flat parameter slice with 8-bit states, in place.

    Args:
        p: parameter, 1-D contiguous (n,), float32/bfloat16/float16; updated in place.
        g: gradient (n,), any float dtype.
        m_codes, v_codes: uint8 (n,); m_absmax, v_absmax: float32 (ceil(n/256),); updated in place.
        map_m, map_v: the signed and unsigned 256-entry maps.
        s: the step scalars.
        offset: element offset of ``p`` in its full tensor (a multiple of 256 when slicing), so
            stochastic rounding of a slice equals that of the whole tensor.
        stochastic: stochastic rounding for bfloat16 parameters.
    """
    m = dequantize_blockwise(m_codes, m_absmax, map_m)
    v = dequantize_blockwise(v_codes, v_absmax, map_v)
    p32, m, v = adamw_math(p.float(), g.float(), m, v, s)
    p.copy_(round_to_param(p32, p.dtype, s.seed, offset, stochastic))
    new_m, new_am = quantize_blockwise(m, map_m)
    new_v, new_av = quantize_blockwise(v, map_v)
    m_codes.copy_(new_m)
    m_absmax.copy_(new_am)
    v_codes.copy_(new_v)
    v_absmax.copy_(new_av)


def adamw32_step(p, g, exp_avg, exp_avg_sq, s: StepScalars, stochastic: bool = False) -> None:
    """The same step with float32 states (small tensors), in place; any shape."""
    p32, m, v = adamw_math(p.float(), g.float(), exp_avg, exp_avg_sq, s)
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
    p.copy_(round_to_param(p32.reshape(-1), p.dtype, s.seed, 0, stochastic).view_as(p))
