"""Hand-written LoRA: the adapter layer, model surgery, merging and parameter counts.

A LoRA layer adds a trainable low-rank update to a frozen linear layer (Hu et al. 2021, eq. 3):
``y = base(x) + dropout(x) @ A^T @ B^T * scale``. Module and parameter names follow PEFT
(``base_layer``, ``lora_A``, ``lora_B``, ``lora_dropout``) so adapters map one-to-one onto PEFT
files; trainability is decided by one predicate, ``"lora_" in name``, plus the modules named by
``modules_to_save``, which are trained whole, in place (PEFT's "modules_to_save"; LongLoRA's
trainable embeddings and norms).
"""
from __future__ import annotations

import contextlib
import math
import numbers
import re
from typing import Callable, Iterator, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from minift.checks import check_int, check_number
from minift.nf4.linear import NF4Linear

# name under which lora_wrap records its settings on the wrapped model
SETTINGS_ATTR = "_minift_lora"
# marks a module lora_wrap trains whole (modules_to_save); the mark travels with the module
SAVED_ATTR = "_minift_trained_whole"


def is_linear(module: nn.Module) -> bool:
    """True for the layer types LoRA can wrap: nn.Linear and minift's NF4Linear."""
    return isinstance(module, (nn.Linear, NF4Linear))


def _module_device(module: nn.Module) -> torch.device:
    for tensor in list(module.parameters()) + list(module.buffers()):
        return tensor.device
    return torch.device("cpu")


def _lora_scale(r: int, alpha: float, rslora: bool) -> float:
    # rsLoRA (Kalajdzievski 2023) divides by sqrt(r) so the update's size does not shrink with r
    return alpha / math.sqrt(r) if rslora else alpha / r


# The rules are minift.checks' (any integral r, any real finite alpha and dropout; never a bool); the
# messages keep the name=value form that adapter_config.json errors quote after the field name.
def check_rank(r: int) -> int:
    """`r` as an int if it is a positive integer (int, numpy ints; not bool or float)."""
    try:
        return check_int("r", r)
    except ValueError:
        raise ValueError(f"LoRA rank r must be a positive integer, got r={r!r}") from None


def check_alpha(alpha: float) -> int | float:
    """`alpha` as an int or float if it is a positive finite real number."""
    # inf or nan would make every update inf/nan (JSON configs can spell both)
    try:
        check_number("alpha", alpha, "> 0", lambda v: v > 0)
    except ValueError:
        raise ValueError(f"LoRA alpha must be a positive finite number, "
                         f"got alpha={alpha!r}") from None
    # a plain Python number, so the settings stay JSON-writable (numpy's float32 is not)
    return int(alpha) if isinstance(alpha, numbers.Integral) else float(alpha)


def check_dropout(dropout: float) -> float:
    """`dropout` as a float if it is a real number in [0, 1)."""
    try:
        check_number("dropout", dropout, "in [0, 1)", lambda v: 0 <= v < 1)
    except ValueError:
        raise ValueError(f"LoRA dropout must be in [0, 1), got dropout={dropout!r}") from None
    return float(dropout)


def check_settings(r: int, alpha: float,
                   dropout: float) -> tuple[int, int | float, float]:
    """(r, alpha, dropout) as plain Python numbers; ValueError unless r is a positive integer,
    alpha positive and finite, dropout in [0, 1)."""
    return check_rank(r), check_alpha(alpha), check_dropout(dropout)


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update.

    Computes ``base(x) + dropout(x) @ A^T @ B^T * scale`` with A (r, in) and B (out, r). A starts
    Kaiming-uniform (as nn.Linear does) and B at zero, so a fresh layer returns exactly
    ``base(x)``. The adapter weights live in ``adapter_dtype``; the low-rank branch runs in the
    input's dtype and is added in the base output's dtype.

    Args:
        base: the layer to adapt, an ``nn.Linear`` or ``minift.nf4.linear.NF4Linear``.
        r: rank of the update.
        alpha: scaling numerator; ``scale = alpha / r`` (or ``alpha / sqrt(r)`` with rslora).
        dropout: dropout probability applied to the branch's input.
        rslora: use the rank-stabilised scale ``alpha / sqrt(r)``.
        adapter_dtype: dtype of ``lora_A.weight`` and ``lora_B.weight``.
    """

    def __init__(self, base: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                 rslora: bool = False, adapter_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        r, alpha, dropout = check_settings(r, alpha, dropout)
        if not is_linear(base):
            raise TypeError(f"LoRALinear wraps nn.Linear or NF4Linear, got {type(base).__name__}")
        self.base_layer = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.rslora = r, alpha, rslora
        self.scale = _lora_scale(r, alpha, rslora)
        device = _module_device(base)
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=adapter_dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device,
                                dtype=adapter_dtype)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = True
        self.merged = False
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """A Kaiming-uniform (a=sqrt(5), nn.Linear's default), B zeros: the update starts at 0."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (read by code that inspects ``layer.weight``)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def _update(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ A^T @ B^T * scale`` in x's dtype, without dropout: (..., in) -> (..., out)."""
        a = self.lora_A.weight.to(x.dtype)  # (r, in)
        b = self.lora_B.weight.to(x.dtype)  # (out, r)
        return F.linear(F.linear(x, a), b) * self.scale

    def lora_branch(self, x: torch.Tensor) -> torch.Tensor:
        """``dropout(x) @ A^T @ B^T * scale`` computed in x's dtype: (..., in) -> (..., out)."""
        return self._update(self.lora_dropout(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        # merged weights already hold the update: add it when unmerged and enabled, take it
        # back out when merged but disabled
        if self.enabled and not self.merged:
            return y + self.lora_branch(x).to(y.dtype)
        if self.merged and not self.enabled:
            # the merged weight holds the whole update, not a dropped-out sample of it, so the
            # subtraction must not apply dropout (which is active in train mode)
            return y - self._update(x).to(y.dtype)
        return y

    def delta_weight(self) -> torch.Tensor:
        """The dense update ``scale * B @ A`` in float32, shape (out, in)."""
        return self.scale * (self.lora_B.weight.float() @ self.lora_A.weight.float())

    def _fold(self, sign: float) -> None:
        if not isinstance(self.base_layer, nn.Linear):
            raise TypeError(
                f"cannot merge into a {type(self.base_layer).__name__} base in place: its "
                "weight is quantized; use minift.merge_lora(model), which dequantizes and builds "
                "a new nn.Linear")
        w = self.base_layer.weight
        with torch.no_grad():
            w.copy_((w.float() + sign * self.delta_weight()).to(w.dtype))

    def merge(self) -> None:
        """Fold ``scale * B @ A`` into the base weight in place (computed in fp32, then cast)."""
        if not self.merged:
            self._fold(+1.0)
            self.merged = True

    def unmerge(self) -> None:
        """Subtract the update from the base weight again, undoing ``merge()``."""
        if self.merged:
            self._fold(-1.0)
            self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scale={self.scale:.4g}, rslora={self.rslora}"


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """(name, LoRALinear) pairs of a model, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def _suffix_match(name: str, suffix: str) -> bool:
    # whole dotted components only: "q_proj" matches "a.q_proj" but not "a.xq_proj"
    return name == suffix or name.endswith("." + suffix)


def find_targets(model: nn.Module, target_modules: str | Sequence[str] = "all-linear",
                 exclude: Sequence[str] = ("lm_head",)) -> list[str]:
    """Names of the linear layers that ``lora_wrap`` would adapt.

    Args:
        model: any nn.Module.
        target_modules: "all-linear", a list/tuple of name suffixes, or a regex string matched
            with ``re.fullmatch`` against full module names.
        exclude: name suffixes skipped by "all-linear".

    Returns:
        The matching module names, in module order.
    """
    linear = [n for n, m in model.named_modules() if n and is_linear(m)]
    if target_modules == "all-linear":
        names = [n for n in linear if not any(_suffix_match(n, s) for s in exclude)]
    elif isinstance(target_modules, (list, tuple)) and target_modules:
        if not all(isinstance(s, str) and s for s in target_modules):
            raise TypeError(f"target_modules entries must be non-empty strings, "
                            f"got {target_modules!r}")
        unknown = [s for s in target_modules if not any(_suffix_match(n, s) for n in linear)]
        if unknown:
            raise ValueError(f"target_modules {unknown} match no linear layer; available linear "
                             f"layers: {_describe(linear)}")
        names = [n for n in linear if any(_suffix_match(n, s) for s in target_modules)]
    elif isinstance(target_modules, str) and target_modules:
        try:
            pattern = re.compile(target_modules)
        except re.error as err:
            raise ValueError(f"target_modules {target_modules!r} is not a valid regex: {err}")
        names = [n for n in linear if pattern.fullmatch(n)]
    else:
        raise TypeError("target_modules must be 'all-linear', a non-empty list of name suffixes "
                        f"or a regex string, got {target_modules!r}")
    if not names:
        raise ValueError(f"target_modules={target_modules!r} matches no linear layer; available "
                         f"linear layers: {_describe(linear)}")
    return names


def _describe(names: list[str], limit: int = 40) -> str:
    if not names:
        return "(none: the model has no nn.Linear or NF4Linear layers)"
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def check_modules_to_save(modules_to_save) -> list[str]:
    """The keys as a list without repeats (one string is one key); TypeError unless non-empty strings."""
    if isinstance(modules_to_save, str):
        modules_to_save = [modules_to_save]
    if not isinstance(modules_to_save, (list, tuple)) or not all(
            isinstance(k, str) and k for k in modules_to_save):
        raise TypeError(f"modules_to_save must be a list of non-empty module-name suffixes, "
                        f"got {modules_to_save!r}")
    return list(dict.fromkeys(modules_to_save))


def find_modules_to_save(model: nn.Module, modules_to_save: str | Sequence[str],
                         targets: Sequence[str] = ()) -> list[str]:
    """Names of the modules ``lora_wrap(..., modules_to_save=...)`` trains whole.

    The rule is PEFT's (0.21, ``_set_trainable``): a module is chosen when its full name ends with
    one of the keys, as a plain string, so "norm" picks ``model.norm`` and every
    ``input_layernorm`` / ``post_attention_layernorm`` (LongLoRA's "embed,norm"), and peft loading
    the adapter picks the same modules. A module inside another chosen one is covered by it.

    Args:
        model: any nn.Module.
        modules_to_save: module-name suffixes, e.g. ``["embed_tokens", "norm"]``.
        targets: the names of the layers LoRA adapts (none of them may be chosen too).

    Returns:
        The chosen module names, in module order.

    Raises:
        ValueError naming the key or module: a key that matches no module, a module without
        parameters, a LoRA target or NF4 (4-bit) module, or weights tied to a module outside the
        chosen ones (embed_tokens tied to lm_head: PEFT trains an untied copy of each).
    """
    keys = check_modules_to_save(modules_to_save)
    modules = dict(model.named_modules())
    chosen = []
    for key in keys:
        found = [n for n in modules if n and n.endswith(key)]
        if not found:
            with_params = [n for n, m in modules.items() if n and next(m.parameters(False), None) is not None]
            raise ValueError(f"modules_to_save: {key!r} matches no module (a module is chosen when its "
                             f"name ends with the key); modules with weights: {_describe(with_params)}")
        chosen += [n for n in found if n not in chosen]
    chosen = [n for n in chosen if not any(n.startswith(o + ".") for o in chosen)]
    for name in chosen:
        module = modules[name]
        inner = [f"{name}.{n}".rstrip(".") for n, m in module.named_modules()
                 if isinstance(m, (LoRALinear, NF4Linear)) or f"{name}.{n}".rstrip(".") in targets]
        if inner:
            raise ValueError(f"modules_to_save: {name!r} is (or holds) {inner[0]!r}, a LoRA target or a "
                             f"4-bit (NF4) layer; a module is either adapted or trained whole, and "
                             f"4-bit weights cannot be trained")
        if not any(p.is_floating_point() for p in module.parameters()):
            raise ValueError(f"modules_to_save: {name!r} has no floating-point parameters to train")
    inside = {id(p) for n in chosen for p in modules[n].parameters()}
    for pname, p in model.named_parameters(remove_duplicate=False):
        if id(p) in inside and not any(pname.startswith(n + ".") for n in chosen):
            owner = next(f"{n}.{q}" for n in chosen for q, t in modules[n].named_parameters() if t is p)
            raise ValueError(f"modules_to_save: {owner!r} is tied to {pname!r}, which is not trained "
                             f"whole; PEFT trains an untied copy of the module, so the two would part. "
                             f"Untie them first (give {pname!r} its own copy) or leave the key out")
    return chosen


def saved_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) pairs that ``lora_wrap`` trains whole (modules_to_save), in module order."""
    return [(n, m) for n, m in model.named_modules() if getattr(m, SAVED_ATTR, False)]


def _replace(module: nn.Module, prefix: str, targets: set[str],
             make: Callable[[nn.Module], nn.Module]) -> None:
    """Recursive named_children/setattr walk swapping each targeted layer for make(layer)."""
    for child_name, child in list(module.named_children()):
        full = f"{prefix}.{child_name}" if prefix else child_name
        if full in targets:
            setattr(module, child_name, make(child))
        else:
            _replace(child, full, targets, make)


def lora_wrap(model: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0,
              target_modules: str | Sequence[str] = "all-linear",
              exclude: str | Sequence[str] = ("lm_head",), rslora: bool = False,
              adapter_dtype: torch.dtype = torch.float32,
              modules_to_save: Sequence[str] | None = None) -> nn.Module:
    """Put a LoRA adapter on the chosen linear layers of any module and freeze everything else.

    Args:
        model: the nn.Module to adapt (modified in place).
        r: rank of every adapter.
        alpha: scaling numerator (scale = alpha / r, or alpha / sqrt(r) with rslora).
        dropout: dropout probability on the adapters' input, in [0, 1).
        target_modules: "all-linear" (every nn.Linear/NF4Linear not in ``exclude``), a list of
            module-name suffixes such as ``["q_proj", "v_proj"]``, or a regex string matched
            against full module names with ``re.fullmatch``.
        exclude: name suffixes that "all-linear" leaves alone.
        rslora: use the rank-stabilised scale alpha / sqrt(r).
        adapter_dtype: dtype of the adapter weights.
        modules_to_save: module-name suffixes of modules trained whole, in place and in their own
            dtype, e.g. ``["embed_tokens", "norm"]`` (matched as PEFT matches them: see
            `find_modules_to_save`); saved in the adapter in PEFT's layout.

    Returns:
        The same model, with only ``lora_`` parameters (and those of ``modules_to_save``)
        requiring grad.
    """
    r, alpha, dropout = check_settings(r, alpha, dropout)
    if lora_layers(model) or hasattr(model, SETTINGS_ATTR):
        raise ValueError("model is already LoRA-wrapped; wrapping twice would stack adapters. "
                         "Use the existing adapters, or minift.merge_lora(model) first")
    if isinstance(exclude, str):
        exclude = (exclude,)
    names = find_targets(model, target_modules, exclude)
    saved = [] if modules_to_save is None else find_modules_to_save(model, modules_to_save, names)
    _replace(model, "", set(names), lambda layer: LoRALinear(
        layer, r=r, alpha=alpha, dropout=dropout, rslora=rslora, adapter_dtype=adapter_dtype))
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
    for name in saved:
        module = model.get_submodule(name)
        setattr(module, SAVED_ATTR, True)
        for param in module.parameters():
            param.requires_grad_(param.is_floating_point())
    setattr(model, SETTINGS_ATTR, {
        "r": r, "alpha": alpha, "dropout": float(dropout), "rslora": bool(rslora),
        "target_modules": target_modules if isinstance(target_modules, str)
        else list(target_modules),
        "wrapped": list(names), "adapter_dtype": str(adapter_dtype).replace("torch.", ""),
        "modules_to_save": None if modules_to_save is None else check_modules_to_save(modules_to_save),
        "saved": saved})
    return model


def _require_lora(model: nn.Module, what: str) -> list[tuple[str, LoRALinear]]:
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"{what}: the model has no LoRALinear layers; call minift.lora_wrap first")
    return layers


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run the model as its base inside the block: every adapter is switched off, then restored.

    Args:
        model: a LoRA-wrapped model.

    Yields:
        The same model.
    """
    layers = _require_lora(model, "disable_adapters")
    check_base_kept(model, "disable_adapters")
    before = [m.enabled for _, m in layers]
    try:
        for _, m in layers:
            m.enabled = False
        yield model
    finally:
        for (_, m), state in zip(layers, before):
            m.enabled = state


def check_base_kept(model: nn.Module, what: str) -> None:
    """ValueError when the model trains modules_to_save: they are trained in place, so switching
    the adapters off would not give the base model back."""
    saved = saved_modules(model)
    if saved:
        raise ValueError(f"{what}: the model trains modules_to_save in place ({saved[0][0]!r} and "
                         f"{len(saved) - 1} more), so with the adapters off it is not the base model; "
                         f"use a frozen copy of the base instead")


def _merged_linear(layer: LoRALinear) -> nn.Linear:
    """A plain nn.Linear holding base weight + scale * B @ A (dequantizing an NF4 base)."""
    base = layer.base_layer
    if isinstance(base, nn.Linear):
        if not layer.merged:
            layer.merge()
        return base
    dtype = getattr(base, "compute_dtype", None) or torch.bfloat16
    w = base.dequantize(dtype)  # (out, in)
    out = nn.Linear(layer.in_features, layer.out_features, bias=base.bias is not None,
                    device=w.device, dtype=dtype)
    with torch.no_grad():
        out.weight.copy_((w.float() + layer.delta_weight().to(w.device)).to(dtype))
        if base.bias is not None:
            out.bias.copy_(base.bias.to(dtype))
    out.requires_grad_(False)
    return out


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by a plain nn.Linear holding ``W + scale * B @ A``.

    Args:
        model: a LoRA-wrapped model (modified in place).

    Returns:
        The same model, with no adapters left; NF4 bases become bf16 (or their compute dtype).
    """
    layers = _require_lora(model, "merge_lora")
    _replace(model, "", {n for n, _ in layers}, _merged_linear)
    for _, module in saved_modules(model):  # already hold their trained weights: part of the base now
        delattr(module, SAVED_ATTR)
        module.requires_grad_(False)
    if hasattr(model, SETTINGS_ATTR):
        delattr(model, SETTINGS_ATTR)
    return model


def adapter_predicate(model: nn.Module) -> Callable[[str], bool]:
    """A test of state_dict / parameter names: True for the adapter's (``lora_`` tensors and those
    of the modules trained whole, modules_to_save)."""
    saved = tuple(n + "." for n, _ in saved_modules(model))
    return lambda name: "lora_" in name or name.startswith(saved)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors, keyed as in ``model.state_dict()``: every ``lora_`` tensor and the
    whole state of each module trained whole (modules_to_save)."""
    mine = adapter_predicate(model)
    return {k: v for k, v in model.state_dict().items() if mine(k)}


def _logical_numel(module: nn.Module) -> int:
    # NF4Linear keeps its weight as packed uint8 buffers; count it as the (out, in) matrix it
    # stands for so LoRA and QLoRA report the same totals
    if isinstance(module, NF4Linear):
        return module.in_features * module.out_features
    return 0


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """Count parameters.

    Args:
        model: any nn.Module.

    Returns:
        (trainable, total): shared parameters are counted once; quantized NF4 weights count as
        the number of weights they represent.
    """
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    total += sum(_logical_numel(m) for m in model.modules())
    return trainable, total


def trainable_summary(model: nn.Module) -> str:
    """One line: ``trainable params: 4,194,304 || all params: ... || trainable%: 0.0622``."""
    trainable, total = trainable_parameters(model)
    percent = 100.0 * trainable / total if total else 0.0
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {percent:.4f}"
