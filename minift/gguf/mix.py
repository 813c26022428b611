"""Which GGUF type each tensor gets: llama.cpp's per-tensor rules for Q4_K_M and the plain types.

The rules follow ``llama_tensor_get_type`` in llama.cpp's src/llama-quant.cpp (the function
``llama-quantize`` runs for each tensor), for a dense Llama-family model:

- norms and every 1-D tensor stay F32 (llama.cpp quantizes only tensors of 2 or more dims);
- output.weight (or token_embd.weight when the model ties it to the output and has no
  output.weight) gets Q6_K, unless the type is Q8_0 or a float type, which it keeps;
- Q4_K_M: attn_v and ffn_down get Q6_K on the "more bits" layers, the rest Q4_K. Layer i of n
  has more bits when ``i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2`` (llama.cpp's
  ``use_more_bits``): the first and last eighth, and every third layer between;
- a row length that does not fill a type's blocks falls back: Q6_K to Q8_0 (as llama.cpp), Q4_K to
  Q4_1 (llama.cpp takes Q5_0, 5.5 bits per weight, which we do not write; Q4_1, 5.0, is the
  nearest we have, and keeps Q4_K's per-block min), and a row that is not a multiple of 32 to F16.
"""
from __future__ import annotations

import re

from minift.gguf.quants import BLOCKS

QUANTS = {"q4_k_m": "Q4_K", "q8_0": "Q8_0", "q4_0": "Q4_0", "q4_1": "Q4_1", "q6_k": "Q6_K", "f16": "F16",
          "bf16": "BF16", "f32": "F32"}
_FALLBACK = {"Q4_K": "Q4_1", "Q6_K": "Q8_0", "Q4_1": "F16", "Q4_0": "F16", "Q8_0": "F16"}
_LAYER = re.compile(r"^blk\.(\d+)\.")


def use_more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of layers whose attn_v / ffn_down Q4_K_M keeps at Q6_K."""
    eighth = n_layers // 8
    return layer < eighth or layer >= 7 * n_layers // 8 or (layer - eighth) % 3 == 2


def _fits(qtype: str, row: int) -> str:
    """``qtype``, or its fallback chain's first type whose blocks divide the row length."""
    while row % BLOCKS[qtype][0]:
        qtype = _FALLBACK[qtype]
    return qtype


def plan_types(tensors: dict[str, tuple[int, ...]], n_layers: int, quant: str) -> dict[str, str]:
    """The GGUF type of each tensor (GGUF name -> numpy shape) when a model is written as ``quant``."""
    if quant not in QUANTS:
        raise ValueError(f"unknown quantization {quant!r}; choose one of {', '.join(QUANTS)}")
    if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
        raise ValueError(f"n_layers must be a positive int, got {n_layers!r}")
    base = QUANTS[quant]
    tied = "output.weight" not in tensors
    plan = {}
    for name, shape in tensors.items():
        shape = tuple(shape)
        if len(shape) < 2 or "norm" in name:
            plan[name] = "F32"
            continue
        qtype = base
        if base not in ("F32", "F16", "BF16", "Q8_0") and (
                name == "output.weight" or (tied and name == "token_embd.weight")):
            qtype = "Q6_K"
        elif quant == "q4_k_m" and (m := _LAYER.match(name)) and (".attn_v." in name or ".ffn_down." in name):
            layer = int(m.group(1))
            if not 0 <= layer < n_layers:
                raise ValueError(f"{name}: layer {layer} is outside the model's {n_layers} layers")
            if use_more_bits(layer, n_layers):
                qtype = "Q6_K"
        plan[name] = _fits(qtype, shape[-1])
    return plan


def q4_k_m_types(tensors: dict[str, tuple[int, ...]], n_layers: int) -> dict[str, str]:
    """The Q4_K_M mix: `plan_types` with quant ``"q4_k_m"``."""
    return plan_types(tensors, n_layers, "q4_k_m")
