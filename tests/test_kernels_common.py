"""minift.kernels.common: the bf16 rounding switch (to_bf16) and how a launcher picks it."""
import pytest
import torch

pytestmark = pytest.mark.triton

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from minift.kernels.common import compiled, round_bf16, to_bf16  # noqa: E402


@triton.jit
def _round_kernel(x_ptr, y_ptr, n, HARDWARE: tl.constexpr, AS_FLOAT32: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    if AS_FLOAT32:  # y is float32
        y = round_bf16(x, HARDWARE)
    else:  # y is bfloat16
        y = to_bf16(x, HARDWARE)
    tl.store(y_ptr + offs, y, mask=mask)


def _edge_bits():
    """float32 bit patterns where rounding to bf16 can go wrong, and random finite ones."""
    bits = [
        0x3F808000,  # 1 + 2**-8: a tie, kept bit 0 -> stays (even)
        0x3F818000,  # a tie, kept bit 1 -> rounds up to even
        0x3F807FFF, 0x3F808001,  # just below / above a tie
        0x3FFFFFFF,  # carries out of the mantissa into the exponent (-> 2.0)
        0x7F7F7FFF,  # below the midpoint past the largest finite bf16: stays finite
        0x7F7F8000, 0x7F7FFFFF,  # at / above that midpoint: infinity, as round-to-nearest-even
        0x00000001, 0x00008000, 0x00018000, 0x007FFFFF,  # subnormals, a subnormal tie each way
        0x00000000, 0x80000000,  # +0, -0
    ]
    bits += [b | 0x80000000 for b in bits]  # the same with the sign set
    gen = torch.Generator().manual_seed(0)
    rand = torch.randint(0, 2**31 - 1, (4000,), generator=gen, dtype=torch.int64)
    rand = rand[(rand & 0x7F800000) != 0x7F800000]  # finite: not the all-ones exponent
    bits += rand.tolist() + (rand | 0x80000000).tolist()
    return torch.tensor(bits, dtype=torch.int64).to(torch.int32).view(torch.float32)


@pytest.mark.parametrize("as_float32", [False, True], ids=["to_bf16", "round_bf16"])
@pytest.mark.parametrize("hardware", [False, True], ids=["bits", "cvt"])
def test_bf16_rounding_to_nearest_even_like_torch(kernel_device, hardware, as_float32):
    if hardware and not compiled(_round_kernel):
        pytest.skip("the hardware conversion is only exact compiled (a CUDA machine)")
    x = _edge_bits()
    y = torch.empty(x.shape, dtype=torch.float32 if as_float32 else torch.bfloat16, device=kernel_device)
    _round_kernel[(1,)](x.to(kernel_device), y, x.numel(), HARDWARE=hardware, AS_FLOAT32=as_float32,
                        BLOCK=triton.next_power_of_2(x.numel()))
    want = x.to(torch.bfloat16)
    assert torch.equal(y.cpu().to(torch.bfloat16).view(torch.int16), want.view(torch.int16))
    if as_float32:  # exactly a bf16 value: the low half of the bits is zero
        assert not (y.cpu().view(torch.int32) & 0xFFFF).any()
    assert torch.isinf(want).sum() == 4  # the midpoint cases did reach infinity


def test_interpreted_kernels_take_the_bit_rounding():
    from triton.runtime.interpreter import InterpretedFunction

    assert compiled(_round_kernel) == (not isinstance(_round_kernel, InterpretedFunction))
    if isinstance(_round_kernel, InterpretedFunction):  # Triton's interpreter truncates instead
        x = torch.tensor([1 + 3 * 2**-9], dtype=torch.float32)  # between two bf16, nearer the upper
        y = torch.empty(1, dtype=torch.bfloat16)
        _round_kernel[(1,)](x, y, 1, HARDWARE=True, AS_FLOAT32=False, BLOCK=2)
        assert y.item() != x.to(torch.bfloat16).item()
