"""Save and load LoRA adapters in PEFT's on-disk format.

A PEFT LoRA adapter is a directory with two files:
``adapter_config.json`` (peft_type "LORA", r, lora_alpha, target_modules, ...) and
``adapter_model.safetensors`` with keys ``base_model.model.<module path>.lora_A.weight`` (r, in)
and ``...lora_B.weight`` (out, r). Because minift's module names equal Hugging Face's, the module
paths need no conversion.

Modules trained whole (``lora_wrap(..., modules_to_save=[...])``) are written as PEFT writes them:
their keys go into the config's ``modules_to_save`` and their tensors into the same file as
``base_model.model.<module path>.weight`` (PEFT strips its ``modules_to_save.default`` wrapper
from the names on saving and puts it back on loading).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from minift.files import atomic_write, read_json, write_json
from minift.lora.layer import (
    SETTINGS_ATTR,
    LoRALinear,
    check_alpha,
    check_dropout,
    check_modules_to_save,
    check_rank,
    find_modules_to_save,
    find_targets,
    is_linear,
    lora_layers,
    lora_state_dict,
    lora_wrap,
    saved_modules,
)
from minift.models.context import ROPE_METADATA_KEY, apply_rope_record, rope_record

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."

# PEFT LoRA features minift does not implement: field -> value meaning "not used"
_UNSUPPORTED = {"use_dora": False, "fan_in_fan_out": False, "rank_pattern": {},
                "alpha_pattern": {}, "layers_to_transform": None,
                "exclude_modules": None, "bias": "none", "lora_bias": False,
                "layer_replication": None, "target_parameters": None,
                "trainable_token_indices": None, "use_qalora": False}


def _uniform(layers, field):
    values = {getattr(m, field) for _, m in layers}
    if len(values) != 1:
        raise ValueError(f"save_adapter: adapters differ in {field} ({sorted(values)}); the PEFT "
                         "format written here needs one value for all layers")
    return values.pop()


def _target_names(model, wrapped):
    """Module-name suffixes for PEFT's target_modules: the last name components when they select
    exactly the wrapped layers, else the full module paths (PEFT accepts both)."""
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in wrapped})
    candidates = {n for n, m in model.named_modules()
                  if n and (is_linear(m) or isinstance(m, LoRALinear))}
    selected = {n for n in candidates if n.rsplit(".", 1)[-1] in suffixes}
    return suffixes if selected == set(wrapped) else sorted(wrapped)


def _saved_keys(model) -> list[str] | None:
    """The config's modules_to_save: the keys given to lora_wrap when they choose exactly the
    modules it trains whole here, else their full names (PEFT's suffix rule matches those alone)."""
    saved = [n for n, _ in saved_modules(model)]
    if not saved:
        return None
    keys = (getattr(model, SETTINGS_ATTR, None) or {}).get("modules_to_save")
    try:
        if keys and find_modules_to_save(model, keys) == saved:
            return list(keys)
    except ValueError:
        pass
    return saved


def adapter_config(model: nn.Module, base_model_name_or_path: Optional[str] = None) -> dict:
    """The adapter_config.json contents describing a LoRA-wrapped model."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("save_adapter: the model has no LoRALinear layers; call minift.lora_wrap")
    dropouts = {float(getattr(m.lora_dropout, "p", 0.0)) for _, m in layers}
    if base_model_name_or_path is None:
        name = getattr(model, "name_or_path", None)
        base_model_name_or_path = name if isinstance(name, str) and name else None
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": _uniform(layers, "r"),
        "lora_alpha": _uniform(layers, "alpha"),
        "lora_dropout": max(dropouts),
        "use_rslora": _uniform(layers, "rslora"),
        "target_modules": _target_names(model, [n for n, _ in layers]),
        "init_lora_weights": True,
        "inference_mode": True,
        "revision": None,
    }
    config.update(_UNSUPPORTED)
    config["modules_to_save"] = _saved_keys(model)
    return config


def save_adapter(model: nn.Module, path: str | os.PathLike,
                 base_model_name_or_path: Optional[str] = None) -> None:
    """Write a LoRA-wrapped model's adapters as a PEFT adapter directory.

    Args:
        model: a model wrapped by ``minift.lora_wrap`` (not merged).
        path: output directory (created if needed); holds adapter_config.json and
            adapter_model.safetensors afterwards.
        base_model_name_or_path: recorded in the config so PEFT can find the base model.
    """
    if any(m.merged for _, m in lora_layers(model)):
        raise ValueError("save_adapter: some adapters are merged into their base weights; call "
                         "unmerge() on them first so the base stays the original")
    write_adapter(path, adapter_config(model, base_model_name_or_path), lora_state_dict(model),
                  model_type=_model_type(model), rope=rope_record(getattr(model, "config", None)))


def write_adapter(path, config: dict, lora_tensors: dict, model_type: Optional[str] = None,
                  rope: Optional[str] = None):
    """Write an adapter directory from its config and its ``...lora_A/B.weight`` tensors, keyed as
    in the model's state_dict (``save_adapter`` and the consolidated distributed export share it).
    `rope`: the stretched RoPE the adapter was trained under (`minift.models.context.rope_record`)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {KEY_PREFIX + k: v.detach().to("cpu").contiguous() for k, v in lora_tensors.items()}
    # the base's architecture rides in the safetensors metadata (adapter_config.json has no
    # field for it): shapes alone cannot tell a llama adapter from a qwen2 one
    metadata = {"format": "pt"}
    if model_type:
        metadata["base_model_type"] = model_type
    if rope:  # PEFT ignores it; load_adapter gives the base the same RoPE (extend_context)
        metadata[ROPE_METADATA_KEY] = rope
    atomic_write(path / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    write_json(path / CONFIG_NAME, config, sort_keys=True)


def read_adapter_config(path: str | os.PathLike) -> dict:
    """Read and check adapter_config.json in ``path``; returns the parsed dict."""
    file = Path(path) / CONFIG_NAME
    if not file.is_file():
        raise ValueError(f"{file}: missing; {path} is not a PEFT adapter directory")
    config = read_json(file, expect=dict)
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{file}: field 'peft_type' must be \"LORA\", "
                         f"got {config.get('peft_type')!r}")
    for field in ("r", "lora_alpha", "target_modules"):
        if field not in config:
            raise ValueError(f"{file}: missing required field {field!r}")
    dropout = config.get("lora_dropout")
    for field, value, check in (("r", config["r"], check_rank),
                                ("lora_alpha", config["lora_alpha"], check_alpha),
                                ("lora_dropout", 0.0 if dropout is None else dropout, check_dropout)):
        try:
            check(value)
        except ValueError as err:
            raise ValueError(f"{file}: field {field!r}: {err}") from None
    # a JSON string such as "yes" or "false" would be truthy: only true/false mean what they say
    if not isinstance(config.get("use_rslora", False), bool):
        raise ValueError(f"{file}: field 'use_rslora' must be true or false, "
                         f"got {config['use_rslora']!r}")
    targets = config["target_modules"]
    if not (isinstance(targets, str) or (isinstance(targets, list)
                                         and all(isinstance(t, str) for t in targets))):
        raise ValueError(f"{file}: field 'target_modules' must be a string or a list of "
                         f"strings, got {targets!r}")
    if config.get("modules_to_save") is not None:
        try:
            check_modules_to_save(config["modules_to_save"])
        except TypeError as err:
            raise ValueError(f"{file}: field 'modules_to_save': {err}") from None
    for field, unused in _UNSUPPORTED.items():
        if field in config and config[field] not in (unused, None, {}, []):
            raise ValueError(f"{file}: field {field!r}={config[field]!r} is not supported "
                             f"(only {unused!r})")
    return config


def _load_tensors(path):
    file = Path(path) / WEIGHTS_NAME
    if not file.is_file():
        raise ValueError(f"{file}: missing; minift reads adapter weights only from safetensors")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{file}: cannot read safetensors file: {err}") from None


def _model_type(model):
    value = getattr(getattr(model, "config", None), "model_type", None)
    return value if isinstance(value, str) else None


def _adapter_model_type(path, config):
    """The architecture the adapter was trained on: from its weights' metadata, else from the
    config.json of its base_model_name_or_path when that is a local folder; None if unknown."""
    try:
        with safe_open(str(Path(path) / WEIGHTS_NAME), framework="pt") as f:
            recorded = (f.metadata() or {}).get("base_model_type")
    except (SafetensorError, OSError):
        recorded = None
    base = config.get("base_model_name_or_path")
    if recorded is None and isinstance(base, str) and (Path(base) / "config.json").is_file():
        try:
            recorded = read_json(Path(base) / "config.json", expect=dict).get("model_type")
        except ValueError:
            recorded = None
    return recorded if isinstance(recorded, str) else None


def _adapter_rope(path) -> Optional[str]:
    """The stretched RoPE the adapter was trained under, from its weights' metadata (or None)."""
    try:
        with safe_open(str(Path(path) / WEIGHTS_NAME), framework="pt") as f:
            return (f.metadata() or {}).get(ROPE_METADATA_KEY)
    except (SafetensorError, OSError):
        return None


def _warn_other_architecture(path, model, config):
    theirs, mine = _adapter_model_type(path, config), _model_type(model)
    if theirs and mine and theirs != mine:
        warnings.warn(f"{path}: the adapter was trained on a {theirs} model, this model is {mine}; "
                      f"the shapes fit, but the weights were learned for another architecture",
                      stacklevel=3)


def _expected_shapes(model, config):
    """{file key: shape} the adapter must provide, without changing the model."""
    layers = lora_layers(model)
    if layers:
        return {KEY_PREFIX + k: tuple(v.shape) for k, v in lora_state_dict(model).items()}
    r = config["r"]
    shapes = {}
    targets = find_targets(model, config["target_modules"])
    if config.get("modules_to_save"):
        own = model.state_dict()
        for name in find_modules_to_save(model, config["modules_to_save"], targets):
            shapes.update({f"{KEY_PREFIX}{k}": tuple(v.shape) for k, v in own.items()
                           if k.startswith(name + ".")})
    for name in targets:
        layer = model.get_submodule(name)
        shapes[f"{KEY_PREFIX}{name}.lora_A.weight"] = (r, layer.in_features)
        shapes[f"{KEY_PREFIX}{name}.lora_B.weight"] = (layer.out_features, r)
    return shapes


def _check_tensors(file, tensors, expected):
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ValueError(f"{file}: missing adapter tensors for this model: {missing[:5]}"
                         + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise ValueError(f"{file}: tensors that match no adapter of this model: {unexpected[:5]}"
                         + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""))
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise ValueError(f"{file}: tensor {key!r} has shape {tuple(tensors[key].shape)} in the "
                             f"file but the model expects {shape}")


def _check_settings_match(file, model, config):
    rslora = bool(config.get("use_rslora", False))
    for name, layer in lora_layers(model):
        for field, mine, theirs in (("r", layer.r, config["r"]),
                                    ("lora_alpha", layer.alpha, config["lora_alpha"]),
                                    ("use_rslora", layer.rslora, rslora)):
            if mine != theirs:
                raise ValueError(f"{file}: {field}={theirs!r} but the model's adapter {name!r} "
                                 f"has {field}={mine!r}")
    mine = [n for n, _ in saved_modules(model)]
    keys = config.get("modules_to_save") or []
    try:
        theirs = find_modules_to_save(model, keys) if keys else []
    except ValueError as err:
        raise ValueError(f"{file}: {err}") from None
    if mine != theirs:
        raise ValueError(f"{file}: modules_to_save={keys!r} but the model trains "
                         f"{mine or 'no modules'} whole")


def _same_base(recorded: str, current: str) -> bool:
    """Whether two names of a base model (a local folder or a hub id) name the same model: the
    same folder when both exist here, else the same last path component (a hub id and its
    local download)."""
    a, b = Path(recorded), Path(current)
    if a.exists() and b.exists():
        return a.resolve() == b.resolve()
    return a.name.lower() == b.name.lower()


def _warn_other_base(path, model, config) -> None:
    """An adapter of another base with the same shapes loads without an error and gives a model
    nobody trained; when both names are known and differ, say so with both."""
    recorded, current = config.get("base_model_name_or_path"), getattr(model, "name_or_path", None)
    if isinstance(recorded, str) and recorded and isinstance(current, str) and current \
            and not _same_base(recorded, current):
        warnings.warn(f"{path}: the adapter was trained on base {recorded!r}, but is being loaded "
                      f"onto {current!r}; the shapes fit, but an adapter only means what it "
                      f"learned on its own base", stacklevel=3)


def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a PEFT-format LoRA adapter into a model.

    An unwrapped model is first wrapped with the adapter's r, lora_alpha, lora_dropout,
    target_modules and use_rslora; a wrapped one must have the same settings. Nothing changes
    when the adapter does not fit.

    Args:
        model: a base model with Hugging Face module names, or one wrapped by ``lora_wrap``.
        path: the adapter directory (adapter_config.json + adapter_model.safetensors).

    Returns:
        The same model, with the adapter weights loaded.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"adapter directory not found: {path}")
    config = read_adapter_config(path)
    file = path / CONFIG_NAME
    wrapped = bool(lora_layers(model))
    if wrapped:
        _check_settings_match(file, model, config)
    tensors = _load_tensors(path)
    try:
        expected = _expected_shapes(model, config)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{file}: {err}") from None
    _check_tensors(path / WEIGHTS_NAME, tensors, expected)
    _warn_other_architecture(path, model, config)
    _warn_other_base(path, model, config)
    rope = _adapter_rope(path)  # checked now, applied once the adapter is in
    apply_rope_record(model, rope, str(path / WEIGHTS_NAME), check_only=True)
    if not wrapped:
        try:
            lora_wrap(model, r=config["r"], alpha=config["lora_alpha"],
                      dropout=config.get("lora_dropout", 0.0) or 0.0,
                      target_modules=config["target_modules"],
                      rslora=bool(config.get("use_rslora", False)),
                      modules_to_save=config.get("modules_to_save") or None)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{file}: {err}") from None
    own = model.state_dict(keep_vars=True)  # parameters and buffers (a saved module's too)
    with torch.no_grad():
        for key, tensor in tensors.items():
            own[key[len(KEY_PREFIX):]].copy_(tensor)
    apply_rope_record(model, rope, str(path / WEIGHTS_NAME))
    return model
