"""Optimizer and RNG state in a checkpoint: tensors for safetensors, the rest as JSON (no pickle)."""
from __future__ import annotations

import random

import numpy as np
import torch


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
