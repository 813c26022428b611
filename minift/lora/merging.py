"""Merging with a check: fold the adapters into the base, then compare the merged model's logits
with the adapter model's on a few held-out samples; a merge that moved them past a tolerance
raises.

From an NF4 base there are two bases to merge into, and they give different models:

* the dequantized 4-bit weights (the default): W_nf4 + scale * B @ A is the model the adapter was
  trained with, so the merged logits match the adapter model's up to rounding;
* the original 16-bit weights, when given: W + scale * B @ A is what most users expect to ship,
  but the adapter learned to correct W_nf4, not W, so the logits move by about the quantization
  error. The report says which base was used and how far the logits moved, so this is a number
  rather than a surprise after deployment.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from minift.lora.layer import lora_layers, merge_lora
from minift.models.loading import _read_tensors
from minift.nf4.linear import NF4Linear


def _original_weights(base_weights, names) -> dict:
    """{layer name: original weight} for the NF4 layers `names`, from a dict or a checkpoint."""
    wanted = {f"{n}.base_layer.weight": n for n in names}
    wanted.update({f"{n}.weight": n for n in names})
    if isinstance(base_weights, (str, Path)):
        # the checkpoint holds the unwrapped names (model.layers.0.self_attn.q_proj.weight)
        found = {wanted[k]: t for _, k, t in _read_tensors(str(base_weights)) if k in wanted}
    else:
        found = {wanted[k]: t for k, t in base_weights.items() if k in wanted}
    missing = [n for n in names if n not in found]
    if missing:
        raise ValueError(f"merge: base_weights has no original weight for {missing[0]!r} "
                         f"({len(missing)} NF4 layer(s) missing, e.g. {missing[0]}.weight)")
    return found


def _swap_in_originals(model, originals) -> None:
    """Replace each NF4 base layer of a LoRA layer by an nn.Linear holding its original weight."""
    for name, layer in lora_layers(model):
        if name not in originals:
            continue
        base, w = layer.base_layer, originals[name]
        if tuple(w.shape) != (base.out_features, base.in_features):
            raise ValueError(f"merge: original weight of {name!r} has shape {tuple(w.shape)}, the "
                             f"layer is ({base.out_features}, {base.in_features})")
        device = _device(layer)
        linear = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                           device=device, dtype=w.dtype)
        with torch.no_grad():
            linear.weight.copy_(w.to(device))
            if base.bias is not None:
                linear.bias.copy_(base.bias.to(w.dtype))
        layer.base_layer = linear.requires_grad_(False)


def _device(layer):
    return layer.lora_A.weight.device


def _pin_merge_dtype(model) -> None:
    """An NF4 layer without a compute dtype ran in its input's dtype, which is that of the
    model's unquantized weights (norms, embeddings); merge into that dtype rather than
    merge_lora's bf16 fallback, so the check compares like with like."""
    dtype = next((p.dtype for n, p in model.named_parameters()
                  if "lora_" not in n and p.is_floating_point()), None)
    for _, layer in lora_layers(model):
        base = layer.base_layer
        if isinstance(base, NF4Linear) and getattr(base, "compute_dtype", None) is None and dtype:
            base.compute_dtype = dtype


@torch.no_grad()
def _logits(model, samples):
    was = model.training
    model.eval()
    out = [model(ids.unsqueeze(0) if ids.dim() == 1 else ids).float() for ids in samples]
    model.train(was)
    return out


# Largest accepted |logit difference| between the merged model and the unmerged one on the same
# base, relative to max(1, largest |logit|), by the dtype the merge is computed in: a merge adds
# scale * B @ A to W once, so the logits differ only by the rounding of W + delta in that dtype.
# float32 measured here: <= 2e-6 relative on the shipped base; bf16 keeps 8 significant bits
# (2^-8 = 3.9e-3 per rounding), float16 11 bits.
MERGE_RTOL = {torch.float32: 1e-4, torch.float64: 1e-8, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def merge_and_check(model, samples, base_weights=None, *, tolerance=None, dtype=None) -> tuple:
    """`merge_lora` plus a before/after comparison of the logits on `samples`.

    The merge is checked against the unmerged adapter model on the base it merges into: logits
    that differ by more than `tolerance` mean the merge went wrong, and raise. The report also
    gives the difference from the adapter model as trained, which for an NF4 base merged into
    the original weights includes the quantization error (the adapter corrected W_nf4, not W).

    Args:
        model: a LoRA-wrapped model (modified in place, like `merge_lora`).
        samples: a few held-out inputs, each a (T,) or (B, T) tensor of token ids.
        base_weights: for an NF4 base only: the original 16-bit weights to merge into, as a dict
            {name: tensor} or the path of the checkpoint the model was loaded from. None merges
            into the dequantized 4-bit weights.
        tolerance: largest accepted |logit difference| of the merge; None: ``MERGE_RTOL`` of the
            merged weights' dtype times max(1, largest |logit|).
        dtype: the dtype the merged model will be saved in; it is cast before the comparison,
            so the check is of what is saved (None keeps the merge's dtype).

    Returns:
        (model, report): report = {"merged_into", "max_abs_logit_diff", "merge_error",
        "tolerance", "max_logit", "samples", "dtype"}; merged_into is "dequantized_nf4",
        "original_weights" or "weights" (no NF4 layer); max_abs_logit_diff is against the adapter
        model as trained, merge_error against the unmerged model on the same base.

    Raises:
        ValueError: when merge_error exceeds the tolerance, naming both and the base.
    """
    layers = lora_layers(model)
    if not samples:
        raise ValueError("merge_and_check: give at least one held-out sample to compare on")
    samples = [torch.as_tensor(s) for s in samples]
    nf4 = [n for n, m in layers if isinstance(m.base_layer, NF4Linear)]
    device = _device(layers[0][1]) if layers else torch.device("cpu")
    samples = [s.to(device) for s in samples]
    trained = _logits(model, samples)  # the adapter model: what was trained
    merged_into = "weights"
    if nf4:
        merged_into = "dequantized_nf4"
        if base_weights is not None:
            _swap_in_originals(model, _original_weights(base_weights, nf4))
            merged_into = "original_weights"
    elif base_weights is not None:
        raise ValueError("merge_and_check: base_weights is only for an NF4 base; this model's "
                         "adapters sit on unquantized weights already")
    _pin_merge_dtype(model)
    unmerged = trained if merged_into != "original_weights" else _logits(model, samples)
    merge_lora(model)
    if dtype is not None:
        model.to(dtype)
    after = _logits(model, samples)
    dtype = _merged_dtype(model)
    scale = max(float(b.abs().max()) for b in trained)
    error = max(float((a - b).abs().max()) for a, b in zip(after, unmerged))
    if tolerance is None:
        tolerance = MERGE_RTOL.get(dtype, 1e-4) * max(1.0, scale)
    report = {"merged_into": merged_into,
              "max_abs_logit_diff": max(float((a - b).abs().max()) for a, b in zip(after, trained)),
              "merge_error": error, "tolerance": float(tolerance), "max_logit": scale,
              "samples": len(samples), "dtype": str(dtype).removeprefix("torch.")}
    if not error <= tolerance:  # NaN fails too
        raise ValueError(f"merge check failed: merged into {merged_into.replace('_', ' ')} "
                         f"({report['dtype']}), the merged model's logits differ from the unmerged "
                         f"model's by {error:.3g} on {len(samples)} sample(s), over the tolerance "
                         f"{tolerance:.3g}; the merged weights are not the model that was trained")
    return model, report


def _merged_dtype(model) -> torch.dtype:
    """The dtype of the merged linear weights (where the merge was rounded)."""
    return next((m.weight.dtype for m in model.modules() if isinstance(m, nn.Linear)), torch.float32)


def describe(report: dict) -> str:
    """One line: which base the adapter went into and how far the logits moved."""
    into = {"dequantized_nf4": "the dequantized 4-bit (NF4) weights it was trained on",
            "original_weights": "the original 16-bit weights (not the 4-bit ones it was trained on)",
            "weights": "the base weights"}[report["merged_into"]]
    return (f"merge check: adapter merged into {into}; largest |logit difference| merged vs "
            f"adapter model on {report['samples']} held-out sample(s): "
            f"{report['max_abs_logit_diff']:.3g} (largest |logit| {report['max_logit']:.3g}; the "
            f"merge itself {report['merge_error']:.3g}, tolerance {report['tolerance']:.3g})")

