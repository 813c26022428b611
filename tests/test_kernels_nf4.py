"""The Triton NF4 dequant kernel (interpreted on CPU) against the pure-torch reference."""
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from oracles import nf4_with_nested_blocksize

import minift.nf4.quantize
from minift.nf4.quantize import SUPPORTED_BLOCKSIZES, _dequantize_reference, dequantize_nf4, quantize_nf4

pytestmark = pytest.mark.triton

CASES = [
    # shape, dtype, blocksize, double_quant: odd sizes, tails, every output dtype
    ((37, 45), torch.bfloat16, 64, True),
    ((3001,), torch.float16, 32, True),
    ((130, 17), torch.float32, 4096, False),
    ((5,), torch.bfloat16, 64, True),
    ((129, 131), torch.bfloat16, 128, True),  # > 256 absmax blocks: two nested scales
    ((7, 3, 11), torch.float32, 256, True),
    ((33, 33), torch.float16, 2048, False),
]


def _launch(q, dtype, out=None):
    from minift.kernels.nf4 import nf4_dequantize

    return nf4_dequantize(q.packed, q.absmax, q.code, q.shape, q.blocksize, dtype, out,
                          nested_absmax=q.nested_absmax, nested_code=q.nested_code, offset=q.offset,
                          nested_blocksize=q.nested_blocksize)


@pytest.mark.parametrize("shape,dtype,blocksize,double_quant", CASES)
def test_kernel_equals_reference_into_poisoned_buffer(shape, dtype, blocksize, double_quant, kernel_device):
    w = (torch.randn(shape) * 30).to(dtype)
    q = quantize_nf4(w, blocksize, double_quant).to(kernel_device)
    out = torch.full(shape, float("nan"), dtype=dtype, device=kernel_device)
    res = _launch(q, dtype, out)
    assert res is out
    assert torch.equal(out.cpu(), _dequantize_reference(q.to("cpu"), dtype))


# Few, small examples: every kernel program is run element by element by the interpreter. Sizes
# reach past one 4,096-element program and past 256 absmax blocks; most are not a multiple of
# the blocksize (a partial last block) or of 2 (a pad nibble).
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=st.one_of(st.tuples(st.integers(1, 9000)), st.tuples(st.integers(1, 40), st.integers(1, 90))),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       blocksize=st.sampled_from(SUPPORTED_BLOCKSIZES), double_quant=st.booleans(), seed=st.integers(0, 2**16))
@example(shape=(3, 700), dtype=torch.bfloat16, blocksize=512, double_quant=True, seed=1)
@example(shape=(2500,), dtype=torch.float16, blocksize=1024, double_quant=False, seed=2)
@example(shape=(8999,), dtype=torch.bfloat16, blocksize=32, double_quant=True, seed=3)  # 282 absmax blocks
def test_kernel_equals_reference_drawn(shape, dtype, blocksize, double_quant, seed, kernel_device):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(shape, generator=g) * 10).to(dtype)
    q = quantize_nf4(w, blocksize, double_quant).to(kernel_device)
    out = torch.full(shape, float("nan"), dtype=dtype, device=kernel_device)
    assert _launch(q, dtype, out) is out
    assert torch.equal(out.cpu(), _dequantize_reference(q.to("cpu"), dtype))


def _nested_128():
    # 300 absmax blocks of 32: three nested scales of 128 blocks each; the second half of the
    # weight is 20x larger, so the scales differ and a wrong nested blocksize shows
    w = torch.randn(9600)
    w[4800:] *= 20
    return nf4_with_nested_blocksize(w.view(96, 100), 32, 128)


def test_kernel_with_nested_blocksize_other_than_256(kernel_device):
    from minift.kernels.nf4 import nf4_dequantize

    q = _nested_128().to(kernel_device)
    expected = _dequantize_reference(q.to("cpu"), torch.float32)
    out = torch.full((96, 100), float("nan"), device=kernel_device)
    assert _launch(q, torch.float32, out) is out
    assert torch.equal(out.cpu(), expected)
    assumed_256 = nf4_dequantize(q.packed, q.absmax, q.code, q.shape, q.blocksize, torch.float32,
                                 nested_absmax=q.nested_absmax, nested_code=q.nested_code, offset=q.offset)
    assert not torch.equal(assumed_256.cpu(), expected)  # so the value passed is the one used


def test_dequantize_nf4_passes_nested_blocksize_to_the_kernel(monkeypatch, kernel_device):
    import minift.kernels.nf4 as kernel

    calls = []
    launch = kernel.nf4_dequantize

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return launch(*args, **kwargs)

    monkeypatch.setattr(minift.nf4.quantize, "nf4_dequantize", spy)  # the name nf4.py calls
    monkeypatch.setattr(minift.nf4.quantize, "_use_kernel", lambda q: True)  # the CUDA dispatch, here on any device
    q = _nested_128().to(kernel_device)
    res = dequantize_nf4(q, torch.bfloat16)
    assert [c["nested_blocksize"] for c in calls] == [128]
    assert torch.equal(res.cpu(), _dequantize_reference(q.to("cpu"), torch.bfloat16))


def test_kernel_allocates_and_converts_dtype(kernel_device):
    q = quantize_nf4(torch.randn(19, 23), 64).to(kernel_device)
    for dtype in (torch.bfloat16, torch.float16):  # a float32 weight decoded to half types
        res = _launch(q, dtype)
        assert res.dtype == dtype and res.shape == (19, 23)
        assert torch.equal(res.cpu(), _dequantize_reference(q.to("cpu"), dtype))


def test_kernel_rounds_bf16_to_nearest_even(kernel_device):
    # values whose fp32 product sits between two bf16 numbers: truncation would differ
    w = torch.linspace(-3, 3, 999)
    q = quantize_nf4(w, 64).to(kernel_device)
    res = _launch(q, torch.bfloat16).cpu()
    fp32 = _dequantize_reference(q.to("cpu"), torch.float32)
    truncated = (fp32.view(torch.int32) & ~0xFFFF).view(torch.float32).to(torch.bfloat16)
    assert torch.equal(res, fp32.to(torch.bfloat16))
    assert not torch.equal(res, truncated)


def test_kernel_rejects_bad_out_buffer(kernel_device):
    q = quantize_nf4(torch.randn(6, 10)).to(kernel_device)
    with pytest.raises(ValueError, match=r"out is \(10, 6\)"):
        _launch(q, torch.float32, torch.empty(10, 6, device=kernel_device))
    with pytest.raises(ValueError, match="torch.float16"):
        _launch(q, torch.float32, torch.empty(6, 10, dtype=torch.float16, device=kernel_device))
    with pytest.raises(ValueError, match="contiguous"):
        _launch(q, torch.float32, torch.empty(10, 6, device=kernel_device).t())


def test_kernel_rejects_inconsistent_inputs(kernel_device):
    from minift.kernels.nf4 import nf4_dequantize

    q = quantize_nf4(torch.randn(6, 10)).to(kernel_device)
    with pytest.raises(ValueError, match="packed bytes"):
        nf4_dequantize(q.packed, q.absmax, q.code, (7, 10), 64, torch.float32, nested_absmax=q.nested_absmax,
                       nested_code=q.nested_code, offset=q.offset)
    with pytest.raises(ValueError, match="nested_code and offset"):
        nf4_dequantize(q.packed, q.absmax, q.code, (6, 10), 64, torch.float32, nested_absmax=q.nested_absmax)
    with pytest.raises(TypeError, match="absmax must be float32"):
        nf4_dequantize(q.packed, q.absmax, q.code, (6, 10), 64, torch.float32)
    for bad in (0, 128.0, True):
        with pytest.raises(ValueError, match=f"nested_blocksize must be a positive int, got {bad!r}"):
            nf4_dequantize(q.packed, q.absmax, q.code, (6, 10), 64, torch.float32, nested_absmax=q.nested_absmax,
                           nested_code=q.nested_code, offset=q.offset, nested_blocksize=bad)


def test_launcher_runs_under_the_device_guard_of_the_weight(monkeypatch, kernel_device):
    import minift.kernels.nf4 as kernel
    from minift.kernels.common import device_guard

    seen = []
    monkeypatch.setattr(kernel, "device_guard", lambda device: seen.append(device) or device_guard(device))
    q = quantize_nf4(torch.randn(6, 10)).to(kernel_device)
    _launch(q, torch.float32)
    assert seen == [q.packed.device]


def test_kernel_rejects_a_blocksize_that_does_not_tile_a_program(kernel_device):
    from minift.kernels.nf4 import nf4_dequantize

    q = quantize_nf4(torch.randn(6, 16), 32, double_quant=False).to(kernel_device)
    with pytest.raises(ValueError, match="blocksize must be a power of two >= 2, got 48"):
        nf4_dequantize(q.packed, torch.ones(2, device=kernel_device), q.code, (6, 16), 48, torch.float32)
