"""AdamW8bit's state dict on the way in: checks, and conversion to the parameter's home.

A saved parameter state is either 8-bit (``exp_avg_codes`` / ``exp_avg_absmax`` /
``exp_avg_sq_codes`` / ``exp_avg_sq_absmax``) or float32 (``exp_avg`` / ``exp_avg_sq``).
Codes and scales may come flat ((n,), (ceil(n/256),): what a 1-process optimizer writes) or
by rows ((R, C), (R, C/256): the exchange format of sharded parameters, ``minift.optim.sharded``);
for a sharded parameter they are cut to this rank's rows. When the saved kind is not the one the
optimizer keeps for the parameter (a checkpoint of a sharded run resumed on one process, or a
changed ``min_8bit_size``), the moments are dequantized or quantized on the way in.
"""
from __future__ import annotations

import numbers

import torch

from minift.checks import check_number
from minift.optim import sharded
from minift.optim.paging import host_empty
from minift.optim.quant8 import dequantize_blockwise, num_blocks, quantize_blockwise
from minift.quantmaps import dynamic_map

VERSION_KEY = "minift_adamw8bit_version"
VERSION = 1
KEYS_8BIT = ("exp_avg_codes", "exp_avg_absmax", "exp_avg_sq_codes", "exp_avg_sq_absmax")
KEYS_32 = ("exp_avg", "exp_avg_sq")


def check_hparams(lr, betas, eps, weight_decay, where: str) -> None:
    """Raise naming the first bad hyper-parameter and `where` it is (defaults, param group i).

    Runs on construction, add_param_group and load_state_dict, as torch.optim does; step() trusts
    the groups (a value written into param_groups later is the writer's to check).
    """
    at = f"AdamW8bit ({where}): "
    check_number(at + "lr", lr, ">= 0", lambda v: v >= 0, error=TypeError)
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"{at}betas must be a pair (beta1, beta2), got {betas!r}")
    for i, beta in enumerate(betas):
        check_number(f"{at}betas[{i}]", beta, "in [0, 1)", lambda v: 0 <= v < 1, error=TypeError)
    check_number(at + "eps", eps, "> 0", lambda v: v > 0, error=TypeError)
    check_number(at + "weight_decay", weight_decay, ">= 0", lambda v: v >= 0, error=TypeError)


def check_state_dict(opt, sd):
    """Validate a saved state dict against ``opt``; returns (state by parameter, saved groups)."""
    if not isinstance(sd, dict) or "state" not in sd or "param_groups" not in sd:
        raise ValueError("AdamW8bit.load_state_dict: expected a dict with 'state' and "
                         "'param_groups' keys")
    version = sd.get(VERSION_KEY)
    if version is None:
        raise ValueError(f"AdamW8bit.load_state_dict: the state dict has no '{VERSION_KEY}' key, "
                         "so it was not written by minift.AdamW8bit (e.g. torch.optim.AdamW)")
    if not isinstance(version, int) or not 1 <= version <= VERSION:
        raise ValueError(f"AdamW8bit.load_state_dict: '{VERSION_KEY}' is {version!r}; this minift "
                         f"reads versions 1..{VERSION}")
    groups = sd["param_groups"]
    if len(groups) != len(opt.param_groups):
        raise ValueError(f"AdamW8bit.load_state_dict: 'param_groups' has {len(groups)} groups, "
                         f"the optimizer has {len(opt.param_groups)}")
    params = {}
    for gi, (mine, saved) in enumerate(zip(opt.param_groups, groups)):
        if len(saved["params"]) != len(mine["params"]):
            raise ValueError(f"AdamW8bit.load_state_dict: param_groups[{gi}] has "
                             f"{len(saved['params'])} params, the optimizer has "
                             f"{len(mine['params'])}")
        check_hparams(saved["lr"], saved["betas"], saved["eps"], saved["weight_decay"],
                      f"saved param_groups[{gi}]")
        params.update(zip(saved["params"], mine["params"]))
    new_state = {}
    for key, st in sd["state"].items():
        if key not in params:
            raise ValueError(f"AdamW8bit.load_state_dict: state[{key!r}] names no parameter "
                             "of 'param_groups'")
        p = params[key]
        new_state[p] = convert_param_state(opt, p, st, f"state[{key!r}]")
    return new_state, groups


def _expected(p, key: str) -> tuple:
    """(shape, dtype) of a saved state tensor of the plain parameter p, flat codes and scales."""
    n = p.numel()
    return {"exp_avg_codes": ((n,), torch.uint8), "exp_avg_sq_codes": ((n,), torch.uint8),
            "exp_avg_absmax": ((num_blocks(n),), torch.float32),
            "exp_avg_sq_absmax": ((num_blocks(n),), torch.float32),
            "exp_avg": (tuple(p.shape), torch.float32),
            "exp_avg_sq": (tuple(p.shape), torch.float32)}[key]


def _describe(v) -> str:
    return str((tuple(v.shape), v.dtype)) if isinstance(v, torch.Tensor) else type(v).__name__


def _saved_local(p, key: str, v, where: str) -> torch.Tensor:
    """The saved tensor ``v`` checked and, for a sharded p, cut to this rank's rows.

    Codes and scales come back flat; float32 moments in the (local) parameter's shape.
    """
    shape, dtype = _expected(p, key)
    if not isinstance(v, torch.Tensor) or v.dtype != dtype:
        raise ValueError(f"AdamW8bit.load_state_dict: {where}['{key}'] is {_describe(v)}, expected "
                         f"{shape} {dtype} for a parameter of shape {tuple(p.shape)}")
    if sharded.is_sharded(p):
        v = sharded.to_local(p, key, v, where)
    else:
        by_rows = key.endswith(("_codes", "_absmax")) and sharded.row_aligned(p) and \
            tuple(v.shape) == sharded.exchange_shape(p, key)
        if tuple(v.shape) != shape and not by_rows:
            raise ValueError(f"AdamW8bit.load_state_dict: {where}['{key}'] is {_describe(v)}, "
                             f"expected {shape} {dtype} for a parameter of shape {tuple(p.shape)}")
        v = v.reshape(shape)
    if dtype == torch.float32:
        # a NaN/Inf scale or moment would turn the parameter into NaN at the next step
        if not bool(torch.isfinite(v).all()):
            raise ValueError(f"AdamW8bit.load_state_dict: {where}['{key}'] holds NaN or Inf "
                             "values (states written with check_finite=False after a "
                             "non-finite gradient?)")
        if key != "exp_avg" and bool((v < 0).any()):  # scales and second moments are >= 0
            raise ValueError(f"AdamW8bit.load_state_dict: {where}['{key}'] holds negative "
                             "values; it must be >= 0")
    return v


def _convert_kind(values: dict, to8: bool, shape) -> dict:
    """8-bit moments dequantized to float32 of ``shape``, or float32 ones quantized."""
    signed, unsigned = dynamic_map(True), dynamic_map(False)
    if to8:
        out = {}
        for prefix, code in (("exp_avg", signed), ("exp_avg_sq", unsigned)):
            x = values[prefix]
            out[prefix + "_codes"], out[prefix + "_absmax"] = quantize_blockwise(x, code.to(x.device))
        return out
    return {prefix: dequantize_blockwise(values[prefix + "_codes"], values[prefix + "_absmax"],
                                         code.to(values[prefix + "_codes"].device)).view(shape)
            for prefix, code in (("exp_avg", signed), ("exp_avg_sq", unsigned))}


def convert_param_state(opt, p, st, where: str) -> dict:
    """Check one parameter's saved state (keys, dtypes, shapes) and copy it to its home."""
    is8 = "exp_avg_codes" in st
    keys = KEYS_8BIT if is8 else KEYS_32
    for k in ("step",) + keys:
        if k not in st:
            raise ValueError(f"AdamW8bit.load_state_dict: {where} lacks key '{k}' "
                             f"(has {sorted(st)})")
    values = {k: _saved_local(p, k, st[k], where) for k in keys}
    lp = sharded.local(p)
    want8 = opt.uses_8bit(p)
    if want8 != is8:
        values = _convert_kind(values, want8, lp.shape)
    out = {"step": _saved_step(st["step"], where)}
    for k, v in values.items():
        home = host_empty(v.shape, v.dtype) if (want8 and opt.paged) else \
            torch.empty(v.shape, dtype=v.dtype, device=lp.device)
        out[k] = home.copy_(v)
    return out


def _saved_step(step, where: str) -> int:
    """The saved update count: a non-negative integer (an int or an integer 0-d tensor)."""
    if isinstance(step, torch.Tensor) and step.numel() == 1 and not step.is_floating_point() \
            and step.dtype != torch.bool:
        step = step.item()
    if isinstance(step, bool) or not isinstance(step, numbers.Integral):
        raise ValueError(f"AdamW8bit.load_state_dict: {where}['step'] must be an integer >= 0, "
                         f"got {type(step).__name__} {step!r}")
    if step < 0:
        raise ValueError(f"AdamW8bit.load_state_dict: {where}['step'] must be an integer >= 0, "
                         f"got {step!r}")
    return int(step)


def exchange_state(opt, sd: dict) -> dict:
    """``sd`` (torch's packed state dict) with sharded parameters' states as exchange DTensors."""
    params = [p for group in opt.param_groups for p in group["params"]]
    for index, st in sd["state"].items():
        p = params[index]
        if sharded.is_sharded(p):
            sd["state"][index] = {k: sharded.to_global(p, k, v) if isinstance(v, torch.Tensor) else v
                                  for k, v in st.items()}
    return sd
