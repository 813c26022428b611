"""Device and host memory of a checkpointed training step with the memory features on.

`feature_estimate` starts from `estimate_memory`'s weights, trainable tensors and optimizer
states and lays out the moments that can hold the peak when the features change them (N = B*T
tokens, e = bytes of the compute dtype, h hidden, i intermediate, V vocabulary, L layers,
hid = e*h*N one hidden state):

* loss, unchunked: logits e*V*N + their fp32 copy 4*V*N, the saved fp32 log-softmax 4*V*N, then
  two fp32 (N, V) gradients at the start of backward (what `estimate_memory` counts);
  chunked (c tokens, `minift.objectives.loss`): one chunk's logits and fp32 copy, its saved log-softmax and
  its gradient, 3*4*c*V + e*c*V, plus the gradients kept from forward: hid for the hidden states
  and V*h*e for a trained lm_head (full fine-tuning).
* checkpointed layer inputs: L*hid on the device, or with activation offload on the host, the
  device holding the restored input and the prefetched one below it (2*hid) during backward.
* one layer's recompute: `estimate_memory`'s per-layer saved tensors; with MLP tiles of t tokens
  the SwiGLU's (N, i) tensors shrink to (B*t, i) (`minift.models.llama.DecoderLayer._mlp`).
* gradients: all trainable bytes at the optimizer step; with the step in backward only the
  largest trainable tensor, and no step moment after backward.
* optimizer states: "paged_adamw8bit" keeps up to `paged_device_budget` bytes of 8-bit pages on
  the device and all of them in host memory; float32 moments of small tensors stay on the device.
"""
from __future__ import annotations

from typing import Optional

from minift.memory.formulas import adam_state_bytes, layer_saved, weight_bytes
from minift.models.config import ModelConfig
from minift.optim.paging import DEFAULT_PAGE_SIZE


def paged_states(trainable, optimizer, budget) -> tuple[int, int]:
    """(device bytes, host bytes) of the optimizer states; a paged optimizer keeps up to
    `budget` bytes of its 8-bit pages resident (None: all)."""
    if optimizer != "paged_adamw8bit":
        return sum(adam_state_bytes(n, s, optimizer) for n, s in trainable), 0
    small = sum(adam_state_bytes(n, s, optimizer) for n, s in trainable if n < 4096)
    paged = sum(adam_state_bytes(n, s, optimizer) for n, s in trainable if n >= 4096)
    resident = paged if budget is None else min(budget, paged)
    return small + resident, paged


def _loss_moment(cfg, method, e, n_tok, chunk) -> tuple[int, int, int]:
    """(bytes at the loss, bytes at the start of backward, saved part) beyond the layers."""
    v, hid = cfg.vocab_size, e * cfg.hidden_size * n_tok
    if chunk is None or chunk >= n_tok:  # one chunk would hold every token: the full logits
        saved = 4 * v * n_tok + 8 * n_tok
        return saved + e * v * n_tok + 4 * v * n_tok, saved + 2 * 4 * v * n_tok, saved
    c = min(chunk, n_tok)
    head_grad = e * v * cfg.hidden_size if method == "full" else 0
    buffers = 3 * 4 * c * v + (e * c * v if e != 4 else 0)
    # backward hands on the kept gradients scaled by the incoming one: copies of both
    return buffers + hid + head_grad, 2 * (hid + head_grad), 0


def feature_estimate(base, cfg: ModelConfig, method: str, targets: tuple, r: int, e: int,
                     batch_size: int, seq_len: int, optimizer: str, attention_mask: bool, *,
                     loss_chunk_size: Optional[int], activation_offload: bool,
                     optimizer_in_backward: bool, mlp_tile_size: Optional[int],
                     paged_device_budget: Optional[int]) -> dict:
    """The fields of a `MemoryEstimate` (and `host`, `host_terms`) of a gradient-checkpointed
    step with the features; `base` is `estimate_memory`'s checkpointed estimate without them."""
    frozen, trainable = weight_bytes(cfg, method, targets, r, e, 4, 64)
    trainable_bytes = sum(n * s for n, s in trainable)
    states, host_states = paged_states(trainable, optimizer, paged_device_budget)
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
    if host_states:
        # a paged step streams one tensor's pages, at most three pages of 2**20 values (codes
        # and absmax of both moments) on the device at once (minift.optim.paging.Pager.run)
        page = adam_state_bytes(DEFAULT_PAGE_SIZE, 2, optimizer)
        step_tmp += min(3 * page, max(adam_state_bytes(n, s, optimizer) for n, s in trainable
                                      if n >= 4096))
    if optimizer_in_backward:
        step_tmp = min(step_tmp, 2 * largest)  # one tensor's step at a time
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
    return dict(frozen_weights=frozen, trainable_params=trainable_bytes, gradients=grads_all,
                optimizer_states=states, activations=activations,
                other=max(0, total - fixed - acts - (grads_all if name == "optimizer_step" else 0)),
                total=total, host=sum(host_terms.values()), host_terms=host_terms,
                peak_moment=name)
