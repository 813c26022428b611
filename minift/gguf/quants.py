"""GGUF tensor types byte for byte: the float types and ggml's block quantizations, in numpy.

A GGUF tensor of numpy shape (rows, n) is stored row by row; each row is cut into blocks of
consecutive elements along its last (contiguous) axis, and each block becomes a fixed number of
bytes. ``BLOCKS`` gives (elements, bytes) per block. Multi-byte fields are little-endian.

- Q8_0 (32 -> 34 bytes): fp16 scale d, then 32 int8 q; x = d * q.
- Q4_0 (32 -> 18): fp16 d, then 16 bytes of 4-bit q; byte j holds element j in its low nibble
  and element j + 16 in its high nibble; x = d * (q - 8).
- Q4_1 (32 -> 20): fp16 d, fp16 m, then the nibbles as Q4_0; x = d * q + m.
- Q4_K (256 -> 144): fp16 d, fp16 dmin, 12 bytes of eight 6-bit scales sc and mins mn, then 128
  bytes of nibbles. The super-block is 8 sub-blocks of 32; x = d * sc[j] * q - dmin * mn[j].
  Bytes 0-3 hold sc[0..3] in their low 6 bits and the top 2 bits of sc[4..7] above; bytes 4-7
  the same for the mins; bytes 8-11 the low 4 bits of sc[4..7] (low nibble) and mn[4..7] (high).
  Nibble byte 32 * c + l holds element 64 * c + l (low) and 64 * c + 32 + l (high).
- Q6_K (256 -> 210): 128 bytes ql (low 4 bits), 64 bytes qh (high 2 bits), 16 int8 scales,
  fp16 d; sixteen sub-blocks of 16; x = d * sc[j] * (q - 32). In each half h of 128 elements,
  ql byte 64 h + l (l < 64) holds element 128 h + l (low nibble) and 128 h + 64 + l (high);
  qh byte 32 h + l holds, from its low bits up, the high bits of elements 128 h + l + 32 k, k = 0..3.

The dequantizers compute in float32 with the same operation order as ggml, so they agree with
the `gguf` package exactly (tests/test_gguf_quants.py). Work runs in chunks of blocks, so a
100M-element tensor needs a few tens of MB of temporaries beyond its input and output.
"""
from __future__ import annotations

import numpy as np

TYPES: dict[str, int] = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 8, "Q4_K": 12, "Q6_K": 14,
                         "BF16": 30}
BLOCKS: dict[str, tuple[int, int]] = {
    "F32": (1, 4), "F16": (1, 2), "BF16": (1, 2),
    "Q4_0": (32, 18), "Q4_1": (32, 20), "Q8_0": (32, 34), "Q4_K": (256, 144), "Q6_K": (256, 210),
}
_NAMES = {v: k for k, v in TYPES.items()}
_CHUNK = 1 << 20  # elements per chunk of work: large enough for numpy, small for memory


def type_name(type_id: int) -> str:
    """The name of a GGML type id, e.g. 12 -> "Q4_K"; ValueError for one this module does not handle."""
    if isinstance(type_id, (int, np.integer)) and not isinstance(type_id, bool) and int(type_id) in _NAMES:
        return _NAMES[int(type_id)]
    supported = ", ".join(f"{k} {v}" for k, v in TYPES.items())
    raise ValueError(f"GGML type id {type_id!r} is unknown or unsupported (supported: {supported})")


def _check_type(qtype: str) -> tuple[int, int]:
    if qtype not in BLOCKS:
        raise ValueError(f"unknown GGUF type {qtype!r}; supported: {', '.join(BLOCKS)}")
    return BLOCKS[qtype]


def nbytes(qtype: str, shape: tuple[int, ...]) -> int:
    """Bytes a tensor of numpy ``shape`` takes as ``qtype``; its last dim must fill whole blocks."""
    block, size = _check_type(qtype)
    shape = tuple(shape)
    if not shape or any(not isinstance(d, (int, np.integer)) or d < 0 for d in shape):
        raise ValueError(f"{qtype}: shape {shape} must be a non-empty tuple of sizes >= 0")
    if shape[-1] % block:
        raise ValueError(f"{qtype}: last dim {shape[-1]} of shape {shape} is not a multiple of the "
                         f"block size {block}")
    return int(np.prod(shape[:-1], dtype=np.int64)) * (shape[-1] // block) * size


# ------------------------------------------------------------------------------ dequantize


def _f16(raw: np.ndarray) -> np.ndarray:
    """(nb, 2) uint8 little-endian fp16 fields -> (nb, 1) float32."""
    return np.ascontiguousarray(raw).view("<f2").astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(..., k) bytes -> (..., 2, k): low nibbles, then high nibbles."""
    return np.stack([qs & 15, qs >> 4], axis=-2)


def _deq_q8_0(b: np.ndarray) -> np.ndarray:
    return b[:, 2:].view(np.int8).astype(np.float32) * _f16(b[:, :2])


def _deq_q4_0(b: np.ndarray) -> np.ndarray:
    q = _nibbles(b[:, 2:]).reshape(len(b), 32).astype(np.int8) - np.int8(8)
    return _f16(b[:, :2]) * q.astype(np.float32)


def _deq_q4_1(b: np.ndarray) -> np.ndarray:
    q = _nibbles(b[:, 4:]).reshape(len(b), 32).astype(np.float32)
    return _f16(b[:, :2]) * q + _f16(b[:, 2:4])


def _unpack_scales_q4_k(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(nb, 12) packed bytes -> the 6-bit scales and mins, each (nb, 8) uint8."""
    lo, mid, top = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.concatenate([lo & 63, (top & 15) | ((lo >> 6) << 4)], axis=1)
    mn = np.concatenate([mid & 63, (top >> 4) | ((mid >> 6) << 4)], axis=1)
    return sc, mn


def _deq_q4_k(b: np.ndarray) -> np.ndarray:
    nb = len(b)
    sc, mn = _unpack_scales_q4_k(b[:, 4:16])
    d = (_f16(b[:, 0:2]) * sc.astype(np.float32))[:, :, None]
    m = (_f16(b[:, 2:4]) * mn.astype(np.float32))[:, :, None]
    q = _nibbles(b[:, 16:].reshape(nb, 4, 32)).reshape(nb, 8, 32).astype(np.float32)
    return (d * q - m).reshape(nb, 256)


def _deq_q6_k(b: np.ndarray) -> np.ndarray:
    nb = len(b)
    ql = _nibbles(b[:, :128].reshape(nb, 2, 64)).reshape(nb, 2, 128)
    qh = b[:, 128:192].reshape(nb, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8)[:, None]
    q = (ql | ((qh & 3) << 4).reshape(nb, 2, 128)).astype(np.int8) - np.int8(32)
    d = (_f16(b[:, 208:210]) * b[:, 192:208].view(np.int8).astype(np.float32))[:, :, None]
    return (d * q.reshape(nb, 16, 16).astype(np.float32)).reshape(nb, 256)


_DEQUANT = {"Q8_0": _deq_q8_0, "Q4_0": _deq_q4_0, "Q4_1": _deq_q4_1, "Q4_K": _deq_q4_k, "Q6_K": _deq_q6_k}


def dequantize(raw: np.ndarray, qtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """The float32 tensor of numpy ``shape`` that the GGUF bytes ``raw`` (uint8, any shape) hold."""
    expected = nbytes(qtype, shape)
    raw = np.asarray(raw)
    if raw.dtype != np.uint8:
        raise ValueError(f"{qtype}: raw data must be uint8 bytes, got dtype {raw.dtype}")
    if raw.size != expected:
        raise ValueError(f"{qtype}: {raw.size} bytes for shape {tuple(shape)}, expected {expected}")
    flat = raw.reshape(-1)
    if qtype == "F32":
        return flat.view("<f4").astype(np.float32).reshape(shape)
    if qtype == "F16":
        return flat.view("<f2").astype(np.float32).reshape(shape)
    if qtype == "BF16":
        return (flat.view("<u2").astype(np.uint32) << 16).view(np.float32).reshape(shape)
    block, size = BLOCKS[qtype]
    blocks = flat.reshape(-1, size)
    out = np.empty((len(blocks), block), np.float32)
    step = max(1, _CHUNK // block)
    for i in range(0, len(blocks), step):
        out[i:i + step] = _DEQUANT[qtype](blocks[i:i + step])
    return out.reshape(shape)
