"""The Triton NF4 dequant kernel (interpreted on CPU) against the pure-torch reference."""
import pytest
import torch

from minift.nf4 import _dequantize_reference, quantize_nf4

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
                          nested_absmax=q.nested_absmax, nested_code=q.nested_code, offset=q.offset)


@pytest.mark.parametrize("shape,dtype,blocksize,double_quant", CASES)
def test_kernel_equals_reference_into_poisoned_buffer(shape, dtype, blocksize, double_quant, kernel_device):
    w = (torch.randn(shape) * 30).to(dtype)
    q = quantize_nf4(w, blocksize, double_quant).to(kernel_device)
    out = torch.full(shape, float("nan"), dtype=dtype, device=kernel_device)
    res = _launch(q, dtype, out)
    assert res is out
    assert torch.equal(out.cpu(), _dequantize_reference(q.to("cpu"), dtype))


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
