"""Fused RMSNorm, RoPE (q and k) and SwiGLU: references, torch.library ops and autograd Functions.

Three layers per op, as for every kernel in minift:
* ``minift.kernels.{rmsnorm,rope,swiglu}``: the Triton kernels and their launchers;
* here: a ``torch.library`` custom op around each launcher (with a fake implementation, so
  ``torch.compile`` traces a model through it), an ``autograd.Function`` that pairs the forward
  and backward ops (formulas in its docstring), and a pure-torch reference that is both the CPU
  path and the oracle of the tests;
* the model: ``fused.rms_norm(x, w, eps) if fused.uses_triton(x) else <reference>``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from minift.kernels import HAS_TRITON
from minift.kernels.rmsnorm_sizes import backward_programs
from minift.tracing import on_cuda, tracing

if HAS_TRITON:  # the CUDA path; the references serve everywhere else
    from minift.kernels.rmsnorm import rms_norm_backward, rms_norm_forward
    from minift.kernels.rope import rope
    from minift.kernels.swiglu import swiglu_backward, swiglu_forward

Tensor = torch.Tensor


def uses_triton(t: Tensor) -> bool:
    """Whether the fused kernels serve tensors like ``t``: on CUDA with Triton, else the references.
    A planning trace of the CUDA path (``minift.tracing``) takes the kernels' ops, whose fake
    implementations allocate what the kernels return."""
    return on_cuda(t) and (HAS_TRITON or tracing())


# ---- references (the CPU path and the oracle) ------------------------------------------------
def rms_norm_reference(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``weight * cast(x * rsqrt(mean(x**2) + eps))``, normalised in float32 (minift's model)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope_reference(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """``x * cos + rotate_half(x) * sin`` for q (B, H, T, D) and k (B, KV, T, D); cos, sin (B|1, 1, T, D)."""
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def swiglu_reference(gate: Tensor, up: Tensor) -> Tensor:
    """``silu(gate) * up``."""
    return F.silu(gate) * up


# ---- custom ops: opaque to torch.compile, shapes from the fake implementations ---------------
def _rows(x: Tensor) -> Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


@torch.library.custom_op("minift::rms_norm", mutates_args=())
def _rms_norm_op(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    y, rstd = rms_norm_forward(_rows(x), weight, eps)
    return y.view(x.shape), rstd


@_rms_norm_op.register_fake
def _(x, weight, eps):
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return (x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype)),
            x.new_empty((rows,), dtype=torch.float32))


@torch.library.custom_op("minift::rms_norm_backward", mutates_args=())
def _rms_norm_backward_op(dy: Tensor, x: Tensor, weight: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor]:
    dx, dw = rms_norm_backward(_rows(dy.to(x.dtype) if dy.dtype != x.dtype else dy), _rows(x),
                               weight, rstd)
    return dx.view(x.shape), dw


@_rms_norm_backward_op.register_fake
def _(dy, x, weight, rstd):
    # the launcher's float32 partial sums of dw, one row per program of its persistent grid, sized
    # for the 132 multiprocessors of an H100 / H200 (the launcher reads the real count)
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    programs = backward_programs(rows, x.shape[-1], x.element_size())
    partial = x.new_empty((programs, x.shape[-1]), dtype=torch.float32)
    dw = partial.sum(0).to(weight.dtype)
    del partial
    return torch.empty_like(x, memory_format=torch.contiguous_format), dw


@torch.library.custom_op("minift::rope", mutates_args=())
def _rope_op(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, backward: bool) -> tuple[Tensor, Tensor]:
    unit = [t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, cos, sin)]
    return rope(*unit, backward=backward)


@_rope_op.register_fake
def _(q, k, cos, sin, backward):
    return torch.empty_like(q), torch.empty_like(k)


@torch.library.custom_op("minift::swiglu", mutates_args=())
def _swiglu_op(gate: Tensor, up: Tensor) -> Tensor:
    return swiglu_forward(gate, up)


@_swiglu_op.register_fake
def _(gate, up):
    return gate.new_empty(gate.shape)


@torch.library.custom_op("minift::swiglu_backward", mutates_args=())
def _swiglu_backward_op(dy: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    return swiglu_backward(dy, gate, up)


@_swiglu_backward_op.register_fake
def _(dy, gate, up):
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


# ---- autograd Functions ----------------------------------------------------------------------
class RMSNormFunction(torch.autograd.Function):
    """y = w * cast(h), h = x * r, r = rsqrt(mean(x**2) + eps) over the last dim (size N).

    Backward (the cast to x's dtype passes the gradient through unchanged), per row:
        dw = sum over rows of dy * cast(h)
        dh = dy * w
        dx = r * (dh - h * mean(dh * h))
    Saved: x, w and r (one float32 per row); h is recomputed.
    """

    @staticmethod
    def forward(ctx, x, weight, eps):
        y, rstd = torch.ops.minift.rms_norm(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = torch.ops.minift.rms_norm_backward(dy, x, weight, rstd)
        return dx, (dw if ctx.needs_input_grad[1] else None), None


class RoPEFunction(torch.autograd.Function):
    """o = x * cos + rotate_half(x) * sin for q and k; cos and sin are constants.

    With halves x = [x1, x2], cos = [c1, c2], sin = [s1, s2]: o1 = x1 c1 - x2 s1 and
    o2 = x2 c2 + x1 s2. The rotation is linear in x, so the backward is its transpose:
        dx1 = do1 * c1 + do2 * s2,  dx2 = do2 * c2 - do1 * s1
    Saved: cos and sin only.
    """

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return torch.ops.minift.rope(q, k, cos, sin, False)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        dq, dk = torch.ops.minift.rope(dq, dk, cos, sin, True)
        return dq, dk, None, None


class SwiGLUFunction(torch.autograd.Function):
    """y = silu(g) * u with silu(g) = g * sigmoid(g).

    Backward, with s = sigmoid(g):
        du = dy * g * s
        dg = dy * u * s * (1 + g * (1 - s))
    Saved: g and u (silu(g) is recomputed, not stored).
    """

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return torch.ops.minift.swiglu(gate, up)

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        return torch.ops.minift.swiglu_backward(dy, gate, up)


# ---- what the model calls (only where uses_triton(x); the references elsewhere) ----------------
def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Fused ``rms_norm_reference``: x (..., N), weight (N,) -> promote(x, weight) dtype."""
    return RMSNormFunction.apply(x, weight, eps)


def apply_rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Fused ``apply_rope_reference``: q (B, H, T, D), k (B, KV, T, D), cos/sin (B|1, 1, T, D)."""
    return RoPEFunction.apply(q, k, cos, sin)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """Fused ``swiglu_reference``: gate and up of one shape and dtype."""
    return SwiGLUFunction.apply(gate, up)
