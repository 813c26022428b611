"""The fused Triton step (kernels/adamw8bit.py) equals the torch reference bit for bit."""
import minift.kernels.adamw8bit as kernel_module
import pytest
import torch
import triton
import triton.runtime.interpreter as interp
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from minift.kernels.common import device_guard

from minift.optim.quant8 import StepScalars, adamw8bit_step_reference, quantize_blockwise
from minift.quantmaps import dynamic_map

pytestmark = pytest.mark.triton
NAMES = ["param", "exp_avg_codes", "exp_avg_absmax", "exp_avg_sq_codes", "exp_avg_sq_absmax"]


def _states(n, device, zero_block, gen=None):
    mm, mv = dynamic_map(True, device), dynamic_map(False, device)
    mc, ma = quantize_blockwise(torch.randn(n, generator=gen).to(device) * 1e-3, mm)
    vc, va = quantize_blockwise(torch.rand(n, generator=gen).to(device) * 1e-5, mv)
    if zero_block and n > 256:
        ma[1] = 0.0  # a block whose first moment is all zero
    return [mc, ma, vc, va], (mm, mv)


def _both(p, g, states, maps, s, offset, stochastic):
    """(reference result, kernel result), each [param, 4 states], from the same inputs."""
    ref = [t.clone() for t in [p] + states]
    out = [t.clone() for t in [p] + states]
    adamw8bit_step_reference(ref[0], g, *ref[1:], *maps, s, offset=offset, stochastic=stochastic)
    kernel_module.adamw8bit_step(out[0], g, *out[1:], *maps, s, offset=offset, stochastic=stochastic)
    return ref, out


@pytest.mark.parametrize("n,dtype,stochastic", [
    (1, torch.float32, False),
    (3 * 256 + 37, torch.float32, False),
    (2 * 256 + 1, torch.bfloat16, False),
    (2 * 256 + 1, torch.bfloat16, True),
    (255, torch.float16, False),
])
def test_kernel_equals_reference(kernel_device, n, dtype, stochastic):
    p = torch.randn(n, device=kernel_device).to(dtype)
    g = torch.randn(n, device=kernel_device) * 1e-2
    states, maps = _states(n, kernel_device, zero_block=True)
    s = StepScalars.make(1e-3, 0.9, 0.999, 1e-8, 0.01, step=3, seed=1234)
    ref, out = _both(p, g, states, maps, s, 512, stochastic)
    for name, a, b in zip(NAMES, ref, out):
        assert torch.equal(a, b), name
    assert not torch.equal(out[0], p)  # the step did move the weights


# Few, small examples: the interpreter runs each 256-element program op by op.
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 1300), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       lr=st.floats(1e-6, 1e-1), beta1=st.floats(0.0, 0.99), beta2=st.floats(0.9, 0.9999),
       eps=st.floats(1e-10, 1e-6), weight_decay=st.floats(0.0, 0.2), step=st.integers(1, 10_000),
       stochastic=st.booleans(), offset_blocks=st.integers(0, 1000), seed=st.integers(0, 2**31 - 1),
       grad_scale=st.sampled_from([1e-6, 1e-2, 1.0, 1e3]))
@example(n=256, dtype=torch.bfloat16, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
         step=1, stochastic=True, offset_blocks=0, seed=0, grad_scale=1.0)  # exactly one block
@example(n=490, dtype=torch.float32, lr=0.0625, beta1=0.0, beta2=0.9375, eps=6.589464624512545e-07,
         weight_decay=0.0, step=1, stochastic=False, offset_blocks=0, seed=0, grad_scale=0.01)
# ^ found by this test: torch's float32 sqrt on the CPU was one ulp off the kernel's sqrt_rn
def test_kernel_equals_reference_drawn(kernel_device, n, dtype, lr, beta1, beta2, eps, weight_decay,
                                       step, stochastic, offset_blocks, seed, grad_scale):
    gen = torch.Generator().manual_seed(seed)
    p = torch.randn(n, generator=gen).to(kernel_device, dtype)
    g = (torch.randn(n, generator=gen) * grad_scale).to(kernel_device, dtype)
    states, maps = _states(n, kernel_device, zero_block=seed % 2 == 0, gen=gen)
    s = StepScalars.make(lr, beta1, beta2, eps, weight_decay, step, seed=seed)
    ref, out = _both(p, g, states, maps, s, offset_blocks * 256, stochastic)
    for name, a, b in zip(NAMES, ref, out):
        assert torch.equal(a, b), name


def test_offsets_past_two_to_the_31_elements(monkeypatch):
    # A tensor of 2**31 elements does not fit a CPU test, so the interpreter is told that this
    # program is number FAKE (its offsets start past 2**31) and every pointer is moved back by
    # as much, so the loads and stores land on the small real tensors. int32 offsets would wrap
    # negative here and read outside the tensors; int64 offsets hit them exactly.
    fake = 2**23 + 3  # fake * 256 > 2**31
    n = 300
    gen = torch.Generator().manual_seed(1)
    p = torch.randn(n, generator=gen).to(torch.bfloat16)
    g = torch.randn(n, generator=gen).to(torch.bfloat16)
    states, maps = _states(n, "cpu", zero_block=False, gen=gen)
    s = StepScalars.make(1e-2, 0.9, 0.999, 1e-8, 0.01, step=2, seed=77)
    ref = [t.clone() for t in [p] + states]
    adamw8bit_step_reference(ref[0], g, *ref[1:], *maps, s, offset=fake * 256, stochastic=True)

    out = [t.clone() for t in [p] + states]
    elem = fake * 256  # elements before the first real one
    shift = {t.data_ptr(): elem * t.element_size() for t in (out[0], g, out[1], out[3])}
    shift.update({t.data_ptr(): fake * 4 for t in (out[2], out[4])})  # absmax: one per program
    cvt = interp._implicit_cvt

    def moved_back(arg):
        res = cvt(arg)
        if hasattr(arg, "data_ptr") and arg.data_ptr() in shift:
            res.handle.data[0] -= shift[arg.data_ptr()]
        return res

    builder = interp.interpreter_builder
    get_pid = builder.create_get_program_id
    monkeypatch.setattr(interp, "_implicit_cvt", moved_back)

    def fake_pid(axis):
        real = get_pid(axis)  # int32, as on a GPU
        return interp.TensorHandle(real.data + (fake if axis == 0 else 0), real.dtype)

    monkeypatch.setattr(builder, "create_get_program_id", fake_pid)
    grid = (triton.cdiv(n, 256),)
    kernel_module._adamw8bit_kernel[grid](
        out[0], g, out[1], out[2], out[3], out[4], *maps, *kernel_module.requant_tables(*maps), elem + n,
        s.beta1, s.one_minus_beta1, s.beta2, s.one_minus_beta2, s.eps, s.decay, s.step_size,
        s.inv_bc2_sqrt, s.seed, 0, STOCHASTIC=True, IS_BF16=True, BLOCK=256)
    for name, a, b in zip(NAMES, ref, out):
        assert torch.equal(a, b), name


def test_device_guard_selects_the_tensors_cuda_device():
    guard = device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert not isinstance(device_guard(torch.device("cpu")), torch.cuda.device)


def test_launcher_runs_under_the_device_guard_of_the_parameter(monkeypatch, kernel_device):
    seen = []

    def spy(device):
        seen.append(device)
        return device_guard(device)

    monkeypatch.setattr(kernel_module, "device_guard", spy)
    p, g = torch.randn(300, device=kernel_device), torch.randn(300, device=kernel_device)
    states, maps = _states(300, kernel_device, zero_block=False)
    kernel_module.adamw8bit_step(p, g, *states, *maps, StepScalars.make(1e-3, 0.9, 0.999, 1e-8, 0.0, 1))
    assert seen == [p.device]
