"""Longer context than the base was trained for: rewrite a model's RoPE scaling in place.

`extend_context` writes the config.json fields transformers reads (max_position_embeddings and
rope_scaling), so `save_model` writes a checkpoint transformers runs with the same numbers, and
the model's cached RoPE tables follow the new config. A LoRA adapter records the scaling it was
trained under (`rope_record`) and `load_adapter` restores it on the base (`apply_rope_record`).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Optional

from torch import nn

from minift.models.config import ModelConfig, rope_type
from minift.models.llama import Llama
from minift.models.rope import check_rope, original_length

METHODS = ("yarn", "linear", "dynamic")
# the safetensors metadata key under which an adapter carries its RoPE settings
ROPE_METADATA_KEY = "minift_rope"


def context_length(config: ModelConfig) -> int:
    """The longest sequence the config's RoPE is set up for.

    max_position_embeddings, except where transformers reads that field as the original length:
    ``dynamic`` (stretched `factor` times past it) and a ``yarn`` block added to an unchanged
    max_position_embeddings (Qwen2.5's recipe: original_max_position_embeddings * factor).
    """
    kind, scaling = rope_type(config), config.rope_scaling or {}
    if kind == "dynamic":
        return max(config.max_position_embeddings, round(config.max_position_embeddings * scaling["factor"]))
    if kind == "yarn":
        return max(config.max_position_embeddings, round(original_length(config) * scaling["factor"]))
    return config.max_position_embeddings


def _llamas(model: nn.Module, caller: str = "extend_context") -> list[Llama]:
    found = [m for m in model.modules() if isinstance(m, Llama)] if isinstance(model, nn.Module) else []
    if not found:
        raise TypeError(f"{caller}: expected a minift Llama model (or a module holding one), "
                        f"got {type(model).__name__}")
    return found


def extended_rope(config: ModelConfig, max_length: int, method: str) -> tuple[int, dict]:
    """(max_position_embeddings, rope_scaling) that stretch `config`'s RoPE to `max_length` tokens.

    factor = max_length / the original length (the pre-training length; for a model extended
    before, the one it was extended from, so extending twice equals extending once). yarn: the
    new length in max_position_embeddings and the original in original_max_position_embeddings;
    linear: the new length in max_position_embeddings; dynamic: max_position_embeddings stays the
    original length, because transformers grows the base past that field's value.
    """
    if method not in METHODS:
        raise ValueError(f"extend_context: method must be one of {', '.join(METHODS)}, got {method!r}")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length <= 0:
        raise ValueError(f"extend_context: max_length must be a positive integer, got {max_length!r}")
    kind = check_rope(config)
    if kind == "llama3":
        raise ValueError(
            f"extend_context: the model's rope_scaling is already 'llama3' (factor "
            f"{config.rope_scaling['factor']} over {original_length(config)} tokens); a second scaling "
            f"on top has no config.json form transformers reads, so it is refused: raise "
            f"rope_scaling['factor'] and max_position_embeddings instead")
    if kind not in ("default", method):
        raise ValueError(f"extend_context: the model's RoPE is already scaled by rope_type {kind!r}; "
                         f"method={method!r} would stack two scalings, which no config.json expresses: "
                         f"use method={kind!r}")
    current = context_length(config)
    if max_length <= current:
        raise ValueError(f"extend_context: max_length {max_length} is not larger than the model's "
                         f"context of {current} tokens")
    original = original_length(config)
    factor = max_length / original
    if method == "yarn":  # beta_fast / beta_slow / mscale / truncate of an earlier yarn stay
        kept = {k: v for k, v in (config.rope_scaling or {}).items()
                if k not in ("type", "rope_type", "factor", "original_max_position_embeddings")}
        scaling = dict(kept, rope_type="yarn", factor=factor, original_max_position_embeddings=original)
        return max_length, scaling
    return (max_length if method == "linear" else original), {"rope_type": method, "factor": factor}


def _set_rope(model: nn.Module, max_position_embeddings: int, rope_scaling: Optional[dict],
              check_only: bool = False) -> None:
    llamas = _llamas(model)
    config = llamas[0].config
    # a copy first: its validation and the frequency check name the bad field before anything changes
    check_rope(dataclasses.replace(config, max_position_embeddings=max_position_embeddings,
                                   rope_scaling=rope_scaling))
    if check_only:
        return
    for llama in llamas:  # the config object is usually shared; tables are per model
        llama.config.max_position_embeddings = max_position_embeddings
        llama.config.rope_scaling = rope_scaling
        llama._inv_freq.clear()


def extend_context(model: nn.Module, max_length: int, method: str = "yarn") -> nn.Module:
    """Stretch the model's RoPE to `max_length` tokens, in place.

    Rewrites `model.config` (max_position_embeddings and rope_scaling, as transformers reads them)
    and drops the cached RoPE tables, so the next forward, `save_model` and `save_adapter` use the
    new scaling. Fine-tune on long sequences afterwards (LongLoRA, YaRN) for the best quality;
    ``dynamic`` is meant for inference without training.

    Args:
        model: a `minift.models.llama.Llama`, plain, LoRA-wrapped or NF4-quantized.
        max_length: the new context in tokens; more than the current one.
        method: "yarn" (NTK-by-parts interpolation and an attention temperature), "linear"
            (position interpolation) or "dynamic" (NTK-aware, base grows with the sequence).

    Returns:
        The same model.
    """
    config = _llamas(model)[0].config
    _set_rope(model, *extended_rope(config, max_length, method))
    return model


# ---- adapters: the scaling an adapter was trained under ------------------------------------
def rope_record(config: Optional[ModelConfig]) -> Optional[str]:
    """The JSON an adapter carries when its model's RoPE is stretched (linear, dynamic, yarn),
    None otherwise (a base's own llama3 scaling is the base's business, and so is a config that
    is not minift's)."""
    if not isinstance(config, ModelConfig) or rope_type(config) not in METHODS:
        return None
    return json.dumps({"max_position_embeddings": config.max_position_embeddings,
                       "rope_scaling": config.rope_scaling}, sort_keys=True)


def apply_rope_record(model: nn.Module, record: Optional[str], source: str,
                      check_only: bool = False) -> None:
    """Give `model` the RoPE settings an adapter was trained under (see `rope_record`).

    Nothing happens when they are already the model's; an unscaled model takes them; a model
    scaled another way is an error naming `source`, since the adapter only means what it learned
    under its own positions. `check_only`: raise what applying would raise, change nothing.
    """
    if record is None:
        return
    try:
        wanted = json.loads(record)
        mpe, scaling = wanted["max_position_embeddings"], wanted["rope_scaling"]
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{source}: metadata {ROPE_METADATA_KEY!r} is not a RoPE record: "
                         f"{record[:200]!r}") from None
    config = _llamas(model, "load_adapter")[0].config
    if (config.max_position_embeddings, config.rope_scaling) == (mpe, scaling):
        return
    if rope_type(config) != "default":
        raise ValueError(f"{source}: the adapter was trained with max_position_embeddings {mpe} and "
                         f"rope_scaling {scaling}, but this model has {config.max_position_embeddings} "
                         f"and {config.rope_scaling}; load it onto the unscaled base")
    try:
        _set_rope(model, mpe, scaling, check_only)
    except ValueError as err:
        raise ValueError(f"{source}: metadata {ROPE_METADATA_KEY!r}: {err}") from None
