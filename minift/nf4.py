"""NF4 weights with double quantization, laid out byte for byte like bitsandbytes.

A weight of n elements is cut into blocks of ``blocksize`` consecutive elements (row-major
order; the last block may be partial). Each element becomes the 4-bit index of the nearest of the
16 NF4 levels after dividing by its block's absmax; two indices share a byte, the even element in
the high nibble. With double quantization the fp32 absmaxes lose their mean (``offset``) and are
themselves quantized to 8 bits with the signed dynamic map in blocks of 256, keeping one fp32
scale per 256 blocks (``nested_absmax``). See docs/qlora.md for the byte layout.

The rounding rules below reproduce bitsandbytes 0.50 on CPU exactly (tests/test_nf4.py holds the
proof), so packed checkpoints interoperate both ways. This module is also the pure-torch
reference of the Triton dequantization kernel in ``minift.kernels.nf4``.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass, replace

import torch

from minift.kernels import HAS_TRITON
from minift.nf4_dequant import dequantize_packed
from minift.quantmaps import dynamic_map, nf4_code

if HAS_TRITON:  # the CUDA path; the torch reference below serves everywhere else
    from minift.kernels.nf4 import nf4_dequantize

SUPPORTED_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_LUT_SIZE = 65536  # grid points over [-1, 1] used to pick an 8-bit code (bitsandbytes' CPU rule)


@dataclass(eq=False)
class NF4Weight:
    """A quantized weight: the tensors bitsandbytes stores plus the metadata to undo it.

    Attributes:
        packed: uint8 (ceil(n / 2), 1); byte k holds element 2k (high nibble) and 2k + 1.
        absmax: per-block scale: uint8 codes into ``nested_code`` with double quantization,
            else float32; shape (ceil(n / blocksize),).
        shape: original shape. dtype: original dtype. blocksize: elements per block.
        code: the 16 NF4 levels (float32).
        nested_absmax: float32 (ceil(n_blocks / 256),) scales of the 8-bit absmax, or None.
        nested_code: the 256-entry signed dynamic map (float32), or None.
        offset: mean of the fp32 absmaxes, added back after the 8-bit decode, or None.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    code: torch.Tensor
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    offset: float | None = None
    nested_blocksize: int = NESTED_BLOCKSIZE

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the weight keeps (what a checkpoint or a saved autograd context holds)."""
        found = [self.packed, self.absmax, self.code, self.nested_absmax, self.nested_code]
        return [t for t in found if t is not None]

    def to(self, device) -> "NF4Weight":
        moved = {
            name: getattr(self, name).to(device)
            for name in ("packed", "absmax", "code", "nested_absmax", "nested_code")
            if getattr(self, name) is not None
        }
        return replace(self, **moved)

    @property
    def nbytes(self) -> int:
        """Bytes held by the tensors, plus 4 for the fp32 offset."""
        return sum(t.nbytes for t in self.tensors()) + (4 if self.offset is not None else 0)

    @property
    def bits_per_param(self) -> float:
        return 8.0 * self.nbytes / self.numel

    def to_bnb_state_dict(self, prefix: str = "weight") -> dict:
        """The tensors under bitsandbytes' serialized names (``Linear4bit.state_dict()``)."""
        return to_bnb_state_dict(self, prefix)

    @classmethod
    def from_bnb_state_dict(cls, sd: dict, prefix: str = "weight") -> "NF4Weight":
        """Rebuild a weight from bitsandbytes' serialized names, without re-quantizing."""
        return from_bnb_state_dict(sd, prefix)


# ---------------------------------------------------------------------------------- checks


def check_blocksize(blocksize, what: str = "quantize_nf4") -> None:
    """Raise unless ``blocksize`` is an int (not a bool) in ``SUPPORTED_BLOCKSIZES``."""
    # 64.0 == 64 would pass the membership test and then fail deep inside as a slice index
    if isinstance(blocksize, bool) or not isinstance(blocksize, int):
        raise TypeError(f"{what}: blocksize must be an int, got {blocksize!r} ({type(blocksize).__name__})")
    if blocksize not in SUPPORTED_BLOCKSIZES:
        raise ValueError(f"{what}: unsupported blocksize {blocksize!r}; use one of {SUPPORTED_BLOCKSIZES}")


def check_weight(w, what: str = "quantize_nf4", name: str = "w") -> None:
    """Raise unless ``w`` is a non-empty, finite float32 / bfloat16 / float16 tensor.

    Messages read ``"{what}: {name} ..."``, so callers can name the layer the tensor belongs to.
    """
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{what}: {name} must be a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{what}: {name} must be float32, bfloat16 or float16, got dtype {w.dtype}")
    if w.numel() == 0:
        raise ValueError(f"{what}: {name} is empty (shape {tuple(w.shape)})")
    if not bool(torch.isfinite(w).all()):
        bad = int((~torch.isfinite(w)).sum())
        raise ValueError(f"{what}: {name} holds {bad} NaN/Inf value(s); they would poison the block absmax")


# -------------------------------------------------------------------------------- quantize


def _quantize_4bit(flat: torch.Tensor, blocksize: int, code: torch.Tensor):
    """flat (n,) float32 -> (packed (ceil(n/2), 1) uint8, absmax (n_blocks,) float32)."""
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].view(-1, blocksize)  # (n_full, blocksize)
    absmax = blocks.abs().amax(dim=1) if full else flat.new_zeros(0)
    # bitsandbytes multiplies full blocks by the reciprocal but divides the tail block; the two
    # differ in the last bit, so both are kept. The 1e-38 floor keeps all-zero blocks finite.
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38)).view(-1, 1)).clamp(-1, 1).reshape(-1)
    if full < n:
        tail_max = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max.view(1)])
        scaled = torch.cat([scaled, (flat[full:] / tail_max).clamp(-1, 1)])
    if n % 2:  # the pad element is 0.0 -> level 7, the low nibble of the last byte
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    # Nearest level; a value exactly on a midpoint goes to the lower level (bucketize, right=False).
    midpoints = (code[:-1] + code[1:]) / 2
    idx = torch.bucketize(scaled, midpoints, out_int32=True).to(torch.uint8)
    packed = (idx[0::2] << 4) | idx[1::2]
    return packed.view(-1, 1), absmax


@functools.lru_cache(maxsize=4)
def _code_lut(device_str: str) -> torch.Tensor:
    # bitsandbytes' CPU 8-bit quantizer snaps the normalized value to one of 65536 evenly spaced
    # grid points over [-1, 1] and takes that point's nearest code (ties to the lower code), so a
    # value within half a grid step of a midpoint may land one code away from the exact nearest.
    code = dynamic_map(True)
    midpoints = 0.5 * (code[:-1] + code[1:])
    grid = torch.arange(_LUT_SIZE, dtype=torch.float32) * 2.0 / float(_LUT_SIZE - 1) + -1.0
    return torch.searchsorted(midpoints, grid).to(torch.uint8).to(device_str)


def _quantize_8bit(flat: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE):
    """flat (n,) float32 in any range -> (codes (n,) uint8, absmax (n_blocks,) float32)."""
    n = flat.numel()
    n_blocks = -(-n // blocksize)
    padded = torch.nn.functional.pad(flat, (0, n_blocks * blocksize - n)).view(n_blocks, blocksize)
    absmax = padded.abs().amax(dim=1)  # padding zeros never raise a max of absolute values
    inv = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))  # zero block -> 0, not inf
    normed = (padded * inv.view(-1, 1)).clamp(-1, 1)
    grid_idx = (((normed + 1.0) * 0.5) * float(_LUT_SIZE - 1) + 0.5).to(torch.int64)  # truncation
    codes = _code_lut(str(flat.device))[grid_idx]
    codes = torch.where((absmax == 0).view(-1, 1), torch.zeros_like(codes), codes)  # zero block
    return codes.reshape(-1)[:n], absmax


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    """Quantize a floating tensor to NF4 (bit-identical to bitsandbytes' ``quantize_4bit``).

    Args:
        w: float32 / bfloat16 / float16 tensor of any shape; finite, non-empty.
        blocksize: elements per absmax block, one of 32, 64, ..., 4096.
        double_quant: quantize the absmaxes to 8 bits (bitsandbytes' ``compress_statistics``).

    Returns:
        An ``NF4Weight`` on ``w``'s device.
    """
    check_blocksize(blocksize)
    check_weight(w)
    code = nf4_code(w.device)
    flat = w.detach().reshape(-1).float()
    packed, absmax = _quantize_4bit(flat, blocksize, code)
    q = NF4Weight(packed=packed, absmax=absmax, shape=torch.Size(w.shape), dtype=w.dtype,
                  blocksize=blocksize, code=code)
    if not double_quant:
        return q
    offset = absmax.mean()  # same reduction as bitsandbytes, so the same fp32 value
    codes, nested_absmax = _quantize_8bit(absmax - offset)
    return replace(q, absmax=codes, nested_absmax=nested_absmax, nested_code=dynamic_map(True, w.device),
                   offset=float(offset.item()))


# ------------------------------------------------------------------------------ dequantize


def absmax_fp32(q: NF4Weight) -> torch.Tensor:
    """Per-block absmax as float32 (n_blocks,); decodes the 8-bit codes when double-quantized."""
    if not q.double_quant:
        return q.absmax.float()
    scale = q.nested_absmax.repeat_interleave(q.nested_blocksize)[: q.absmax.numel()]
    # Two roundings (product, then sum), never a fused multiply-add: that is what bitsandbytes does.
    return q.nested_code[q.absmax.long()] * scale + q.offset


def _dequantize_reference(q: NF4Weight, dtype: torch.dtype) -> torch.Tensor:
    n = q.numel
    nibbles = torch.stack([q.packed.view(-1) >> 4, q.packed.view(-1) & 15], dim=1).view(-1)[:n]
    scale = absmax_fp32(q).repeat_interleave(q.blocksize)[:n]
    # The product is formed in fp32 and rounded once to the output dtype (as bitsandbytes does).
    return (q.code[nibbles.long()] * scale).to(dtype).view(q.shape)


def check_out(out: torch.Tensor, q: NF4Weight, dtype: torch.dtype) -> None:
    """Raise if a caller-provided output buffer cannot hold ``q`` dequantized to ``dtype``."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
    if tuple(out.shape) != tuple(q.shape):
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {tuple(q.shape)}")
    if out.dtype != dtype:
        raise ValueError(f"out has dtype {out.dtype}, expected {dtype}")
    if out.device != q.device:
        raise ValueError(f"out is on {out.device}, the weight is on {q.device}")
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")


def _use_kernel(q: NF4Weight) -> bool:
    """Whether ``dequantize_nf4`` runs the Triton kernel (CUDA tensors with Triton installed)."""
    return q.packed.is_cuda and HAS_TRITON


def dequantize_nf4(q: NF4Weight, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Undo ``quantize_nf4``: a tensor of the original shape (equal to bitsandbytes' output).

    Args:
        q: the quantized weight.
        dtype: output dtype (float32, bfloat16 or float16); default the original dtype.
        out: optional preallocated contiguous buffer of the right shape, dtype and device
            (lets one buffer serve every layer).

    Returns:
        ``out`` if given, else a new tensor.
    """
    if not isinstance(q, NF4Weight):
        raise TypeError(f"dequantize_nf4: q must be an NF4Weight, got {type(q).__name__}")
    dtype = q.dtype if dtype is None else dtype
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dequantize_nf4: dtype must be float32, bfloat16 or float16, got {dtype}")
    if out is not None:
        check_out(out, q, dtype)
    if _use_kernel(q):
        return nf4_dequantize(q.packed, q.absmax, q.code, q.shape, q.blocksize, dtype, out=out,
                              nested_absmax=q.nested_absmax, nested_code=q.nested_code, offset=q.offset,
                              nested_blocksize=q.nested_blocksize)
    if q.packed.device.type == "cpu":  # the reference's bits, a table gather per byte
        return dequantize_packed(q.packed, absmax_fp32(q), q.code, q.shape, q.blocksize, dtype, out)
    result = _dequantize_reference(q, dtype)
    return result if out is None else out.copy_(result)


# --------------------------------------------------------------- bitsandbytes state dicts


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def to_bnb_state_dict(q: NF4Weight, prefix: str = "weight") -> dict:
    """The tensors under bitsandbytes' names; the small fields travel as JSON bytes (uint8)."""
    meta = {"quant_type": "nf4", "blocksize": q.blocksize, "dtype": _dtype_name(q.dtype), "shape": list(q.shape)}
    sd = {prefix: q.packed, f"{prefix}.absmax": q.absmax, f"{prefix}.quant_map": q.code}
    if q.double_quant:
        meta.update(nested_blocksize=q.nested_blocksize, nested_dtype="float32", nested_offset=q.offset)
        sd[f"{prefix}.nested_absmax"] = q.nested_absmax
        sd[f"{prefix}.nested_quant_map"] = q.nested_code
    raw = json.dumps(meta).encode("utf-8")
    sd[f"{prefix}.quant_state.bitsandbytes__nf4"] = torch.tensor(list(raw), dtype=torch.uint8)
    return sd


class MissingKeyError(KeyError):
    """A bitsandbytes state dict lacks a key; ``key`` names it."""

    def __init__(self, key: str):
        super().__init__(f"bitsandbytes state dict is missing key {key!r}")
        self.key = key


def _read_meta(sd: dict, prefix: str) -> tuple[str, dict]:
    key = f"{prefix}.quant_state.bitsandbytes__nf4"
    if key not in sd:
        others = [k for k in sd if k.startswith(f"{prefix}.quant_state.bitsandbytes__")]
        if others:
            kind = others[0].rsplit("__", 1)[-1]
            raise ValueError(f"{others[0]}: unsupported quant_type {kind!r}; only 'nf4' is supported")
        raise MissingKeyError(key)
    raw = sd[key]
    if not isinstance(raw, torch.Tensor):
        raise ValueError(f"{key}: expected a uint8 tensor of JSON bytes, got {type(raw).__name__}")
    try:
        meta = json.loads(bytes(raw.cpu().to(torch.uint8).tolist()).decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{key}: not a JSON quant state ({err})") from err
    if not isinstance(meta, dict):
        raise ValueError(f"{key}: quant state must be a JSON object, got {type(meta).__name__}")
    if meta.get("quant_type") != "nf4":
        raise ValueError(f"{key}: unsupported quant_type {meta.get('quant_type')!r}; only 'nf4' is supported")
    for field in ("blocksize", "dtype", "shape"):
        if field not in meta:
            raise ValueError(f"{key}: quant state has no field {field!r}")
    for field, default in (("blocksize", None), ("nested_blocksize", NESTED_BLOCKSIZE)):
        value = meta.get(field, default)
        if isinstance(value, bool) or not isinstance(value, int) or value not in SUPPORTED_BLOCKSIZES:
            raise ValueError(f"{key}: unsupported {field} {value!r}; expected one of {SUPPORTED_BLOCKSIZES}")
    shape = meta["shape"]
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise ValueError(f"{key}: field 'shape' must be a list of non-negative ints, got {shape!r}")
    offset = meta.get("nested_offset")
    if "nested_offset" in meta and (isinstance(offset, bool) or not isinstance(offset, (int, float))):
        raise ValueError(f"{key}: field 'nested_offset' must be a number, got {offset!r}")
    return key, meta


def _require(sd: dict, key: str, numel: int, dtype: torch.dtype, why: str = "") -> torch.Tensor:
    """``sd[key]`` flattened, after checking it holds ``numel`` elements of ``dtype``."""
    if key not in sd:
        raise MissingKeyError(key)
    t = sd[key]
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{key}: expected a tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise ValueError(f"{key}: expected dtype {dtype}{why}, got {t.dtype}")
    if t.numel() != numel:
        raise ValueError(f"{key}: expected {numel} elements, got {t.numel()} (shape {tuple(t.shape)})")
    return t.reshape(-1)


def from_bnb_state_dict(sd: dict, prefix: str = "weight") -> NF4Weight:
    """Rebuild an ``NF4Weight`` from bitsandbytes' serialized names (no re-quantization).

    Every tensor is checked against the quant state before use: the absmax count must match the
    shape and blocksize, the absmax dtype must match the quant state (uint8 codes with double
    quantization, float32 without), the code books must hold 16 / 256 float32 levels. A problem
    raises ``ValueError`` naming the key and the expected and actual size or dtype; a missing key
    raises ``MissingKeyError`` (a ``KeyError``) naming it.
    """
    meta_key, meta = _read_meta(sd, prefix)
    dtype = getattr(torch, str(meta["dtype"]), None)
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"{meta_key}: unsupported dtype {meta['dtype']!r}; expected 'float32', 'bfloat16' "
                         "or 'float16'")
    shape = torch.Size(meta["shape"])
    blocksize = meta["blocksize"]
    n_blocks = -(-shape.numel() // blocksize)
    if prefix not in sd:
        raise MissingKeyError(prefix)
    if not isinstance(sd[prefix], torch.Tensor):
        raise ValueError(f"{prefix}: expected a tensor, got {type(sd[prefix]).__name__}")
    # bitsandbytes may store the packed bytes in another dtype (quant_storage); the bytes count
    packed = sd[prefix].reshape(-1).view(torch.uint8).reshape(-1, 1)
    if packed.shape[0] != -(-shape.numel() // 2):
        raise ValueError(f"{prefix}: {packed.shape[0]} packed bytes do not fit shape {tuple(shape)}")
    double_quant = "nested_offset" in meta
    if not double_quant:
        stray = [k for k in (f"{prefix}.nested_absmax", f"{prefix}.nested_quant_map") if k in sd]
        if stray:
            raise ValueError(f"{stray[0]}: present, but {meta_key} has no nested_offset (no double quantization)")
    absmax = _require(sd, f"{prefix}.absmax", n_blocks, torch.uint8 if double_quant else torch.float32,
                      " (double quantization)" if double_quant else " (no double quantization)")
    code = _require(sd, f"{prefix}.quant_map", 16, torch.float32)
    q = NF4Weight(packed=packed, absmax=absmax, shape=shape, dtype=dtype, blocksize=blocksize, code=code)
    if not double_quant:
        return q
    nested_blocksize = meta.get("nested_blocksize", NESTED_BLOCKSIZE)
    nested_absmax = _require(sd, f"{prefix}.nested_absmax", -(-n_blocks // nested_blocksize), torch.float32)
    nested_code = _require(sd, f"{prefix}.nested_quant_map", 256, torch.float32)
    return replace(q, nested_absmax=nested_absmax, nested_code=nested_code, offset=float(meta["nested_offset"]),
                   nested_blocksize=nested_blocksize)
