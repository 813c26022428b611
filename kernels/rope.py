"""Rotary position embedding applied to q and k, forward and backward in one kernel.

Layout as minift's model and Hugging Face Llama ("rotate half"): for a head vector x of size D
with halves x1 = x[:D/2], x2 = x[D/2:] and cos/sin rows c, s (halves c1, c2, s1, s2):
    forward:  o1 = x1 * c1 - x2 * s1        o2 = x2 * c2 + x1 * s2
    backward: d1 = g1 * c1 + g2 * s2        d2 = g2 * c2 - g1 * s1   (the transpose)
One program per (batch, position) rotates every head of that position, so a cos/sin row is read
once for all heads. Math in float32, one rounding to the output dtype.
"""
import torch
import triton
import triton.language as tl
from minift.kernels.common import device_guard, launch, round_to_bf16


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, seq_len, n_heads, x_sb, x_sh, x_st, o_sb, o_sh,
                 o_st, c_sb, c_st, HALF: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_H: tl.constexpr, BACKWARD: tl.constexpr, OUT_BF16: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // seq_len
    t = pid % seq_len
    d = tl.arange(0, BLOCK_D)  # (BLOCK_D,) index within a half
    dm = d < HALF
    c = cos_ptr + b * c_sb + t * c_st
    s = sin_ptr + b * c_sb + t * c_st
    c1 = tl.load(c + d, mask=dm, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(c + HALF + d, mask=dm, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(s + d, mask=dm, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(s + HALF + d, mask=dm, other=0.0).to(tl.float32)[None, :]
    h = tl.arange(0, BLOCK_H)[:, None]  # (BLOCK_H, 1) heads
    mask = (h < n_heads) & dm[None, :]  # (BLOCK_H, BLOCK_D)
    xp = x_ptr + b * x_sb + t * x_st + h * x_sh + d[None, :]
    x1 = tl.load(xp, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(xp + HALF, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        o1 = x1 * c1 + x2 * s2
        o2 = x2 * c2 - x1 * s1
    else:
        o1 = x1 * c1 - x2 * s1
        o2 = x2 * c2 + x1 * s2
    if OUT_BF16:
        o1 = round_to_bf16(o1)
        o2 = round_to_bf16(o2)
    op = out_ptr + b * o_sb + t * o_st + h * o_sh + d[None, :]
    tl.store(op, o1.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(op + HALF, o2.to(out_ptr.dtype.element_ty), mask=mask)


def _rotate(x, cos, sin, backward):
    b, heads, t, dim = x.shape
    out = torch.empty_like(x)  # keeps x's (possibly transposed) layout
    assert x.stride(3) == 1 and out.stride(3) == 1 and dim % 2 == 0
    if x.numel() == 0:
        return out
    half = dim // 2
    with device_guard(x.device):
        launch(_rope_kernel, (b * t,))(
            x, cos, sin, out, t, heads, x.stride(0), x.stride(1), x.stride(2), out.stride(0),
            out.stride(1), out.stride(2), cos.stride(0), cos.stride(2), HALF=half,
            BLOCK_D=triton.next_power_of_2(half), BLOCK_H=triton.next_power_of_2(heads),
            BACKWARD=backward, OUT_BF16=x.dtype == torch.bfloat16, num_warps=4,
            enable_fp_fusion=False)
    return out


def rope(q, k, cos, sin, backward=False):
    """Rotate q (B, H, T, D) and k (B, KV, T, D) by cos/sin (B or 1, 1, T, D); new tensors.

    ``backward=True`` applies the transpose (the gradient of the forward rotation).
    """
    assert q.dim() == k.dim() == cos.dim() == 4 and cos.shape == sin.shape
    assert cos.shape[-2:] == (q.shape[2], q.shape[3]) and cos.stride() == sin.stride()
    assert cos.stride(3) == 1
    cos = cos.expand(q.shape[0], 1, -1, -1)  # a batch of 1 broadcasts with stride 0
    sin = sin.expand(q.shape[0], 1, -1, -1)
    return _rotate(q, cos, sin, backward), _rotate(k, cos, sin, backward)
