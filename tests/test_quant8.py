"""Blockwise 8-bit quantization and the reference step (minift/quant8.py)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minift.optim.quant8 import (
    BLOCK,
    StepScalars,
    adamw32_step,
    dequantize_blockwise,
    nearest_code,
    quantize_blockwise,
    round_to_param,
)
from minift.quantmaps import dynamic_map


@pytest.mark.parametrize("signed", [True, False])
def test_nearest_code_is_the_argmin(signed):
    code = dynamic_map(signed)
    lo = -1.0 if signed else 0.0
    y = torch.cat([torch.rand(3000) * (1 - lo) + lo, code, torch.tensor([lo, 1.0])])
    dist = (y[:, None] - code[None, :]).abs()  # (N, 256)
    got = nearest_code(y, code).long()
    assert torch.equal(dist.gather(1, got[:, None])[:, 0], dist.min(dim=1).values)


def _bound(code, signed):
    # Worst rounding error relative to absmax: half the widest gap, or the gap below the first
    # entry for the signed map (its lowest entry is -0.993, not -1).
    half_gap = (code[1:] - code[:-1]).max().item() / 2
    return max(half_gap, (code[0] + 1).item() if signed else 0.0)


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 3 * BLOCK + 7), scale=st.floats(1e-6, 1e3), signed=st.booleans(),
       seed=st.integers(0, 2**16))
def test_round_trip_error_bound(n, scale, signed, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * scale
    x = x if signed else x.abs()
    code = dynamic_map(signed)
    codes, absmax = quantize_blockwise(x, code)
    assert codes.dtype == torch.uint8 and codes.shape == (n,)
    assert absmax.shape == ((n + BLOCK - 1) // BLOCK,)
    padded = torch.nn.functional.pad(x, (0, absmax.numel() * BLOCK - n)).view(-1, BLOCK)
    assert torch.equal(absmax, padded.abs().amax(dim=1))
    err = (dequantize_blockwise(codes, absmax, code) - x).abs()
    block_absmax = absmax.repeat_interleave(BLOCK)[:n]
    assert (err <= block_absmax * _bound(code, signed) * (1 + 1e-5)).all()


def test_zero_block_stores_exact_zeros():
    x = torch.zeros(2 * BLOCK + 5)
    x[BLOCK:2 * BLOCK] = torch.randn(BLOCK)
    codes, absmax = quantize_blockwise(x, dynamic_map(True))
    assert absmax[0] == 0 and absmax[2] == 0
    out = dequantize_blockwise(codes, absmax, dynamic_map(True))
    assert torch.equal(out[:BLOCK], torch.zeros(BLOCK)) and not torch.isnan(out).any()


def test_fp32_state_step_matches_torch_adamw():
    p = torch.nn.Parameter(torch.randn(40, 30))
    ref = torch.nn.Parameter(p.detach().clone())
    opt = torch.optim.AdamW([ref], lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    m, v = torch.zeros(40, 30), torch.zeros(40, 30)
    for step in range(1, 6):
        g = torch.randn(40, 30)
        ref.grad = g
        opt.step()
        with torch.no_grad():
            adamw32_step(p, g, m, v, StepScalars.make(1e-2, 0.9, 0.99, 1e-8, 0.1, step))
    torch.testing.assert_close(p.detach(), ref.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(v, opt.state[ref]["exp_avg_sq"], rtol=1e-6, atol=0)


def test_stochastic_rounding_is_unbiased_and_reproducible():
    x = torch.full((20000,), 1.0 + 0.25 * 2**-7)  # a quarter of the way from 1 to the next bf16
    out = round_to_param(x, torch.bfloat16, seed=7, offset=0, stochastic=True).float()
    assert set(out.unique().tolist()) == {1.0, 1.0 + 2**-7}
    up = (out > 1).float().mean().item()
    assert abs(up - 0.25) < 0.02
    again = round_to_param(x, torch.bfloat16, seed=7, offset=0, stochastic=True)
    other = round_to_param(x, torch.bfloat16, seed=8, offset=0, stochastic=True)
    assert torch.equal(again.float(), out) and not torch.equal(other.float(), out)
    nearest = round_to_param(x, torch.bfloat16, seed=7, offset=0, stochastic=False)
    assert torch.equal(nearest, x.to(torch.bfloat16))


def test_stochastic_rounding_of_negative_values_is_unbiased():
    x = torch.full((20000,), -(1.0 + 0.75 * 2**-7))
    out = round_to_param(x, torch.bfloat16, seed=3, offset=0, stochastic=True).float()
    assert abs(out.mean().item() - x[0].item()) < 2e-4
