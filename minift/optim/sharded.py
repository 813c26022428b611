"""AdamW8bit on sharded parameters: FSDP2's DTensors, whose rows are split over the ranks.

Each rank steps only its own rows and keeps the optimizer states of those rows: states are
per-shard, so they shrink with the world size like the weights and gradients do.

Blocks. The 8-bit moments are quantized in blocks of 256 consecutive elements of the flattened
parameter. When a row holds a multiple of 256 elements ("row-aligned": every Llama projection,
embedding and lm_head), a rank's rows start on a block boundary, so the blocks of its shard are
exactly the blocks of the whole parameter: the sharded step is bit for bit the 1-process step,
and the states can be cut into rows at any world size. Parameters whose rows are not a multiple
of 256 (LoRA B with r < 256, 1-D norms) would need blocks that straddle two ranks; under FSDP
they keep float32 moments instead (8 bytes per element, as the small tensors always do).

Exchange format (``state_dict``) for a sharded parameter of shape (R, ...), C = numel / R:
``exp_avg_codes`` / ``exp_avg_sq_codes`` uint8 (R, C) and ``exp_avg_absmax`` /
``exp_avg_sq_absmax`` float32 (R, C / 256), or ``exp_avg`` / ``exp_avg_sq`` float32 of the
parameter's shape; all DTensors placed like the parameter, so torch.distributed.checkpoint
saves each rank's rows and reads them back re-sliced for any world size.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from minift.optim.quant8 import BLOCK
from minift.tracing import known


def is_sharded(t) -> bool:
    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (the tensor itself otherwise); shares its storage."""
    return t._local_tensor if isinstance(t, DTensor) else t


def check_placement(p: DTensor, where: str) -> None:
    """Only row sharding (FSDP2's Shard(0)) and replication are stepped shard by shard."""
    for placement in p.placements:
        if not (isinstance(placement, Replicate) or (isinstance(placement, Shard) and placement.dim == 0)):
            raise ValueError(f"AdamW8bit: {where} (shape {tuple(p.shape)}) is a DTensor placed as "
                             f"{tuple(p.placements)}; only row sharding Shard(0) (FSDP2) and "
                             "Replicate are supported")
    g = p.grad
    if g is not None and isinstance(g, DTensor) and tuple(g.placements) != tuple(p.placements):
        raise ValueError(f"AdamW8bit: {where} has a gradient placed as {tuple(g.placements)}, its "
                         f"parameter as {tuple(p.placements)}; reduce the gradient first")


def row_size(p: torch.Tensor) -> int:
    """Elements per row (dim 0) of p; a 0-d tensor is one row of one element."""
    return p.numel() // p.shape[0] if p.dim() and p.shape[0] else max(p.numel(), 1)


def row_aligned(p: torch.Tensor) -> bool:
    """Whether p's rows hold whole 8-bit blocks (then any row split keeps the blocks intact)."""
    return p.dim() >= 2 and row_size(p) % BLOCK == 0


def first_row(p: DTensor) -> int:
    """Global index of this rank's first row of ``p``."""
    with unset_fake_temporarily():  # layout arithmetic on the mesh, real in a planning trace too
        _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return int(offset[0]) if p.dim() else 0


def flat_offset(p: torch.Tensor) -> int:
    """Global flat index of this rank's first element (0 for a plain tensor)."""
    return first_row(p) * row_size(p) if isinstance(p, DTensor) else 0


def agree_all_finite(finite, params) -> bool:
    """``finite`` on every rank that holds a shard of ``params`` (MIN over the mesh): a NaN in
    one rank's rows skips the step on all ranks, so none of them drifts from the others.

    ``finite`` is a bool, or a 0-d bool tensor on the device, not read yet: then the flag is
    reduced on the device and read once, after the all-reduce, the one host-device sync of the
    decision (a bool costs no copy to the device either: the flag is filled there).
    """
    mesh = next((p.device_mesh for p in params if isinstance(p, DTensor)), None)
    on_device = isinstance(finite, torch.Tensor)
    if mesh is None or not dist.is_initialized():
        return bool(known(finite, True)) if on_device else finite  # a trace's flag: finite
    device = torch.device("cuda", torch.cuda.current_device()) if mesh.device_type == "cuda" else \
        torch.device(mesh.device_type)
    if on_device:
        flag = finite.reshape(1).to(device=device, dtype=torch.int32, non_blocking=True)
    else:
        flag = torch.full((1,), 1 if finite else 0, dtype=torch.int32, device=device)
    for dim in range(mesh.ndim):
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=mesh.get_group(dim))
    return bool(known(flag[0], True))  # the one read


def exchange_shape(p: torch.Tensor, key: str) -> tuple:
    """Global shape of state ``key`` of a sharded parameter in the exchange format."""
    rows = p.shape[0] if p.dim() else 1
    if key.endswith("_codes"):
        return (rows, row_size(p))
    if key.endswith("_absmax"):
        return (rows, row_size(p) // BLOCK)
    return tuple(p.shape)


def to_global(p: DTensor, key: str, value: torch.Tensor) -> DTensor:
    """This rank's state ``value`` as a DTensor of the exchange format (a view, no copy)."""
    shape = exchange_shape(p, key)
    view = value.view(local(p).shape[0], shape[1]) if key.endswith(("_codes", "_absmax")) else value
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(view, p.device_mesh, p.placements, shape=torch.Size(shape), stride=stride)


def to_local(p: DTensor, key: str, value: torch.Tensor, where: str) -> torch.Tensor:
    """A saved state tensor cut to this rank's rows: a DTensor of the exchange format (any
    world size, DCP re-sliced it already) or a full plain tensor (sliced here)."""
    shape = exchange_shape(p, key)
    numel = 1
    for s in shape:
        numel *= s
    if tuple(value.shape) != shape and value.numel() != numel:
        raise ValueError(f"AdamW8bit.load_state_dict: {where}['{key}'] has shape {tuple(value.shape)}, "
                         f"expected {shape} for a parameter of shape {tuple(p.shape)}")
    if isinstance(value, DTensor):
        if tuple(value.shape) != shape:
            raise ValueError(f"AdamW8bit.load_state_dict: {where}['{key}'] has shape {tuple(value.shape)}, "
                             f"expected {shape} for a parameter of shape {tuple(p.shape)}")
        if tuple(value.placements) != tuple(p.placements):
            value = value.redistribute(p.device_mesh, p.placements)
        return local(value).reshape(-1) if key.endswith(("_codes", "_absmax")) else local(value)
    rows = value.reshape(shape[0], -1)
    start, count = first_row(p), local(p).shape[0] if p.dim() else 1
    part = rows[start:start + count]
    return part.reshape(-1) if key.endswith(("_codes", "_absmax")) else part.reshape(local(p).shape)
