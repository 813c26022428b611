"""`estimate_memory`: the memory of one training step, from a trace of the step itself.

The estimate is `minift.planning.trace.trace_step`'s: the step ``minift.train`` runs, on fake tensors
at the model's real shapes, on the target device's code path, counted by the MemoryTracker. No
formula stands between the code and the figure: change the code and the estimate follows.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Union

import torch

from minift.checks import check_flag
from minift.memory.report import CATEGORIES, MemoryEstimate, breakdown_table  # noqa: F401
from minift.models.config import ModelConfig
from minift.planning.grpo_memory import GRPOTrace, trace_grpo_step
from minift.planning.trace import Trace, trace_step
from minift.training.config import TrainConfig

# TrainConfig fields that describe the run, not one step: a trace neither needs nor checks them
_RUN_FIELDS = {"learning_rate", "warmup_ratio", "lr_scheduler", "epochs", "max_steps", "eval_interval",
               "save_interval", "log_interval", "keep_last", "output_dir", "resume_from", "progress",
               "dist_timeout", "skip_steps", "micro_batch_size", "max_length", "device", "method",
               "group_by_length",  # which rows share a micro-batch; a trace makes its own
               "fsdp_cpu_offload", "parallel"}  # the last two are the cpu_offload / parallel arguments
TRAIN_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name not in _RUN_FIELDS)


def estimate_memory(config_or_preset: Union[ModelConfig, str], method: str = "lora",
                    batch_size: int = 1, seq_len: int = 512, r: int = 16,
                    target_modules="all-linear", optimizer: str = "adamw",
                    gradient_checkpointing: bool = False, dtype: torch.dtype = torch.bfloat16, *,
                    adapter_dtype: torch.dtype = torch.float32, blocksize: int = 64,
                    attention_mask: bool = True, device: str = "cuda", world_size: int = 1,
                    parallel: Optional[str] = None, cpu_offload: bool = False,
                    lm_head_nf4: bool = False, modules_to_save=None, **train_fields) -> MemoryEstimate:
    """The memory of one training step of minift, by category, in bytes: traced, not modelled.

    Runs the step ``minift.train`` runs (`minift.training.loop.run_step`) on fake tensors at the
    model's shapes (`minift.planning.trace`), on ``device``'s code path, under the MemoryTracker.

    Args:
        config_or_preset: a `ModelConfig` or a preset name from `minift.models.config.PRESETS`.
        method: "full", "lora" or "qlora".
        batch_size: sequences per micro-batch (pairs for objective="dpo", prompts for
            objective="grpo", each sampled ``grpo_group_size`` times).
        seq_len: tokens per sequence (the prompt's for objective="grpo", which adds
            ``grpo_max_new_tokens`` sampled tokens: `minift.planning.grpo_memory`'s stages, the
            estimate the largest of rollout, scoring and update).
        r, target_modules, adapter_dtype: the LoRA adapters (lora, qlora), as `minift.lora_wrap`.
        modules_to_save: modules trained whole beside the adapters (lora, qlora), e.g.
            ``["embed_tokens", "norm"]``, as `minift.lora_wrap`: their weights, gradients and
            optimizer states count as trainable.
        optimizer, gradient_checkpointing: as `minift.TrainConfig`.
        dtype: the dtype the model's weights are stored in.
        blocksize: NF4 block size (QLoRA). lm_head_nf4: QLoRA quantizes lm_head too.
        attention_mask: whether batches carry padding (the masked attention path: Flex on CUDA,
            a dense mask on the CPU); False for full-length rows (the causal kernel).
        device: "cuda" or "cpu": whose code path the step takes.
        world_size, parallel: a torchrun job of ``world_size`` GPUs, "fsdp" (the
            default) or "ddp"; the estimate is one GPU's. cpu_offload (FSDP's CPU offload) is
            refused: a trace cannot tell its host from its stand-in device.
        **train_fields: any other `minift.TrainConfig` field of the step (loss_chunk_size,
            activation_offload, optimizer_in_backward, mlp_tile_size, paged_device_budget,
            objective, grad_accum, bf16, neftune_alpha, dpo_reference, ...), defaults as there.

    Returns:
        A `MemoryEstimate`: the categories, ``total`` (the peak of allocated bytes), ``reserved``
        (the simulated CUDA caching allocator's peak), ``host``, and ``moment``, where the
        peak happens. ``settings["train_config"]`` is the `TrainConfig` that was traced.

    Raises:
        TypeError / ValueError naming the argument or field: an unknown method, optimizer,
        device or TrainConfig field, a non-positive size, seq_len beyond the model's
        max_position_embeddings, or a combination TrainConfig refuses.
    """
    unknown = sorted(set(train_fields) - set(TRAIN_FIELDS))
    if unknown:
        raise TypeError(f"estimate_memory: unknown argument(s) {', '.join(unknown)}; TrainConfig fields "
                        f"of a step are {', '.join(TRAIN_FIELDS)}")
    attention_mask = check_flag("attention_mask", attention_mask)
    gradient_checkpointing = check_flag("gradient_checkpointing", gradient_checkpointing)
    for name, value in (("dtype", dtype), ("adapter_dtype", adapter_dtype)):
        if not isinstance(value, torch.dtype) or not value.is_floating_point:
            raise TypeError(f"{name} must be a floating torch.dtype, got {value!r}")
    if parallel is not None and parallel not in ("fsdp", "ddp"):
        raise ValueError(f"parallel must be one of fsdp, ddp (or None), got {parallel!r}")
    if "bf16" in train_fields:
        train_fields["bf16"] = check_flag("bf16", train_fields["bf16"])
    if train_fields.get("batching") == "pack":  # rows of seq_len tokens each (trace_step packs them so)
        train_fields["max_length"] = seq_len
    config = TrainConfig(method=method, optimizer=optimizer, gradient_checkpointing=gradient_checkpointing,
                         parallel=parallel if world_size != 1 else None,
                         fsdp_cpu_offload=check_flag("cpu_offload", cpu_offload), **train_fields)
    if config.objective == "grpo":
        if world_size != 1:
            raise ValueError("objective='grpo': the trace runs one process; estimate with world_size=1 "
                             "(each rank of a torchrun job samples and trains its own share of the prompts)")
        grpo = trace_grpo_step(config_or_preset, config, prompts=batch_size, prompt_len=seq_len,
                               device=device, dtype=dtype, r=r, target_modules=target_modules,
                               adapter_dtype=adapter_dtype, blocksize=blocksize, lm_head_nf4=lm_head_nf4,
                               modules_to_save=modules_to_save)
        return from_grpo_trace(grpo, config)
    trace = trace_step(config_or_preset, config, batch_size=batch_size, seq_len=seq_len,
                       device=device, dtype=dtype, r=r, target_modules=target_modules,
                       adapter_dtype=adapter_dtype, blocksize=blocksize, padded=attention_mask,
                       lm_head_nf4=lm_head_nf4, world_size=world_size, modules_to_save=modules_to_save)
    return from_trace(trace, config)


def from_trace(trace: Trace, config: TrainConfig) -> MemoryEstimate:
    """A `MemoryEstimate` of a `Trace`."""
    rep = trace.report
    settings = dict(trace.settings, train_config=config_text(config),
                    trace_seconds=round(trace.seconds, 2))
    return _estimate(rep, settings, rep.moment, trace)


def from_grpo_trace(trace: GRPOTrace, config: TrainConfig) -> MemoryEstimate:
    """A `MemoryEstimate` of a GRPO step: the categories of its largest stage (``total`` the step's
    peak); ``settings["stages"]`` holds every stage's peak and moment."""
    rep = trace.stages[trace.peak_stage]
    stages = {k: {"peak": int(r.peak), "moment": r.moment} for k, r in trace.stages.items()}
    settings = dict(trace.settings, objective="grpo", batch_size=trace.settings["prompts"],
                    seq_len=trace.settings["prompt_len"], train_config=config_text(config),
                    trace_seconds=round(trace.seconds, 2), stages=stages, peak_stage=trace.peak_stage,
                    kv_cache=int(trace.kv_cache))
    return _estimate(rep, settings, f"{trace.peak_stage}: {rep.moment}", trace)


def _estimate(rep, settings: dict, moment, trace) -> MemoryEstimate:
    """The estimate of a tracker report ``rep`` and a trace's simulated reserved peaks."""
    return MemoryEstimate(
        frozen_weights=rep.frozen_weights, trainable_params=rep.trainable_params,
        gradients=rep.gradients, optimizer_states=rep.optimizer_states, activations=rep.activations,
        other=rep.other, total=rep.peak, settings=settings, host=rep.host, moment=moment,
        host_parts=dict(rep.host_parts),
        reserved=trace.reserved, reserved_expandable=trace.reserved_expandable)


def config_text(config: TrainConfig) -> str:
    """``TrainConfig(...)`` with the fields that differ from the defaults, as a user writes it."""
    default = TrainConfig(method=config.method)
    changed = [f"{f.name}={getattr(config, f.name)!r}" for f in dataclasses.fields(TrainConfig)
               if f.name != "method" and getattr(config, f.name) != getattr(default, f.name)
               and f.name not in ("micro_batch_size", "max_length")]
    return f"TrainConfig(method={config.method!r}" + "".join(", " + c for c in changed) + ")"


def estimate_dpo_memory(config_or_preset, method: str = "lora", batch_size: int = 1, seq_len: int = 512,
                        **kwargs) -> MemoryEstimate:
    """`estimate_memory` of a DPO step: ``batch_size`` pairs (2 x batch_size sequences of
    ``seq_len``), the policy's and the reference's log-probs, the reference as
    ``TrainConfig.dpo_reference`` makes it (adapters off for LoRA/QLoRA, a frozen copy for full)."""
    return estimate_memory(config_or_preset, method, batch_size, seq_len, objective="dpo", **kwargs)
