"""Memory of one DPO step, built on `estimate_memory`'s SFT model of a step.

A DPO step (minift.objectives.dpo.DPOObjective.step) differs from an SFT step in three ways:

1. twice the sequences: B pairs are one (2B, T) forward, chosen rows then rejected rows, so the
   policy's activations, logits and loss buffers are those of an SFT step with batch 2B;
2. a reference forward before it, without autograd: it keeps no activations, but its logits
   (2B, T, V) in the compute dtype, their float32 copy and the float32 log-softmax that the
   cross-entropy makes are alive at its end, on top of the weights and optimizer states (the
   gradients are freed: zero_grad(set_to_none=True) ran after the previous step); with
   ``loss_chunk_size`` only one chunk's logits are (``minift.objectives.loss.chunked_row_logps``), and the
   policy's loss is that of an SFT step with the chunked loss;
3. the reference's weights: none with LoRA/QLoRA (the same model with its adapters switched
   off), none with precomputed log-probs (2 floats per pair, on disk and host), a second copy of
   the model for full fine-tuning ("copy"), or that copy in NF4 ("copy_nf4").

The peak is the larger of the policy step's peak and the end of the reference forward.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Union

import torch

from minift.memory.estimate import MemoryEstimate, _elem, _resolve_config, estimate_memory
from minift.models.config import ModelConfig

REFERENCES = ("adapters", "copy", "copy_nf4", "precomputed")


def _reference_weights(cfg, method, reference, policy, seq_len, **kwargs) -> int:
    if reference in ("adapters", "precomputed"):
        return 0
    if reference == "copy_nf4":  # the QLoRA base is exactly that: NF4 linears, the rest in dtype
        return estimate_memory(cfg, "qlora", 1, seq_len, **kwargs).frozen_weights
    # a frozen copy of the policy as it started: its base weights, and for full FT the weights
    # that are trained
    return policy.frozen_weights + (policy.trainable_params if method == "full" else 0)


def estimate_dpo_memory(config_or_preset: Union[ModelConfig, str], method: str = "lora",
                        batch_size: int = 1, seq_len: int = 512, *, reference: str = None,
                        **kwargs) -> MemoryEstimate:
    """Estimate the memory of one DPO training step, by category, in bytes.

    Args:
        config_or_preset, method, seq_len: as for `estimate_memory`.
        batch_size: preference pairs per micro-batch (the forward holds 2 * batch_size rows).
        reference: "adapters" (LoRA/QLoRA default), "copy" (full default), "copy_nf4" or
            "precomputed"; see the module docstring.
        **kwargs: the other `estimate_memory` options (r, optimizer, dtype, device, ...).

    Returns:
        A `MemoryEstimate`; the reference copy counts as frozen weights, and ``terms`` adds
        ``reference_weights``, ``reference_forward`` (the bytes alive at the end of the
        reference forward) and ``sequences`` (2 * batch_size).
    """
    cfg = _resolve_config(config_or_preset)
    if reference is None:
        reference = "copy" if method == "full" else "adapters"
    if reference not in REFERENCES:
        raise ValueError(f"reference must be one of {', '.join(REFERENCES)}, got {reference!r}")
    if reference == "adapters" and method == "full":
        raise ValueError("reference='adapters' needs LoRA or QLoRA: full fine-tuning has no "
                         "adapters to switch off; use 'copy', 'copy_nf4' or 'precomputed'")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive number of pairs, got {batch_size!r}")
    policy = estimate_memory(cfg, method, 2 * batch_size, seq_len, **kwargs)
    extra = _reference_weights(cfg, method, reference, policy, seq_len,
                               **{k: v for k, v in kwargs.items() if k in ("dtype", "blocksize")})
    e = _elem(kwargs.get("dtype", torch.bfloat16))
    rows = 2 * batch_size * seq_len
    chunk = kwargs.get("loss_chunk_size")
    # reference forward's end: logits in dtype + their float32 copy + float32 log-softmax, of all
    # (2B, T) positions, or of one chunk of them after the (2B, T, H) hidden states
    # (minift.objectives.loss.chunked_row_logps)
    if chunk is None:
        ref_pass = rows * cfg.vocab_size * (e + 4 + 4)
    else:
        ref_pass = min(chunk, rows) * cfg.vocab_size * (e + 4 + 4) + rows * cfg.hidden_size * e
    ref_pass = 0 if reference == "precomputed" else ref_pass
    fixed = policy.frozen_weights + policy.trainable_params + policy.optimizer_states + extra
    total = max(policy.total + extra, fixed + ref_pass)
    other = policy.other if total == policy.total + extra else ref_pass
    settings = dict(policy.settings, objective="dpo", reference=reference, pairs=batch_size,
                    peak_moment=policy.settings["peak_moment"] if other == policy.other
                    else "reference_forward")
    terms = dict(policy.terms, reference_weights=extra, reference_forward=ref_pass,
                 sequences=2 * batch_size)
    activations = policy.activations if other == policy.other else 0
    gradients = policy.gradients if other == policy.other else 0
    return replace(policy, frozen_weights=policy.frozen_weights + extra, other=other,
                   activations=activations, gradients=gradients, total=total,
                   settings=settings, terms=terms)
