"""Fused AdamW step on blockwise 8-bit states: one kernel launch per parameter tensor and step.

Each program owns one 256-element block, the unit of the absmax scale, so the new absmax is a
reduction inside the program and the whole step is a single pass over memory: read grad, param,
two uint8 codes and two absmax; write param, two codes and two absmax. The pure-torch reference
(same op order, same float32 roundings) is ``minift.optim.quant8.adamw8bit_step_reference``.

Bitwise agreement with the reference rests on three choices: the launch has FP fusion off (a
fused multiply-add rounds once where torch's separate kernels round twice); the bias correction
of the second moment is a multiplication by a host-computed reciprocal, never a division by a
scalar (torch's CUDA division by a Python scalar multiplies by its reciprocal, the CPU divides,
so only the multiplication is the same everywhere); bf16 rounding is done on the bits.
"""
import math

import torch
import triton
import triton.language as tl
from minift.kernels.common import device_guard, launch, program_offsets, round_to_bf16

BLOCK = 256  # elements per program = elements per absmax block


@triton.jit
def _nearest(y, code_ptr):
    """Index of the nearest entry of the sorted 256-entry map (ties to the lower entry).

    A branch-free binary search: after the 8 steps ``lo`` is the last entry <= y (or 0).
    """
    lo = tl.zeros(y.shape, dtype=tl.int32)
    for k in tl.static_range(8):
        cand = lo + (128 >> k)
        lo = tl.where(tl.load(code_ptr + cand) <= y, cand, lo)
    hi = tl.minimum(lo + 1, 255)
    c_lo = tl.load(code_ptr + lo)
    c_hi = tl.load(code_ptr + hi)
    return tl.where((c_hi - y) < (y - c_lo), hi, lo)


@triton.jit
def _requantize(x, mask, code_ptr, codes_ptr, absmax_ptr, offs, pid):
    """Fresh absmax for this block, then nearest map entry of x / absmax; stores both."""
    absmax = tl.max(tl.where(mask, tl.abs(x), 0.0), axis=0)
    scale = tl.where(absmax > 0.0, absmax, 1.0)  # all-zero block: store zeros, not NaN
    idx = _nearest(tl.div_rn(x, scale), code_ptr)
    tl.store(codes_ptr + offs, idx.to(tl.uint8), mask=mask)
    tl.store(absmax_ptr + pid, absmax)


@triton.jit
def _stochastic_round_bf16(p, offs, seed):
    """Add 16 hashed bits below the bf16 mantissa and truncate (hash: lowbias32, see quant8)."""
    x = offs.to(tl.uint32) * 0x9E3779B1 + seed.to(tl.uint32)
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    x = x ^ (x >> 16)
    bits = p.to(tl.uint32, bitcast=True) + (x & 0xFFFF)
    return (bits & 0xFFFF0000).to(tl.float32, bitcast=True)


@triton.jit
def _adamw8bit_kernel(p_ptr, g_ptr, mq_ptr, mabs_ptr, vq_ptr, vabs_ptr, map_m_ptr, map_v_ptr, n,
                      beta1, one_minus_beta1, beta2, one_minus_beta2, eps, decay, step_size,
                      inv_bc2_sqrt, seed, offset, STOCHASTIC: tl.constexpr, IS_BF16: tl.constexpr,
                      BLOCK: tl.constexpr):
    pid, offs = program_offsets(BLOCK)  # int64, (BLOCK,) int64: slices may pass 2**31 elements
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    mq = tl.load(mq_ptr + offs, mask=mask, other=0).to(tl.int32)
    vq = tl.load(vq_ptr + offs, mask=mask, other=0).to(tl.int32)
    m = tl.load(map_m_ptr + mq) * tl.load(mabs_ptr + pid)  # one absmax block per program
    v = tl.load(map_v_ptr + vq) * tl.load(vabs_ptr + pid)
    # Same operation order as minift.optim.quant8.adamw_math (decoupled decay before the Adam update).
    m = m * beta1 + g * one_minus_beta1
    v = v * beta2 + (g * g) * one_minus_beta2
    p = p * decay
    denom = tl.sqrt_rn(v) * inv_bc2_sqrt + eps
    p = p - tl.div_rn(m, denom) * step_size
    if STOCHASTIC:
        p = _stochastic_round_bf16(p, offs + offset, seed)
    elif IS_BF16:
        p = round_to_bf16(p)
    tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)
    _requantize(m, mask, map_m_ptr, mq_ptr, mabs_ptr, offs, pid)
    _requantize(v, mask, map_v_ptr, vq_ptr, vabs_ptr, offs, pid)


def _check_launch(p, g, m_codes, m_absmax, v_codes, v_absmax, s):
    # Preconditions of a launch, not user errors: minift.optim checks what users pass (on
    # construction, add_param_group and load_state_dict), so these only guard the internal calls.
    n = p.numel()
    assert p.is_contiguous() and p.dim() == 1 and g.numel() == n and g.is_contiguous()
    assert m_codes.numel() == v_codes.numel() == n
    assert m_absmax.numel() == v_absmax.numel() == triton.cdiv(n, BLOCK)
    assert m_codes.dtype == v_codes.dtype == torch.uint8
    assert all(math.isfinite(x) for x in (s.beta1, s.beta2, s.eps, s.decay, s.step_size,
                                          s.inv_bc2_sqrt)), s


def adamw8bit_step(p, g, m_codes, m_absmax, v_codes, v_absmax, map_m, map_v, s, offset=0,
                   stochastic=False):
    """Launch the fused step on a flat contiguous parameter slice; updates everything in place.

    ``s`` carries the step scalars (``minift.optim.quant8.StepScalars``); ``offset`` is the element
    offset of the slice in its tensor (multiple of 256) so stochastic rounding matches.
    """
    _check_launch(p, g, m_codes, m_absmax, v_codes, v_absmax, s)
    n = p.numel()
    if n == 0:
        return
    grid = (triton.cdiv(n, BLOCK),)
    with device_guard(p.device):
        launch(_adamw8bit_kernel, grid)(
            p, g, m_codes, m_absmax, v_codes, v_absmax, map_m, map_v, n,
            s.beta1, s.one_minus_beta1, s.beta2, s.one_minus_beta2, s.eps, s.decay, s.step_size,
            s.inv_bc2_sqrt, s.seed, offset,
            STOCHASTIC=bool(stochastic and p.dtype == torch.bfloat16),
            IS_BF16=p.dtype == torch.bfloat16, BLOCK=BLOCK, num_warps=2,
            # No fused multiply-add: the reference rounds every product and sum on its own
            # (with fusion on the sm_90 PTX holds 16 fma.rn.f32: tests/kernel_compile.py).
            enable_fp_fusion=False)
