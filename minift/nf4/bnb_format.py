"""A whole model's linear weights as a bitsandbytes 4-bit ("-bnb-4bit") checkpoint.

`minift.nf4.format` converts one weight (`NF4Weight` <-> the tensors of ``Linear4bit.state_dict()``);
this module applies it to a model for ``save_model(..., quantization="nf4")`` and names the pieces
that the loader groups back into `NF4Linear` layers, so the writer and the reader share one list of
keys and one conversion. Each quantized linear ``<m>`` is stored as bitsandbytes 0.50 writes it
(``QuantState.as_dict(packed=True)`` beside the packed weight), for n = out * in elements:

    <m>.weight                                uint8 (ceil(n/2), 1): two 4-bit codes a byte, the even
                                              element (row-major) in the high nibble
    <m>.weight.absmax                         uint8 (ceil(n/blocksize),): 8-bit codes of the block
                                              absmaxes (double quantization; float32 without)
    <m>.weight.quant_map                      float32 (16,): the NF4 levels
    <m>.weight.nested_absmax                  float32 (ceil(blocks/256),): one scale per 256 codes
    <m>.weight.nested_quant_map               float32 (256,): the signed dynamic map of the codes
    <m>.weight.quant_state.bitsandbytes__nf4  uint8: UTF-8 JSON of quant_type, blocksize, dtype (of
                                              the dequantized weight), shape, nested_blocksize,
                                              nested_dtype and nested_offset (the absmaxes' mean)

config.json's ``quantization_config`` tells transformers to build ``Linear4bit`` layers for every
linear except those named in ``llm_int8_skip_modules``, which hold plain float weights.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
from torch import nn

from minift.nf4.format import NF4Weight
from minift.nf4.linear import NF4Linear, _skipped
from minift.nf4.quantize import check_weight

# The serialized pieces next to a `<linear>.weight` of dtype uint8 (the keys to_bnb_state_dict adds).
BNB_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__nf4")
# The pieces of a weight without double quantization (keyed as bnb_piece names them).
UNNESTED_PIECES = frozenset({"weight"} | {f"weight.{s}" for s in BNB_SUFFIXES if not s.startswith("nested")})
# What save_model(quantization="nf4") keeps in float, as quantize_model's default does.
FLOAT_MODULES = ("lm_head",)


def bnb_piece(name: str) -> Optional[tuple[str, str]]:
    """(module path, "weight.<suffix>") when ``name`` is one of the serialized pieces, else None."""
    for suffix in BNB_SUFFIXES:
        if name.endswith(".weight." + suffix):
            return name[: -len(".weight." + suffix)], "weight." + suffix
    return None


def bnb_state_dict(model: nn.Module, state: dict[str, torch.Tensor],
                   quantize: Callable[[torch.Tensor], NF4Weight]) -> tuple[dict[str, torch.Tensor], dict]:
    """``state`` (the model's float state dict, on the CPU) with every linear weight in NF4 form,
    and the ``quantization_config`` for config.json.

    `NF4Linear` layers are written as they are (their state dict already uses bitsandbytes'
    names); every other ``nn.Linear`` outside `FLOAT_MODULES` is quantized with ``quantize``, the
    layers quantize_model would convert. The model itself is not changed. Tensors keep the order
    of ``state``, so one layer's pieces stay together when the checkpoint is sharded.
    """
    check_bnb_saveable(model)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear | NF4Linear)}
    targets = {f"{name}.weight" for name, m in layers.items()
               if type(m) is nn.Linear and not _skipped(name, FLOAT_MODULES)}
    out, dtypes = {}, []
    for key, t in state.items():
        if key in targets:
            check_weight(t, "save_model", f"layer {key[:-len('.weight')]!r} weight")
            q = quantize(t)
            dtypes.append(q.dtype)
            out.update(q.to_bnb_state_dict(key))
        else:
            out[key] = t
    for m in layers.values():
        if isinstance(m, NF4Linear):
            dtypes.append(m.compute_dtype or m.weight_dtype)
    kept = [name for name, m in layers.items() if type(m) is nn.Linear and f"{name}.weight" not in targets]
    double = all(m.offset is not None for m in layers.values() if isinstance(m, NF4Linear))
    return _unshared(out), quantization_config(dtypes, kept, double)


def check_bnb_saveable(model: nn.Module) -> None:
    """Raise a one-line ValueError for a layer whose weight is quantized, but not as an `NF4Linear`."""
    for name, m in model.named_modules():
        if type(m) is NF4Linear:
            continue
        own = list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False))
        odd = [key for key, t in own if t is not None and not (t.is_floating_point() and t.itemsize >= 2)]
        if isinstance(m, NF4Linear) or odd:
            hint = "; call its to_nf4_linear() on the full layer first" if hasattr(m, "to_nf4_linear") else ""
            raise ValueError(f"layer {name!r} is a {type(m).__name__} holding a non-float weight; "
                             f"save_model(quantization='nf4') writes NF4Linear and float layers only{hint}")


def quantization_config(dtypes: Iterable[torch.dtype], skip: list[str], double_quant: bool) -> dict:
    """transformers' ``BitsAndBytesConfig`` fields for a pre-quantized NF4 checkpoint.

    ``bnb_4bit_compute_dtype`` is the layers' compute dtype (their weight's dtype where they set
    none) when they agree, else float32; ``llm_int8_skip_modules`` names every linear stored in
    float, by full path, which transformers matches from the start of a module's name.
    """
    found = set(dtypes)
    compute = found.pop() if len(found) == 1 else torch.float32
    return {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
            "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": double_quant,
            "bnb_4bit_compute_dtype": str(compute).removeprefix("torch."),
            "bnb_4bit_quant_storage": "uint8", "llm_int8_skip_modules": sorted(skip)}


def _unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each tensor with storage of its own: layers share their code books, and safetensors refuses
    to write tensors that alias one another."""
    seen: set[int] = set()
    out = {}
    for key, t in state.items():
        ptr = t.untyped_storage().data_ptr()
        out[key] = t.clone() if ptr in seen else t.contiguous()
        seen.add(ptr)
    return out
