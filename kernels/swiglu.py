"""SwiGLU ``silu(gate) * up`` forward and backward, elementwise over flat tensors.

    forward:  y = silu(g) * u,  silu(g) = g * sigmoid(g)
    backward: du = dy * silu(g)
              dg = dy * u * sigmoid(g) * (1 + g * (1 - sigmoid(g)))
The backward recomputes sigmoid(g) from the saved g instead of saving silu(g): one tensor of
(B, T, intermediate) less between forward and backward. Math in float32, one rounding.
"""
import torch
import triton
import triton.language as tl
from minift.kernels.common import device_guard, launch, program_offsets, round_to_bf16

BLOCK = 1024


@triton.jit
def _store(ptr, offs, mask, v, BF16: tl.constexpr):
    if BF16:
        v = round_to_bf16(v)
    tl.store(ptr + offs, v.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_fwd_kernel(g_ptr, u_ptr, y_ptr, n, BF16: tl.constexpr, BLOCK: tl.constexpr):
    _, offs = program_offsets(BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    _store(y_ptr, offs, mask, g * tl.sigmoid(g) * u, BF16)


@triton.jit
def _swiglu_bwd_kernel(dy_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, n, BF16: tl.constexpr,
                       BLOCK: tl.constexpr):
    _, offs = program_offsets(BLOCK)
    mask = offs < n
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    _store(du_ptr, offs, mask, dy * (g * sig), BF16)
    _store(dg_ptr, offs, mask, dy * u * sig * (1.0 + g * (1.0 - sig)), BF16)


def _flat(*ts):
    assert all(t.shape == ts[0].shape and t.dtype == ts[0].dtype for t in ts)
    return [t.reshape(-1) if t.is_contiguous() else t.contiguous().view(-1) for t in ts]


def swiglu_forward(gate, up):
    """silu(gate) * up for two tensors of one shape and dtype; a new contiguous tensor."""
    g, u = _flat(gate, up)
    y = torch.empty_like(g)
    if g.numel():
        with device_guard(g.device):
            launch(_swiglu_fwd_kernel, (triton.cdiv(g.numel(), BLOCK),))(
                g, u, y, g.numel(), BF16=g.dtype == torch.bfloat16, BLOCK=BLOCK, num_warps=4,
                enable_fp_fusion=False)
    return y.view(gate.shape)


def swiglu_backward(dy, gate, up):
    """(d gate, d up) of silu(gate) * up for the output gradient dy."""
    d, g, u = _flat(dy.to(gate.dtype), gate, up)
    dg, du = torch.empty_like(g), torch.empty_like(u)
    if g.numel():
        with device_guard(g.device):
            launch(_swiglu_bwd_kernel, (triton.cdiv(g.numel(), BLOCK),))(
                d, g, u, dg, du, g.numel(), BF16=g.dtype == torch.bfloat16, BLOCK=BLOCK, num_warps=4,
                enable_fp_fusion=False)
    return dg.view(gate.shape), du.view(gate.shape)
