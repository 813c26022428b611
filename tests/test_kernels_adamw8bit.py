"""The fused Triton step (kernels/adamw8bit.py) equals the torch reference bit for bit."""
import pytest
import torch

from minift.optim.quant8 import StepScalars, adamw8bit_step_reference, quantize_blockwise
from minift.quantmaps import dynamic_map

pytestmark = pytest.mark.triton


def _states(n, device, zero_block):
    mm, mv = dynamic_map(True, device), dynamic_map(False, device)
    mc, ma = quantize_blockwise(torch.randn(n, device=device) * 1e-3, mm)
    vc, va = quantize_blockwise(torch.rand(n, device=device) * 1e-5, mv)
    if zero_block and n > 256:
        ma[1] = 0.0  # a block whose first moment is all zero
    return [mc, ma, vc, va], (mm, mv)


@pytest.mark.parametrize("n,dtype,stochastic", [
    (1, torch.float32, False),
    (3 * 256 + 37, torch.float32, False),
    (2 * 256 + 1, torch.bfloat16, False),
    (2 * 256 + 1, torch.bfloat16, True),
    (255, torch.float16, False),
])
def test_kernel_equals_reference(kernel_device, n, dtype, stochastic):
    from minift.kernels.adamw8bit import adamw8bit_step

    p = torch.randn(n, device=kernel_device).to(dtype)
    g = torch.randn(n, device=kernel_device) * 1e-2
    states, maps = _states(n, kernel_device, zero_block=True)
    s = StepScalars.make(1e-3, 0.9, 0.999, 1e-8, 0.01, step=3, seed=1234)
    ref = [t.clone() for t in [p] + states]
    out = [t.clone() for t in [p] + states]
    adamw8bit_step_reference(ref[0], g, *ref[1:], *maps, s, offset=512, stochastic=stochastic)
    adamw8bit_step(out[0], g, *out[1:], *maps, s, offset=512, stochastic=stochastic)
    names = ["param", "exp_avg_codes", "exp_avg_absmax", "exp_avg_sq_codes", "exp_avg_sq_absmax"]
    for name, a, b in zip(names, ref, out):
        assert torch.equal(a, b), name
    assert not torch.equal(out[0], p)  # the step did move the weights
