"""Read and write Hugging Face checkpoints: config.json plus (sharded) safetensors.

Loading builds the model on the meta device (no memory, no random init) and fills it tensor by
tensor from `safe_open`, so the full-precision checkpoint never sits in memory at once. With
quantize="nf4" each linear weight is quantized the moment it is read, a slice at a time, which
bounds the peak at the quantized model plus about one full-precision tensor as stored in the
checkpoint. Nothing is ever unpickled.
"""
from __future__ import annotations

import contextlib
import os
import re
import tempfile
import warnings
from typing import Iterator, Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from minift.files import file_mode, read_json, write_json
from minift.models.config import ModelConfig
from minift.models.llama import Llama
from minift.nf4 import quantize as nf4
from minift.nf4.bnb_format import BNB_SUFFIXES, UNNESTED_PIECES, bnb_piece, bnb_state_dict
from minift.nf4.format import MissingKeyError
from minift.nf4.linear import NF4Linear
from minift.quantmaps import nf4_code
from minift.sizes import parse_bytes

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Old Llama checkpoints store RoPE tables; they are recomputed from the config.
IGNORED_KEYS = re.compile(r".*\.rotary_emb\.inv_freq$")
# Elements of a weight quantized at once on load. quantize_nf4 holds several float32 copies of
# its input (about 16 bytes per element); slices of 64K elements keep that near 1 MB instead of
# 7x the largest weight. A multiple of 2 * blocksize, so slices hold whole blocks and whole bytes.
QUANT_SLICE = 1 << 16
NF4_BLOCKSIZE = 64


def load_model(path: str | os.PathLike, dtype: torch.dtype = torch.bfloat16, device=None,
               quantize: Optional[str] = None) -> Llama:
    """Load a Hugging Face Llama/Mistral/Qwen2 checkpoint directory.

    Args:
        path: directory with config.json and model.safetensors (or the sharded files and
            model.safetensors.index.json), or a llama.cpp .gguf file (minift.models.gguf_loading).
        dtype: dtype of the weights that stay in floating point (and NF4 compute dtype).
        device: where the weights go (default cpu).
        quantize: None, or "nf4" to quantize every linear weight except lm_head while loading.
            Checkpoints already stored in bitsandbytes' NF4 form ("-bnb-4bit") load quantized
            whatever this says.

    Returns:
        A `minift.models.llama.Llama` in eval mode.
    """
    path = os.fspath(path)
    if quantize not in (None, "nf4"):
        raise ValueError(f"quantize must be None or 'nf4', got {quantize!r}")
    dtype = as_dtype(dtype)
    if path.endswith(".gguf") and not os.path.isdir(path):  # llama.cpp's single-file format
        from minift.models.gguf_loading import load_gguf_model  # imports this module
        return load_gguf_model(path, dtype, torch.device(device if device is not None else "cpu"), quantize)
    if not os.path.isdir(path):
        raise FileNotFoundError(_not_a_folder(path))
    config_path = os.path.join(path, "config.json")
    config = ModelConfig.from_json(config_path)
    device = torch.device(device if device is not None else "cpu")
    with torch.device("meta"):
        try:
            model = Llama(config)
        except ValueError as e:  # e.g. a rope_type the model does not implement
            raise ValueError(f"{config_path}: {e}") from None
    filler = _Filler(model, dtype, device, quantize == "nf4")
    for file, name, tensor in _read_tensors(path):
        try:
            filler.add(name, tensor)
        except ValueError as e:  # a wrong shape or dtype: say which file holds the tensor
            raise ValueError(f"{file}: {e}") from None
        # Drop the reference now: a quantized weight's full-precision tensor would otherwise live
        # on while the next one is read, two such tensors at the peak instead of one.
        del tensor
    filler.finish()
    # what save_adapter records as base_model_name_or_path, so PEFT finds the base offline
    model.name_or_path = os.path.abspath(path)
    return model.eval()


def as_dtype(dtype) -> torch.dtype:
    """A floating torch dtype from itself or its name ("bfloat16", "torch.float16", "fp32")."""
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    names = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16",
             "float": "float32"}
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.").lower()
        value = getattr(torch, names.get(name, name), None)
        if isinstance(value, torch.dtype) and value.is_floating_point:
            return value
    raise ValueError(f"dtype must be a floating torch dtype or its name (float32, bfloat16, "
                     f"float16), got {dtype!r}")


def _not_a_folder(path: str) -> str:
    if os.path.exists(path):
        return f"{path} is a file; a checkpoint is a folder with config.json and *.safetensors"
    hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", path) and not path.startswith(".")
    if hub_id:
        return (f"{path!r} is not a folder: minift reads checkpoints from local folders (config.json "
                f"+ *.safetensors, as on the Hugging Face Hub); download it first, e.g. "
                f"`huggingface-cli download {path} --local-dir {path.split('/')[-1]}`, then pass "
                f"that folder")
    return f"checkpoint folder {path} does not exist"


def _weight_files(path: str) -> list[str]:
    index = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index):
        try:
            weight_map = read_json(index, expect=dict)["weight_map"]
            files = sorted(set(weight_map.values()))
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index}: not a valid safetensors index ({e!r})") from None
        for name in files:
            if not os.path.isfile(os.path.join(path, name)):
                raise FileNotFoundError(f"shard {name} named in {index} does not exist")
        return [os.path.join(path, name) for name in files]
    single = os.path.join(path, SINGLE_FILE)
    if os.path.isfile(single):
        return [single]
    raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path} (only safetensors "
                            f"checkpoints are read; pickled .bin files are not)")


def _read_tensors(path: str) -> Iterator[tuple[str, str, torch.Tensor]]:
    """(file, tensor name, tensor) of every tensor of the checkpoint."""
    for file in _weight_files(path):
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                for name in f.keys():
                    yield file, name, f.get_tensor(name)
        except SafetensorError as e:
            raise ValueError(f"{file}: truncated or corrupt safetensors file ({e})") from None


class _Filler:
    """Moves checkpoint tensors into a meta-device model, quantizing linears when asked."""

    def __init__(self, model: Llama, dtype, device, quantize: bool):
        self.model, self.dtype, self.device, self.quantize = model, dtype, device, quantize
        self.expected = {n: tuple(p.shape) for n, p in model.named_parameters()}
        self.loaded: set[str] = set()
        self.pending: dict[str, dict[str, torch.Tensor]] = {}  # bnb pieces by module path
        self.unexpected: list[str] = []
        self.tied_head: Optional[torch.Tensor] = None  # a stored lm_head beside tied embeddings
        self.declared = model.config.torch_dtype
        self.other_dtypes: dict[str, str] = {}  # tensor name -> stored dtype unlike the declared

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if IGNORED_KEYS.match(name):
            return
        if tensor.is_floating_point():
            self._check_values(name, tensor)
        if name == "lm_head.weight" and self.model.config.tie_word_embeddings:
            self.tied_head = tensor  # tied: the embedding is the head; compared in finish()
            return
        module_path, _, leaf = name.rpartition(".")
        bnb_leaf = bnb_piece(name)
        if bnb_leaf is not None:
            self._add_bnb_piece(*bnb_leaf, tensor)
        elif name not in self.expected:
            self.unexpected.append(name)
        elif leaf == "weight" and tensor.dtype == torch.uint8:
            self._add_bnb_piece(module_path, "weight", tensor)
        elif not tensor.is_floating_point():
            raise ValueError(f"tensor {name!r} has dtype {str(tensor.dtype).removeprefix('torch.')} "
                             f"in the checkpoint; weights must be floating point (or bitsandbytes' "
                             f"uint8 NF4 weights with their quantization tensors)")
        else:
            self._check_shape(name, tuple(tensor.shape))
            self._set(module_path, leaf, tensor)

    def _check_values(self, name: str, tensor: torch.Tensor) -> None:
        # A NaN or Inf in a base weight trains into NaN at the first step, which then reads as a
        # learning-rate problem; it is the checkpoint's, so say so here, naming the tensor.
        # checked a slice at a time: the check must not hold a second weight-sized tensor
        if not all(bool(torch.isfinite(part).all()) for part in tensor.reshape(-1).split(QUANT_SLICE)):
            bad = sum(int((~torch.isfinite(part)).sum()) for part in tensor.reshape(-1).split(QUANT_SLICE))
            raise ValueError(f"tensor {name!r} holds {bad} NaN or Inf value(s) of "
                             f"{tensor.numel()}; the checkpoint is damaged")
        stored = str(tensor.dtype).removeprefix("torch.")
        if stored != self.declared:
            self.other_dtypes[name] = stored

    def _check_shape(self, name, shape):
        if shape != self.expected[name]:
            raise ValueError(f"tensor {name!r} has shape {shape} in the checkpoint but the model "
                             f"built from config.json expects {self.expected[name]}")

    def _set(self, module_path: str, leaf: str, tensor: torch.Tensor) -> None:
        module = self.model.get_submodule(module_path)
        quantizable = (leaf == "weight" and isinstance(module, nn.Linear)
                       and module_path != "lm_head")
        if self.quantize and quantizable:
            bias = module.bias if module.bias is not None and not module.bias.is_meta else None
            weight = quantize_in_slices(tensor, self.dtype, self.device)
            self._replace(module_path, NF4Linear(weight, bias=bias, compute_dtype=self.dtype))
            self.loaded.add(f"{module_path}.{leaf}")
            return
        if tensor.is_floating_point():
            tensor = tensor.to(self.device, self.dtype)
        # A bias may arrive after its weight was quantized; NF4Linear keeps it frozen.
        frozen = not isinstance(module, (nn.Linear, nn.Embedding)) and hasattr(module, "dequantize")
        setattr(module, leaf, nn.Parameter(tensor, requires_grad=not frozen))
        self.loaded.add(f"{module_path}.{leaf}")

    def _replace(self, module_path: str, new: nn.Module) -> None:
        parent_path, _, child = module_path.rpartition(".")
        setattr(self.model.get_submodule(parent_path), child, new)

    def _add_bnb_piece(self, module_path: str, key: str, tensor: torch.Tensor) -> None:
        pieces = self.pending.setdefault(module_path, {})
        pieces[key] = tensor
        if len(pieces) == 1 + len(BNB_SUFFIXES):
            self._build_bnb_linear(module_path, self.pending.pop(module_path))

    def _build_bnb_linear(self, module_path: str, pieces: dict) -> None:
        if f"{module_path}.weight" not in self.expected:
            self.unexpected.extend(f"{module_path}.{k}" for k in sorted(pieces))
            return
        module = self.model.get_submodule(module_path)
        bias = module.bias if module.bias is not None and not module.bias.is_meta else None
        layer = NF4Linear.from_bnb_state_dict(pieces, prefix="", bias=bias,
                                              compute_dtype=self.dtype)
        want = self.expected[f"{module_path}.weight"]
        if (layer.out_features, layer.in_features) != want:
            raise ValueError(f"tensor '{module_path}.weight' has shape "
                             f"{(layer.out_features, layer.in_features)} in the checkpoint but the "
                             f"model built from config.json expects {want}")
        self._replace(module_path, layer.to(self.device))
        self.loaded.add(f"{module_path}.weight")

    def finish(self) -> None:
        for module_path in [m for m, p in self.pending.items() if set(p) == UNNESTED_PIECES]:
            # no nested pieces come without double quantization; the quant state says if it has one
            with contextlib.suppress(MissingKeyError):
                self._build_bnb_linear(module_path, self.pending[module_path])
                del self.pending[module_path]
        if self.unexpected:
            raise ValueError(f"checkpoint has {len(self.unexpected)} unexpected tensor(s) the model "
                             f"does not have: {_names(self.unexpected)}")
        incomplete = [f"{m}.weight ({', '.join(sorted(p))} only)" for m, p in self.pending.items()]
        if incomplete:
            raise ValueError(f"incomplete bitsandbytes NF4 tensors: {_names(incomplete)}")
        missing = [n for n in self.expected if n not in self.loaded]
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} tensor(s): {_names(missing)}")
        self.model.tie_weights()
        self._check_tied_head()
        self._note_dtypes()

    def _check_tied_head(self) -> None:
        """A stored lm_head beside tie_word_embeddings is dropped only when it is the embedding."""
        head, self.tied_head = self.tied_head, None
        if head is None:
            return
        embed = self.model.get_submodule("model.embed_tokens").weight
        same = tuple(head.shape) == tuple(embed.shape) and torch.equal(
            head.to(embed.device, embed.dtype), embed.detach())
        if not same:
            raise ValueError("config.json sets tie_word_embeddings: true, so the head is the input "
                             "embedding, but the checkpoint holds a different 'lm_head.weight' that "
                             "would go unused; set tie_word_embeddings to false to load that head")

    def _note_dtypes(self) -> None:
        """Tensors stored in another dtype than config.json declares are loaded in the load
        dtype like the rest; one line says which, so a mixed checkpoint is no surprise."""
        if self.other_dtypes and len(self.other_dtypes) < len(self.loaded):
            kinds = sorted(set(self.other_dtypes.values()))
            warnings.warn(f"{len(self.other_dtypes)} tensor(s) are stored as {', '.join(kinds)} while "
                          f"config.json declares {self.declared}: {_names(list(self.other_dtypes))}; "
                          f"all were loaded as {str(self.dtype).removeprefix('torch.')}", stacklevel=3)


def quantize_in_slices(w: torch.Tensor, dtype: torch.dtype, device, blocksize: int = NF4_BLOCKSIZE,
                       slice_size: int = QUANT_SLICE):
    """``quantize_nf4(w.to(device, dtype), blocksize)``, bit for bit, computed a slice at a time.

    Blocks of `blocksize` consecutive elements are quantized independently, so quantizing
    `slice_size`-element pieces of the flattened weight (whole blocks, whole bytes) and
    concatenating gives the same packed bytes and per-block absmax; the double quantization of
    the absmaxes (their mean, then 8-bit blocks of 256) runs once on the whole, as quantize_nf4
    does. Neither a float32 copy of `w` nor quantize_nf4's float32 temporaries of the whole
    tensor ever exist; the extra memory is one slice's working set plus the packed result.
    """
    if slice_size % (2 * blocksize):
        raise ValueError(f"slice_size must be a multiple of 2 * blocksize, got {slice_size}")
    flat = w.detach().reshape(-1)
    n = flat.numel()
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=device)  # filled in place:
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=device)  # no concat copy
    for start in range(0, n, slice_size):
        part = nf4.quantize_nf4(flat[start:start + slice_size].to(device, dtype), blocksize,
                                double_quant=False)
        packed[start // 2:start // 2 + part.packed.shape[0]] = part.packed
        absmax[start // blocksize:start // blocksize + part.absmax.numel()] = part.absmax
    # the same double quantization over the same fp32 absmaxes as quantize_nf4
    return nf4.double_quantize(nf4.NF4Weight(packed=packed, absmax=absmax, shape=torch.Size(w.shape),
                                             dtype=dtype, blocksize=blocksize,
                                             code=nf4_code(packed.device)))


def _names(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def save_model(model: Llama, path: str | os.PathLike, max_shard_size: int | str = "5GB",
               quantization: Optional[str] = None) -> None:
    """Write `model` as a Hugging Face checkpoint (config.json, safetensors shards, index).

    Files are written under temporary names and renamed into place, so an interrupted save never
    leaves a half-written checkpoint that looks complete.

    Args:
        model: a `minift.models.llama.Llama` with merged weights (plain, or NF4 with quantization).
        path: output directory, created if needed; earlier weight files in it are replaced.
        max_shard_size: bytes per shard, as an int or a string like "5GB", "200MB".
        quantization: None writes float weights; "nf4" writes bitsandbytes' 4-bit checkpoint
            (`minift.nf4.bnb_format`): NF4Linear weights as they are, the other linears except
            lm_head quantized first as quantize_model does (the model is not changed).
    """
    if quantization not in (None, "nf4"):
        raise ValueError(f"quantization must be None or 'nf4', got {quantization!r}")
    _check_saveable(model, quantized=quantization == "nf4")
    limit = parse_bytes(max_shard_size, "max_shard_size")
    state = {n: t.detach().to("cpu").contiguous() for n, t in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # stored once, as the embedding
    quant_config = None
    if quantization == "nf4":
        state, quant_config = bnb_state_dict(model, state, lambda w: quantize_in_slices(w, w.dtype, "cpu"))
    shards = _split(state, limit)
    os.makedirs(path, exist_ok=True)
    files = _shard_names(len(shards))
    with tempfile.TemporaryDirectory(dir=path, prefix=".saving-") as tmp:
        for name, shard in zip(files, shards):
            save_file(shard, os.path.join(tmp, name), metadata={"format": "pt"})
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(t.nbytes for t in state.values())},
                     "weight_map": {n: f for f, s in zip(files, shards) for n in s}}
            write_json(os.path.join(tmp, INDEX_FILE), index, sort_keys=True, atomic=False)
        write_json(os.path.join(tmp, "config.json"), _config_dict(model, state, quant_config),
                   sort_keys=True, atomic=False)
        write_json(os.path.join(tmp, "generation_config.json"), _generation_dict(model.config),
                   sort_keys=True, atomic=False)
        _remove_stale_weights(path, keep=set(os.listdir(tmp)))
        for name in sorted(os.listdir(tmp), key=lambda n: n == "config.json"):  # config last
            os.chmod(os.path.join(tmp, name), file_mode())  # the temp dir is owner-only
            os.replace(os.path.join(tmp, name), os.path.join(path, name))


def _check_saveable(model: nn.Module, quantized: bool = False) -> None:
    names = list(model.state_dict())
    lora = [n for n in names if "lora_" in n]
    if lora:
        raise ValueError(f"model has LoRA adapters (e.g. {lora[0]!r}); call minift.merge_lora(model) "
                         f"first to fold them into the base weights, or save just the adapter with "
                         f"minift.save_adapter")
    nf4 = [n for n in names if n.endswith(".weight.absmax")]
    if nf4 and not quantized:
        raise ValueError(f"model has NF4-quantized weights (e.g. {nf4[0][:-len('.absmax')]!r}); "
                         f"pass quantization='nf4' to save them as a bitsandbytes checkpoint, or load "
                         f"the checkpoint without quantize, merge the adapter into it, then save")


def _split(state: dict[str, torch.Tensor], limit: int) -> list[dict[str, torch.Tensor]]:
    # Greedy in state_dict order, so each layer's tensors stay together where they fit; a tensor
    # larger than the limit gets a shard of its own.
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        if shards[-1] and size + t.nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += t.nbytes
    return shards


def _shard_names(n: int) -> list[str]:
    if n == 1:
        return [SINGLE_FILE]
    return [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def _remove_stale_weights(path: str, keep: set[str]) -> None:
    # Shards of an earlier save with another shard count would otherwise sit beside the new ones.
    for name in os.listdir(path):
        stale = name == SINGLE_FILE or name == INDEX_FILE or re.fullmatch(
            r"model-\d{5}-of-\d{5}\.safetensors", name)
        if stale and name not in keep:
            os.remove(os.path.join(path, name))


def _config_dict(model: Llama, state: dict[str, torch.Tensor], quant_config: Optional[dict]) -> dict:
    d = model.config.to_hf_dict()
    d.pop("quantization_config", None)  # an earlier one: the saved weights are plain or as below
    if quant_config is not None:
        d["quantization_config"] = quant_config
    dtypes = {t.dtype for n, t in state.items() if t.is_floating_point() and bnb_piece(n) is None}
    if len(dtypes) == 1:
        d["torch_dtype"] = d["dtype"] = str(dtypes.pop()).removeprefix("torch.")
    return d


def _generation_dict(config: ModelConfig) -> dict:
    d = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}
    if config.pad_token_id is not None:
        d["pad_token_id"] = config.pad_token_id
    return d
