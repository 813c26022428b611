"""The frozen 4-bit linear layer QLoRA trains adapters on, and whole-model quantization.

``NF4Linear`` keeps its weight as the packed NF4 tensors (buffers, never parameters) and
dequantizes on every use, forward and backward; the full-precision (out, in) matrix lives only
for the duration of one matmul. Its ``state_dict`` uses bitsandbytes' serialized names, so a
``Linear4bit`` checkpoint loads into it and back.
"""
from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

from minift.nf4.format import FLOAT_DTYPES, MissingKeyError, NF4Weight, from_bnb_state_dict
from minift.nf4.inference import linear_no_grad
from minift.nf4.quantize import check_blocksize, check_weight, dequantize_nf4, quantize_nf4

logger = logging.getLogger(__name__)

# buffer name -> suffix of the bitsandbytes key (after "<prefix>weight")
_BUFFERS = {"weight": "", "weight_absmax": ".absmax", "weight_quant_map": ".quant_map",
            "weight_nested_absmax": ".nested_absmax", "weight_nested_quant_map": ".nested_quant_map"}
_QUANT_STATE_KEY = "weight.quant_state.bitsandbytes__nf4"


def _autocast_off(device_type: str):
    """A context with autocast disabled for ``device_type`` (a no-op where autocast does not exist)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class NF4MatMul(torch.autograd.Function):
    """y = x @ dequant(W).T + b with a frozen NF4 weight W of shape (out, in).

    Forward, in the compute dtype c (W_c = dequant(W) as c, an (out, in) matrix):
        y = x.to(c) @ W_c.T + b.to(c)                  # (..., in) @ (in, out) -> (..., out)
    Backward (W and b are frozen, so only x gets a gradient):
        dL/dx = (dL/dy.to(c) @ W_c).to(x.dtype)        # (..., out) @ (out, in) -> (..., in)
        dL/dW = dL/db = None
    W_c is built again in backward and freed right after, so no (out, in) float tensor lives
    between forward and backward: only the quantized tensors of W (packed nibbles, absmax codes,
    code books; about 0.52 bytes per weight value) go through ``ctx.save_for_backward``, where
    saved-tensor hooks (offloading, checkpointing) see them. ``ctx`` itself holds plain metadata
    only (shape, dtypes, block sizes, the float offset), never a tensor.

    Both passes run with autocast off: ``compute_dtype`` was already chosen by the caller (which
    accounts for autocast), and autocast would otherwise recast the matmul, overriding an
    explicit ``NF4Linear(compute_dtype=torch.float32)``.
    """

    @staticmethod
    def forward(ctx, x, weight: NF4Weight, bias, compute_dtype):
        # None for the nested pair without double quantization: save_for_backward keeps the slot
        ctx.save_for_backward(weight.packed, weight.absmax, weight.code, weight.nested_absmax,
                              weight.nested_code)
        ctx.shape, ctx.weight_dtype, ctx.blocksize = weight.shape, weight.dtype, weight.blocksize
        ctx.offset, ctx.nested_blocksize = weight.offset, weight.nested_blocksize
        ctx.x_dtype, ctx.compute_dtype = x.dtype, compute_dtype
        with _autocast_off(x.device.type):
            w = dequantize_nf4(weight, compute_dtype)  # (out, in), freed when forward returns
            b = None if bias is None else bias.to(compute_dtype)
            return torch.nn.functional.linear(x.to(compute_dtype), w, b)

    @staticmethod
    def backward(ctx, grad_out):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        packed, absmax, code, nested_absmax, nested_code = ctx.saved_tensors
        weight = NF4Weight(packed=packed, absmax=absmax, code=code, nested_absmax=nested_absmax,
                           nested_code=nested_code, shape=ctx.shape, dtype=ctx.weight_dtype,
                           blocksize=ctx.blocksize, offset=ctx.offset,
                           nested_blocksize=ctx.nested_blocksize)
        with _autocast_off(grad_out.device.type):
            w = dequantize_nf4(weight, ctx.compute_dtype)  # (out, in)
            grad_x = grad_out.to(ctx.compute_dtype) @ w  # (..., in)
        return grad_x.to(ctx.x_dtype), None, None, None


class NF4Linear(nn.Module):
    """A frozen linear layer with an NF4 (double-quantized) weight.

    Args:
        weight: the quantized (out_features, in_features) weight.
        bias: optional (out_features,) tensor, stored as a frozen parameter.
        compute_dtype: dtype of the dequantized weight and the matmul; None picks the autocast
            dtype when autocast is on, else the input's dtype.
    """

    # the dequantized weight inside minift.nf4.inference's cache; a class attribute, so that
    # subclasses built without NF4Linear.__init__ (ShardedNF4Linear) have it too
    _inference_weight: torch.Tensor | None = None

    def __init__(self, weight: NF4Weight, bias: torch.Tensor | None = None, compute_dtype=None):
        super().__init__()
        if not isinstance(weight, NF4Weight):
            raise TypeError(f"NF4Linear: weight must be an NF4Weight, got {type(weight).__name__}")
        if len(weight.shape) != 2:
            raise ValueError(f"NF4Linear: weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
        if compute_dtype is not None and compute_dtype not in FLOAT_DTYPES:
            raise TypeError(f"NF4Linear: compute_dtype must be float32, bfloat16 or float16, got {compute_dtype}")
        self.out_features, self.in_features = (int(s) for s in weight.shape)
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"NF4Linear: bias has shape {tuple(bias.shape)}, expected ({self.out_features},)")
        self.compute_dtype = compute_dtype
        self._set_weight(weight)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def _set_weight(self, q: NF4Weight) -> None:
        self.weight_dtype, self.blocksize, self.offset = q.dtype, q.blocksize, q.offset
        self.nested_blocksize = q.nested_blocksize
        tensors = {"weight": q.packed, "weight_absmax": q.absmax, "weight_quant_map": q.code,
                   "weight_nested_absmax": q.nested_absmax, "weight_nested_quant_map": q.nested_code}
        for name, t in tensors.items():
            self._buffers.pop(name, None)
            self.register_buffer(name, t, persistent=False)  # saved under bnb names, see below

    @property
    def quant_weight(self) -> NF4Weight:
        """The weight as an ``NF4Weight`` over the current buffers (follows ``.to()``)."""
        return NF4Weight(packed=self.weight, absmax=self.weight_absmax, code=self.weight_quant_map,
                         shape=torch.Size((self.out_features, self.in_features)), dtype=self.weight_dtype,
                         blocksize=self.blocksize, nested_absmax=self.weight_nested_absmax,
                         nested_code=self.weight_nested_quant_map, offset=self.offset,
                         nested_blocksize=self.nested_blocksize)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias=None, blocksize: int = 64, double_quant: bool = True,
                    compute_dtype=None) -> "NF4Linear":
        """Quantize a float (out, in) tensor into a new layer."""
        return cls(quantize_nf4(weight, blocksize, double_quant), bias, compute_dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True,
                    compute_dtype=None) -> "NF4Linear":
        """Quantize an ``nn.Linear`` (its bias is kept as is)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"NF4Linear.from_linear: expected nn.Linear, got {type(linear).__name__}")
        return cls.from_weight(linear.weight, linear.bias, blocksize, double_quant, compute_dtype)

    @classmethod
    def from_bnb_state_dict(cls, sd: dict, prefix: str = "", bias=None, compute_dtype=None) -> "NF4Linear":
        """Build a layer from bitsandbytes ``Linear4bit`` tensors stored under ``prefix + "weight"``."""
        if bias is None:
            bias = sd.get(f"{prefix}bias")
        return cls(from_bnb_state_dict(sd, f"{prefix}weight"), bias, compute_dtype)

    def dequantize(self, dtype=None) -> torch.Tensor:
        """The weight as a float (out, in) tensor; dtype defaults to compute_dtype, then the original."""
        return dequantize_nf4(self.quant_weight, dtype or self.compute_dtype or self.weight_dtype)

    def _pick_dtype(self, x: torch.Tensor) -> torch.dtype:
        if self.compute_dtype is not None:
            return self.compute_dtype
        if torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        return x.dtype if x.dtype in FLOAT_DTYPES else self.weight_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"NF4Linear: input must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            # nn.Linear refuses integer input too; casting it would hide a wrong tensor (token ids)
            raise TypeError(f"NF4Linear: input must be a floating-point tensor, got dtype {x.dtype}")
        dtype = self._pick_dtype(x)
        if not torch.is_grad_enabled():  # decoding: no autograd context (minift.nf4.inference)
            with _autocast_off(x.device.type):
                return linear_no_grad(x, self.quant_weight, self.bias, dtype, self._inference_weight)
        return NF4MatMul.apply(x, self.quant_weight, self.bias, dtype)

    def _apply(self, fn, recurse=True):
        # The quantization tensors are a fixed format, not float weights: letting a dtype
        # conversion (module.to(torch.bfloat16), .half(), .double(), .type(...)) reach them would
        # round the fp32 scales and code books, change every dequantized value and write a
        # quant_map bitsandbytes never wrote. So whatever fn does to them, a changed dtype is
        # replaced by an exact copy of the original on the device fn chose; device moves and
        # dtype-preserving operations apply as usual. The bias is an ordinary parameter and follows.
        kept = {name: self._buffers[name] for name in _BUFFERS if self._buffers.get(name) is not None}
        super()._apply(fn, recurse)
        for name, old in kept.items():
            new = self._buffers[name]
            if new is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"blocksize={self.blocksize}, double_quant={self.offset is not None}, "
                f"compute_dtype={self.compute_dtype}")

    # -- state dict under bitsandbytes' names ------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for key, t in self.quant_weight.to_bnb_state_dict(f"{prefix}weight").items():
            destination[key] = t if keep_vars else t.detach()
        if self.bias is not None:
            destination[f"{prefix}bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        expected = {f"{prefix}{_QUANT_STATE_KEY}"} | {f"{prefix}weight{s}" for s in _BUFFERS.values()}
        if self.bias is not None:
            expected.add(f"{prefix}bias")
        if strict:  # a leaf module: every key under its prefix is meant for it
            unexpected_keys.extend(sorted(k for k in state_dict if k.startswith(prefix) and k not in expected))
        try:
            q = from_bnb_state_dict(state_dict, f"{prefix}weight")
        except MissingKeyError as err:
            missing_keys.append(err.key)
            return
        except (KeyError, ValueError) as err:
            error_msgs.append(str(err))
            return
        if tuple(q.shape) != (self.out_features, self.in_features):
            error_msgs.append(f"{prefix}weight: shape {tuple(q.shape)} does not match "
                              f"({self.out_features}, {self.in_features})")
            return
        self._set_weight(q.to(self.weight.device))
        if self.bias is not None:
            if f"{prefix}bias" not in state_dict:
                missing_keys.append(f"{prefix}bias")
            else:
                self.bias = nn.Parameter(state_dict[f"{prefix}bias"].detach().to(self.bias.device),
                                         requires_grad=False)


def _model_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.device, id(t.untyped_storage()))  # the storage, alive while the module holds it
        if key not in seen:
            seen.add(key)
            total += t.nbytes
    return total


def _skipped(path: str, skip) -> bool:
    parts = path.split(".")
    return any(s == path or s in parts or path.endswith("." + s) for s in skip)


def quantize_model(model: nn.Module, skip=("lm_head",), blocksize: int = 64, double_quant: bool = True,
                   compute_dtype=None) -> nn.Module:
    """Replace every ``nn.Linear`` (outside ``skip``) by an ``NF4Linear``, in place.

    Every target layer's weight is checked first (float32 / bfloat16 / float16, non-empty, finite)
    together with ``blocksize`` and ``compute_dtype``, so bad input raises before anything is
    converted and the model is left as it was; the error names the layer. Layers are then
    converted one at a time and each replaced ``nn.Linear`` is dropped right away, so
    peak memory stays near the final size plus one layer. LoRA adapter layers (``lora_A``,
    ``lora_B``) are left in full precision. The bytes of parameters and buffers before and after
    are logged and stored as ``model._minift_quant_report = {"bytes_before", "bytes_after",
    "layers"}``.

    Args:
        model: the model to convert (modified in place).
        skip: module names (a path component or a full dotted path) kept in full precision.
        blocksize, double_quant, compute_dtype: passed to ``NF4Linear.from_linear``.

    Returns:
        The same model.

    Raises:
        TypeError: a non-int ``blocksize``, a bad ``compute_dtype``, or a target weight that is
            not float32 / bfloat16 / float16 (the message names the layer).
        ValueError: an unsupported ``blocksize``, or an empty or non-finite target weight (the
            message names the layer).
    """
    if isinstance(skip, str):
        skip = (skip,)
    check_blocksize(blocksize, "quantize_model")
    if compute_dtype is not None and compute_dtype not in FLOAT_DTYPES:
        raise TypeError(f"quantize_model: compute_dtype must be float32, bfloat16 or float16, got {compute_dtype}")
    targets = [name for name, m in model.named_modules()
               if type(m) is nn.Linear and not _skipped(name, skip) and "lora_" not in name]
    # All checks before the first conversion: a bad layer found halfway would otherwise leave
    # the model half quantized.
    for name in targets:
        check_weight(model.get_submodule(name).weight, "quantize_model", f"layer {name!r} weight")
    before = _model_bytes(model)
    for name in targets:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = getattr(parent, child_name)
        setattr(parent, child_name, NF4Linear.from_linear(layer, blocksize, double_quant, compute_dtype))
        del layer  # the last reference: its full-precision weight is freed here, not at the end
    after = _model_bytes(model)
    model._minift_quant_report = {"bytes_before": before, "bytes_after": after, "layers": len(targets)}
    logger.info("quantize_model: %d linear layers to NF4, %d -> %d bytes", len(targets), before, after)
    return model
