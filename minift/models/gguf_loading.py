"""Load a GGUF file (llama.cpp's format) as a minift Llama, and the name and layout rules both ways.

The architecture comes from the `<arch>.*` metadata llama.cpp writes (llama and qwen2; Mistral
files carry arch "llama"), the weights from the tensor table, dequantized one tensor at a time
into `dtype`, or straight into NF4 with ``quantize="nf4"`` (the same filler as `load_model`).

llama.cpp's converter reorders the rows of each llama attn_q / attn_k head: Hugging Face rotates
the two halves of a head (element i with i + d/2), ggml rotates adjacent pairs (2i with 2i + 1),
so the converter moves row i + d/2 next to row i. `unpermute_qk` undoes that on load and
`permute_qk` redoes it on export. qwen2 files keep the Hugging Face order.
"""
from __future__ import annotations

import os
import re
from typing import Optional

import numpy as np
import torch

from minift.gguf import quants
from minift.gguf.format import GGUFFile, read_gguf
from minift.models.config import ModelConfig
from minift.models.llama import Llama
from minift.models.loading import _Filler

ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}  # GGUF general.architecture -> model_type
PERMUTED_ARCHITECTURES = ("llama",)
# GGUF tensor name -> minift parameter name; {} is the layer index
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias", "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight", "ffn_gate.bias": "mlp.gate_proj.bias",
    "ffn_up.bias": "mlp.up_proj.bias", "ffn_down.bias": "mlp.down_proj.bias",
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_TO_GGUF = {v: k for k, v in _LAYER_NAMES.items()}
_LAYER = re.compile(r"blk\.(\d+)\.(.+)")
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")


def minift_name(gguf_name: str) -> Optional[str]:
    """The minift parameter a GGUF tensor fills ("blk.3.attn_q.weight" ->
    "model.layers.3.self_attn.q_proj.weight"); None for a name minift has no place for."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _LAYER.fullmatch(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    return None


def gguf_name(name: str) -> str:
    """The GGUF tensor name of a minift parameter (the inverse of `minift_name`)."""
    for g, n in _GLOBAL_NAMES.items():
        if n == name:
            return g
    m = _HF_LAYER.fullmatch(name)
    if m and m.group(2) in _TO_GGUF:
        return f"blk.{m.group(1)}.{_TO_GGUF[m.group(2)]}"
    raise ValueError(f"parameter {name!r} has no GGUF tensor name")


def _head_rows(w: np.ndarray, heads: int, forward: bool) -> np.ndarray:
    rows = w.shape[0]
    if rows % (2 * heads):
        raise ValueError(f"{rows} rows do not split into {heads} heads of an even size")
    half = rows // heads // 2
    # forward: head rows [first half | second half] -> interleaved pairs; backward: the reverse
    split = (heads, 2, half) if forward else (heads, half, 2)
    return w.reshape(*split, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_qk(w: np.ndarray, heads: int) -> np.ndarray:
    """Hugging Face row order of a q/k weight (or bias) -> llama.cpp's (`heads` of this tensor)."""
    return _head_rows(w, heads, forward=True)


def unpermute_qk(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's row order of a llama attn_q / attn_k tensor -> Hugging Face's."""
    return _head_rows(w, heads, forward=False)


def _key(f: GGUFFile, key: str, kinds, default=None, required=True):
    value = f.metadata.get(key, default)
    if value is None and required:
        raise ValueError(f"{f.path}: metadata {key!r} is missing")
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    if value is not None and (not isinstance(value, kinds) or isinstance(value, bool) and bool not in kinds):
        raise ValueError(f"{f.path}: metadata {key!r} has {value!r}, of the wrong type")
    return value


def _rope_scaling(f: GGUFFile, arch: str) -> Optional[dict]:
    """rope_scaling from llama.cpp's `<arch>.rope.scaling.*` keys (linear and yarn)."""
    if "rope_freqs.weight" in f.tensors:
        raise ValueError(f"{f.path}: tensor 'rope_freqs.weight' (per-frequency RoPE factors, as llama.cpp "
                         f"writes Llama 3.1's llama3 scaling) is not supported yet")
    kind = _key(f, f"{arch}.rope.scaling.type", str, "none")
    if kind == "none":
        return None
    factor = _key(f, f"{arch}.rope.scaling.factor", (int, float))
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn":
        scaling = {"rope_type": "yarn", "factor": float(factor)}
        original = _key(f, f"{arch}.rope.scaling.original_context_length", int, required=False)
        if original is not None:
            scaling["original_max_position_embeddings"] = original
        for key in ("beta_fast", "beta_slow"):
            value = _key(f, f"{arch}.rope.scaling.yarn_{key}", (int, float), required=False)
            if value is not None:
                scaling[key] = float(value)
        return scaling
    raise ValueError(f"{f.path}: metadata '{arch}.rope.scaling.type' is {kind!r}; supported: none, "
                     f"linear, yarn")


def _token_id(f: GGUFFile, role: str) -> Optional[int]:
    return _key(f, f"tokenizer.ggml.{role}_token_id", int, required=False)


def gguf_config(f: GGUFFile, dtype: torch.dtype = torch.float32) -> ModelConfig:
    """The ModelConfig a GGUF file's metadata and tensor table describe."""
    arch = _key(f, "general.architecture", str)
    if arch not in ARCHITECTURES:
        raise ValueError(f"{f.path}: general.architecture {arch!r} is not supported; supported: "
                         f"{', '.join(ARCHITECTURES)}")
    if "token_embd.weight" not in f.tensors:
        raise ValueError(f"{f.path}: tensor 'token_embd.weight' is missing")
    heads = _key(f, f"{arch}.attention.head_count", int)
    hidden = _key(f, f"{arch}.embedding_length", int)
    head_dim = _key(f, f"{arch}.attention.key_length", int, required=False) or hidden // heads
    d = {"model_type": ARCHITECTURES[arch],
         "vocab_size": f.tensors["token_embd.weight"].shape[0], "hidden_size": hidden,
         "intermediate_size": _key(f, f"{arch}.feed_forward_length", int),
         "num_hidden_layers": _key(f, f"{arch}.block_count", int), "num_attention_heads": heads,
         "num_key_value_heads": _key(f, f"{arch}.attention.head_count_kv", int, heads),
         "head_dim": head_dim,
         "max_position_embeddings": _key(f, f"{arch}.context_length", int),
         "rms_norm_eps": float(_key(f, f"{arch}.attention.layer_norm_rms_epsilon", (int, float))),
         "rope_theta": float(_key(f, f"{arch}.rope.freq_base", (int, float), 10000.0)),
         "rope_scaling": _rope_scaling(f, arch),
         "tie_word_embeddings": "output.weight" not in f.tensors,
         "attention_bias": "blk.0.attn_q.bias" in f.tensors,
         "bos_token_id": _token_id(f, "bos"), "eos_token_id": _token_id(f, "eos"),
         "pad_token_id": _token_id(f, "padding"),
         "torch_dtype": str(dtype).removeprefix("torch.")}
    return ModelConfig.from_hf_dict(d, source=f.path)


def _dequantized(f: GGUFFile, name: str, heads: int, permuted: bool) -> torch.Tensor:
    info = f.tensors[name]
    try:
        qtype = quants.type_name(info.type_id)
    except ValueError:
        raise ValueError(f"{f.path}: tensor {name!r} is {info.type_name}, which minift cannot "
                         f"dequantize; supported: {', '.join(quants.TYPES)}") from None
    w = quants.dequantize(f.raw(name), qtype, info.shape)
    if permuted:
        w = unpermute_qk(w, heads)
    return torch.from_numpy(w)


def load_gguf_model(path: str | os.PathLike, dtype: torch.dtype, device, quantize: Optional[str]) -> Llama:
    """The body of `load_model` for a .gguf file (arguments checked there)."""
    f = read_gguf(path)
    config = gguf_config(f, dtype)
    with torch.device("meta"):
        model = Llama(config)
    filler = _Filler(model, dtype, device, quantize == "nf4")
    arch = f.metadata["general.architecture"]
    for name in f.tensors:
        target = minift_name(name)
        if target is None:
            raise ValueError(f"{f.path}: tensor {name!r} has no place in a {arch} model")
        kind = re.match(r"blk\.\d+\.attn_([qk])\.", name)
        permuted = kind is not None and arch in PERMUTED_ARCHITECTURES
        heads = config.num_attention_heads if kind and kind.group(1) == "q" else config.num_key_value_heads
        try:
            filler.add(target, _dequantized(f, name, heads, permuted))
        except ValueError as e:
            raise ValueError(f"{f.path}: {e}") from None
    try:
        filler.finish()
    except ValueError as e:  # a missing tensor: say which file lacks it
        raise ValueError(f"{f.path}: {e}") from None
    model.name_or_path = os.path.abspath(path)
    return model.eval()
