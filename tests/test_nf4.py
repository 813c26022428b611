"""NF4 storage: bit-exact parity with bitsandbytes (CPU), state dicts both ways, bad input."""
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from oracles import bnb_dequantize, nf4_with_nested_blocksize

import minift
from minift.nf4.quantize import (
    SUPPORTED_BLOCKSIZES,
    NF4Weight,
    absmax_fp32,
    dequantize_nf4,
    double_quantize,
    quantize_nf4,
)

bnb = pytest.importorskip("bitsandbytes")
F = bnb.functional

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@pytest.fixture(autouse=True)
def _no_compile():
    # bitsandbytes' fallback dequantizer is torch.compile'd and recompiles for every new shape;
    # plain eager execution gives the same numbers in a fraction of the time.
    with torch.compiler.set_stance("force_eager"):
        yield


def _bnb(w, blocksize, double_quant):
    packed, state = F.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4")
    return packed, state, bnb_dequantize(packed, state).reshape(w.shape)


def _assert_same_as_bnb(w, blocksize, double_quant):
    packed, state, deq = _bnb(w, blocksize, double_quant)
    q = quantize_nf4(w, blocksize=blocksize, double_quant=double_quant)
    assert torch.equal(q.packed, packed)
    assert q.absmax.dtype == state.absmax.dtype and torch.equal(q.absmax, state.absmax)
    if double_quant:
        assert torch.equal(q.nested_absmax, state.state2.absmax)
        assert torch.equal(q.nested_code, state.state2.code)
        assert q.offset == state.offset.item()
    assert torch.equal(q.code, state.code)
    out = dequantize_nf4(q)
    assert out.dtype == w.dtype and out.shape == w.shape
    assert torch.equal(out, deq)


# 1-D, 2-D and 3-D shapes, most of them not a multiple of any blocksize; 1-D ones reach past
# 256 blocks of 32 (two nested scales)
SHAPES = st.one_of(st.tuples(st.integers(1, 9000)),
                   st.tuples(st.integers(1, 70), st.integers(1, 150)),
                   st.tuples(st.integers(1, 12), st.integers(1, 20), st.integers(1, 40)))


@settings(max_examples=25, deadline=None)
@given(shape=SHAPES, dtype=st.sampled_from(DTYPES), blocksize=st.sampled_from(SUPPORTED_BLOCKSIZES),
       double_quant=st.booleans(), log_scale=st.floats(-3, 2), seed=st.integers(0, 2**16))
def test_bit_exact_with_bitsandbytes(shape, dtype, blocksize, double_quant, log_scale, seed):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(shape, generator=g) * 10**log_scale).to(dtype)
    _assert_same_as_bnb(w, blocksize, double_quant)


@pytest.mark.parametrize("shape", [(1,), (7,), (63,), (65,), (3, 5, 7), (300, 257)])
def test_bit_exact_odd_and_nd_shapes(shape):
    _assert_same_as_bnb(torch.randn(shape, dtype=torch.bfloat16), 64, True)


def test_bit_exact_many_blocks_and_zero_blocks():
    # > 256 absmax blocks (two nested scales), a zero block and exact ties on the NF4 midpoints
    code = minift.quantmaps.nf4_code()
    mids = (code[:-1] + code[1:]) / 2
    w = torch.randn(700, 64)
    w[3] = 0.0
    w[5, :15] = mids
    w[5, 15] = 1.0
    _assert_same_as_bnb(w, 64, True)
    _assert_same_as_bnb(w.flatten()[: 64 * 512 + 11], 64, True)  # partial last block


def test_ties_go_to_the_lower_level():
    code = minift.quantmaps.nf4_code()
    mids = (code[:-1] + code[1:]) / 2  # absmax 1.0 -> scaled value equals the midpoint exactly
    w = torch.cat([torch.tensor([1.0]), mids])
    q = quantize_nf4(w, 64, double_quant=False)
    nibbles = torch.stack([q.packed.view(-1) >> 4, q.packed.view(-1) & 15], 1).view(-1)[: w.numel()]
    assert nibbles[1:].tolist() == list(range(15))


def test_nibble_order_and_padding():
    w = torch.tensor([-1.0, 1.0, 0.0])  # levels 0, 15, 7; the pad nibble is level 7 (zero)
    q = quantize_nf4(w, 64, double_quant=False)
    assert q.packed.shape == (2, 1)
    assert q.packed.view(-1).tolist() == [0x0F, 0x77]


def test_bits_per_param_measured_from_tensors():
    q = quantize_nf4(torch.randn(1024, 4096), 64, True)
    n = 1024 * 4096
    expected_bytes = n // 2 + n // 64 + 4 * (n // 64 // 256) + 4 * 16 + 4 * 256 + 4
    assert q.nbytes == expected_bytes
    assert q.bits_per_param == pytest.approx(8 * expected_bytes / n)
    # without the two code books (1,088 bytes, fixed per tensor): 4 + 8/64 + 32/(64*256) exactly
    book_bytes = q.code.nbytes + q.nested_code.nbytes
    assert 8 * (q.nbytes - book_bytes - 4) / n == 4 + 8 / 64 + 32 / (64 * 256)
    assert 4.126 < q.bits_per_param < 4.13
    single = quantize_nf4(torch.randn(1024, 4096), 64, double_quant=False)
    assert single.bits_per_param == pytest.approx(4 + 32 / 64, abs=1e-3)


def test_dequantize_other_dtype_and_out_buffer():
    w = torch.randn(33, 65)
    q = quantize_nf4(w, 128)
    out = torch.full((33, 65), float("nan"), dtype=torch.bfloat16)
    res = dequantize_nf4(q, torch.bfloat16, out=out)
    assert res is out
    assert torch.equal(out, (absmax_fp32(q).repeat_interleave(128)[: w.numel()]
                             * dequantize_nf4(q, torch.float32).view(-1) / absmax_fp32(q).repeat_interleave(128)[: w.numel()]
                             ).to(torch.bfloat16).view(33, 65))
    assert minift.dequantize_nf4 is dequantize_nf4 and minift.quantize_nf4 is quantize_nf4


def test_quantization_error_bounded_by_half_level_gap():
    w = torch.randn(64, 64)
    q = quantize_nf4(w, 64)
    err = (dequantize_nf4(q) - w).abs().view(-1, 64)
    true_absmax = w.view(-1, 64).abs().amax(1, keepdim=True)
    # |w - c a'| <= |w - c a| + |c| |a - a'|: half the largest NF4 gap (1 - 0.6962, /2) of the true
    # absmax, plus the 8-bit error of the absmax itself
    bound = 0.1520 * true_absmax + (absmax_fp32(q).view(-1, 1) - true_absmax).abs() + 1e-6
    assert (err <= bound).all()
    assert err.max() > 0.05  # and the bound is not vacuous: 4 bits do lose information


def test_to_device_keeps_values():
    q = quantize_nf4(torch.randn(10, 10))
    moved = q.to("cpu")
    assert moved is not q and torch.equal(dequantize_nf4(moved), dequantize_nf4(q))


# ------------------------------------------------------------------ bitsandbytes state dicts


def _bnb_linear(w, bias=None):
    lin = bnb.nn.Linear4bit(w.shape[1], w.shape[0], bias=bias is not None, compute_dtype=w.dtype,
                            compress_statistics=True, quant_type="nf4")
    lin.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, compress_statistics=True, quant_type="nf4")
    if bias is not None:
        lin.bias = torch.nn.Parameter(bias.clone(), requires_grad=False)
    return lin.to("cpu")  # quantizes on the move, as on a GPU


@pytest.mark.parametrize("dtype", DTYPES)
def test_state_dict_equals_linear4bit(dtype):
    w = torch.randn(24, 70).to(dtype)
    theirs = _bnb_linear(w).state_dict()
    ours = quantize_nf4(w, 64, True).to_bnb_state_dict("weight")
    assert set(ours) == set(theirs)
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    meta = json.loads(bytes(ours["weight.quant_state.bitsandbytes__nf4"].tolist()))
    assert meta["dtype"] == str(dtype).removeprefix("torch.") and meta["shape"] == [24, 70]


def test_load_linear4bit_state_dict_and_back_into_bnb():
    w = torch.randn(40, 33, dtype=torch.bfloat16)
    theirs = _bnb_linear(w).state_dict()
    q = NF4Weight.from_bnb_state_dict(theirs, "weight")
    ref = bnb_dequantize(theirs["weight"], _bnb(w, 64, True)[1])
    assert torch.equal(dequantize_nf4(q), ref)
    ours = quantize_nf4(w).to_bnb_state_dict("weight")
    stats = {k: v for k, v in ours.items() if k != "weight"}
    param = bnb.nn.Params4bit.from_prequantized(ours["weight"], stats, device="cpu")
    assert torch.equal(bnb_dequantize(param, param.quant_state), dequantize_nf4(q))


def test_state_dict_without_double_quant_round_trips():
    q = quantize_nf4(torch.randn(9, 31), 32, double_quant=False)
    sd = q.to_bnb_state_dict("layer.weight")
    assert "layer.weight.nested_absmax" not in sd
    back = NF4Weight.from_bnb_state_dict(sd, "layer.weight")
    assert not back.double_quant and torch.equal(dequantize_nf4(back), dequantize_nf4(q))


@pytest.mark.parametrize("key", ["weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
                                 "weight.nested_quant_map", "weight.quant_state.bitsandbytes__nf4"])
def test_missing_key_is_named(key):
    sd = quantize_nf4(torch.randn(8, 8)).to_bnb_state_dict()
    del sd[key]
    with pytest.raises(KeyError, match=key.replace(".", r"\.")):
        NF4Weight.from_bnb_state_dict(sd)


def test_unknown_quant_type_is_named():
    sd = quantize_nf4(torch.randn(8, 8)).to_bnb_state_dict()
    sd["weight.quant_state.bitsandbytes__fp4"] = sd.pop("weight.quant_state.bitsandbytes__nf4")
    with pytest.raises(ValueError, match="fp4"):
        NF4Weight.from_bnb_state_dict(sd)
    meta = {"quant_type": "fp4", "blocksize": 64, "dtype": "float32", "shape": [8, 8]}
    sd.pop("weight.quant_state.bitsandbytes__fp4")
    sd["weight.quant_state.bitsandbytes__nf4"] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    with pytest.raises(ValueError, match="quant_type 'fp4'"):
        NF4Weight.from_bnb_state_dict(sd)


META_KEY = "weight.quant_state.bitsandbytes__nf4"


def _small_sd(double_quant=True):
    # 8 x 40 = 320 elements in blocks of 32: 10 absmax blocks, one nested scale
    return quantize_nf4(torch.randn(8, 40), 32, double_quant).to_bnb_state_dict()


def _set(sd, key, value):
    sd[key] = value


def _edit_meta(sd, edit):
    meta = json.loads(bytes(sd[META_KEY].tolist()))
    edit(meta)
    sd[META_KEY] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)


BAD_STATE_DICTS = {
    "truncated absmax": (True, lambda sd: _set(sd, "weight.absmax", sd["weight.absmax"][:-1]),
                         r"weight\.absmax: expected 10 elements, got 9"),
    "absmax too long": (False, lambda sd: _set(sd, "weight.absmax", torch.ones(11)),
                        r"weight\.absmax: expected 10 elements, got 11"),
    "short quant_map": (True, lambda sd: _set(sd, "weight.quant_map", sd["weight.quant_map"][:4]),
                        r"weight\.quant_map: expected 16 elements, got 4"),
    "bf16 quant_map": (True, lambda sd: _set(sd, "weight.quant_map", sd["weight.quant_map"].bfloat16()),
                       r"weight\.quant_map: expected dtype torch\.float32, got torch\.bfloat16"),
    "fp32 absmax with double quant": (
        True, lambda sd: _set(sd, "weight.absmax", sd["weight.absmax"].float()),
        r"weight\.absmax: expected dtype torch\.uint8 \(double quantization\), got torch\.float32"),
    "uint8 absmax without double quant": (
        False, lambda sd: _set(sd, "weight.absmax", torch.zeros(10, dtype=torch.uint8)),
        r"weight\.absmax: expected dtype torch\.float32 \(no double quantization\), got torch\.uint8"),
    "nested tensors without nested_offset": (
        True, lambda sd: _edit_meta(sd, lambda m: m.pop("nested_offset")),
        r"weight\.nested_absmax: present, but .* has no nested_offset"),
    "nested_absmax too long": (True, lambda sd: _set(sd, "weight.nested_absmax", torch.ones(2)),
                               r"weight\.nested_absmax: expected 1 elements, got 2"),
    "short nested_quant_map": (True, lambda sd: _set(sd, "weight.nested_quant_map", torch.zeros(255)),
                               r"weight\.nested_quant_map: expected 256 elements, got 255"),
    "packed is not a tensor": (True, lambda sd: _set(sd, "weight", [1, 2]), r"weight: expected a tensor, got list"),
    "no shape": (True, lambda sd: _edit_meta(sd, lambda m: m.pop("shape")),
                 rf"{META_KEY}: quant state has no field 'shape'"),
    "bad shape": (True, lambda sd: _edit_meta(sd, lambda m: m.update(shape=[8, "40"])),
                  r"field 'shape' must be a list of non-negative ints, got \[8, '40'\]"),
    "shape of another size": (True, lambda sd: _edit_meta(sd, lambda m: m.update(shape=[8, 42])),
                              r"weight: 160 packed bytes do not fit shape \(8, 42\)"),
    "unsupported blocksize": (True, lambda sd: _edit_meta(sd, lambda m: m.update(blocksize=48)),
                              rf"{META_KEY}: unsupported blocksize 48"),
    "float blocksize": (True, lambda sd: _edit_meta(sd, lambda m: m.update(blocksize=32.0)),
                        r"unsupported blocksize 32\.0"),
    "unsupported nested_blocksize": (True, lambda sd: _edit_meta(sd, lambda m: m.update(nested_blocksize=100)),
                                     r"unsupported nested_blocksize 100"),
    "bad nested_offset": (True, lambda sd: _edit_meta(sd, lambda m: m.update(nested_offset="0.5")),
                          r"field 'nested_offset' must be a number, got '0\.5'"),
    "bad dtype": (True, lambda sd: _edit_meta(sd, lambda m: m.update(dtype="int8")),
                  rf"{META_KEY}: unsupported dtype 'int8'"),
    "not JSON": (True, lambda sd: _set(sd, META_KEY, torch.tensor(list(b"\xff{nf4"), dtype=torch.uint8)),
                 rf"{META_KEY}: not a JSON quant state"),
    "JSON list": (True, lambda sd: _set(sd, META_KEY, torch.tensor(list(b"[1, 2]"), dtype=torch.uint8)),
                  rf"{META_KEY}: quant state must be a JSON object, got list"),
}


@pytest.mark.parametrize("case", BAD_STATE_DICTS.values(), ids=BAD_STATE_DICTS.keys())
def test_bad_state_dict_names_key_and_expectation(case):
    double_quant, spoil, match = case
    sd = _small_sd(double_quant)
    NF4Weight.from_bnb_state_dict(dict(sd))  # the untouched dict loads
    spoil(sd)
    with pytest.raises(ValueError, match=match):
        NF4Weight.from_bnb_state_dict(sd)


def test_bad_state_dict_is_a_load_error_in_nf4linear():
    from minift.nf4.linear import NF4Linear

    layer = NF4Linear(quantize_nf4(torch.randn(8, 40), 32))
    sd = layer.state_dict()
    sd["weight.absmax"] = sd["weight.absmax"][:-1]
    with pytest.raises(RuntimeError, match=r"weight\.absmax: expected 10 elements, got 9"):
        layer.load_state_dict(sd)


def test_nested_blocksize_other_than_256_round_trips():
    # 300 blocks of 32: three nested scales at 128, two at 256; the second half is 20x larger, so
    # decoding with the wrong nested blocksize would put badly wrong scales on many blocks
    w = torch.randn(9600)
    w[4800:] *= 20
    q = nf4_with_nested_blocksize(w, 32, 128)
    assert q.nested_absmax.numel() == 3
    sd = q.to_bnb_state_dict()
    assert json.loads(bytes(sd[META_KEY].tolist()))["nested_blocksize"] == 128
    back = NF4Weight.from_bnb_state_dict(sd)
    assert back.nested_blocksize == 128 and torch.equal(dequantize_nf4(back), dequantize_nf4(q))
    true_absmax = w.view(-1, 32).abs().amax(1)
    # the 8-bit code of (absmax - offset) is off by at most about half the dynamic map's largest
    # gap (0.014) times its nested scale
    scale = q.nested_absmax.repeat_interleave(128)[:300]
    assert ((absmax_fp32(back) - true_absmax).abs() <= 0.008 * scale).all()
    wrong = NF4Weight(**{**back.__dict__, "nested_blocksize": 256})
    assert ((absmax_fp32(wrong) - true_absmax).abs() > 0.1 * scale).any()


@pytest.mark.parametrize("n", [100, 64 * 300 + 5])  # one nested block; two, the last partial
def test_double_quantize_of_a_single_quantized_weight_equals_bitsandbytes(n):
    # double_quantize on its own, from the float32 absmaxes: bitsandbytes' compress_statistics
    w = torch.randn(n) * torch.linspace(0.1, 5, n)
    single = quantize_nf4(w, 64, double_quant=False)
    q = double_quantize(single)
    _, state, deq = _bnb(w, 64, True)
    assert q.packed is single.packed  # the nibbles are shared, not copied
    assert q.absmax.dtype == torch.uint8 and torch.equal(q.absmax, state.absmax)
    assert torch.equal(q.nested_absmax, state.state2.absmax)
    assert torch.equal(q.nested_code, state.state2.code)
    assert q.offset == state.offset.item() and q.nested_blocksize == 256
    assert torch.equal(dequantize_nf4(q), deq)
    assert single.absmax.dtype == torch.float32 and not single.double_quant  # left as it was


def test_double_quantize_bad_input():
    single = quantize_nf4(torch.randn(640), 64, double_quant=False)
    with pytest.raises(TypeError, match="double_quantize: q must be an NF4Weight, got Tensor"):
        double_quantize(single.absmax)
    with pytest.raises(ValueError, match="double_quantize: q is already double-quantized"):
        double_quantize(double_quantize(single))
    with pytest.raises(ValueError, match="double_quantize: unsupported blocksize 100"):
        double_quantize(single, nested_blocksize=100)


# ------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("blocksize", [16, 48, 100, 8192])
def test_unsupported_blocksize(blocksize):
    with pytest.raises(ValueError, match=f"unsupported blocksize {blocksize}"):
        quantize_nf4(torch.randn(4, 4), blocksize=blocksize)


@pytest.mark.parametrize("blocksize", [64.0, True, "64", None])
def test_blocksize_must_be_an_int(blocksize):
    with pytest.raises(TypeError, match=r"blocksize must be an int, got " + repr(blocksize).replace(".", r"\.")):
        quantize_nf4(torch.randn(4, 4), blocksize=blocksize)


def test_non_floating_input():
    with pytest.raises(TypeError, match="dtype torch.int64"):
        quantize_nf4(torch.arange(10))
    with pytest.raises(TypeError, match="torch.Tensor"):
        quantize_nf4([1.0, 2.0])


def test_empty_input():
    with pytest.raises(ValueError, match="empty"):
        quantize_nf4(torch.empty(0, 4))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input(bad):
    w = torch.randn(4, 4)
    w[1, 2] = bad
    with pytest.raises(ValueError, match="NaN/Inf"):
        quantize_nf4(w)


def test_bad_out_buffer_and_dtype():
    q = quantize_nf4(torch.randn(6, 10))
    with pytest.raises(ValueError, match="shape"):
        dequantize_nf4(q, out=torch.empty(10, 6))
    with pytest.raises(ValueError, match="dtype"):
        dequantize_nf4(q, out=torch.empty(6, 10, dtype=torch.float16))
    with pytest.raises(TypeError, match="dtype"):
        dequantize_nf4(q, dtype=torch.int32)
    with pytest.raises(TypeError, match="NF4Weight"):
        dequantize_nf4(torch.randn(3))
