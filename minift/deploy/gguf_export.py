"""Export a minift model as one GGUF file that llama.cpp and Ollama run, in pure Python.

Every weight is converted the moment the writer reaches it (dequantized from NF4 if it is stored
so, rows permuted for llama's attn_q / attn_k, quantized to the type `minift.gguf.mix` picks), so
beyond the model the export holds about one tensor in float32 and its encoded bytes.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

from minift.files import reporting_write_errors
from minift.gguf import mix, quants
from minift.gguf.format import FLOAT32, UINT32, Field, TensorData, read_gguf, write_gguf
from minift.models.config import ModelConfig, rope_type
from minift.models.context import context_length
from minift.models.gguf_loading import PERMUTED_ARCHITECTURES, gguf_name, permute_qk
from minift.models.gguf_tokenizer import gguf_tokenizer_metadata
from minift.models.llama import Llama
from minift.models.loading import load_model
from minift.models.rope import original_length, rope_inv_freq
from minift.models.tokenizer import Tokenizer, load_tokenizer

QUANTS = tuple(mix.QUANTS)
# general.file_type: llama.cpp's name for the file's dominant type (llama_ftype)
FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q4_k_m": 15, "q6_k": 18, "bf16": 32}
QUANTIZATION_VERSION = 2  # the block layouts of ggml's current quantizations


def check_quant(quant: str) -> str:
    if quant not in QUANTS:
        raise ValueError(f"unknown GGUF quant {quant!r}; choose one of {', '.join(QUANTS)}")
    return quant


def _weights(model: Llama) -> dict[str, Callable[[], torch.Tensor]]:
    """Hugging Face parameter name -> a function giving that weight in float32 on the CPU
    (NF4 weights dequantized then, not now)."""
    lora = [n for n, _ in model.named_parameters() if "lora_" in n]
    if lora:
        raise ValueError(f"model has LoRA adapters (e.g. {lora[0]!r}); call minift.merge_lora(model) "
                         f"first so the file holds the merged weights")
    out: dict[str, Callable[[], torch.Tensor]] = {}
    for path, module in model.named_modules():
        prefix = f"{path}." if path else ""
        if hasattr(module, "dequantize") and not isinstance(module, (nn.Linear, nn.Embedding)):
            out[prefix + "weight"] = lambda m=module: m.dequantize(torch.float32)
        for leaf, p in module.named_parameters(recurse=False):
            if prefix + leaf not in out and p.is_floating_point():
                out[prefix + leaf] = lambda p=p: p.detach()
    out = {n: (lambda get=get: get().to("cpu", torch.float32)) for n, get in out.items()}
    if model.config.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def _rope_metadata(model: Llama, arch: str) -> tuple[dict[str, Any], Optional[TensorData]]:
    """llama.cpp's rope.scaling keys for linear and yarn; Llama 3.1's llama3 scaling as the
    rope_freqs tensor of per-frequency divisors that llama.cpp multiplies the wavelengths by."""
    config = model.config
    kind, scaling = rope_type(config), config.rope_scaling or {}
    if kind == "default":
        return {}, None
    if kind == "llama3":
        plain = rope_inv_freq(dataclasses.replace(config, rope_scaling=None), "cpu")
        factors = (plain / rope_inv_freq(config, "cpu")).numpy().astype(np.float32)
        return {}, TensorData("rope_freqs.weight", factors.shape, "F32", factors)
    if kind not in ("linear", "yarn"):
        raise ValueError(f"rope_scaling type {kind!r} has no llama.cpp equivalent; llama.cpp runs "
                         f"linear, yarn and llama3 scaling")
    unsupported = [k for k in ("attention_factor", "mscale", "mscale_all_dim") if scaling.get(k) is not None]
    if unsupported:
        raise ValueError(f"rope_scaling {', '.join(unsupported)} cannot be written to GGUF yet")
    meta = {f"{arch}.rope.scaling.type": kind, f"{arch}.rope.scaling.factor": float(scaling["factor"]),
            f"{arch}.rope.scaling.original_context_length": Field(original_length(config), UINT32)}
    for key in ("beta_fast", "beta_slow"):
        if scaling.get(key) is not None:
            meta[f"{arch}.rope.scaling.yarn_{key}"] = float(scaling[key])
    return meta, None


def _model_metadata(model: Llama, arch: str, quant: str, name: str) -> dict[str, Any]:
    c = model.config
    meta = {"general.architecture": arch, "general.name": name,
            "general.file_type": Field(FILE_TYPES[quant], UINT32),
            "general.quantization_version": Field(QUANTIZATION_VERSION, UINT32),
            f"{arch}.context_length": Field(context_length(c), UINT32),
            f"{arch}.embedding_length": Field(c.hidden_size, UINT32),
            f"{arch}.block_count": Field(c.num_hidden_layers, UINT32),
            f"{arch}.feed_forward_length": Field(c.intermediate_size, UINT32),
            f"{arch}.attention.head_count": Field(c.num_attention_heads, UINT32),
            f"{arch}.attention.head_count_kv": Field(c.num_key_value_heads, UINT32),
            f"{arch}.rope.freq_base": Field(float(c.rope_theta), FLOAT32),
            f"{arch}.rope.dimension_count": Field(c.head_dim, UINT32),
            f"{arch}.attention.layer_norm_rms_epsilon": Field(float(c.rms_norm_eps), FLOAT32),
            f"{arch}.vocab_size": Field(c.vocab_size, UINT32)}
    if c.head_dim * c.num_attention_heads != c.hidden_size:  # llama.cpp assumes hidden / heads otherwise
        meta[f"{arch}.attention.key_length"] = Field(c.head_dim, UINT32)
        meta[f"{arch}.attention.value_length"] = Field(c.head_dim, UINT32)
    return meta


def _tokenizer_for(model: Llama, source: Optional[str], tokenizer) -> Tokenizer:
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    folder = tokenizer or source or getattr(model, "name_or_path", None)
    if folder is None:
        raise ValueError("export_gguf needs the tokenizer (llama.cpp reads it from the file): pass "
                         "tokenizer= (a minift Tokenizer or the folder holding tokenizer.json)")
    return load_tokenizer(folder)


def export_gguf(model_or_path, path: str | os.PathLike, quant: str = "q4_k_m",
                tokenizer: Optional[Tokenizer | str | os.PathLike] = None,
                name: Optional[str] = None) -> dict:
    """Write a model as a GGUF file for llama.cpp / Ollama.

    Args:
        model_or_path: a minift Llama (plain, NF4 or merged; not with unmerged LoRA adapters), or
            a Hugging Face checkpoint folder, loaded in the dtype its config.json declares.
        path: the .gguf file to write (atomically: a finished file or none).
        quant: "q4_k_m" (Q4_K with Q6_K where llama.cpp's Q4_K_M mix puts it), "q8_0", "q4_0", "q4_1",
            "q6_k", "f16", "bf16" or "f32"; norms stay F32 and tensors whose rows do not fill a
            block fall back as `minift.gguf.mix.plan_types` decides.
        tokenizer: a minift Tokenizer or its folder; default the checkpoint folder (the model's
            `name_or_path` for a model). Only byte-level BPE tokenizers are written so far.
        name: general.name (default: the folder or file name).

    Returns:
        {"path", "quant", "bytes" (file size), "parameters", "tensor_bytes", "bits_per_weight"
        (tensor bytes * 8 / parameters), "types" (ggml type -> tensor count)}.
    """
    check_quant(quant)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"output folder {folder} does not exist")
    source = None
    if isinstance(model_or_path, (str, os.PathLike)):
        source = os.fspath(model_or_path)
        model = load_for_export(source)
    elif isinstance(model_or_path, Llama):
        model = model_or_path
    else:
        raise TypeError(f"export_gguf: expected a minift Llama or a checkpoint folder, got "
                        f"{type(model_or_path).__name__}")
    config = model.config
    arch = "qwen2" if config.model_type == "qwen2" else "llama"  # Mistral runs as llama in llama.cpp
    rope_meta, rope_tensor = _rope_metadata(model, arch)
    tok = _tokenizer_for(model, source, tokenizer)
    default_name = os.path.basename(os.path.normpath(source or getattr(model, "name_or_path", "") or "model"))
    default_name = default_name.removesuffix(".gguf")
    meta = _model_metadata(model, arch, quant, name or default_name)
    meta.update(rope_meta)
    meta.update(gguf_tokenizer_metadata(tok, config.vocab_size))
    weights = {gguf_name(n): (n, get) for n, get in _weights(model).items()}
    order = sorted(weights, key=_file_order)
    shapes = {g: tuple(_shape(model, weights[g][0])) for g in order}
    types = mix.plan_types(shapes, config.num_hidden_layers, quant)
    permuted = arch in PERMUTED_ARCHITECTURES
    tensors = [rope_tensor] if rope_tensor is not None else []
    for g in order:
        heads = (config.num_attention_heads if ".attn_q." in g else
                 config.num_key_value_heads if ".attn_k." in g else None)
        tensors.append(TensorData(g, shapes[g], types[g],
                                  _encoder(weights[g][1], types[g], heads if permuted else None)))
    needed = sum(quants.nbytes(types[g], shapes[g]) for g in order)  # the tensor data, about the file
    with reporting_write_errors(f"writing {path}", folder, needed=needed):
        write_gguf(path, meta, tensors)
    return _summary(path, quant)


def load_for_export(folder: str) -> Llama:
    """A checkpoint folder loaded in the dtype its config.json declares: exact, and half the
    memory of float32 for the usual bf16 checkpoints (each tensor becomes float32 when written)."""
    return load_model(folder, dtype=ModelConfig.from_json(folder).torch_dtype)


def _shape(model: Llama, name: str) -> torch.Size:
    module_path, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_path)
    if leaf == "weight" and hasattr(module, "out_features") and not isinstance(module, nn.Linear):
        return torch.Size((module.out_features, module.in_features))  # NF4: packed bytes stored
    return getattr(module, leaf).shape


def _file_order(name: str) -> tuple:
    """llama.cpp's converter order: embeddings, then each block, then the final norm and head."""
    if name.startswith("blk."):
        return (1, int(name.split(".")[1]), name)
    return (0 if name == "token_embd.weight" else 2, 0, name)


def _encoder(get: Callable[[], torch.Tensor], qtype: str, heads: Optional[int]) -> Callable[[], np.ndarray]:
    def encode() -> np.ndarray:
        w = get().numpy()
        if heads is not None:
            w = permute_qk(w, heads)
        return quants.quantize(np.ascontiguousarray(w, dtype=np.float32), qtype)
    return encode


def _summary(path, quant: str) -> dict:
    f = read_gguf(path)
    params = sum(int(np.prod(t.shape)) for t in f.tensors.values())
    data = sum(t.nbytes for t in f.tensors.values())
    types: dict[str, int] = {}
    for t in f.tensors.values():
        types[t.type_name] = types.get(t.type_name, 0) + 1
    return {"path": os.fspath(path), "quant": quant, "bytes": os.path.getsize(path), "parameters": params,
            "tensor_bytes": data, "bits_per_weight": 8 * data / params, "types": types}
