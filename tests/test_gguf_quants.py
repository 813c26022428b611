"""GGUF block quantizations against the `gguf` package (llama.cpp's own Python reader/writer):
dequantization equal to it on any bytes, Q8_0 / Q4_0 / Q4_1 quantization equal to it byte for byte,
and the K-quant encoders' proven error bounds."""
import numpy as np
import pytest

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
