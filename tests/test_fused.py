"""Fused RMSNorm / RoPE / SwiGLU (minift.models.fused + minift.kernels.{rmsnorm,rope,swiglu}).

Each Triton kernel runs in the interpreter on drawn shapes and dtypes and is compared with the
pure-torch reference (forward) and with autograd of the reference (backward). Tolerances:
float32 within 1e-5 (relative and absolute; float32 sums in another order); bfloat16 and float16
against the float32 reference on the same inputs within a few units in the last place of the
output dtype (rtol 2**-6 for bf16, 2**-9 for fp16; the kernels round once, torch's low-precision
autograd rounds at every op). Then the ops as torch.library custom ops: opcheck and a
torch.compile trace through their fake implementations.
"""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import minift.models.fused as fused
from minift.models.fused import (
    apply_rope,
    apply_rope_reference,
    rms_norm,
    rms_norm_reference,
    swiglu,
    swiglu_reference,
    uses_triton,
)

pytestmark = pytest.mark.triton
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2**-6, atol=2**-6),
       torch.float16: dict(rtol=2**-9, atol=2**-9)}
SETTINGS = settings(max_examples=15, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


def _leaf(t, dtype, device):
    return t.to(device, dtype).requires_grad_()


def _close(got, want, dtype, scale=1.0):
    tol = {k: v * scale for k, v in TOL[dtype].items()}
    torch.testing.assert_close(got.float().cpu(), want.float().cpu(), **tol)


def _check(fast_fn, ref_fn, inputs, dtype, device, grad_scale=1.0):
    """fast_fn on low-precision leaves vs ref_fn on float32 copies: outputs and input gradients."""
    fast_in = [_leaf(t, dtype, device) if g else t.to(device, dtype) for t, g in inputs]
    ref_in = [t.to(dtype).float().requires_grad_(g) for t, g in inputs]  # same values, float32
    fast_out, ref_out = fast_fn(*fast_in), ref_fn(*ref_in)
    fast_out = fast_out if isinstance(fast_out, tuple) else (fast_out,)
    ref_out = ref_out if isinstance(ref_out, tuple) else (ref_out,)
    gen = torch.Generator().manual_seed(3)
    grads = [torch.randn(o.shape, generator=gen) for o in ref_out]
    for a, b in zip(fast_out, ref_out):
        assert a.dtype == dtype and a.shape == b.shape
        _close(a, b, dtype)
    leaves = [t for t, (_, g) in zip(fast_in, inputs) if g]
    got = torch.autograd.grad(fast_out, leaves, [g.to(device, dtype) for g in grads])
    want = torch.autograd.grad(ref_out, [t for t, (_, g) in zip(ref_in, inputs) if g], grads)
    for a, b in zip(got, want):
        assert a.dtype == dtype
        _close(a, b, dtype, grad_scale)


@SETTINGS
@given(rows=st.integers(1, 12), n=st.integers(1, 200), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2**16))
def test_rms_norm_matches_reference_and_its_autograd(kernel_device, rows, n, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n, generator=gen) * 3
    w = 1 + torch.randn(n, generator=gen) * 0.1
    # the weight gradient sums `rows` terms: its tolerance grows with them
    _check(lambda a, b: rms_norm(a, b, 1e-6), lambda a, b: rms_norm_reference(a, b, 1e-6),
           [(x, True), (w, True)], dtype, kernel_device, grad_scale=rows)


def test_rms_norm_of_a_3d_batch_and_frozen_weight(kernel_device):
    x = torch.randn(2, 5, 64, device=kernel_device, requires_grad=True)
    w = torch.randn(64, device=kernel_device)  # frozen, as in LoRA
    y = rms_norm(x, w, 1e-5)
    torch.testing.assert_close(y, rms_norm_reference(x, w, 1e-5), rtol=1e-5, atol=1e-5)
    (gx,) = torch.autograd.grad(y.square().sum(), x)
    (rx,) = torch.autograd.grad(rms_norm_reference(x, w, 1e-5).square().sum(), x)
    torch.testing.assert_close(gx, rx, rtol=1e-5, atol=1e-5)


def test_rms_norm_backward_splits_rows_over_programs(kernel_device):
    # 7 rows over 3 programs (3 + 3 + 1): the weight gradient adds the partial sums of all three
    from minift.kernels.rmsnorm import rms_norm_backward, rms_norm_forward

    x, w, dy = (torch.randn(7, 40, device=kernel_device), torch.randn(40, device=kernel_device),
                torch.randn(7, 40, device=kernel_device))
    _, rstd = rms_norm_forward(x, w, 1e-6)
    dx, dw = rms_norm_backward(dy, x, w, rstd, programs=3)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    want = torch.autograd.grad(rms_norm_reference(xr, wr, 1e-6), (xr, wr), dy)
    torch.testing.assert_close((dx, dw), want, rtol=1e-5, atol=1e-5)


def test_rms_norm_backward_writes_every_partial_row(kernel_device, monkeypatch):
    # 9 rows over 4 programs of 3: the last program gets none and still writes its (zero) partial
    # dw row; the launcher's buffers come NaN-filled, so a row left unwritten would show
    import minift.kernels.rmsnorm as kernel

    class NaNFilled:
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def empty(shape, **kw):
            return torch.empty(shape, **kw).fill_(float("nan"))

    monkeypatch.setattr(kernel, "torch", NaNFilled())
    x, w, dy = (torch.randn(9, 40, device=kernel_device), torch.randn(40, device=kernel_device),
                torch.randn(9, 40, device=kernel_device))
    _, rstd = kernel.rms_norm_forward(x, w, 1e-6)
    dx, dw = kernel.rms_norm_backward(dy, x, w, rstd, programs=4)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    want = torch.autograd.grad(rms_norm_reference(xr, wr, 1e-6), (xr, wr), dy)
    torch.testing.assert_close((dx, dw), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n,dtype,rows,prefetch", [
    (40, torch.bfloat16, 4, True),   # short rows: tiles of 4 rows
    (1000, torch.float32, 2, True),  # tiles of 2 rows
    (3000, torch.float32, 1, True),  # one row a tile, the next one loaded ahead
    (4100, torch.float32, 1, False),  # a row of 32 KiB: loaded, then reduced
])
def test_rms_norm_backward_tiles(kernel_device, n, dtype, rows, prefetch):
    # 11 rows over 3 programs (4 + 4 + 3): tiles run past a program's last row and are masked
    from minift.kernels.rmsnorm import rms_norm_backward, rms_norm_forward
    from minift.kernels.rmsnorm_sizes import backward_sizes

    sizes = backward_sizes(n, dtype.itemsize)
    assert (sizes.rows, sizes.prefetch) == (rows, prefetch)
    gen = torch.Generator().manual_seed(n)
    x, dy = (torch.randn(11, n, generator=gen) * 3).to(dtype), torch.randn(11, n, generator=gen).to(dtype)
    w = (1 + torch.randn(n, generator=gen) * 0.1).to(dtype)
    _, rstd = rms_norm_forward(x.to(kernel_device), w.to(kernel_device), 1e-6)
    dx, dw = rms_norm_backward(dy.to(kernel_device), x.to(kernel_device), w.to(kernel_device), rstd, programs=3)
    xr, wr = x.float().requires_grad_(), w.float().requires_grad_()
    want = torch.autograd.grad(rms_norm_reference(xr, wr, 1e-6), (xr, wr), dy.float())
    assert dx.dtype == dw.dtype == dtype
    _close(dx, want[0], dtype)
    _close(dw, want[1], dtype, scale=11)


@SETTINGS
@given(b=st.integers(1, 2), heads=st.integers(1, 5), kv=st.integers(1, 3), t=st.integers(1, 7),
       dim=st.sampled_from([2, 8, 24, 64]), dtype=st.sampled_from(DTYPES),
       transposed=st.booleans(), batch_cos=st.booleans(), seed=st.integers(0, 2**16))
def test_rope_matches_reference_and_its_autograd(kernel_device, b, heads, kv, t, dim, dtype,
                                                 transposed, batch_cos, seed):
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(b, heads, t, dim, generator=gen), torch.randn(b, kv, t, dim, generator=gen)
    if transposed:  # the model's layout: (B, T, H, D) viewed as (B, H, T, D)
        q = q.transpose(1, 2).contiguous().transpose(1, 2)
    angle = torch.randn(b if batch_cos else 1, 1, t, dim, generator=gen)
    cos, sin = angle.cos(), angle.sin()
    _check(apply_rope, apply_rope_reference, [(q, True), (k, True), (cos, False), (sin, False)],
           dtype, kernel_device)


def test_rope_takes_tables_scaled_by_an_attention_factor(kernel_device):
    # yarn multiplies cos and sin by its attention factor (minift.models.rope.rope_cos_sin); the
    # kernel applies the tables as given, forward and (transposed) backward
    from minift.models.config import ModelConfig
    from minift.models.rope import rope_attention_factor, rope_cos_sin, rope_inv_freq

    config = ModelConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=16,
                         rope_scaling={"rope_type": "yarn", "factor": 8.0})
    factor = rope_attention_factor(config)
    assert factor > 1
    cos, sin = rope_cos_sin(rope_inv_freq(config), torch.arange(40, 49)[None], torch.float32, factor)
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 9, 16, generator=gen), torch.randn(2, 1, 9, 16, generator=gen)
    for dtype in DTYPES:
        _check(apply_rope, apply_rope_reference, [(q, True), (k, True), (cos, False), (sin, False)],
               dtype, kernel_device)


@SETTINGS
@given(shape=st.one_of(st.tuples(st.integers(1, 3000)), st.tuples(st.integers(1, 4), st.integers(1, 9),
                                                                      st.integers(1, 70))),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_swiglu_matches_reference_and_its_autograd(kernel_device, shape, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    g, u = torch.randn(shape, generator=gen) * 4, torch.randn(shape, generator=gen)
    _check(swiglu, swiglu_reference, [(g, True), (u, True)], dtype, kernel_device)


def test_use_fused_only_on_cuda_with_triton(monkeypatch):
    assert not uses_triton(torch.zeros(1))
    meta_cuda = type("T", (), {"is_cuda": True})()
    assert uses_triton(meta_cuda) == fused.HAS_TRITON
    monkeypatch.setattr(fused, "HAS_TRITON", False)
    assert not uses_triton(meta_cuda)


def _op_cases(device):
    x, w = torch.randn(3, 5, 32, device=device), torch.randn(32, device=device)
    y, rstd = torch.ops.minift.rms_norm(x, w, 1e-6)
    q, k = torch.randn(2, 4, 6, 16, device=device), torch.randn(2, 2, 6, 16, device=device)
    cos, sin = torch.randn(1, 1, 6, 16, device=device), torch.randn(1, 1, 6, 16, device=device)
    g, u = torch.randn(3, 40, device=device), torch.randn(3, 40, device=device)
    return [(torch.ops.minift.rms_norm.default, (x, w, 1e-6)),
            (torch.ops.minift.rms_norm_backward.default, (torch.randn_like(y), x, w, rstd)),
            (torch.ops.minift.rope.default, (q, k, cos, sin, False)),
            (torch.ops.minift.rope.default, (q, k, cos, sin, True)),
            (torch.ops.minift.swiglu.default, (g, u)),
            (torch.ops.minift.swiglu_backward.default, (torch.randn_like(g), g, u))]


@pytest.mark.slow
def test_custom_ops_pass_opcheck(kernel_device):
    # schema, fake implementation against the real one, and tracing through AOT dispatch
    for op, args in _op_cases(kernel_device):
        result = torch.library.opcheck(op, args)
        assert set(result.values()) == {"SUCCESS"}, (op, result)


@pytest.mark.slow
def test_torch_compile_traces_the_fused_ops_in_one_graph(kernel_device):
    def block(x, w, q, k, cos, sin, g, u):
        q, k = apply_rope(q, k, cos, sin)
        return rms_norm(x, w, 1e-6).sum() + q.sum() + 2 * k.sum() + swiglu(g, u).square().sum()

    gen = torch.Generator().manual_seed(0)
    shapes = [(2, 3, 32), (32,), (1, 2, 4, 8), (1, 1, 4, 8), (1, 1, 4, 8), (1, 1, 4, 8), (5, 7), (5, 7)]
    raw = [torch.randn(s, generator=gen).to(kernel_device) for s in shapes]
    needs = [True, True, True, True, False, False, True, True]
    eager = [t.clone().requires_grad_(n) for t, n in zip(raw, needs)]
    traced = [t.clone().requires_grad_(n) for t, n in zip(raw, needs)]
    torch._dynamo.reset()
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)  # fullgraph: no breaks
    out, want = compiled(*traced), block(*eager)
    out.backward()
    want.backward()
    torch.testing.assert_close(out, want)
    for a, b in zip(traced, eager):
        if b.grad is not None:
            torch.testing.assert_close(a.grad, b.grad)
