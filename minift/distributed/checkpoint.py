"""Sharded checkpoints (torch.distributed.checkpoint) and consolidated exports written by rank 0.

A sharded checkpoint is a directory of DCP files: every rank writes its own shards of the model
and optimizer state, and any world size can read it back (DCP re-slices the saved shards onto
the loading ranks' layout; one process reads it without a process group). LoRA and QLoRA
checkpoints leave the frozen base out, as the single-process checkpoints do.

The exports a user keeps — a PEFT adapter or an HF-format model — are gathered to full tensors
on CPU and written once, by rank 0, in exactly the format a 1-process run writes.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from torch import nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.tensor import DTensor, distribute_tensor

from minift.checkpoints import steps as ckpt
from minift.distributed.parallel import barrier, is_main, reshard, unwrap
from minift.lora.adapter import adapter_config, write_adapter
from minift.lora.layer import adapter_predicate
from minift.models.config import ModelConfig
from minift.models.context import rope_record
from minift.models.llama import Llama
from minift.models.loading import save_model
from minift.nf4.fsdp import shardable_nf4


def _options(trainable_only: bool, **extra) -> StateDictOptions:
    return StateDictOptions(ignore_frozen_params=trainable_only, **extra)


def _dcp_ready(model: nn.Module) -> nn.Module:
    """The plain module, with NF4 layers in their one-parameter form (same forward).

    DCP maps every state_dict key to a module attribute; ``NF4Linear`` writes bitsandbytes'
    names (``weight.absmax``, ...), which are not attributes, while ``ShardedNF4Linear`` holds
    one ``nf4_bytes`` parameter. An FSDP model already has them; a 1-process model gets them
    here, so it reads and writes the same checkpoints.
    """
    plain = unwrap(model)
    reshard(plain)  # parameters as the optimizer holds them, not a root left gathered by an eval
    shardable_nf4(plain)
    return plain


def _optimizer_extras(optimizer) -> dict:
    """The optimizer state dict's entries besides "state" and "param_groups" (plain values)."""
    return {k: v for k, v in optimizer.state_dict().items() if k not in ("state", "param_groups")}


def save_sharded(path, model: nn.Module, optimizer: torch.optim.Optimizer, *, trainable_only: bool) -> str:
    """Write this rank's shards of the model (all of it, or only what trains) and optimizer.

    Every rank must call it. Returns the directory.
    """
    model_sd, optim_sd = get_state_dict(_dcp_ready(model), optimizer, options=_options(trainable_only))
    dcp.save({"model": model_sd, "optim": optim_sd, "optim_extra": _optimizer_extras(optimizer)},
             checkpoint_id=str(path))
    barrier()
    return str(path)


def load_sharded(path, model: nn.Module, optimizer: torch.optim.Optimizer, *, trainable_only: bool) -> None:
    """Read a ``save_sharded`` directory into ``model`` and ``optimizer`` (any world size)."""
    if not (Path(path) / ".metadata").is_file():
        raise FileNotFoundError(f"{path}: not a sharded checkpoint (no .metadata file)")
    options = _options(trainable_only)
    # DCP builds the optimizer's load template by stepping a fresh optimizer on zero gradients,
    # and skips that (loading no optimizer state at all) when a parameter still holds a gradient:
    # a checkpoint replaces the state, so gradients left from before it are dropped first
    optimizer.zero_grad(set_to_none=True)
    model_sd, optim_sd = get_state_dict(_dcp_ready(model), optimizer, options=options)
    _match_saved_optimizer(optim_sd, dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)
    state = {"model": model_sd, "optim": optim_sd, "optim_extra": _optimizer_extras(optimizer)}
    dcp.load(state, checkpoint_id=str(path))
    # DCP keeps an optimizer's "state" and "param_groups" only; minift.AdamW8bit's state dict
    # also carries its format version, skipped steps and seed, and refuses a dict without them.
    # They travel beside it and are put back on the way into load_state_dict.
    load = optimizer.load_state_dict
    optimizer.load_state_dict = lambda state_dict: load({**state["optim_extra"], **state_dict})
    try:
        # the frozen base is not in a trainable-only checkpoint: the model's load must not ask
        # for it (dcp.load above already failed on any trainable tensor the checkpoint lacks)
        set_state_dict(_dcp_ready(model), optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"], options=_options(trainable_only, strict=not trainable_only))
    finally:
        del optimizer.load_state_dict


def _match_saved_optimizer(optim_sd: dict, saved: dict) -> None:
    """Make the optimizer's load template ask for what the checkpoint holds, in place.

    DCP reads into tensors shaped like the saved ones. A parameter's state may be saved in another
    form than this optimizer keeps: minift.AdamW8bit keeps float32 moments on shards whose rows
    do not hold whole 8-bit blocks, and 8-bit codes flat on one process but by rows on shards.
    Such entries get plain tensors of the saved shape and dtype (every rank reads the whole
    tensor); the optimizer's ``load_state_dict`` converts them.
    """
    for fqn, state in optim_sd.get("state", {}).items():
        prefix = f"optim.state.{fqn}."
        stored = {key[len(prefix):]: meta for key, meta in saved.items()
                  if key.startswith(prefix) and "." not in key[len(prefix):]}
        tensors = {k: m for k, m in stored.items() if isinstance(m, TensorStorageMetadata)}
        same = set(stored) == set(state) and all(
            isinstance(state[k], torch.Tensor) and tuple(state[k].shape) == tuple(m.size)
            and state[k].dtype == m.properties.dtype for k, m in tensors.items())
        if stored and not same:
            optim_sd["state"][fqn] = {
                k: torch.empty(tuple(m.size), dtype=m.properties.dtype) if k in tensors else state.get(k)
                for k, m in stored.items()}


def load_full_checkpoint(path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Resume a 1-process checkpoint (safetensors) in a distributed run; returns its trainer state.

    Every rank reads the whole checkpoint from the shared file system. DDP's replicas load it as
    one process does. FSDP's shards take their rows of each full tensor (no communication), and so
    do the optimizer's moments: torch AdamW's float32 ones here, ``minift.AdamW8bit`` cuts its
    own (8-bit codes by whole blocks, float32 where rows are not whole blocks).
    """
    plain = unwrap(model)
    if not any(isinstance(p, DTensor) for p in plain.parameters()):
        return ckpt.load_checkpoint(path, model=plain, optimizer=optimizer)
    state, tensors, opt_state = ckpt.read_checkpoint(path)
    ready = _dcp_ready(plain)
    ckpt.check_model_tensors(ready, tensors, path)
    set_model_state_dict(ready, tensors, options=StateDictOptions(full_state_dict=True, strict=False))
    ckpt.load_optimizer_state(optimizer, _sharded_moments(optimizer, opt_state), path)
    ckpt.set_rng_state(load_file(Path(path) / "rng.safetensors", device="cpu"), state["rng"])
    return state


def _sharded_moments(optimizer: torch.optim.Optimizer, opt_state: dict) -> dict:
    """A 1-process optimizer state with every parameter-shaped tensor cut to this rank's rows as a
    DTensor placed like its (sharded) parameter; minift.AdamW8bit cuts its states itself."""
    if hasattr(optimizer, "uses_8bit"):
        return opt_state
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for index, st in opt_state["state"].items():
        p = params[int(index)] if int(index) < len(params) else None
        state[index] = {k: distribute_tensor(v.to(p.to_local().device), p.device_mesh, p.placements,
                                             src_data_rank=None)
                        if isinstance(p, DTensor) and isinstance(v, torch.Tensor) and v.shape == p.shape else v
                        for k, v in st.items()}
    return dict(opt_state, state=state)


def full_state_dict(model: nn.Module, *, trainable_only: bool) -> dict:
    """Full (unsharded) tensors on CPU on rank 0, {} elsewhere; every rank must call it."""
    sd = get_model_state_dict(_dcp_ready(model), options=_options(trainable_only, full_state_dict=True,
                                                               cpu_offload=True))
    return sd if is_main() else {}


def export_adapter(model: nn.Module, path, base_model_name_or_path=None) -> None:
    """The PEFT adapter of a LoRA / QLoRA model, written once by rank 0 (every rank calls it)."""
    tensors = full_state_dict(model, trainable_only=True)
    if is_main():
        config = adapter_config(unwrap(model), base_model_name_or_path)
        mine = adapter_predicate(unwrap(model))
        write_adapter(path, config, {k: v for k, v in tensors.items() if mine(k)},
                      model_type=getattr(unwrap(model).config, "model_type", None),
                      rope=rope_record(getattr(unwrap(model), "config", None)))
    barrier()


def export_model(model: nn.Module, path, config: ModelConfig) -> None:
    """A fully fine-tuned model in HF format, written once by rank 0 (every rank calls it)."""
    tensors = full_state_dict(model, trainable_only=False)
    if is_main():
        with torch.device("meta"):
            plain = Llama(config)
        plain.load_state_dict(tensors, assign=True)
        plain.tie_weights()
        save_model(plain, path)
    barrier()
