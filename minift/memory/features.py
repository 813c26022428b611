"""Device and host memory of a checkpointed training step with the memory features on.

`estimate_features` starts from `estimate_memory`'s weights, trainable tensors and optimizer
states and lays out the moments that can hold the peak when the features change them (N = B*T
tokens, e = bytes of the compute dtype, h hidden, i intermediate, V vocabulary, L layers,
hid = e*h*N one hidden state):

* loss, unchunked: logits e*V*N + their fp32 copy 4*V*N, the saved fp32 log-softmax 4*V*N, then
  two fp32 (N, V) gradients at the start of backward (what `estimate_memory` counts);
  chunked (c tokens, `minift.loss`): one chunk's logits and fp32 copy, its saved log-softmax and
  its gradient, 3*4*c*V + e*c*V, plus the gradients kept from forward: hid for the hidden states
  and V*h*e for a trained lm_head (full fine-tuning).
* checkpointed layer inputs: L*hid on the device, or with activation offload on the host, the
  device holding the restored input and the prefetched one below it (2*hid) during backward.
* one layer's recompute: `estimate_memory`'s per-layer saved tensors; with MLP tiles of t tokens
  the SwiGLU's (N, i) tensors shrink to (B*t, i) (`minift.model.DecoderLayer._mlp`).
* gradients: all trainable bytes at the optimizer step; with the step in backward only the
  largest trainable tensor, and no step moment after backward.
* optimizer states: "paged_adamw8bit" keeps up to `paged_device_budget` bytes of 8-bit pages on
  the device and all of them in host memory; float32 moments of small tensors stay on the device.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Union

import torch

from minift.config import ModelConfig
from minift._util import LINEARS
from minift.memory.estimate import _elem, _resolve_config, _targets, estimate_memory
from minift.memory.formulas import adam_state_bytes, layer_saved, weight_bytes

DEFAULT_BUDGET = 2**30


@dataclass
class FeatureEstimate:
    """Device bytes per category at the estimated peak, host bytes apart; `total` = device peak."""

    frozen_weights: int
    trainable_params: int
    gradients: int
    optimizer_states: int
    activations: int
    other: int
    total: int
    host: int
    peak_moment: str
    settings: dict = field(default_factory=dict)
    host_terms: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        keys = ("frozen_weights", "trainable_params", "gradients", "optimizer_states",
                "activations", "other", "total", "host")
        return {k: int(getattr(self, k)) for k in keys}


def _states(trainable, optimizer, budget) -> tuple[int, int]:
    """(device bytes, host bytes) of the optimizer states."""
    if optimizer != "paged_adamw8bit":
        return sum(adam_state_bytes(n, s, optimizer) for n, s in trainable), 0
    small = sum(adam_state_bytes(n, s, optimizer) for n, s in trainable if n < 4096)
    paged = sum(adam_state_bytes(n, s, optimizer) for n, s in trainable if n >= 4096)
    resident = paged if budget is None else min(budget, paged)
    return small + resident, paged


def _loss_moment(cfg, method, e, n_tok, chunk) -> tuple[int, int, int]:
    """(bytes at the loss, bytes at the start of backward, saved part) beyond the layers."""
    v, hid = cfg.vocab_size, e * cfg.hidden_size * n_tok
    if chunk is None:
        saved = 4 * v * n_tok + 8 * n_tok
        return saved + e * v * n_tok + 4 * v * n_tok, saved + 2 * 4 * v * n_tok, saved
    c = min(chunk, n_tok)
    head_grad = e * v * cfg.hidden_size if method == "full" else 0
    buffers = 3 * 4 * c * v + (e * c * v if e != 4 else 0)
    # backward hands on the kept gradients scaled by the incoming one: copies of both
    return buffers + hid + head_grad, 2 * (hid + head_grad), 0


def estimate_features(config_or_preset: Union[ModelConfig, str], method: str = "qlora",
                      batch_size: int = 1, seq_len: int = 2048, r: int = 16,
                      target_modules="all-linear", optimizer: str = "adamw",
                      dtype: torch.dtype = torch.bfloat16, *,
                      loss_chunk_size: Optional[int] = 1024, activation_offload: bool = False,
                      optimizer_in_backward: bool = False, mlp_tile_size: Optional[int] = None,
                      paged_device_budget: Optional[int] = DEFAULT_BUDGET,
                      attention_mask: bool = False, device: str = "cuda") -> FeatureEstimate:
    """Estimate a gradient-checkpointed step with the memory features (names as TrainConfig's).

    Raises:
        ValueError: what `estimate_memory` refuses, and optimizer_in_backward for a method
            other than "full" with more than one micro-batch is not modelled (grad_accum = 1).
    """
    cfg = _resolve_config(config_or_preset)
    base = estimate_memory(cfg, method, batch_size, seq_len, r, target_modules, optimizer,
                           True, dtype, attention_mask=attention_mask, device=device)
    e = _elem(dtype)
    targets = LINEARS if method == "full" else _targets(target_modules)
    frozen, trainable = weight_bytes(cfg, method, targets, r, e, 4, 64)
    trainable_bytes = sum(n * s for n, s in trainable)
    states, host_states = _states(trainable, optimizer, paged_device_budget)
    n_tok = batch_size * seq_len
    hid = e * cfg.hidden_size * n_tok
    L = cfg.num_hidden_layers
    shared = base.terms.get("embedding_ids", 0) + base.terms.get("rope_cos_sin", 0) \
        + base.terms.get("attention_mask_bool", 0)
    inputs_dev = 0 if activation_offload else L * hid
    layer = sum(layer_saved(cfg, method, targets, r, e, batch_size, seq_len, True,
                             attention_mask).values())
    tiled = mlp_tile_size is not None and mlp_tile_size < seq_len
    tile_tok = batch_size * (mlp_tile_size if tiled else seq_len)
    # tiled, a layer's recompute keeps only the tiles' inputs (views of the normed input,
    # counted already); each tile's SwiGLU tensors and down_proj input live during its own
    # recompute in backward
    tile_mlp = 4 * e * cfg.intermediate_size * tile_tok if tiled else 0
    if tiled:
        layer -= 4 * e * cfg.intermediate_size * n_tok
    largest = max((n * s for n, s in trainable), default=0)
    grads_all = largest if optimizer_in_backward else trainable_bytes
    fixed = frozen + trainable_bytes + states
    at_loss, at_backward, saved_loss = _loss_moment(cfg, method, e, n_tok, loss_chunk_size)
    head_nonloss = (4 * cfg.hidden_size + 4) * n_tok + (2 * hid if method == "full" else 0)
    restored = 2 * hid if activation_offload else 0
    scratch_bwd = 3 * e * cfg.intermediate_size * tile_tok + hid
    step_tmp = base.terms.get("step_temporaries", 0)
    if optimizer_in_backward:
        step_tmp = min(step_tmp, 2 * largest)  # one tensor's step at a time
    if host_states:  # a paged step brings one tensor's pages to the device at a time
        step_tmp += max(adam_state_bytes(n, s, optimizer) for n, s in trainable if n >= 4096)
    moments = {
        "loss": (fixed + shared + inputs_dev + head_nonloss + at_loss,
                 inputs_dev + head_nonloss + saved_loss, 0),
        "backward_start": (fixed + shared + inputs_dev + head_nonloss + at_backward,
                           inputs_dev + head_nonloss + saved_loss, 0),
        "recompute": (fixed + shared + inputs_dev + restored + layer + hid + 2 * hid,
                      inputs_dev + restored + layer + hid, 0),
        "backward_layer": (fixed + shared + inputs_dev + restored + layer + tile_mlp + scratch_bwd
                           + (largest if optimizer_in_backward else trainable_bytes - largest),
                           inputs_dev + restored + layer + tile_mlp, 0),
    }
    if not optimizer_in_backward:
        moments["optimizer_step"] = (fixed + trainable_bytes + step_tmp, 0, 0)
    else:
        # the head's weight is stepped first, while the loss's backward copies are alive
        moments["step_in_backward"] = (moments["backward_start"][0] + step_tmp,
                                       moments["backward_start"][1], 0)
    name = max(moments, key=lambda k: moments[k][0])
    total, acts, _ = moments[name]
    activations = max(m[1] for m in moments.values())
    host_terms = {"optimizer_states": host_states,
                  "layer_inputs": L * hid if activation_offload else 0}
    return FeatureEstimate(
        frozen_weights=frozen, trainable_params=trainable_bytes, gradients=grads_all,
        optimizer_states=states, activations=activations,
        other=max(0, total - fixed - acts - (grads_all if name == "optimizer_step" else 0)),
        total=total, host=sum(host_terms.values()), peak_moment=name,
        settings=dict(method=method, batch_size=batch_size, seq_len=seq_len, r=r,
                      optimizer=optimizer, loss_chunk_size=loss_chunk_size,
                      activation_offload=activation_offload,
                      optimizer_in_backward=optimizer_in_backward, mlp_tile_size=mlp_tile_size,
                      paged_device_budget=paged_device_budget, dtype=str(dtype)),
        host_terms=host_terms)


# What the planner turns on, one step at a time, until a method fits (gradient checkpointing is
# on throughout). Each rung keeps the ones before it.
LADDER = (
    ("chunked loss (loss_chunk_size=1024)", dict(loss_chunk_size=1024)),
    ("activation offload", dict(activation_offload=True)),
    ("smaller loss chunks (256) and MLP tiles of 1024 tokens",
     dict(loss_chunk_size=256, mlp_tile_size=1024)),
    ("paged 8-bit AdamW, nothing resident (paged_device_budget=0)",
     dict(optimizer="paged_adamw8bit", paged_device_budget=0)),
    ("optimizer step in backward (max_grad_norm=None, grad_accum=1)",
     dict(optimizer_in_backward=True)),
)
LONGEST_LIMIT = 1 << 22  # 4M tokens: the search's upper bound


def plan_features(cfg: ModelConfig, budget: int, method: str, batch_size: int, seq_len: int,
                  **common) -> dict:
    """The fewest rungs of `LADDER` with which `method` fits `budget` device bytes.

    Returns {"fits", "features" (names of the rungs used), "settings" (estimate_features
    keywords), "estimate", "longest_seq_batch_1"}; `common` holds r, optimizer, dtype, ...
    """
    settings, used = dict(common, loss_chunk_size=None), []
    est = estimate_features(cfg, method, batch_size, seq_len, **settings)
    for name, change in LADDER:
        if est.total <= budget:
            break
        settings.update(change)
        used.append(name)
        est = estimate_features(cfg, method, batch_size, seq_len, **settings)
    full_set = dict(settings)
    for _, change in LADDER:
        full_set.update(change)
    return {"fits": est.total <= budget, "features": used, "settings": settings, "estimate": est,
            "longest_seq_batch_1": longest_seq(cfg, budget, method, **full_set)}


def longest_seq(cfg: ModelConfig, budget: int, method: str, **settings) -> int:
    """Longest sequence at batch 1 whose estimate fits `budget` (0 if none), memory only: the
    search goes past max_position_embeddings (the caller says when the answer is beyond it)."""
    roomy = dataclasses.replace(cfg, max_position_embeddings=LONGEST_LIMIT)

    def fits(t):
        return estimate_features(roomy, method, 1, t, **settings).total <= budget

    if not fits(2):
        return 0
    good, bad = 2, LONGEST_LIMIT + 1
    while bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    return good


def format_feature_plan(results: dict, budget: int, max_pos: int, fmt) -> str:
    """Lines for ``python -m minift plan``: per method, the features needed, device and host
    (``fmt`` writes a byte count)."""
    lines = ["", "With the memory features (gradient checkpointing on), per method:"]
    for method, res in results.items():
        est = res["estimate"]
        what = ", ".join(res["features"]) or "none needed"
        status = "fits" if res["fits"] else "does not fit even with every feature"
        longest = res["longest_seq_batch_1"]
        beyond = f" (beyond max_position_embeddings {max_pos})" if longest > max_pos else ""
        lines.append(f"- {method}: {status} with {what}: device {fmt(est.total)} of "
                     f"{fmt(budget)}, host RAM {fmt(est.host)}; longest sequence at batch 1 "
                     f"with every feature: {longest}{beyond}")
    return "\n".join(lines)
