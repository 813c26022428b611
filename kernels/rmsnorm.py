"""RMSNorm forward (one row per program) and backward (a persistent grid over tiles of rows).

Forward, per row of N = hidden size elements, in float32:
    r = rsqrt(mean(x**2) + eps)          stored (M,) float32 for the backward
    y = w * cast(x * r)                  cast to x's dtype first, as minift's model does
Backward (formula and reference in ``minift.models.fused``): one or two programs per
multiprocessor, each over a run of rows that it walks ``ROWS`` rows at a time as a
(ROWS, BLOCK_N) tile, loading the next tile before it reduces this one where registers allow
(``PREFETCH``); it writes their dx and keeps a float32 partial sum of dw, which the launcher adds
up. Sizes and their reasons: ``minift.kernels.rmsnorm_sizes.backward_sizes``.
"""
import torch
import triton
import triton.language as tl
from minift.kernels.common import compiled, device_guard, launch, round_bf16, to_bf16
from minift.kernels.rmsnorm_sizes import backward_programs, backward_sizes


@triton.jit
def _cast_like(h, X_BF16: tl.constexpr, HW_BF16: tl.constexpr, x_dtype: tl.constexpr):
    """float32 h rounded to x's dtype and read back as float32 (the model's h.to(x.dtype))."""
    if X_BF16:
        h = round_bf16(h, HW_BF16)
    else:
        h = h.to(x_dtype).to(tl.float32)
    return h


@triton.jit
def _rmsnorm_fwd_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, x_stride, y_stride, n_cols, eps,
                        X_BF16: tl.constexpr, Y_BF16: tl.constexpr, HW_BF16: tl.constexpr,
                        BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)  # (BLOCK_N,) the whole row; BLOCK_N >= n_cols
    mask = cols < n_cols
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt_rn(tl.sum(x * x, axis=0) / n_cols + eps)
    h = _cast_like(x * rstd, X_BF16, HW_BF16, x_ptr.dtype.element_ty)
    y = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32) * h
    if Y_BF16:
        y = to_bf16(y, HW_BF16)
    tl.store(y_ptr + row * y_stride + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _rmsnorm_bwd_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_ptr, n_rows, n_cols,
                        rows_per_program, tiles_per_program, dy_stride, x_stride, dx_stride,
                        X_BF16: tl.constexpr, DX_BF16: tl.constexpr, HW_BF16: tl.constexpr,
                        ROWS: tl.constexpr, BLOCK_N: tl.constexpr, PREFETCH: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)[None, :]  # (1, BLOCK_N)
    col_ok = cols < n_cols
    first = pid * rows_per_program
    # this program's rows are [first, end); the last program's run may stop short of a tile
    end = tl.minimum(first + rows_per_program, n_rows)
    rows = first + tl.arange(0, ROWS)[:, None]  # (ROWS, 1) the first tile
    ok = (rows < end) & col_ok
    if PREFETCH:
        dy = tl.load(dy_ptr + rows * dy_stride + cols, mask=ok, other=0.0)
        x = tl.load(x_ptr + rows * x_stride + cols, mask=ok, other=0.0)
    dw = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    for _ in range(0, tiles_per_program):
        nxt = rows + ROWS
        nxt_ok = (nxt < end) & col_ok
        if PREFETCH:
            # the next tile's loads go out before this tile's reduction, so the program has loads
            # in flight while it reduces and stores; past ``end`` they are masked off
            dy_next = tl.load(dy_ptr + nxt * dy_stride + cols, mask=nxt_ok, other=0.0)
            x_next = tl.load(x_ptr + nxt * x_stride + cols, mask=nxt_ok, other=0.0)
        else:
            dy = tl.load(dy_ptr + rows * dy_stride + cols, mask=ok, other=0.0)
            x = tl.load(x_ptr + rows * x_stride + cols, mask=ok, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=rows < end, other=0.0)  # (ROWS, 1)
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)  # cached after the first
        g = dy.to(tl.float32)
        h = x.to(tl.float32) * rstd
        dw += g * _cast_like(h, X_BF16, HW_BF16, x_ptr.dtype.element_ty)
        dh = g * w
        dx = rstd * (dh - h * (tl.sum(dh * h, axis=1)[:, None] / n_cols))
        if DX_BF16:
            dx = to_bf16(dx, HW_BF16)
        tl.store(dx_ptr + rows * dx_stride + cols, dx.to(dx_ptr.dtype.element_ty), mask=ok)
        if PREFETCH:
            dy, x = dy_next, x_next
        rows, ok = nxt, nxt_ok
    tl.store(dw_ptr + pid * n_cols + cols, tl.sum(dw, axis=0)[None, :], mask=col_ok)


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
                                  HW_BF16=compiled(_rmsnorm_fwd_kernel), BLOCK_N=block,
                                  num_warps=warps, enable_fp_fusion=False)
    return y, rstd


def rms_norm_backward(dy, x, weight, rstd, programs=None):
    """dy, x (M, N) with unit last stride, weight (N,), rstd (M,) -> dx (M, N) x's dtype, dw (N,) w's dtype.

    ``programs``: the persistent grid; by default ``backward_sizes(...).per_sm`` per multiprocessor
    of x's GPU (4 on CPU, where the interpreter runs).
    """
    assert dy.shape == x.shape and dy.stride(1) == 1 and x.stride(1) == 1 and rstd.shape == (x.shape[0],)
    m, n = x.shape
    itemsize = max(x.element_size(), dy.element_size())
    sizes = backward_sizes(n, itemsize)
    if programs is None:
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else None
        programs = backward_programs(m, n, itemsize, sms) if sms else 4
    programs = max(1, min(programs, m))
    per_program = triton.cdiv(m, programs)
    dx = torch.empty((m, n), dtype=x.dtype, device=x.device)
    # every program stores its row of partial sums (zeros if it got no rows): no memset needed
    partial = (torch.empty if m else torch.zeros)((programs, n), dtype=torch.float32, device=x.device)
    if m:
        with device_guard(x.device):
            launch(_rmsnorm_bwd_kernel, (programs,))(
                dy, x, weight.contiguous(), rstd, dx, partial, m, n, per_program,
                triton.cdiv(per_program, sizes.rows), dy.stride(0), x.stride(0), dx.stride(0),
                X_BF16=x.dtype == torch.bfloat16, DX_BF16=x.dtype == torch.bfloat16,
                HW_BF16=compiled(_rmsnorm_bwd_kernel), ROWS=sizes.rows, BLOCK_N=sizes.block,
                PREFETCH=sizes.prefetch, num_warps=sizes.warps, enable_fp_fusion=False)
    return dx, partial.sum(0).to(weight.dtype)
