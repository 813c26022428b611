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
the `gguf` package exactly (tests/test_gguf_quants.py); so do the Q8_0, Q4_0 and Q4_1 encoders,
byte for byte. The Q4_K and Q6_K encoders are our own: each sub-block tries a few scales around
the plain one (range / 15 levels, or absmax at level -32), refits scale and min to each
candidate's rounded levels by least squares, and keeps the lowest squared error, never worse than
the plain fit; the super-block then stores the sub-block scales in 6 (Q4_K) or 8 (Q6_K) bits, and
every element is re-rounded to the nearest level of the scales as stored. Hence, per element,
|x - x^| <= sqrt(plain fit's squared error over the sub-block) + 15 d / 2 + dmin / 2 for Q4_K and
+ 16 d for Q6_K (d, dmin the fp16 super-block scales), which the tests check. Work runs in chunks
of blocks, so a 100M-element tensor needs some tens of MB of temporaries beyond input and output.
"""
from __future__ import annotations

import numpy as np

from minift.gguf.format import GGML_TYPE_IDS, GGML_TYPES

# the types this module converts; ids, block elements and block bytes come from the container's table
_HANDLED = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q6_K")
TYPES: dict[str, int] = {name: GGML_TYPE_IDS[name] for name in sorted(_HANDLED, key=GGML_TYPE_IDS.get)}
BLOCKS: dict[str, tuple[int, int]] = {name: GGML_TYPES[GGML_TYPE_IDS[name]][1:] for name in _HANDLED}
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


# -------------------------------------------------------------------------------- quantize
# Q8_0, Q4_0 and Q4_1 follow ggml's reference encoders operation for operation in float32, so the
# bytes equal llama.cpp's (and the gguf package's). Q4_K and Q6_K search each sub-block's scale.


def _to_f16(v: np.ndarray) -> np.ndarray:
    """(nb, 1) float32 -> (nb, 2) uint8 little-endian fp16."""
    return v.astype("<f2").view(np.uint8)


def _f16_at_least(v: np.ndarray) -> np.ndarray:
    """The fp16 value nearest to v, moved one fp16 step up where it fell below v (as float32).

    A super-block scale rounded down would push the largest sub-block scale past the top code
    (63, 127) and clip it; rounded up, every sub-block scale stays within half a step of its code.
    That matters most where the scale is an fp16 subnormal (Q6_K: a block absmax below about
    0.25), whose rounding is coarse: a constant block of 0.01 came back 0.7% off when clipped.
    """
    h = v.astype(np.float16)
    low = h.astype(np.float32) < v
    h[low] = np.nextafter(h[low], np.float16(np.inf))
    return h.astype(np.float32)


def _inverse(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(d == 0, np.float32(0), np.float32(1) / d)


def _round_half_away(v: np.ndarray) -> np.ndarray:
    """C's roundf: halves go away from zero (np.rint would go to even)."""
    a = np.abs(v)
    f = np.floor(a)
    return np.copysign(f + (a - f >= 0.5), v)


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """(..., 2, k) values < 16 -> (..., k) bytes: the first half low, the second high."""
    return q[..., 0, :] | (q[..., 1, :] << 4)


def _q8_0(x: np.ndarray) -> np.ndarray:
    d = np.abs(x).max(axis=1, keepdims=True) / np.float32(127)
    q = _round_half_away(x * _inverse(d)).astype(np.int8).view(np.uint8)
    return np.concatenate([_to_f16(d), q], axis=1)


def _q4_0(x: np.ndarray) -> np.ndarray:
    # the scale maps the element of largest magnitude (the first one, on a tie) to -8
    peak = np.take_along_axis(x, np.abs(x).argmax(axis=1)[:, None], axis=1)
    d = peak / np.float32(-8)
    q = np.minimum(np.trunc(x * _inverse(d) + np.float32(8.5)), 15).astype(np.uint8)
    return np.concatenate([_to_f16(d), _pack_nibbles(q.reshape(-1, 2, 16))], axis=1)


def _q4_1(x: np.ndarray) -> np.ndarray:
    lo, hi = x.min(axis=1, keepdims=True), x.max(axis=1, keepdims=True)
    d = (hi - lo) / np.float32(15)
    q = np.minimum(np.trunc((x - lo) * _inverse(d) + np.float32(0.5)), 15).astype(np.uint8)
    return np.concatenate([_to_f16(d), _to_f16(lo), _pack_nibbles(q.reshape(-1, 2, 16))], axis=1)


def _sums(x: np.ndarray, levels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per candidate: the sums of L, L * L and L * x over a row ((ns, K) each)."""
    return (levels.sum(axis=2), np.einsum("ikn,ikn->ik", levels, levels),
            np.einsum("ikn,in->ik", levels, x))


def _pick(x: np.ndarray, levels: np.ndarray, s: np.ndarray, b: np.ndarray, sums: tuple,
          first: tuple[np.ndarray, np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Among candidate fits ``s * L + b`` of the rows of x (ns, n) pick the lowest squared error.

    ``levels`` (ns, K, n) are the candidates' integer levels, ``s`` and ``b`` (ns, K) their fits,
    ``sums`` their `_sums`; ``first`` is the plain min/max (or absmax) fit (s0, b0, L0). The errors of the K candidates come
    from sums (cheap, but prone to cancellation), so the winner's error is recomputed element by
    element and compared with the plain fit's: the pick's error is never above the plain fit's.
    Returns (s, b), each (ns,).
    """
    n, (sl, sll, slx) = x.shape[1], sums
    sx, sxx = x.sum(axis=1, keepdims=True), np.einsum("in,in->i", x, x)[:, None]
    err = sxx - 2 * (s * slx + b * sx) + s * s * sll + 2 * s * b * sl + n * b * b
    rows = np.arange(len(x))
    k = err.argmin(axis=1)
    s, b = s[rows, k], b[rows, k]
    err = np.square(s[:, None] * levels[rows, k] + b[:, None] - x).sum(axis=1)
    s0, b0, l0 = first
    use_first = np.square(s0 * l0 + b0 - x).sum(axis=1) <= err
    return np.where(use_first, s0[:, 0], s), np.where(use_first, b0[:, 0], b)


def _levels(x: np.ndarray, coef: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """rint(x (ns, n) * coef (ns, K)) clipped to lo..hi, as (ns, K, n)."""
    levels = x[:, None, :] * coef[:, :, None]
    np.rint(levels, out=levels)
    return np.clip(levels, lo, hi, out=levels)


def _fit_affine(x: np.ndarray, nmax: int, steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of x (ns, n): s >= 0, b <= 0 with x ~ s * L + b, L in 0..nmax, near-least squares.

    Each candidate maps the row's range [min(x, 0), max(x)] onto nmax + t levels (t from
    ``steps``), rounds, and then refits s and b to those levels by least squares (b pinned to 0
    when the fit wants it positive: the format stores -b as a non-negative min).
    """
    n = x.shape[1]
    lo = np.minimum(x.min(axis=1, keepdims=True), 0)
    span = x.max(axis=1, keepdims=True) - lo
    inv = _inverse(span)
    l0 = np.clip(np.rint((x - lo) * (nmax * inv)), 0, nmax)
    levels = _levels(x - lo, (nmax + steps) * inv, 0, nmax)
    sl, sll, slx = sums = _sums(x, levels)
    sx = x.sum(axis=1, keepdims=True)
    det = n * sll - sl * sl
    with np.errstate(divide="ignore", invalid="ignore"):
        s = (n * slx - sl * sx) / det
        b = (sx - s * sl) / n
        pinned = ~(det > 0) | (b > 0)
        s = np.where(pinned, slx / sll, s)
    s = np.where(np.isfinite(s), np.maximum(s, 0), 0).astype(np.float32)
    b = np.where(pinned, 0, b).astype(np.float32)
    return _pick(x, levels, s, b, sums, (span / nmax, lo, l0))


def _fit_symmetric(x: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """Per row of x (ns, n): s with x ~ s * L, L in -32..31, near-least squares.

    The element of largest magnitude goes to the -32 end (the one with a level to spare), as
    -(32 + t) for each t in ``steps``; s is then refit to the rounded levels by least squares.
    """
    peak = np.take_along_axis(x, np.abs(x).argmax(axis=1)[:, None], axis=1)
    inv = _inverse(peak)
    l0 = np.clip(np.rint(x * (-32 * inv)), -32, 31)
    levels = _levels(x, -(32 + steps) * inv, -32, 31)
    sums = _sums(x, levels)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = sums[2] / sums[1]
    s = np.where(np.isfinite(s), s, 0).astype(np.float32)
    zero = np.zeros_like(x[:, :1])
    return _pick(x, levels, s, np.zeros_like(s), sums, (peak / np.float32(-32), zero, l0))[0]


def _requantize(x: np.ndarray, scale: np.ndarray, offset: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """The nearest level L in lo..hi of each x for the stored x = scale * L - offset (0 if scale is 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        levels = np.clip(np.rint((x + offset) / scale), lo, hi)
    return np.where(scale != 0, levels, max(lo, 0))


_STEPS_Q4_K = np.linspace(-1, 1, 9, dtype=np.float32)
_STEPS_Q6_K = np.linspace(-8, 0, 9, dtype=np.float32)


def _q4_k(x: np.ndarray) -> np.ndarray:
    nb = len(x)
    s, b = _fit_affine(x.reshape(nb * 8, 32), 15, _STEPS_Q4_K)
    s, m = s.reshape(nb, 8), -b.reshape(nb, 8)
    # the super-block scales map the largest sub-block scale and min to the top 6-bit code, 63
    d = _f16_at_least(s.max(axis=1, keepdims=True) / np.float32(63))
    dmin = _f16_at_least(m.max(axis=1, keepdims=True) / np.float32(63))
    sc = np.clip(np.rint(s * _inverse(d)), 0, 63).astype(np.uint8)
    mn = np.clip(np.rint(m * _inverse(dmin)), 0, 63).astype(np.uint8)
    scale = (d * sc.astype(np.float32))[:, :, None]  # exactly what the decoder multiplies by
    offset = (dmin * mn.astype(np.float32))[:, :, None]
    levels = _requantize(x.reshape(nb, 8, 32), scale, offset, 0, 15).astype(np.uint8)
    packed_scales = np.concatenate([sc[:, :4] | ((sc[:, 4:] >> 4) << 6), mn[:, :4] | ((mn[:, 4:] >> 4) << 6),
                                    (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4)], axis=1)
    qs = _pack_nibbles(levels.reshape(nb, 4, 2, 32)).reshape(nb, 128)
    return np.concatenate([_to_f16(d), _to_f16(dmin), packed_scales, qs], axis=1)


def _q6_k(x: np.ndarray) -> np.ndarray:
    nb = len(x)
    s = _fit_symmetric(x.reshape(nb * 16, 16), _STEPS_Q6_K).reshape(nb, 16)
    d = _f16_at_least(np.abs(s).max(axis=1, keepdims=True) / np.float32(127))
    sc = np.clip(np.rint(s * _inverse(d)), -127, 127).astype(np.int8)
    scale = (d * sc.astype(np.float32))[:, :, None]
    levels = (_requantize(x.reshape(nb, 16, 16), scale, np.float32(0), -32, 31) + 32).astype(np.uint8)
    halves = levels.reshape(nb, 2, 128)
    ql = ((halves[:, :, :64] & 15) | ((halves[:, :, 64:] & 15) << 4)).reshape(nb, 128)
    top = (halves >> 4).reshape(nb, 2, 4, 32)
    qh = (top[:, :, 0] | (top[:, :, 1] << 2) | (top[:, :, 2] << 4) | (top[:, :, 3] << 6)).reshape(nb, 64)
    return np.concatenate([ql, qh, sc.view(np.uint8), _to_f16(d)], axis=1)


_QUANT = {"Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q4_K": _q4_k, "Q6_K": _q6_k}
_SCALE_FIELDS = {"Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q4_K": [0, 2], "Q6_K": [208]}  # fp16 byte offsets
_CANDIDATES = {"Q4_K": len(_STEPS_Q4_K) + 2, "Q6_K": len(_STEPS_Q6_K) + 2}  # temporaries per element


def _bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits, rounding to nearest even as torch does; a NaN keeps its sign and top
    payload bits and is made quiet (ggml's rule: torch's NaN bits differ between its code paths)."""
    bits = x.view(np.uint32)
    rounded = (bits + (np.uint32(0x7FFF) + ((bits >> 16) & 1))) >> 16
    return np.where(np.isnan(x), (bits >> 16) | 0x40, rounded).astype("<u2").view(np.uint8)


def quantize(x: np.ndarray, qtype: str) -> np.ndarray:
    """float32 (..., n) -> the GGUF bytes of ``qtype``, uint8 (..., n // block * bytes per block).

    Block types need finite input whose block scales fit fp16; F16 needs values within its range.
    """
    block, size = _check_type(qtype)
    x = np.ascontiguousarray(x, dtype=np.float32)
    nbytes(qtype, x.shape)  # checks the shape
    out_shape = (*x.shape[:-1], x.shape[-1] // block * size)
    if qtype == "F32":
        return x.astype("<f4").view(np.uint8).reshape(out_shape)
    if qtype == "BF16":
        return _bf16(x.reshape(-1)).reshape(out_shape)
    if qtype == "F16":
        with np.errstate(over="ignore"):
            half = x.astype("<f2")
        if np.isinf(half).sum() != np.isinf(x).sum():
            raise ValueError(f"F16: values beyond fp16's range (largest |x| {np.abs(x).max():.6g} > 65504)")
        return half.view(np.uint8).reshape(out_shape)
    if not np.isfinite(x).all():
        raise ValueError(f"{qtype}: input holds {int((~np.isfinite(x)).sum())} NaN/Inf value(s)")
    blocks = x.reshape(-1, block)
    out = np.empty((len(blocks), size), np.uint8)
    step = max(1, _CHUNK // block // _CANDIDATES.get(qtype, 1))
    with np.errstate(over="ignore"):
        for i in range(0, len(blocks), step):
            out[i:i + step] = _QUANT[qtype](blocks[i:i + step])
    for at in _SCALE_FIELDS[qtype]:
        if np.isinf(out[:, at:at + 2].copy().view("<f2")).any():
            raise ValueError(f"{qtype}: values too large for the fp16 block scales "
                             f"(largest |x| {np.abs(x).max():.6g})")
    return out.reshape(out_shape)
