"""RMSNorm forward and backward, one row of the hidden size per program (forward).

Forward, per row of N = hidden size elements, in float32:
    r = rsqrt(mean(x**2) + eps)          stored (M,) float32 for the backward
    y = w * cast(x * r)                  cast to x's dtype first, as minift's model does
Backward (formula and reference in ``minift.models.fused``): each program walks ``rows_per_program``
rows, writes their dx and keeps a float32 partial sum of dw; the launcher adds the partials.
"""
import torch
import triton
import triton.language as tl
from minift.kernels.common import device_guard, launch, round_to_bf16


@triton.jit
def _cast_like(h, X_BF16: tl.constexpr, x_dtype: tl.constexpr):
    """float32 h rounded to x's dtype and read back as float32 (the model's h.to(x.dtype))."""
    if X_BF16:
        h = round_to_bf16(h)
    else:
        h = h.to(x_dtype).to(tl.float32)
    return h


@triton.jit
def _rmsnorm_fwd_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, x_stride, y_stride, n_cols, eps,
                        X_BF16: tl.constexpr, Y_BF16: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)  # (BLOCK_N,) the whole row; BLOCK_N >= n_cols
    mask = cols < n_cols
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt_rn(tl.sum(x * x, axis=0) / n_cols + eps)
    h = _cast_like(x * rstd, X_BF16, x_ptr.dtype.element_ty)
    y = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32) * h
    if Y_BF16:
        y = round_to_bf16(y)
    tl.store(y_ptr + row * y_stride + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _rmsnorm_bwd_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_ptr, n_rows, n_cols,
                        rows_per_program, dy_stride, x_stride, dx_stride,
                        X_BF16: tl.constexpr, DX_BF16: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for i in range(0, rows_per_program):
        row = pid * rows_per_program + i
        # the last program may run past the last row: its loads and stores are masked off
        ok = mask & ((row + tl.zeros((BLOCK_N,), dtype=tl.int64)) < n_rows)
        dy = tl.load(dy_ptr + row * dy_stride + cols, mask=ok, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + row * x_stride + cols, mask=ok, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + tl.minimum(row, n_rows - 1))
        h = x * rstd
        dw += dy * _cast_like(h, X_BF16, x_ptr.dtype.element_ty)
        dh = dy * w
        dx = rstd * (dh - h * (tl.sum(dh * h, axis=0) / n_cols))
        if DX_BF16:
            dx = round_to_bf16(dx)
        tl.store(dx_ptr + row * dx_stride + cols, dx.to(dx_ptr.dtype.element_ty), mask=ok)
    tl.store(dw_ptr + pid * n_cols + cols, dw, mask=mask)


def _settings(n_cols, per_thread=32):
    """Block covering a row, and warps so each thread holds about `per_thread` values of a row."""
    block = triton.next_power_of_2(n_cols)
    return block, min(max(block // (32 * per_thread), 1), 16)


def rms_norm_forward(x, weight, eps):
    """x (M, N) with unit last stride, weight (N,) -> y (M, N) in promote(x, w) dtype, rstd (M,) fp32."""
    assert x.dim() == 2 and x.stride(1) == 1 and weight.shape == (x.shape[1],)
    m, n = x.shape
    y = torch.empty((m, n), dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    rstd = torch.empty(m, dtype=torch.float32, device=x.device)
    if m == 0:
        return y, rstd
    block, warps = _settings(n)
    with device_guard(x.device):
        launch(_rmsnorm_fwd_kernel, (m,))(x, weight.contiguous(), y, rstd, x.stride(0), y.stride(0), n, eps,
                                  X_BF16=x.dtype == torch.bfloat16, Y_BF16=y.dtype == torch.bfloat16,
                                  BLOCK_N=block, num_warps=warps, enable_fp_fusion=False)
    return y, rstd


def rms_norm_backward(dy, x, weight, rstd, programs=None):
    """dy, x (M, N) with unit last stride, weight (N,), rstd (M,) -> dx (M, N) x's dtype, dw (N,) w's dtype."""
    assert dy.shape == x.shape and dy.stride(1) == 1 and x.stride(1) == 1 and rstd.shape == (x.shape[0],)
    m, n = x.shape
    if programs is None:  # about two programs per multiprocessor keep a GPU busy
        programs = 2 * torch.cuda.get_device_properties(x.device).multi_processor_count \
            if x.is_cuda else 4
    programs = max(1, min(programs, m))
    per_program = triton.cdiv(m, programs)
    dx = torch.empty((m, n), dtype=x.dtype, device=x.device)
    partial = torch.zeros((programs, n), dtype=torch.float32, device=x.device)
    # the backward holds five row vectors per thread (dy, x, w, h, dw): half the forward's share
    block, warps = _settings(n, per_thread=16)
    if m:
        with device_guard(x.device):
            launch(_rmsnorm_bwd_kernel, (programs,))(
                dy, x, weight.contiguous(), rstd, dx, partial, m, n, per_program, dy.stride(0),
                x.stride(0), dx.stride(0), X_BF16=x.dtype == torch.bfloat16,
                DX_BF16=x.dtype == torch.bfloat16, BLOCK_N=block, num_warps=warps,
                enable_fp_fusion=False)
    return dx, partial.sum(0).to(weight.dtype)
