"""Memory of a training step from first principles: parameter counts times bytes per element.

The formulas (docs/memory.md explains them; `minift.memory.formulas` holds them; N = batch_size * seq_len tokens, e = bytes of the
compute dtype, h = hidden size, i = intermediate size):

* weights: every tensor of `minift.models.llama.Llama` at its storage format: `dtype` for full and LoRA,
  NF4 for QLoRA's decoder linears (n/2 packed bytes + one uint8 absmax code per 64 values + one
  float32 per 256 codes + the 16- and 256-entry code books: ~4.127 bits per parameter).
* LoRA adapters: r * (in + out) per adapted linear, in `adapter_dtype` (float32).
* gradients: one per trainable value, in the trainable tensor's dtype.
* optimizer states: "adamw" (torch.optim.AdamW) keeps two moments in the parameter's dtype;
  "adamw8bit" / "paged_adamw8bit" keep two uint8 codes per value plus a float32 absmax per 256
  values, and float32 moments for tensors smaller than 4096 values.
* activations: what `minift.models.llama.Llama` and `minift.train`'s loss keep for backward, term by
  term (`layer_saved`, `head_saved`), derived by listing the tensors autograd saves.
* other: the loss's buffers (logits and their float32 copy, or the two float32 logit gradients at
  the start of backward) or the optimizer's temporaries during its step, whichever moment is
  the peak.

The total is the peak over the named moments of the step that can hold it (`_moments`): the end
of the loss (weights + states + activations + logits), the start of backward, the optimizer step
(weights + states + gradients + step temporaries) and, with checkpointing or NF4, the recompute
and dequantization moments. `estimate_memory` reads as: check the arguments, size what is stored,
size what autograd keeps, take the largest moment.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from minift.checks import check_choice, check_flag, check_int
from minift.memory.features import feature_estimate, paged_states
from minift.memory.formulas import (
    dequant_scratch,
    down_proj_saved,
    head_saved,
    layer_gradient_bytes,
    layer_saved,
    step_temporaries,
    weight_bytes,
)
from minift.memory.parallel import per_gpu
from minift.memory.report import CATEGORIES, MemoryEstimate, breakdown_table  # noqa: F401
from minift.models.config import ModelConfig
from minift.names import LINEARS, METHODS, OPTIMIZERS
from minift.optim.paging import DEFAULT_DEVICE_BUDGET


def _elem(dtype: torch.dtype) -> int:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    return torch.finfo(dtype).bits // 8


def _resolve_config(config_or_preset) -> ModelConfig:
    if isinstance(config_or_preset, ModelConfig):
        return config_or_preset
    if isinstance(config_or_preset, str):
        return ModelConfig.from_name(config_or_preset)
    raise TypeError(f"config_or_preset must be a ModelConfig or a preset name, "
                    f"got {type(config_or_preset).__name__}")


def _targets(target_modules) -> tuple:
    if target_modules == "all-linear":
        return LINEARS
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    try:
        names = tuple(target_modules)
    except TypeError:
        raise TypeError(f"target_modules must be 'all-linear' or a list of names, got "
                        f"{type(target_modules).__name__}") from None
    if not names:
        raise ValueError(f"target_modules is empty: nothing would be adapted; use 'all-linear' or "
                         f"a list of {', '.join(LINEARS)}")
    unknown = [t for t in names if t not in LINEARS]
    if unknown:
        raise ValueError(f"target_modules: unknown names {unknown}; use 'all-linear' or a list "
                         f"of {', '.join(LINEARS)}")
    # lora_wrap adapts a module once however often it is named, so count it once
    return tuple(dict.fromkeys(names))


def estimate_memory(config_or_preset: Union[ModelConfig, str], method: str = "lora",
                    batch_size: int = 1, seq_len: int = 512, r: int = 16,
                    target_modules="all-linear", optimizer: str = "adamw",
                    gradient_checkpointing: bool = False, dtype: torch.dtype = torch.bfloat16, *,
                    adapter_dtype: torch.dtype = torch.float32, blocksize: int = 64,
                    attention_mask: bool = True, device: str = "cuda",
                    loss_chunk_size: Optional[int] = None, activation_offload: bool = False,
                    optimizer_in_backward: bool = False, mlp_tile_size: Optional[int] = None,
                    paged_device_budget: Optional[int] = DEFAULT_DEVICE_BUDGET, world_size: int = 1,
                    parallel: Optional[str] = None, cpu_offload: bool = False) -> MemoryEstimate:
    """Estimate the memory of one training step of minift, by category, in bytes.

    Args:
        config_or_preset: a `ModelConfig` or a preset name from `minift.models.config.PRESETS`.
        method: "full", "lora" or "qlora".
        batch_size: sequences per micro-batch.
        seq_len: tokens per sequence.
        r: LoRA rank (lora and qlora).
        target_modules: "all-linear" or a list of decoder linear names ("q_proj", ...); a name
            given twice counts once, as `lora_wrap` adapts each module once.
        optimizer: "adamw", "adamw8bit" or "paged_adamw8bit".
        gradient_checkpointing: recompute each decoder layer in backward.
        dtype: the dtype the model's weights and activations are stored in.
        adapter_dtype: dtype of the LoRA weights.
        blocksize: NF4 block size (QLoRA).
        attention_mask: whether batches carry padding (or packed samples), which the model
            expands to a (B, 1, T, T) mask; batches without padding take the fused causal path.
        device: "cuda" or "cpu"; only the optimizer step's scratch memory depends on it
            (foreach AdamW and the fused 8-bit kernel on CUDA, per-tensor loops on CPU).
        loss_chunk_size, activation_offload, optimizer_in_backward, mlp_tile_size,
            paged_device_budget: the memory features, as `minift.TrainConfig`'s fields of the
            same names. With any of them set (or paged_adamw8bit with a budget) the step is
            estimated with gradient checkpointing (`minift.memory.features`), device bytes in
            the categories and host bytes in `host` (paged states, offloaded layer inputs).
        world_size, parallel, cpu_offload: GPUs of a torchrun job, "fsdp" (the default when
            world_size > 1) or "ddp", and FSDP's CPU offload; the estimate is then per GPU
            (`minift.memory.parallel.per_gpu`, docs/distributed.md).

    Returns:
        A `MemoryEstimate`; `total` is the estimated peak (of one GPU with world_size > 1).

    Raises:
        TypeError: batch_size, seq_len or r not an integer (any integral type such as numpy
            ints is accepted; bools and floats are not), gradient_checkpointing or
            attention_mask not a bool, a bad dtype or config type.
        ValueError: an unknown method, optimizer, device or target module name, an empty
            target_modules, a non-positive size, or seq_len beyond the model's
            max_position_embeddings. Each message names the argument.
    """
    s = _check_args(config_or_preset, method=method, batch_size=batch_size, seq_len=seq_len,
                    r=r, target_modules=target_modules, optimizer=optimizer,
                    gradient_checkpointing=gradient_checkpointing, dtype=dtype,
                    adapter_dtype=adapter_dtype, blocksize=blocksize,
                    attention_mask=attention_mask, device=device)
    features = dict(loss_chunk_size=check_int("loss_chunk_size", loss_chunk_size, optional=True),
                    activation_offload=check_flag("activation_offload", activation_offload),
                    optimizer_in_backward=check_flag("optimizer_in_backward",
                                                     optimizer_in_backward),
                    mlp_tile_size=check_int("mlp_tile_size", mlp_tile_size, optional=True),
                    paged_device_budget=check_int("paged_device_budget", paged_device_budget,
                                                  minimum=0, optional=True))
    if any(v for k, v in features.items() if k != "paged_device_budget"):
        if not gradient_checkpointing:
            raise ValueError("the memory features are estimated for gradient-checkpointed steps; "
                             "set gradient_checkpointing=True with them")
        base = estimate_memory(s.cfg, method, batch_size, seq_len, r, target_modules,
                               optimizer, True, dtype, adapter_dtype=adapter_dtype,
                               blocksize=blocksize, attention_mask=attention_mask,
                               device=device, paged_device_budget=paged_device_budget)
        f = feature_estimate(base, s.cfg, s.method, s.targets, s.r, s.e, s.batch_size,
                             s.seq_len, s.optimizer, s.attention_mask, **features)
        settings = dict(base.settings, peak_moment=f.pop("peak_moment"), **features)
        return _spread(MemoryEstimate(settings=settings, terms=base.terms, **f), s, world_size,
                       parallel, cpu_offload, paged_device_budget)
    # what is stored: weights, adapters, optimizer states
    frozen, trainable = weight_bytes(s.cfg, s.method, s.targets, s.r, s.e, s.ae, s.blocksize)
    trainable_bytes = sum(n * elem for n, elem in trainable)
    states, host_states = paged_states(trainable, s.optimizer, paged_device_budget)
    fixed = frozen + trainable_bytes + states  # alive at every moment of the step
    # what autograd keeps, then the moments of the step that can hold the peak
    saved = _saved_for_backward(s)
    activations = sum(saved.terms.values())  # the high-water mark; the terms add up to it
    peak_name, total, other = max(_moments(s, fixed, trainable, saved), key=lambda m: m[1])
    settings = dict(model=getattr(s.cfg, "name", None), method=s.method,
                    batch_size=s.batch_size, seq_len=s.seq_len,
                    r=s.r if s.method != "full" else None, optimizer=s.optimizer,
                    gradient_checkpointing=s.gradient_checkpointing, dtype=str(s.dtype),
                    peak_moment=peak_name)
    terms = dict(saved.terms, loss_buffers=max(_loss_buffers(s)),
                 step_temporaries=step_temporaries(trainable, s.optimizer, s.device),
                 dequant_scratch=_qlora_scratch(s))
    est = MemoryEstimate(frozen_weights=frozen, trainable_params=trainable_bytes,
                         gradients=trainable_bytes, optimizer_states=states,
                         activations=activations, other=other, total=total,
                         settings=settings, terms=terms, host=host_states,
                         host_terms={"optimizer_states": host_states})
    return _spread(est, s, world_size, parallel, cpu_offload, paged_device_budget)


def _spread(est: MemoryEstimate, s: "_Setup", world_size, parallel, cpu_offload,
            paged_device_budget=DEFAULT_DEVICE_BUDGET) -> MemoryEstimate:
    """`est` itself on one GPU; per GPU of a torchrun job otherwise (minift.memory.parallel)."""
    world_size = check_int("world_size", world_size)
    if world_size == 1 and parallel is None:
        return est
    return per_gpu(est, s.cfg, world_size=world_size, parallel=parallel or "fsdp", r=s.r,
                   target_modules=s.targets, e=s.e, ae=s.ae, blocksize=s.blocksize,
                   cpu_offload=cpu_offload, paged_device_budget=paged_device_budget)


# ---- arguments ---------------------------------------------------------------------------
@dataclass(frozen=True)
class _Setup:
    """The checked arguments of `estimate_memory`, with the sizes its formulas share."""

    cfg: ModelConfig
    method: str
    batch_size: int
    seq_len: int
    r: int
    targets: tuple  # the adapted linears; every linear for full fine-tuning
    optimizer: str
    gradient_checkpointing: bool
    attention_mask: bool
    device: str
    dtype: torch.dtype
    e: int  # bytes per value of `dtype`
    ae: int  # bytes per value of the adapters' dtype
    blocksize: int

    @property
    def n_tok(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def n_loss(self) -> int:
        return self.batch_size * (self.seq_len - 1)  # every token but the last has a target

    @property
    def hidden(self) -> int:
        return self.e * self.cfg.hidden_size * self.n_tok  # one hidden state (B, T, h)


def _check_args(config_or_preset, *, method, batch_size, seq_len, r, target_modules, optimizer,
                gradient_checkpointing, dtype, adapter_dtype, blocksize, attention_mask,
                device) -> _Setup:
    """`estimate_memory`'s arguments checked (errors name the argument), as a `_Setup`."""
    cfg = _resolve_config(config_or_preset)
    method = check_choice("method", method, METHODS)
    optimizer = check_choice("optimizer", optimizer, OPTIMIZERS)
    batch_size = check_int("batch_size", batch_size, error=TypeError)
    seq_len = check_int("seq_len", seq_len, error=TypeError)
    r = check_int("r", r, error=TypeError)
    gradient_checkpointing = check_flag("gradient_checkpointing", gradient_checkpointing)
    attention_mask = check_flag("attention_mask", attention_mask)
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device must be 'cuda' or 'cpu', got {device!r}")
    e, ae = _elem(dtype), _elem(adapter_dtype)
    targets = LINEARS if method == "full" else _targets(target_modules)
    # checked last: the arguments themselves first, then whether the model can take them
    if seq_len > cfg.max_position_embeddings:
        raise ValueError(f"seq_len {seq_len} is longer than the model's max_position_embeddings "
                         f"({cfg.max_position_embeddings})")
    return _Setup(cfg=cfg, method=method, batch_size=batch_size, seq_len=seq_len, r=r,
                  targets=targets, optimizer=optimizer,
                  gradient_checkpointing=gradient_checkpointing, attention_mask=attention_mask,
                  device=device, dtype=dtype, e=e, ae=ae, blocksize=blocksize)


# ---- what autograd keeps -----------------------------------------------------------------
@dataclass
class _SavedForBackward:
    """Bytes kept for backward, split by when they are alive."""

    terms: dict  # named parts of the activations; they add up to the high-water mark
    per_layer: list  # each decoder layer's saved set, bottom to top
    shared: int  # token ids, cos/sin: alive from the embedding to the end of backward
    head: int  # the head's saved tensors: from the end of the forward to the start of backward
    base: int  # all but the head's tensors, alive through the loss
    recomputed: int  # checkpointing: what a recomputed layer keeps, with its residual sums


def _saved_for_backward(s: _Setup) -> _SavedForBackward:
    """The activations of the whole model: the head's terms and every layer's, summed."""
    terms = head_saved(s.cfg, s.method, s.e, s.batch_size, s.seq_len)
    layers = [layer_saved(s.cfg, s.method, s.targets, s.r, s.e, s.batch_size, s.seq_len,
                           input_grad=(i > 0 or s.method == "full"), masked=s.attention_mask)
              for i in range(s.cfg.num_hidden_layers)]
    per_layer = [sum(t.values()) for t in layers]
    head_terms = {k: terms.pop(k) for k in ("final_norm", "lm_head_input", "loss")}
    head = sum(head_terms.values())
    shared = sum(terms.values())
    recomputed = 0
    if s.gradient_checkpointing:
        # Each layer keeps only its inputs (hidden state; cos, sin and the boolean mask are
        # shared). Backward recomputes one layer at a time after the head's tensors are gone;
        # what the recompute keeps is that layer's saved set plus its residual sum.
        terms["layer_inputs"] = s.cfg.num_hidden_layers * s.hidden
        terms["attention_mask_bool"] = s.batch_size * s.seq_len ** 2 if s.attention_mask else 0
        base = sum(terms.values())
        # torch stops a recompute once the layer's last saved tensor exists; the frames it
        # unwinds still hold the residual x + attention and, when down_proj is an adapter
        # whose lora branch saves last, the base layer's output: both counted as kept
        adapted_down = s.method != "full" and "down_proj" in s.targets
        recomputed = max(per_layer) + s.hidden + (s.hidden if adapted_down else 0)
        terms["head_or_recomputed_layer"] = max(head, recomputed)
    else:
        for name in layers[-1]:
            terms["layers." + name] = sum(t[name] for t in layers)
        base = sum(terms.values())
        terms.update(head_terms)
    return _SavedForBackward(terms=terms, per_layer=per_layer, shared=shared, head=head, base=base,
                  recomputed=recomputed)


# ---- the moments that can hold the peak --------------------------------------------------
# Each returns (name, live bytes, of which "other"); `fixed` is weights + optimizer states.
def _moments(s: _Setup, fixed: int, trainable: list, saved: _SavedForBackward) -> list:
    """Every moment of the step that can hold the peak, for these settings."""
    moments = [_loss_moment(s, fixed, saved), _backward_start_moment(s, fixed, saved),
               _optimizer_step_moment(s, fixed, trainable)]
    if s.gradient_checkpointing:
        if s.method == "qlora":
            moments.append(_recompute_dequant_moment(s, fixed, saved))
        moments.append(_recompute_moment(s, fixed, saved))
        # the top layer has the most inputs alive, the bottom one the most gradients (full)
        for k in sorted({0, s.cfg.num_hidden_layers - 1}):
            moments.append(_backward_layer_moment(s, fixed, saved, k))
    elif s.method == "qlora":
        moments.append(_forward_dequant_moment(s, fixed, saved))
    return moments


def _loss_buffers(s: _Setup) -> tuple:
    """(logits, logit gradients): the loss's buffers at its two moments.

    minift.train drops the logits once the loss is computed, so computing the loss holds the
    logits in the compute dtype and, unless they are float32 already, their float32 copy; the
    start of backward holds the float32 gradient cross_entropy hands to log_softmax and the one
    that returns. The loss shifts the labels, so all of it covers every position (B*T rows).
    """
    v = s.cfg.vocab_size
    upcast = 4 * v * s.n_tok if s.e != 4 else 0
    return s.e * v * s.n_tok + upcast, 2 * 4 * v * s.n_tok


def _loss_moment(s: _Setup, fixed: int, saved: _SavedForBackward) -> tuple:
    """The end of the loss: every saved tensor and the logits."""
    logits = _loss_buffers(s)[0]
    return "loss", fixed + saved.base + saved.head + logits, logits


def _backward_start_moment(s: _Setup, fixed: int, saved: _SavedForBackward) -> tuple:
    """The start of backward: every saved tensor and the two float32 logit gradients."""
    logit_grads = _loss_buffers(s)[1]
    return "backward_start", fixed + saved.base + saved.head + logit_grads, logit_grads


def _optimizer_step_moment(s: _Setup, fixed: int, trainable: list) -> tuple:
    """The optimizer step: the gradients and the step's scratch."""
    step_tmp = step_temporaries(trainable, s.optimizer, s.device)
    gradients = sum(n * elem for n, elem in trainable)
    return "optimizer_step", fixed + gradients + step_tmp, step_tmp


def _qlora_scratch(s: _Setup) -> int:
    """The dequantization scratch of QLoRA's largest NF4 weight; 0 for other methods."""
    return dequant_scratch(s.cfg, s.device, s.e) if s.method == "qlora" else 0


def _head_grads(s: _Setup) -> int:
    """Gradients of lm_head and the final norm, alive through the layers' backward (full)."""
    return s.e * s.cfg.hidden_size * (s.cfg.vocab_size + 1) if s.method == "full" else 0


def _recompute_moment(s: _Setup, fixed: int, saved: _SavedForBackward) -> tuple:
    """Checkpointing, recomputing the top layer: its kept set, the head's gradients and two
    hidden-state gradients."""
    return ("recompute", fixed + saved.base + saved.recomputed + _head_grads(s) + 2 * s.hidden,
            2 * s.hidden)


def _recompute_dequant_moment(s: _Setup, fixed: int, saved: _SavedForBackward) -> tuple:
    """Checkpointing, QLoRA: the recompute's dequantization of the top layer's down_proj.

    Alive: the layer's kept tensors but down_proj's adapter ones, the residual x + attention,
    two hidden-state gradients and the dequantization scratch.
    """
    down = down_proj_saved(s.cfg, s.method, s.targets, s.r, s.e, s.n_tok)
    other = 2 * s.hidden + _qlora_scratch(s)
    live = (fixed + saved.shared + saved.terms["layer_inputs"]
            + saved.terms["attention_mask_bool"] + max(saved.per_layer) - down["adapter"]
            + s.hidden + _head_grads(s) + other)
    return "recompute_dequant", live, other


def _backward_layer_moment(s: _Setup, fixed: int, saved: _SavedForBackward, k: int) -> tuple:
    """Checkpointing, backward through layer k's MLP just after down_proj's weight gradient.

    Alive: the layer's recomputed tensors (less down_proj's input, now freed), the inputs of
    this and the lower layers, the gradients of every layer above, and as scratch the output's
    gradient and three (B, T, intermediate) gradients of the SwiGLU.
    """
    layer_grads = layer_gradient_bytes(s.cfg, s.method, s.targets, s.r, s.e, s.ae)
    scratch = 3 * s.e * s.cfg.intermediate_size * s.n_tok + s.hidden
    above = s.cfg.num_hidden_layers - 1 - k
    live = (fixed + saved.shared + saved.terms["attention_mask_bool"] + (k + 1) * s.hidden
            + saved.per_layer[k]
            - down_proj_saved(s.cfg, s.method, s.targets, s.r, s.e, s.n_tok, freed=True)
            + _head_grads(s) + above * layer_grads["layer"] + layer_grads["down_proj"] + scratch)
    return f"backward_layer_{k}", live, scratch


def _forward_dequant_moment(s: _Setup, fixed: int, saved: _SavedForBackward) -> tuple:
    """QLoRA without checkpointing: the NF4 forward of the last layer's down_proj.

    Every earlier saved tensor is alive, its input (the SwiGLU product) is not saved yet, and
    the layer's input and its residual sum are held.
    """
    down = down_proj_saved(s.cfg, s.method, s.targets, s.r, s.e, s.n_tok)
    other = s.e * s.cfg.intermediate_size * s.n_tok + 2 * s.hidden + _qlora_scratch(s)
    return ("forward_dequant", fixed + saved.base - down["input"] - down["adapter"] + other,
            other)


