"""Switches a training step turns on for the block and off again: each is an attribute that
minift's modules read in their forward (gradient checkpointing, activation offload, MLP tiles,
shifted sparse attention)."""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import nn


@contextlib.contextmanager
def module_flag(model, attr: str, value, *, required: bool, missing: str):
    """Set `attr` to `value` on every submodule of `model` that has it, for the block, then put
    the old values back. `missing` is the ValueError when `required` and no module has `attr`."""
    holders = [m for m in model.modules() if hasattr(m, attr)]
    if required and not holders:
        raise ValueError(missing)
    previous = [getattr(m, attr) for m in holders]
    for m in holders:
        setattr(m, attr, value)
    try:
        yield
    finally:
        for m, old in zip(holders, previous):
            setattr(m, attr, old)


def gradient_checkpointing(model, enabled: bool):
    """Set every module's ``gradient_checkpointing`` flag for the block, then restore it."""
    return module_flag(model, "gradient_checkpointing", enabled, required=enabled,
                       missing="TrainConfig.gradient_checkpointing=True, but no module of the model "
                               "has a 'gradient_checkpointing' attribute")


def offloading(model: torch.nn.Module, enabled: bool):
    """Set every module's ``activation_offload`` flag for the block, then restore it."""
    return module_flag(model, "activation_offload", enabled, required=enabled,
                       missing="TrainConfig.activation_offload=True, but no module of the model has "
                               "an 'activation_offload' attribute (minift's Llama has)")


def mlp_tiling(model: torch.nn.Module, tile: Optional[int]):
    """Set every decoder layer's ``mlp_tile_size`` (tokens per MLP tile) for the block."""
    return module_flag(model, "mlp_tile_size", tile, required=tile is not None,
                       missing="TrainConfig.mlp_tile_size is set, but no module of the model has an "
                               "'mlp_tile_size' attribute (minift's Llama decoder layers have)")


@contextlib.contextmanager
def shifted_sparse_attention(model: torch.nn.Module, enabled: bool, group_size: Optional[int]):
    """Set the model's ``s2_attention`` flag and ``s2_group_size`` (S²-Attn in training forwards)
    for the block, then restore them."""
    with module_flag(model, "s2_attention", enabled, required=enabled,
                     missing="TrainConfig.s2_attention=True, but no module of the model has an "
                             "'s2_attention' attribute (minift's Llama has)"), \
            module_flag(model, "s2_group_size", group_size, required=False, missing=""):
        yield


def decoder_layers(model: nn.Module, why: str) -> nn.ModuleList:
    """The model's decoder layers (``model.layers``); a ValueError says `why` they were wanted."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ValueError(f"{why}, but the {type(model).__name__} has no 'model.layers' list of "
                         "decoder layers (minift's Llama has)")
    return layers
