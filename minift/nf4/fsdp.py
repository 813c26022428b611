"""NF4 weights in a form FSDP2 can shard and all-gather as 4-bit bytes.

``fully_shard`` shards parameters, not buffers, and casts floating parameters to the mixed
precision ``param_dtype`` before the all-gather; ``NF4Linear`` keeps its weight in buffers. A
``ShardedNF4Linear`` keeps every per-weight tensor of the quantized matrix in ONE frozen uint8
parameter, ``nf4_bytes``, which FSDP2 splits along dim 0 like any 1-D tensor:

    nf4_bytes = [fp32 scales as bytes | packed 4-bit codes | uint8 absmax codes]
                 4 * ceil(n_blocks/256)  ceil(n/2)            n_blocks           (double quant)
                 4 * n_blocks            ceil(n/2)                                (single quant)

The fp32 segment comes first so that it starts at byte 0 of the gathered tensor. FSDP2 leaves
non-floating parameters out of the ``param_dtype`` cast, and a group with mixed dtypes is
all-gathered as raw bytes, so what crosses the wire per weight of n elements is about
n/2 + n/64 + 4n/16384 bytes (blocksize 64, double quant): 0.516 bytes per element against 2 for
a bf16 copy. The two code books (16 and 256 fp32 levels) are constants and stay replicated
buffers. The gathered bytes are read back into an ``NF4Weight`` without any arithmetic, so the
dequantized weight after an all-gather equals the unsharded one bit for bit.
"""
from __future__ import annotations

import torch
from torch import nn

from minift.nf4.linear import NF4Linear
from minift.nf4.quantize import NF4Weight

_FLAT = "nf4_bytes"


def _segments(q: NF4Weight) -> list[tuple[str, torch.Tensor]]:
    """(field, tensor) in storage order: fp32 tensors first so their byte offsets stay 4-aligned."""
    fields = [("nested_absmax", q.nested_absmax), ("packed", q.packed), ("absmax", q.absmax)]
    fields = [(name, t) for name, t in fields if t is not None]
    return sorted(fields, key=lambda f: f[1].dtype != torch.float32)


def pack_bytes(q: NF4Weight) -> tuple[torch.Tensor, list[tuple[str, torch.dtype, tuple, int]]]:
    """The quantized tensors of ``q`` as one flat uint8 tensor, plus the layout to read them back.

    Returns:
        (flat, layout): flat (total_bytes,) uint8; layout lists (field, dtype, shape, n_bytes).
    """
    parts, layout = [], []
    for name, t in _segments(q):
        raw = t.detach().contiguous().reshape(-1).view(torch.uint8)
        parts.append(raw)
        layout.append((name, t.dtype, tuple(t.shape), raw.numel()))
    return torch.cat(parts), layout


def unpack_bytes(flat: torch.Tensor, layout, meta: NF4Weight) -> NF4Weight:
    """Rebuild an ``NF4Weight`` from ``pack_bytes`` output; ``meta`` gives the non-tensor fields."""
    fields, start = {}, 0
    for name, dtype, shape, n_bytes in layout:
        piece = flat[start:start + n_bytes]
        if dtype != torch.uint8:
            # a gathered tensor may be a view at any byte offset; a copy makes the fp32 view legal
            piece = piece.clone().view(dtype)
        fields[name] = piece.view(shape)
        start += n_bytes
    return NF4Weight(packed=fields["packed"], absmax=fields["absmax"], shape=meta.shape, dtype=meta.dtype,
                     blocksize=meta.blocksize, code=meta.code, nested_absmax=fields.get("nested_absmax"),
                     nested_code=meta.nested_code, offset=meta.offset, nested_blocksize=meta.nested_blocksize)


class ShardedNF4Linear(NF4Linear):
    """An ``NF4Linear`` whose quantized tensors live in one frozen uint8 parameter.

    Same forward and backward as ``NF4Linear`` (the weight is read from ``nf4_bytes`` on every
    call, so under FSDP2 it is the gathered full tensor inside forward and backward). Its
    ``state_dict`` holds ``nf4_bytes`` itself, which is what a sharded checkpoint stores; use
    ``to_nf4_linear`` for the bitsandbytes names.
    """

    def __init__(self, layer: NF4Linear):
        q = layer.quant_weight
        nn.Module.__init__(self)
        self.out_features, self.in_features = layer.out_features, layer.in_features
        self.compute_dtype = layer.compute_dtype
        self.weight_dtype, self.blocksize, self.offset = q.dtype, q.blocksize, q.offset
        self.nested_blocksize = q.nested_blocksize
        flat, self.layout = pack_bytes(q)
        self.register_parameter(_FLAT, nn.Parameter(flat, requires_grad=False))
        self.register_buffer("weight_quant_map", q.code, persistent=False)
        self.register_buffer("weight_nested_quant_map", q.nested_code, persistent=False)
        self.bias = layer.bias

    @torch.compiler.disable
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # FSDP2 gathers a unit's parameters into one buffer, so these uint8 bytes and the layer's
        # float parameters (norms, adapters) are views of one storage in several dtypes; AOT
        # autograd cannot merge such aliased graph inputs, so compiled decoder layers run the
        # NF4 matmul eagerly (a graph break on each side of it)
        return super().forward(x)

    @property
    def weight(self) -> torch.Tensor:
        """The packed 4-bit codes (ceil(n/2), 1) uint8, as ``NF4Linear.weight`` (gathered under FSDP2)."""
        return self.quant_weight.packed

    @property
    def quant_weight(self) -> NF4Weight:
        meta = NF4Weight(packed=None, absmax=None, shape=torch.Size((self.out_features, self.in_features)),
                         dtype=self.weight_dtype, blocksize=self.blocksize, code=self.weight_quant_map,
                         nested_code=self.weight_nested_quant_map, offset=self.offset,
                         nested_blocksize=self.nested_blocksize)
        return unpack_bytes(getattr(self, _FLAT), self.layout, meta)

    def to_nf4_linear(self) -> NF4Linear:
        """A plain ``NF4Linear`` over the same bytes (call on the full, unsharded layer)."""
        return NF4Linear(self.quant_weight, None if self.bias is None else self.bias.detach(), self.compute_dtype)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        nn.Module._save_to_state_dict(self, destination, prefix, keep_vars)

    def _load_from_state_dict(self, *args, **kwargs):
        nn.Module._load_from_state_dict(self, *args, **kwargs)


def shardable_nf4(model: nn.Module) -> int:
    """Replace every ``NF4Linear`` in ``model`` by a ``ShardedNF4Linear``, in place.

    Returns:
        The number of layers replaced.
    """
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, NF4Linear) and not isinstance(m, ShardedNF4Linear)]
    for name, layer in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, ShardedNF4Linear(layer))
    return len(targets)
