"""Training checkpoints: atomic on disk, resumable bit for bit, pickle-free.

A checkpoint is a directory ``<output_dir>/step-N`` holding

    model.safetensors       adapter tensors (lora/qlora) or the whole state dict (full)
    optimizer.safetensors   every tensor of ``optimizer.state_dict()["state"]``
    optimizer.json          the rest of the optimizer state (scalars, param_groups)
    rng.safetensors         torch CPU (and CUDA) generator states
    trainer_state.json      step, data position, counters, config, model and base fingerprints,
                            python/numpy RNG
    manifest.json           file names and byte sizes; written last, it marks the checkpoint complete

It is first written into ``<output_dir>/.tmp-step-N``, every file is fsync'ed, and only then the
directory is renamed to ``step-N``. A crash mid-save leaves a ``.tmp-`` directory (never read,
removed on the next save) or a directory without a valid manifest (never taken for a checkpoint).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from minift._util import fsync_path, read_json, write_json
from minift.lora import lora_state_dict
from minift.preference import PAIR_KEYS

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
# Relative tolerance of the base fingerprint. The sums are float64 over float32 (or uint8) values,
# so another summation order (thread count, CPU vs CUDA) moves them by ~1e-12 relative; another
# base (other weights, weights scaled, another quantization) moves them by far more than 1e-4.
BASE_RTOL = 1e-4
_FINGERPRINT_CHUNK = 1 << 22  # elements converted to float64 at a time
_STEP_DIR = re.compile(r"^step-(\d+)$")


# ---- what goes into a checkpoint ---------------------------------------------------------
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


def _model_tensors(model: torch.nn.Module, method: str) -> tuple[dict, dict]:
    """Tensors to save, plus aliases (name -> saved name) for tensors shared with another name."""
    if method in ("lora", "qlora"):
        state = lora_state_dict(model)
    else:
        state = model.state_dict()
    tensors, aliases, seen = {}, {}, {}
    for name, t in state.items():
        # Tied weights (lm_head / embed_tokens) share storage; safetensors refuses duplicates.
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach().to("cpu").contiguous()
    return tensors, aliases


def _load_model_tensors(model, tensors: dict, aliases: dict, path: Path) -> None:
    for alias, name in aliases.items():
        tensors[alias] = tensors[name]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if unexpected:
        raise ValueError(f"{path}: checkpoint has tensors the model lacks: {', '.join(unexpected[:5])}")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    absent = [n for n in trainable if n not in tensors]
    if absent:
        raise ValueError(f"{path}: checkpoint lacks trainable parameters: {', '.join(absent[:5])}")


def _split_optimizer_state(sd: dict) -> tuple[dict, dict]:
    """optimizer.state_dict() -> (tensors for safetensors, JSON-able rest)."""
    tensors, scalars = {}, {}
    for idx, pstate in sd["state"].items():
        rest = {}
        for key, value in pstate.items():
            if torch.is_tensor(value):
                tensors[f"{idx}/{key}"] = value.detach().to("cpu").contiguous()
            else:
                rest[key] = _jsonable(value, f"optimizer state[{idx}][{key!r}]")
        scalars[str(idx)] = rest
    groups = [_jsonable(g, f"optimizer param_groups[{i}]") for i, g in enumerate(sd["param_groups"])]
    # Optimizers may add top-level entries (format version, counters); keep them as they are.
    extra = {k: _jsonable(v, f"optimizer state_dict[{k!r}]") for k, v in sd.items()
             if k not in ("state", "param_groups")}
    return tensors, {"state": scalars, "param_groups": groups, "extra": extra}


def _join_optimizer_state(tensors: dict, meta: dict) -> dict:
    state = {int(idx): dict(rest) for idx, rest in meta["state"].items()}
    for name, t in tensors.items():
        idx, key = name.split("/", 1)
        state.setdefault(int(idx), {})[key] = t
    return dict(meta.get("extra", {}), state=state, param_groups=meta["param_groups"])


def _jsonable(value, where: str):
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, where) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v, f"{where}[{k!r}]") for k, v in value.items()}
    raise TypeError(f"{where}: cannot store a {type(value).__name__} in a checkpoint")


def rng_state() -> tuple[dict, dict]:
    """All global RNG states: (tensors, JSON-able)."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    meta = {"python": [version, list(internal), gauss],
            "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    return tensors, meta


def set_rng_state(tensors: dict, meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda.{i}"] for i in range(len(tensors)) if f"cuda.{i}" in tensors]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def clean_incomplete(output_dir) -> list[str]:
    """Tidy up after interrupted saves; returns the directories removed.

    A ``.tmp-step-N`` whose manifest is complete (the crash came after writing it) becomes
    ``step-N`` if there is none; so does an ``.old-step-N`` left by a crash in the middle of
    replacing ``step-N``. Everything else of that kind is deleted.
    """
    root = Path(output_dir)
    removed = []
    if not root.is_dir():
        return removed
    for entry in sorted(root.iterdir()):
        for prefix in (".tmp-", ".old-"):
            if entry.is_dir() and entry.name.startswith(prefix + "step-"):
                final = root / entry.name[len(prefix):]
                if not final.exists() and is_complete(entry):
                    os.rename(entry, final)
                else:
                    shutil.rmtree(entry, ignore_errors=True)
                    removed.append(str(entry))
    return removed


def save_checkpoint(output_dir, step: int, *, model, optimizer, method: str, trainer_state: dict,
                    keep_last: Optional[int] = None, rng: Optional[tuple] = None) -> str:
    """Write ``<output_dir>/step-<step>`` atomically and prune to the last `keep_last`.

    Args:
        output_dir: run directory.
        step: optimizer steps completed.
        model: the model being trained.
        optimizer: its optimizer.
        method: "full" (whole state dict) or "lora"/"qlora" (adapter tensors only).
        trainer_state: JSON-able loop state (data position, counters, config, ...).
        keep_last: keep only this many newest checkpoints (None keeps all).
        rng: (tensors, meta) from `rng_state()` taken earlier; default: the RNG states now.

    Returns:
        The checkpoint directory.
    """
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    clean_incomplete(root)
    tmp, final = root / f".tmp-step-{step}", root / f"step-{step}"
    tmp.mkdir()
    model_tensors, aliases = _model_tensors(model, method)
    save_file(model_tensors, tmp / "model.safetensors", metadata={"aliases": json.dumps(aliases)})
    opt_tensors, opt_meta = _split_optimizer_state(optimizer.state_dict())
    save_file(opt_tensors, tmp / "optimizer.safetensors")
    write_json(tmp / "optimizer.json", opt_meta, indent=None, atomic=False)
    rng_tensors, rng_meta = rng if rng is not None else rng_state()
    save_file(rng_tensors, tmp / "rng.safetensors")
    state = dict(trainer_state, step=step, method=method, rng=rng_meta,
                 fingerprint=model_fingerprint(model), format_version=FORMAT_VERSION)
    write_json(tmp / "trainer_state.json", state, indent=None, atomic=False)
    files = sorted(p.name for p in tmp.iterdir())
    for name in files:
        fsync_path(tmp / name)
    write_json(tmp / MANIFEST, {"step": step, "files": {n: (tmp / n).stat().st_size for n in files}},
               indent=None, atomic=False)
    fsync_path(tmp)
    if final.exists():  # saving the same step again (e.g. after a resume): swap, then drop the old
        old = root / f".old-step-{step}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    fsync_path(root)
    if keep_last:
        for _, path in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(path, ignore_errors=True)
    return str(final)


# ---- finding and reading -----------------------------------------------------------------
def is_complete(path) -> bool:
    """True when `path` has a manifest and every file it lists, at the listed size."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        return all((path / n).is_file() and (path / n).stat().st_size == size
                   for n, size in manifest["files"].items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def list_checkpoints(output_dir) -> list[tuple[int, str]]:
    """Complete checkpoints under `output_dir` as (step, path), oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _STEP_DIR.match(entry.name)
        if match and entry.is_dir() and is_complete(entry):
            found.append((int(match.group(1)), str(entry)))
    return sorted(found)


def latest_checkpoint(output_dir) -> Optional[str]:
    """The newest complete checkpoint under `output_dir`, or None."""
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def resolve_checkpoint(spec: str, output_dir) -> str:
    """Turn ``resume_from`` ("latest" or a path) into a complete checkpoint directory."""
    if spec == "latest":
        path = latest_checkpoint(output_dir)
        if path is None:
            raise FileNotFoundError(f"resume_from='latest': no complete checkpoint in {output_dir}")
        return path
    path = Path(spec)
    if not path.is_dir():
        raise FileNotFoundError(f"resume_from: checkpoint directory {spec} does not exist")
    if not is_complete(path):
        # A run directory rather than a checkpoint: take its newest checkpoint.
        inner = latest_checkpoint(path)
        if inner is None:
            raise ValueError(f"resume_from: {spec} is not a complete checkpoint (no valid {MANIFEST})")
        return inner
    return str(path)


def read_trainer_state(path) -> dict:
    return read_json(Path(path) / "trainer_state.json", expect=dict)


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


def load_checkpoint(path, *, model, optimizer) -> dict:
    """Restore model tensors, optimizer state and RNG states; return the trainer state dict."""
    path = Path(path)
    if not is_complete(path):
        raise ValueError(f"{path}: not a complete checkpoint (missing or invalid {MANIFEST})")
    state = read_trainer_state(path)
    tensors = load_file(path / "model.safetensors", device="cpu")
    with safe_open(path / "model.safetensors", framework="pt") as f:
        aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    _load_model_tensors(model, tensors, aliases, path)
    opt_meta = read_json(path / "optimizer.json", expect=dict)
    opt_state = _join_optimizer_state(load_file(path / "optimizer.safetensors", device="cpu"), opt_meta)
    try:
        optimizer.load_state_dict(opt_state)
    except (ValueError, KeyError) as e:
        raise ValueError(f"{path}: optimizer state does not fit this optimizer: {e}") from e
    set_rng_state(load_file(path / "rng.safetensors", device="cpu"), state["rng"])
    return state
