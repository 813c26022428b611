"""The fused Triton step (kernels/adamw8bit.py) equals the torch reference bit for bit."""
import contextlib
import dataclasses

import minift.kernels.adamw8bit as kernel_module
import pytest
import torch
import triton
import triton.language as tl
import triton.runtime.interpreter as interp
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from minift.kernels.common import device_guard
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import minift.optim.adamw8bit as optim_module
from minift.optim import AdamW8bit
from minift.optim.adamw8bit_state import KEYS_8BIT
from minift.optim.in_backward import StepInBackward
from minift.optim.quant8 import (
    StepScalars,
    adamw8bit_step_reference,
    nearest_code,
    quantize_blockwise,
    requant_table,
)
from minift.quantmaps import dynamic_map
from minift.tracing import planning

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


def _zero_first_block(g, states):
    """Gradient and both moments zero in the first block: the new moments are all zero there,
    so the kernel takes the absmax-0 branch (store zeros, divide by one)."""
    g[:256] = 0
    for codes, absmax, code in ((states[0], states[1], dynamic_map(True, g.device)),
                                (states[2], states[3], dynamic_map(False, g.device))):
        codes[:256] = torch.argmin(code.abs())  # the map's 0.0 entry
        absmax[0] = 0.0


# Few, small examples: the interpreter runs each 256-element program op by op.
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(0, 1300), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       lr=st.floats(1e-6, 1e-1), beta1=st.floats(0.0, 0.99), beta2=st.floats(0.9, 0.9999),
       eps=st.floats(1e-10, 1e-6), weight_decay=st.floats(0.0, 0.2), step=st.integers(1, 10_000),
       stochastic=st.booleans(), offset_blocks=st.integers(0, 1000), seed=st.integers(0, 2**31 - 1),
       grad_scale=st.sampled_from([1e-30, 1e-6, 1e-2, 1.0, 1e3, 1e15]), zero_block=st.booleans())
@example(n=256, dtype=torch.bfloat16, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
         step=1, stochastic=True, offset_blocks=0, seed=0, grad_scale=1.0, zero_block=False)  # one block
@example(n=490, dtype=torch.float32, lr=0.0625, beta1=0.0, beta2=0.9375, eps=6.589464624512545e-07,
         weight_decay=0.0, step=1, stochastic=False, offset_blocks=0, seed=0, grad_scale=0.01,
         zero_block=False)
# ^ found by this test: torch's float32 sqrt on the CPU was one ulp off the kernel's sqrt_rn
@example(n=0, dtype=torch.bfloat16, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
         step=1, stochastic=True, offset_blocks=0, seed=0, grad_scale=1.0, zero_block=False)  # empty
@example(n=0, dtype=torch.float32, lr=0.0625, beta1=0.0, beta2=0.9375, eps=9.7e-07, weight_decay=0.0,
         step=1, stochastic=False, offset_blocks=0, seed=0, grad_scale=1e-30, zero_block=True)
# ^ found by this test: empty, with the zero-block setup asked for
@example(n=600, dtype=torch.float32, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01,
         step=2, stochastic=False, offset_blocks=3, seed=5, grad_scale=1e15, zero_block=True)
@example(n=300, dtype=torch.bfloat16, lr=1e-2, beta1=0.5, beta2=0.99, eps=1e-10, weight_decay=0.0,
         step=7, stochastic=True, offset_blocks=1, seed=6, grad_scale=1e-30, zero_block=True)
# ^ g**2 near 1e30 (no inf), and denormal products, each beside an all-zero block
def test_kernel_equals_reference_drawn(kernel_device, n, dtype, lr, beta1, beta2, eps, weight_decay,
                                       step, stochastic, offset_blocks, seed, grad_scale, zero_block):
    gen = torch.Generator().manual_seed(seed)
    p = torch.randn(n, generator=gen).to(kernel_device, dtype)
    # a gradient scale past the dtype's range (1e15 in float16) keeps its gradient in float32
    g_dtype = dtype if grad_scale < torch.finfo(dtype).max / 100 else torch.float32
    g = (torch.randn(n, generator=gen) * grad_scale).to(kernel_device, g_dtype)
    states, maps = _states(n, kernel_device, zero_block=seed % 2 == 0, gen=gen)
    if zero_block and n:  # an empty tensor has no first block
        _zero_first_block(g, states)
    s = StepScalars.make(lr, beta1, beta2, eps, weight_decay, step, seed=seed)
    ref, out = _both(p, g, states, maps, s, offset_blocks * 256, stochastic)
    for name, a, b in zip(NAMES, ref, out):
        assert torch.equal(a, b), name
    if zero_block and n:
        assert not out[2][0] and not out[4][0]  # the zero block's new absmax (m and v) is 0


@triton.jit
def _nearest_of(y_ptr, out_ptr, table_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    y = tl.load(y_ptr + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, kernel_module._nearest(y, table_ptr).to(tl.uint8), mask=mask)


def _float_of_bits(bits):
    bits = bits & 0xFFFFFFFF
    return torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32).view(torch.float32)


@pytest.mark.parametrize("signed", [True, False])
def test_kernel_requantization_equals_the_search_on_every_split(kernel_device, signed):
    # The kernel's table lookup on its own, on the values where it can go wrong: every split of
    # the table and every midpoint and entry of the map, 1 and 2 ulps either side, both signs;
    # zeros, denormals, the largest floats, infinities and NaN; and random bit patterns.
    code = dynamic_map(signed)
    threshold, _ = requant_table(code)
    bits = torch.cat([threshold[torch.isfinite(threshold)].view(torch.int32).to(torch.int64),
                      ((code[:-1] + code[1:]) / 2).view(torch.int32).to(torch.int64),
                      code.view(torch.int32).to(torch.int64)])
    y = torch.cat([_float_of_bits(bits + d) for d in (-2, -1, 0, 1, 2)])
    tiny = torch.finfo(torch.float32).tiny
    special = torch.tensor([0.0, tiny, tiny / 2, 1e-45, 1.0, 2.0, 3.4e38, float("inf"), float("nan")])
    drawn = _float_of_bits(torch.randint(0, 2**32, (4096,), generator=torch.Generator().manual_seed(5)))
    y = torch.cat([y, -y, special, -special, drawn]).to(kernel_device)
    out = torch.empty(y.numel(), dtype=torch.uint8, device=kernel_device)
    table = kernel_module.requant_tables(code.to(kernel_device), code.to(kernel_device))[0]
    _nearest_of[(triton.cdiv(y.numel(), 1024),)](y, out, table, y.numel(), BLOCK=1024)
    assert torch.equal(out.cpu(), nearest_code(y.cpu(), code))


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


# ---- the multi-tensor launch ------------------------------------------------------------------
class _Counted:
    """Stands in for a JITFunction: counts ``kernel[grid](...)`` calls, then runs the kernel (or,
    with ``run=False``, only records them, as tests/kernel_compile.py's recorder does)."""

    def __init__(self, kernel, run=True):
        self.kernel, self.run, self.grids = kernel, run, []

    def __getitem__(self, grid):
        def call(*args, **kwargs):
            self.grids.append(grid)
            return self.kernel[grid](*args, **kwargs) if self.run else None
        return call


@pytest.fixture
def launches(monkeypatch):
    """The two kernels, counted: ``launches["single"].grids`` / ``launches["multi"].grids``."""
    counted = {"single": _Counted(kernel_module._adamw8bit_kernel),
               "multi": _Counted(kernel_module._adamw8bit_multi_kernel)}
    monkeypatch.setattr(kernel_module, "_adamw8bit_kernel", counted["single"])
    monkeypatch.setattr(kernel_module, "_adamw8bit_multi_kernel", counted["multi"])
    return counted


def _slice_tensors(n, dtype, g_dtype, misaligned, gen):
    """[p, g, m codes, m absmax, v codes, v absmax] of n elements; ``misaligned`` puts p, g and
    the codes one element into larger buffers (data pointers off 16 bytes: no wide loads)."""
    k = int(misaligned)
    p = torch.randn(n + k, generator=gen).to(dtype)[k:]
    g = (torch.randn(n + k, generator=gen) * 1e-2).to(g_dtype)[k:]
    states, _ = _states(n, "cpu", zero_block=n > 512, gen=gen)
    for i in (0, 2):  # the codes, moved by k bytes
        states[i] = torch.cat([states[i][:k], states[i]])[k:]
    return [p, g] + states


def _launch_groups(slices) -> int:
    """How many launches ``adamw8bit_step_many`` makes for ``slices``, by its grouping rule: one per
    set of non-empty slices alike in parameter and gradient dtype, effective stochastic rounding
    (bf16 only), step scalars other than the seed, and 16-byte loads (element count and all six
    data pointers multiples of 16). A group is cut only past MAX_PROGRAMS programs."""
    groups = {}
    for p, g, *states, s, _, stochastic in slices:
        if p.numel():
            aligned = p.numel() % 16 == 0 and all(t.data_ptr() % 16 == 0 for t in (p, g, *states))
            key = (p.dtype, g.dtype, bool(stochastic) and p.dtype == torch.bfloat16, aligned,
                   kernel_module._scalar_args(s))
            groups[key] = groups.get(key, 0) + triton.cdiv(p.numel(), kernel_module.BLOCK)
    assert all(programs <= kernel_module.MAX_PROGRAMS for programs in groups.values())
    return len(groups)


@settings(max_examples=12, deadline=None)
@given(sizes=st.lists(st.integers(0, 700), min_size=1, max_size=5), data=st.data())
@example(sizes=[256, 0, 513], data=None)
def test_multi_tensor_launch_equals_per_tensor_launches(sizes, data):
    draw = (lambda strategy, default: data.draw(strategy)) if data is not None else \
        (lambda strategy, default: default)
    gen = torch.Generator().manual_seed(len(sizes) * 1000 + sum(sizes))
    maps = (dynamic_map(True), dynamic_map(False))
    scalars = [StepScalars.make(1e-3, 0.9, 0.999, 1e-8, 0.01, step=3),
               StepScalars.make(3e-2, 0.8, 0.99, 1e-6, 0.0, step=11)]
    many = []
    for i, n in enumerate(sizes):
        dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), torch.bfloat16)
        g_dtype = draw(st.sampled_from([dtype, torch.float32]), dtype)
        stochastic = draw(st.booleans(), i % 2 == 0)
        misaligned = draw(st.booleans(), i == 2)
        offset = 256 * draw(st.integers(0, 50), i)
        s = dataclasses.replace(scalars[draw(st.integers(0, 1), 0)], seed=draw(st.integers(0, 2**31 - 1), i))
        many.append([*_slice_tensors(n, dtype, g_dtype, misaligned, gen), s, offset, stochastic])
    # the multi-tensor launch updates the slices as built (misaligned where drawn so); the
    # per-tensor launches and the reference update copies of them
    single, ref = ([[t.clone() for t in sl[:6]] + sl[6:] for sl in many] for _ in range(2))
    expected = _launch_groups(many)
    assert kernel_module.adamw8bit_step_many([tuple(sl) for sl in many], *maps) == expected
    for sl in single:
        kernel_module.adamw8bit_step(*sl[:6], *maps, *sl[6:])
    for sl in ref:
        adamw8bit_step_reference(*sl[:6], *maps, *sl[6:])
    for a, b, c in zip(many, single, ref):
        for name, x, y, z in zip(NAMES[:1] + ["grad"] + NAMES[1:], a, b, c):
            assert torch.equal(x, y), ("multi vs single", name, a[0].numel())
            assert torch.equal(x, z), ("multi vs reference", name, a[0].numel())


def test_multi_tensor_launch_groups_like_slices(launches):
    gen = torch.Generator().manual_seed(3)
    maps = (dynamic_map(True), dynamic_map(False))
    s = StepScalars.make(1e-3, 0.9, 0.999, 1e-8, 0.01, step=3)

    def slices(specs):
        return [(*_slice_tensors(n, dtype, dtype, False, gen), dataclasses.replace(s, seed=i, **kw), 0, sto)
                for i, (n, dtype, sto, kw) in enumerate(specs)]

    # seeds and sizes differ, everything else is alike: one launch, one program per block
    like = [(256, torch.float32, False, {}), (48, torch.float32, False, {}), (512, torch.float32, False, {}),
            (0, torch.float32, False, {})]
    assert kernel_module.adamw8bit_step_many(slices(like), *maps) == 1
    assert launches["multi"].grids == [(1 + 1 + 2,)] and not launches["single"].grids
    # another dtype, stochastic rounding (bf16 only), other step scalars, an element count that
    # is not a multiple of 16 (no wide loads): each its own group
    launches["multi"].grids.clear()
    mixed = [(256, torch.float32, False, {}), (256, torch.bfloat16, False, {}), (256, torch.bfloat16, True, {}),
             (256, torch.float32, True, {}), (256, torch.float32, False, {"step_size": 0.5}),
             (100, torch.float32, False, {})]
    assert kernel_module.adamw8bit_step_many(slices(mixed), *maps) == 5  # fp32 stochastic = fp32
    assert sorted(launches["multi"].grids) == [(1,), (1,), (1,), (1,), (2,)]
    launches["multi"].grids.clear()
    assert kernel_module.adamw8bit_step_many(slices([(0, torch.float32, False, {})]), *maps) == 0
    assert kernel_module.adamw8bit_step_many([], *maps) == 0
    assert not launches["multi"].grids


def test_multi_tensor_launch_refuses_bad_slices():
    maps = (dynamic_map(True), dynamic_map(False))
    s = StepScalars.make(1e-3, 0.9, 0.999, 1e-8, 0.01, step=3)
    tensors = _slice_tensors(256, torch.float32, torch.float32, False, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="a slice is"):
        kernel_module.adamw8bit_step_many([(*tensors, s, 0)], *maps)
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        kernel_module.adamw8bit_step_many([(tensors[0].double(), *tensors[1:], s, 0, False)], *maps)
    with pytest.raises(ValueError, match="every tensor must be on cpu"):
        kernel_module.adamw8bit_step_many([(*tensors[:5], tensors[5].to("meta"), s, 0, False)], *maps)


def test_multi_tensor_offsets_past_two_to_the_31_elements(monkeypatch):
    # As test_offsets_past_two_to_the_31_elements for the multi-tensor kernel: every program
    # index is moved past 2**31 / 256, so all programs fall in the last of three slices, whose
    # first program is FIRST; its row's pointers are moved back by the elements before the real
    # ones. int32 block or element offsets would wrap; the search and the offsets are int64.
    fake, first = 2**23 + 3, 9
    n, elem = 300, (fake - first) * 256
    gen = torch.Generator().manual_seed(2)
    p = torch.randn(n, generator=gen).to(torch.bfloat16)
    g = torch.randn(n, generator=gen).to(torch.bfloat16)
    states, maps = _states(n, "cpu", zero_block=False, gen=gen)
    s = StepScalars.make(1e-2, 0.9, 0.999, 1e-8, 0.01, step=2, seed=77)
    ref = [t.clone() for t in [p] + states]
    adamw8bit_step_reference(ref[0], g, *ref[1:], *maps, s, offset=elem + 512, stochastic=True)
    out = [t.clone() for t in [p] + states]
    dummy = torch.zeros(16)  # rows of the two slices no program reaches
    ptrs = [out[0].data_ptr() - 2 * elem, g.data_ptr() - 2 * elem, out[1].data_ptr() - elem,
            out[2].data_ptr() - 4 * (fake - first), out[3].data_ptr() - elem, out[4].data_ptr() - 4 * (fake - first)]
    rows = [dummy.data_ptr()] * 6 + [16, 0, 0]
    table = torch.tensor([0, 5, first] + rows * 2 + ptrs + [elem + n, 512, s.seed], dtype=torch.int64)
    assert table.numel() == 3 * (kernel_module.ROW + 1)
    get_pid = interp.interpreter_builder.create_get_program_id
    monkeypatch.setattr(interp.interpreter_builder, "create_get_program_id",
                        lambda axis: interp.TensorHandle(get_pid(axis).data + (fake if axis == 0 else 0),
                                                         get_pid(axis).dtype))
    kernel_module._adamw8bit_multi_kernel[(triton.cdiv(n, 256),)](
        table, 3, *maps, *kernel_module.requant_tables(*maps), s.beta1, s.one_minus_beta1, s.beta2,
        s.one_minus_beta2, s.eps, s.decay, s.step_size, s.inv_bc2_sqrt, P_DTYPE=tl.bfloat16,
        G_DTYPE=tl.bfloat16, ALIGNED=False, STOCHASTIC=True, IS_BF16=True, BLOCK=256)
    for name, a, b in zip(NAMES, ref, out):
        assert torch.equal(a, b), name
    assert not dummy.any()


# ---- the optimizer's launches -------------------------------------------------------------------
def _lora_like(dtype=torch.float32, seed=0):
    """A and B factors of 3 adapted linears (n not a multiple of 256 for some; the second one
    strided, a transposed view, so the flat copy is written back after the launch)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(4, 80), (96, 4), (4, 96), (64, 4), (4, 64), (80, 4)]
    ps = [torch.nn.Parameter(torch.randn(shape, generator=gen).to(dtype)) for shape in shapes]
    ps[1] = torch.nn.Parameter(torch.randn(shapes[1][::-1], generator=gen).to(dtype).t())
    assert not ps[1].is_contiguous()
    return ps, gen


def _grads(ps, gen):
    for p in ps:
        p.grad = (torch.randn(p.shape, generator=gen) * 1e-2).to(p.dtype)


def _fused_cuda_path(monkeypatch):
    """The optimizer takes its CUDA path (the Triton kernels, interpreted) on CPU tensors."""
    monkeypatch.setattr(optim_module, "on_cuda", lambda t: True)


def _run(make_opt, dtype, steps, fused, monkeypatch):
    ps, gen = _lora_like(dtype)
    opt = make_opt(ps)
    with monkeypatch.context() as m:
        if fused:
            _fused_cuda_path(m)
        for _ in range(steps):
            _grads(ps, gen)
            opt.step()
        opt.state_dict()  # flushes kept pages to the host
    return ps, opt


def _assert_same(a, b):
    (ps_a, opt_a), (ps_b, opt_b) = a, b
    for p, q in zip(ps_a, ps_b):
        assert torch.equal(p, q)
        for key in KEYS_8BIT:
            assert torch.equal(opt_a.state[p][key], opt_b.state[q][key]), key


OPTIMIZERS = {
    "one group": (lambda ps: AdamW8bit(ps, lr=1e-2, weight_decay=0.1, min_8bit_size=0), 1),
    "two groups": (lambda ps: AdamW8bit([{"params": ps[:2], "lr": 3e-3}, {"params": ps[2:]}], lr=1e-2,
                                         min_8bit_size=0, stochastic_rounding=True), 2),
    # every page kept on the device: they step together after the pager's run
    "paged, all kept": (lambda ps: AdamW8bit(ps, lr=1e-2, min_8bit_size=0, paged=True, page_size=256,
                                             device_budget_bytes=None), 1),
}


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_optimizer_steps_lora_parameters_in_one_launch_per_group(monkeypatch, launches, name, dtype):
    make_opt, groups = OPTIMIZERS[name]
    fused = _run(make_opt, dtype, 2, True, monkeypatch)
    # two steps: a launch per param group and step, one program per block of every parameter
    assert len(launches["multi"].grids) == 2 * groups and not launches["single"].grids
    blocks = sum(triton.cdiv(p.numel(), 256) for p in fused[0])
    assert sum(grid[0] for grid in launches["multi"].grids) == 2 * blocks
    _assert_same(fused, _run(make_opt, dtype, 2, False, monkeypatch))  # the CPU step, reference bits


def test_paged_streamed_pages_and_hooks_launch_per_tensor(monkeypatch, launches):
    # streamed pages are written back right after their step, so each launches alone
    make_opt = lambda ps: AdamW8bit(ps, lr=1e-2, min_8bit_size=0, paged=True, page_size=256,  # noqa: E731
                                    device_budget_bytes=0)
    fused = _run(make_opt, torch.float32, 2, True, monkeypatch)
    pages = sum(triton.cdiv(p.numel(), 256) for p in fused[0])
    assert len(launches["single"].grids) == 2 * pages and not launches["multi"].grids
    _assert_same(fused, _run(make_opt, torch.float32, 2, False, monkeypatch))


def test_step_in_backward_launches_once_per_parameter(monkeypatch, launches):
    def run(fused):
        ps, gen = _lora_like(torch.float32, seed=4)
        x = torch.randn(3, 80, generator=gen)
        opt = AdamW8bit(ps, lr=1e-2, min_8bit_size=0)
        with monkeypatch.context() as m, StepInBackward(opt):
            if fused:
                _fused_cuda_path(m)
            for _ in range(2):
                h = x @ ps[0].t() @ ps[1].t() @ ps[2].t() @ ps[3].t() @ ps[4].t() @ ps[5].t()
                h.square().sum().backward()
        return ps, opt

    fused = run(True)
    assert len(launches["single"].grids) == 2 * len(fused[0]) and not launches["multi"].grids
    _assert_same(fused, run(False))


def test_fused_step_reads_the_device_once_and_skips_non_finite(monkeypatch):
    ps, gen = _lora_like(torch.float32)
    opt = AdamW8bit(ps, lr=1e-2, min_8bit_size=0)
    _fused_cuda_path(monkeypatch)
    counted = _Counted(kernel_module._adamw8bit_multi_kernel, run=False)
    monkeypatch.setattr(kernel_module, "_adamw8bit_multi_kernel", counted)
    _grads(ps, gen)
    opt.step()  # creates the states (and the map tables, read once on the host)
    reads = []
    for name in ("item", "__bool__", "tolist", "cpu", "__int__", "__float__", "numpy"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _r=real, _n=name, **k:
                            reads.append(_n) or _r(self, *a, **k))
    _grads(ps, gen)
    opt.step()
    assert reads == ["item"] and len(counted.grids) == 2  # the finiteness flag; a launch a step
    ps[3].grad[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="skipped the step"):
        opt.step()
    assert len(counted.grids) == 2 and opt.skipped_steps == 1


class _Allocations(TorchDispatchMode):
    """(shape, dtype) of every new tensor an operator returns (not views, not in-place results)."""

    def __init__(self):
        super().__init__()
        self.made = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not any(r.alias_info for r in func._schema.returns):
            self.made += [(tuple(t.shape), t.dtype) for t in tree_flatten(out)[0]
                          if isinstance(t, torch.Tensor) and t.numel()]
        return out


def test_a_planning_trace_allocates_what_the_launch_does_and_launches_nothing(monkeypatch, launches):
    def step(fake):
        with contextlib.ExitStack() as stack:
            if fake:
                stack.enter_context(FakeTensorMode())
                stack.enter_context(planning("cuda"))
            else:
                _fused_cuda_path(stack.enter_context(monkeypatch.context()))
            ps, gen = _lora_like(torch.bfloat16)
            opt = AdamW8bit(ps, lr=1e-2, min_8bit_size=0, stochastic_rounding=True)
            for _ in range(2):
                for p in ps:
                    p.grad = torch.ones_like(p)
                with _Allocations() as seen:
                    opt.step()
            return seen.made

    real = step(False)
    assert len(launches["multi"].grids) == 2
    traced = step(True)
    assert len(launches["multi"].grids) == 2  # none in the trace
    assert traced == real
    assert ((kernel_module.ROW + 1) * 6,) in [shape for shape, dtype in real if dtype == torch.int64]
