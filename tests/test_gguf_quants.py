"""GGUF block quantizations against the `gguf` package (llama.cpp's own Python reader/writer):
dequantization equal to it on any bytes, Q8_0 / Q4_0 / Q4_1 quantization equal to it byte for byte,
and the K-quant encoders' proven error bounds."""
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as GT  # noqa: E402
from gguf import quants as gq  # noqa: E402

from minift.gguf import quants as q  # noqa: E402

# where each block type keeps its fp16 fields (byte offsets inside the block)
F16_FIELDS = {"Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q4_K": [0, 2], "Q6_K": [208]}


def random_blocks(qtype: str, rows: int, blocks_per_row: int, seed: int = 0) -> np.ndarray:
    """Random bytes for ``qtype`` whose fp16 scale fields are finite (NaN never compares equal)."""
    rng = np.random.default_rng(seed)
    size = q.BLOCKS[qtype][1]
    raw = rng.integers(0, 256, (rows * blocks_per_row, size), dtype=np.uint8)
    for at in F16_FIELDS[qtype]:
        halves = (rng.standard_normal(len(raw)) * 10.0 ** rng.integers(-4, 3, len(raw))).astype(np.float16)
        raw[:, at:at + 2] = halves.view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, blocks_per_row * size)


def test_tables_match_gguf():
    for name, type_id in q.TYPES.items():
        assert GT[name].value == type_id
        assert gguf.GGML_QUANT_SIZES[GT[name]] == q.BLOCKS[name]
        assert q.type_name(type_id) == name
    assert set(q.TYPES) == set(q.BLOCKS)


@pytest.mark.parametrize("bad", [7, 99, -1, "2", True])
def test_type_name_rejects_unknown_ids(bad):
    with pytest.raises(ValueError, match=f"GGML type id {bad!r} is unknown or unsupported"):
        q.type_name(bad)


def test_nbytes():
    assert q.nbytes("Q4_K", (3, 512)) == 3 * 2 * 144
    assert q.nbytes("Q8_0", (64,)) == 2 * 34
    assert q.nbytes("F32", (2, 3, 5)) == 120
    assert q.nbytes("BF16", (0, 7)) == 0
    with pytest.raises(ValueError, match=r"^Q6_K: last dim 300 of shape \(2, 300\) is not a multiple of the block size 256$"):
        q.nbytes("Q6_K", (2, 300))
    with pytest.raises(ValueError, match=r"^unknown GGUF type 'Q5_0'; supported: F32, F16, BF16"):
        q.nbytes("Q5_0", (32,))
    with pytest.raises(ValueError, match="non-empty tuple"):
        q.nbytes("F16", ())


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"])
@pytest.mark.parametrize("rows,blocks_per_row", [(1, 1), (3, 5), (17, 2)])
def test_dequantize_random_bytes_equals_gguf(qtype, rows, blocks_per_row):
    raw = random_blocks(qtype, rows, blocks_per_row, seed=rows * 31 + blocks_per_row)
    shape = (rows, blocks_per_row * q.BLOCKS[qtype][0])
    out = q.dequantize(raw, qtype, shape)
    assert out.dtype == np.float32 and out.shape == shape
    assert np.array_equal(out, gq.dequantize(raw, GT[qtype]))


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16"])
def test_float_types_dequantize_equals_gguf(qtype):
    raw = np.random.default_rng(1).integers(0, 256, (6, 40 * q.BLOCKS[qtype][1]), dtype=np.uint8)
    out = q.dequantize(raw, qtype, (6, 40))
    ref = gq.dequantize(raw, GT[qtype]).astype(np.float32)
    assert out.dtype == np.float32
    assert np.array_equal(out.view(np.uint32), ref.view(np.uint32))  # NaN payloads too


def test_dequantize_errors_are_one_line():
    with pytest.raises(ValueError, match=r"^Q4_0: 19 bytes for shape \(1, 32\), expected 18$"):
        q.dequantize(np.zeros(19, np.uint8), "Q4_0", (1, 32))
    with pytest.raises(ValueError, match=r"^Q8_0: raw data must be uint8 bytes, got dtype float32$"):
        q.dequantize(np.zeros(34, np.float32), "Q8_0", (32,))
    with pytest.raises(ValueError, match=r"^Q4_K: last dim 32 of shape \(32,\) is not a multiple"):
        q.dequantize(np.zeros(18, np.uint8), "Q4_K", (32,))


# ------------------------------------------------------------------------------------ quantize

def f16_field(raw: np.ndarray, qtype: str, at: int) -> np.ndarray:
    """One fp16 field of every block, as float32 (n_blocks,)."""
    return raw.reshape(-1, q.BLOCKS[qtype][1])[:, at:at + 2].copy().view("<f2").astype(np.float32)[:, 0]


def structured_rows(n: int) -> list:
    """Rows the quantizers must get right: zeros, constants, one sign, outliers, tiny/huge values."""
    rng = np.random.default_rng(n)
    g = rng.standard_normal(n).astype(np.float32)
    return [np.zeros(n), np.full(n, 0.3), np.full(n, -2.5), np.abs(g), -np.abs(g), g * 1e-6, g * 1e3,
            np.where(np.arange(n) % 7 == 0, 40.0, g), np.sign(g) * 1e-20, np.repeat([1.0, -1.0], n // 2)]


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
def test_quantize_structured_rows_equal_gguf_bytes(qtype):
    x = np.stack(structured_rows(256)).astype(np.float32)
    assert np.array_equal(q.quantize(x, qtype), gq.quantize(x, GT[qtype]))


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 4), blocks=st.integers(1, 4), exponent=st.integers(-30, 3), data=st.data())
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
def test_quantize_equals_gguf_bytes(qtype, rows, blocks, exponent, data):
    x = data.draw(hnp.arrays(np.float32, (rows, 32 * blocks),
                             elements=st.floats(-30.0, 30.0, width=32)))
    x = (x * np.float32(10.0 ** exponent)).astype(np.float32)
    # A block scale so small that its inverse overflows (1/d = inf) makes the reference multiply
    # 0 by inf and cast the NaN to a byte, which is undefined (its bytes vary with numpy's code
    # path); the stored fp16 scale is 0 there, so those codes decode to nothing. Found by this test
    # at elements of 1e-44.
    blocks_ = x.reshape(-1, 32)
    d = {"Q8_0": np.abs(blocks_).max(axis=1) / 127, "Q4_0": np.abs(blocks_).max(axis=1) / 8,
         "Q4_1": (blocks_.max(axis=1) - blocks_.min(axis=1)) / 15}[qtype].astype(np.float32)
    with np.errstate(divide="ignore"):
        assume(np.isfinite(np.float32(1) / d[d != 0]).all())
    raw = q.quantize(x, qtype)
    assert raw.dtype == np.uint8 and raw.shape == (rows, blocks * q.BLOCKS[qtype][1])
    assert np.array_equal(raw, gq.quantize(x, GT[qtype]))
    assert np.array_equal(q.dequantize(raw, qtype, x.shape), gq.dequantize(raw, GT[qtype]))


def test_float_types_round_like_torch_and_gguf():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    bits = rng.integers(0, 2**32, 4096, dtype=np.uint64).astype(np.uint32)  # every exponent, NaN and Inf too
    x = np.concatenate([bits.view(np.float32), rng.standard_normal(4096).astype(np.float32)])
    assert np.array_equal(q.quantize(x, "BF16"), gq.quantize(x, GT.BF16))  # NaN bits as ggml
    ordered = x[~np.isnan(x)]  # torch's NaN bits depend on its code path
    assert np.array_equal(q.quantize(ordered, "BF16").view(np.int16),
                          torch.from_numpy(ordered).bfloat16().view(torch.int16).numpy())
    finite = x[np.isfinite(x)]
    small = np.clip(finite, -6e4, 6e4)
    assert np.array_equal(q.quantize(small, "F16").view(np.float16), small.astype(np.float16))
    assert np.array_equal(q.quantize(x, "F32").view(np.float32).view(np.uint32), x.view(np.uint32))


def test_quantize_errors_are_one_line():
    with pytest.raises(ValueError, match=r"^Q4_K: last dim 128 of shape \(2, 128\) is not a multiple"):
        q.quantize(np.zeros((2, 128), np.float32), "Q4_K")
    with pytest.raises(ValueError, match=r"^unknown GGUF type 'IQ2_XS'"):
        q.quantize(np.zeros(32, np.float32), "IQ2_XS")
    with pytest.raises(ValueError, match=r"^Q8_0: input holds 2 NaN/Inf value\(s\)$"):
        q.quantize(np.array([np.nan, np.inf] + [0.0] * 30, np.float32), "Q8_0")
    with pytest.raises(ValueError, match=r"^Q4_1: values too large for the fp16 block scales \(largest \|x\| 1e\+06\)$"):
        q.quantize(np.full(32, 1e6, np.float32), "Q4_1")
    with pytest.raises(ValueError, match=r"^F16: values beyond fp16's range \(largest \|x\| 70000 > 65504\)$"):
        q.quantize(np.array([7e4], np.float32), "F16")


def test_q8_0_error_is_half_a_step_plus_the_fp16_scale_rounding():
    """ggml rounds x / d with the float32 scale d = absmax / 127 and stores d as fp16, so an element's
    error is at most d / 2 + 127 * |d - d16|; d16 / 2 alone is exceeded (by up to 11% on this data)."""
    x = np.random.default_rng(4).standard_normal((256, 1024)).astype(np.float32)
    raw = q.quantize(x, "Q8_0")
    err = np.abs(q.dequantize(raw, "Q8_0", x.shape) - x).reshape(-1, 32).max(axis=1)
    d = np.abs(x).reshape(-1, 32).max(axis=1) / np.float32(127)
    d16 = f16_field(raw, "Q8_0", 0)
    assert (err <= d / 2 + 127 * np.abs(d - d16) + 1e-6 * d).all()
    assert (err <= d16 / 2 * (1 + 127 * 2.0**-10)).all()  # |d - d16| <= 2^-11 d: the relative form


# ------------------------------------------------------------------------------- K-quants
# The proven bound. The encoder's fit (s, b, levels L*) has a squared error no larger than the
# plain fit's (range over 15 levels for Q4_K, the absmax element at -32 for Q6_K): the plain fit
# is always a candidate. The stored scale d * sc is within d / 2 of s (and dmin * mn within
# dmin / 2 of -b), and the stored levels are the nearest ones for the stored scales, so they do no
# worse than L*: per element |x - x^| <= sqrt(plain fit's squared error over the sub-block)
# + max|L*| * d / 2 (+ dmin / 2), with d, dmin the stored fp16 scales (rounded up by the encoder).


def plain_fit_error(x: np.ndarray, qtype: str) -> np.ndarray:
    """sqrt of the plain fit's squared error per sub-block, repeated per element (x's shape)."""
    if qtype == "Q4_K":
        sub = x.reshape(-1, 32).astype(np.float64)
        lo = np.minimum(sub.min(axis=1, keepdims=True), 0)
        step = (sub.max(axis=1, keepdims=True) - lo) / 15
        fit = step * np.clip(np.rint((sub - lo) / np.where(step > 0, step, 1)), 0, 15) + lo
    else:
        sub = x.reshape(-1, 16).astype(np.float64)
        s = np.take_along_axis(sub, np.abs(sub).argmax(axis=1)[:, None], axis=1) / -32
        fit = s * np.clip(np.rint(sub / np.where(s != 0, s, 1)), -32, 31)
    err = np.sqrt(np.square(fit - sub).sum(axis=1, keepdims=True))
    return np.broadcast_to(err, sub.shape).reshape(x.shape)


def check_k_quant(x: np.ndarray, qtype: str) -> np.ndarray:
    """Quantize, check gguf decodes the bytes as we do, check the proven bound; the decoded x."""
    raw = q.quantize(x, qtype)
    assert raw.shape == (*x.shape[:-1], x.shape[-1] // 256 * q.BLOCKS[qtype][1])
    out = q.dequantize(raw, qtype, x.shape)
    assert np.array_equal(out, gq.dequantize(raw, GT[qtype]))
    per_block = x.size // 256
    if qtype == "Q4_K":
        scales = [f16_field(raw, qtype, 0), f16_field(raw, qtype, 2)]
        rounding = 7.5 * scales[0] + 0.5 * scales[1]
    else:
        scales = [f16_field(raw, qtype, 208)]
        rounding = 16 * scales[0]
    bound = plain_fit_error(x, qtype) + np.repeat(rounding, 256).reshape(x.shape)
    peak = np.abs(x).reshape(per_block, 256).max(axis=1).repeat(256).reshape(x.shape)
    # subnormal fp16 super-block scales included: the encoder rounds them up, never down (a
    # constant block of 0.01 was 0.7% off in Q6_K when a rounded-down d clipped its scale code)
    # (blocks of float32 denormals, |x| <~ 1e-38, are held to the loose bound only: their
    # sub-block scale |x| / 32 underflows float32 before any fp16 rounding)
    err, tiny = np.abs(out - x), peak < 1e-30
    assert (err[~tiny] <= (bound + 1e-5 * peak)[~tiny]).all()
    assert (err[tiny] <= 2 * peak[tiny]).all()
    return out


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K"])
def test_k_quants_structured_rows(qtype):
    rows = [r for r in structured_rows(512) if np.abs(r).max() == 0 or np.abs(r).max() > 1e-3]
    check_k_quant(np.stack(rows).astype(np.float32), qtype)
    tiny = np.stack(structured_rows(256)).astype(np.float32) * np.float32(1e-7)  # fp16 subnormal scales
    out = q.dequantize(q.quantize(tiny, qtype), qtype, tiny.shape)
    assert np.array_equal(out, gq.dequantize(q.quantize(tiny, qtype), GT[qtype]))
    assert (np.abs(out - tiny) <= 2 * np.abs(tiny).max()).all()


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 3), blocks=st.integers(1, 2), exponent=st.integers(-2, 3), data=st.data())
@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K"])
def test_k_quants_random_rows(qtype, rows, blocks, exponent, data):
    x = data.draw(hnp.arrays(np.float32, (rows, 256 * blocks), elements=st.floats(-30.0, 30.0, width=32)))
    x = (x * np.float32(10.0 ** exponent)).astype(np.float32)
    check_k_quant(x, qtype)


def test_k_quant_error_on_gaussian_data():
    x = np.random.default_rng(5).standard_normal((64, 4096)).astype(np.float32)
    mse = {t: float(np.mean(np.square(q.dequantize(q.quantize(x, t), t, x.shape) - x)))
           for t in ["Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"]}
    check_k_quant(x, "Q4_K")
    check_k_quant(x, "Q6_K")
    # measured here: Q8_0 2.87e-5, Q4_0 7.39e-3, Q4_1 6.11e-3, Q4_K 5.09e-3, Q6_K 2.74e-4
    assert mse["Q4_K"] < 0.75 * mse["Q4_0"]  # 0.69
    assert mse["Q4_K"] < 0.9 * mse["Q4_1"]  # 0.83, with half a bit per weight less
    assert mse["Q6_K"] < mse["Q4_K"] / 15  # 1/18.6
    assert mse["Q6_K"] < 12 * mse["Q8_0"]  # 9.6x: two bits fewer (16x) but a finer block (16)
