"""Fingerprints that tell whether a checkpoint belongs to this run: parameter shapes, the frozen
base's sums, the tokenized data's hash; and `check_compatible`, which compares them."""
from __future__ import annotations

import hashlib
from typing import Optional

import numpy as np
import torch

from minift.data.preference import PAIR_KEYS

# Relative tolerance of the base fingerprint. The sums are float64 over float32 (or uint8) values,
# so another summation order (thread count, CPU vs CUDA) moves them by ~1e-12 relative; another
# base (other weights, weights scaled, another quantization) moves them by far more than 1e-4.
BASE_RTOL = 1e-4
_FINGERPRINT_CHUNK = 1 << 22  # elements converted to float64 at a time


def model_fingerprint(model: torch.nn.Module) -> dict:
    """Parameter name -> shape, for telling whether a checkpoint belongs to this model."""
    return {name: list(p.shape) for name, p in model.named_parameters()}


def base_fingerprint(model: torch.nn.Module) -> dict:
    """Frozen tensor name -> [numel, sum, sum of squares] (float64), for telling whether a resume
    runs on the base the checkpoint was trained on.

    LoRA and QLoRA checkpoints hold only the adapters, so a base with the same shapes but other
    weights would otherwise resume silently. Frozen parameters and buffers (NF4 packed weights,
    their absmax codes and scales) are summed; a pass over the weights, done once per run.
    """
    tensors = [(n, p) for n, p in model.named_parameters() if not p.requires_grad]
    tensors += list(model.named_buffers())
    out = {}
    for name, t in tensors:
        flat = t.detach().reshape(-1)
        total = torch.zeros((), dtype=torch.float64, device=flat.device)
        squares = torch.zeros((), dtype=torch.float64, device=flat.device)
        for chunk in flat.split(_FINGERPRINT_CHUNK):  # bounded float64 copies, even for 7B models
            c = chunk.to(torch.float64)
            total += c.sum()
            squares += (c * c).sum()
        out[name] = [flat.numel(), float(total), float(squares)]
    return out


def _base_difference(saved: dict, now: dict, rtol: float = BASE_RTOL) -> Optional[str]:
    """A description of the first frozen tensor that differs, or None."""
    for name, (numel, total, squares) in saved.items():
        if name not in now:
            return f"frozen tensor {name!r} is not in this run's base"
        n2, t2, s2 = now[name]
        if n2 != numel:
            return f"frozen tensor {name!r} has {numel} elements in the checkpoint's base, {n2} now"
        scale = max(squares, s2)
        # |sum| <= sqrt(numel * sum of squares) (Cauchy-Schwarz): the natural scale of a sum that
        # may itself be near zero.
        if abs(squares - s2) > rtol * scale or abs(total - t2) > rtol * (numel * scale) ** 0.5:
            return (f"frozen tensor {name!r} differs (sum {total:.6g}, sum of squares {squares:.6g} "
                    f"in the checkpoint's base; {t2:.6g}, {s2:.6g} now)")
    extra = [n for n in now if n not in saved]
    return f"frozen tensor {extra[0]!r} is not in the checkpoint's base" if extra else None


def data_fingerprint(examples) -> dict:
    """Count and hash of tokenized examples (or preference pairs), so a resume can tell that the
    data is the same."""
    h = hashlib.sha256()
    for ex in examples:
        for key in PAIR_KEYS if "chosen_ids" in ex else ("input_ids", "labels"):
            h.update(np.asarray(ex[key], dtype=np.int64).tobytes())
    return {"examples": len(examples), "sha256": h.hexdigest()}


def check_compatible(state: dict, path, *, method: str, model, config: dict, fields=(),
                     data: Optional[dict] = None, base: Optional[dict] = None) -> None:
    """Raise ValueError naming what differs between a checkpoint and the run resuming it.

    Args:
        state: the checkpoint's trainer state (`read_trainer_state`).
        path: the checkpoint, for messages.
        method: this run's method.
        model: this run's model (parameter names and shapes are compared).
        config: this run's config dict; `fields` of it must equal the checkpoint's.
        fields: config fields that must not change.
        data: this run's `data_fingerprint`, if the data must be the same.
        base: this run's `base_fingerprint`, if the frozen base must be the same (checked when
            the checkpoint recorded one).
    """
    if state.get("method") != method:
        raise ValueError(f"{path}: checkpoint was trained with method {state.get('method')!r}, "
                         f"this run uses method {method!r}")
    saved, now = state.get("fingerprint", {}), model_fingerprint(model)
    diffs = [f"{n}: missing from the model" for n in saved if n not in now]
    diffs += [f"{n}: not in the checkpoint" for n in now if n not in saved]
    diffs += [f"{n}: shape {saved[n]} in the checkpoint, {now[n]} in the model"
              for n in saved if n in now and saved[n] != now[n]]
    if diffs:
        raise ValueError(f"{path}: checkpoint is for a different model "
                         f"({len(diffs)} parameter(s) differ): " + "; ".join(diffs[:3]))
    old = state.get("config", {})
    changed = [f"{f} ({old.get(f)!r} -> {config.get(f)!r})" for f in fields if old.get(f) != config.get(f)]
    if changed:
        raise ValueError(f"{path}: resuming needs the same data order; changed: {', '.join(changed)}")
    if data is not None and state.get("data") != data:
        raise ValueError(f"{path}: train_data differs from the data this checkpoint was trained on "
                         f"({state.get('data', {}).get('examples')} examples then, "
                         f"{data['examples']} now, or other tokens)")
    if base is not None and state.get("base") is not None:
        difference = _base_difference(state["base"], base)
        if difference:
            raise ValueError(f"{path}: checkpoint was trained on a different base model: {difference}")
