"""The NF4 weight format: `NF4Weight`, and its form under bitsandbytes' state-dict names.

What is stored, not how it is computed: `minift.nf4.quantize` quantizes and dequantizes. An `NF4Weight`
holds the tensors bitsandbytes stores (packed nibbles, absmax, code books) and the metadata to undo
the quantization; `to_bnb_state_dict` / `from_bnb_state_dict` write and read them under the names
``Linear4bit.state_dict()`` uses, checking every tensor against the quant state on the way in.
See docs/qlora.md for the byte layout.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace

import torch

SUPPORTED_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


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
