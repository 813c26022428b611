"""Fast CPU NF4 dequantization (minift/nf4/dequant.py) against the reference it must equal."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from oracles import nf4_with_nested_blocksize
from torch.utils._python_dispatch import TorchDispatchMode

from minift.nf4 import dequant as nf4_dequant
from minift.nf4.dequant import dequantize_packed, pair_table
from minift.nf4.quantize import SUPPORTED_BLOCKSIZES, _dequantize_reference, dequantize_nf4, quantize_nf4
from minift.quantmaps import nf4_code

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8),
                                                                      b.view(torch.uint8))


def test_pair_table_holds_both_nibbles_of_every_byte():
    code = nf4_code()
    pairs = pair_table(code).view(torch.float32).view(256, 2)
    byte = torch.arange(256)
    assert torch.equal(pairs[:, 0], code[byte >> 4]) and torch.equal(pairs[:, 1], code[byte & 15])


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 40), cols=st.integers(1, 300), blocksize=st.sampled_from(SUPPORTED_BLOCKSIZES),
       dtype=st.sampled_from(sorted(DTYPES)), out_dtype=st.sampled_from(["same"] + sorted(DTYPES)),
       double_quant=st.booleans(), log_scale=st.integers(-20, 4), zero_rows=st.booleans(),
       slice_blocks=st.integers(1, 5), seed=st.integers(0, 2**31 - 1))
def test_fast_dequant_equals_the_reference(rows, cols, blocksize, dtype, out_dtype, double_quant,
                                           log_scale, zero_rows, slice_blocks, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen) * 10.0 ** log_scale
    if zero_rows:
        w[: rows // 2] = 0  # all-zero blocks: absmax floor and exact zeros
    w = w.to(DTYPES[dtype])
    q = quantize_nf4(w, blocksize, double_quant)
    out_dtype = q.dtype if out_dtype == "same" else DTYPES[out_dtype]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(nf4_dequant, "SLICE", slice_blocks * blocksize)  # several slices, a short last one
        got = dequantize_nf4(q, out_dtype)
    assert _same_bits(got, _dequantize_reference(q, out_dtype))


@pytest.mark.parametrize("nested_blocksize", [64, 256, 1024])
def test_fast_dequant_with_other_nested_blocksizes(nested_blocksize):
    q = nf4_with_nested_blocksize(torch.randn(70, 130), 64, nested_blocksize)
    assert _same_bits(dequantize_nf4(q, torch.bfloat16), _dequantize_reference(q, torch.bfloat16))


@pytest.mark.parametrize("dtype", list(DTYPES.values()))
@pytest.mark.parametrize("offset", [0, 1])  # an odd start cannot be viewed as int64 words
def test_fast_dequant_into_a_poisoned_out_buffer(dtype, offset):
    q = quantize_nf4(torch.randn(96, 200), 64)
    store = torch.full((offset + 96 * 200,), float("nan"), dtype=dtype)
    out = store[offset:].view(96, 200)
    result = dequantize_nf4(q, dtype, out=out)
    assert result.data_ptr() == out.data_ptr()
    assert _same_bits(out, _dequantize_reference(q, dtype))


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append((func.overloadpacket.__name__, out.numel() if isinstance(out, torch.Tensor) else 0))
        return out


_VIEWS = {"view", "slice", "unsqueeze", "expand", "reshape", "_unsafe_view", "as_strided", "alias",
          "detach", "empty"}  # no new values (empty: the output itself)


def _full_size_temporaries(ops, n):
    return [op for op in ops if op[0] not in _VIEWS and not op[0].endswith("_") and op[1] >= n]


def test_one_gather_per_byte_and_no_full_size_temporaries(monkeypatch):
    monkeypatch.setattr(nf4_dequant, "SLICE", 64 * 64)
    q = quantize_nf4(torch.randn(128, 256), 64)  # 32768 values: 8 slices of 4096
    with _OpLog() as log:
        dequantize_nf4(q, torch.bfloat16)
    gathers = [size for name, size in log.ops if name == "index_select" and size > 256]
    assert gathers == [2048] * 8  # one int64 word (two values) per byte, slice by slice
    assert _full_size_temporaries(log.ops, 32768) == []
    with _OpLog() as ref_log:  # the premise: the reference builds nibbles, scales, products
        _dequantize_reference(q, torch.bfloat16)
    assert len(_full_size_temporaries(ref_log.ops, 32768)) >= 4


def test_dequantize_packed_partial_last_block_and_odd_length():
    w = torch.randn(3, 37)  # 111 values: one whole block of 64 and a partial one of 47
    q = quantize_nf4(w, 64, double_quant=False)
    got = dequantize_packed(q.packed, q.absmax, q.code, q.shape, 64, torch.float16)
    assert _same_bits(got, _dequantize_reference(q, torch.float16))
