"""A host micro-batch onto the device, with every decision about it taken on the host.

On CUDA a blocking host<->device copy or a read of a device value (`.item()`, `bool(t)`)
waits for all queued work. The training step therefore copies every tensor of a micro-batch,
labels included, before its forward is queued and without blocking (`non_blocking=True`), and
decides on the host, where reading the batch is free, whether it is padded at all.
"""
from __future__ import annotations

import torch

from minift.tracing import known


def to_device(batch: dict, device) -> dict:
    """`batch`'s (B, T) tensors on `device`, copied before any compute is queued.

    An `attention_mask` with no padding is dropped (read on the host, before the copy) unless
    the batch is packed, so the model takes the fused causal kernel without reading the mask
    on the device.
    """
    device = torch.device(device)
    mask = batch.get("attention_mask")
    unpadded = (mask is not None and "segment_ids" not in batch and mask.device.type == "cpu"
                and known(lambda: mask.all(), False))
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()
            if not (k == "attention_mask" and unpadded)}
