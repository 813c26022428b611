"""The FSDP part of ``python -m minift bench gpu``: FSDP2 on the one GPU a session has.

A 1-process job (a process group of world size 1, NCCL on CUDA, gloo in the dry run) still runs
FSDP2's whole machinery — sharding, the all-gather of each unit before its forward and backward,
the reduce-scatter of the gradients — so it checks on CUDA what the CPU tests check on gloo:

* the NF4 all-gather: a QLoRA weight stored as ``ShardedNF4Linear`` bytes, gathered, equals the
  unsharded layer's dequantized weight bit for bit, and the gather moves 4-bit bytes;
* a QLoRA training step (gradient checkpointing, chunked loss, ``AdamW8bit``) under FSDP against
  the same step without it: the losses, the step time and the peak memory, beside
  `minift.estimate_memory` of the one-process step (a trace runs FSDP only for world_size > 1).
"""
from __future__ import annotations

import os
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from minift.bench.gpu_steps import (
    LORA_R,
    _batch,
    _estimate,
    _free,
    build,
    measure_step,
    train_flops_per_token,
)
from minift.distributed import parallel as mdist
from minift.models.config import ModelConfig
from minift.nf4.fsdp import shardable_nf4
from minift.nf4.linear import NF4Linear
from minift.objectives.sft import accumulate_gradients

CHUNK = 1024  # tokens per chunk of the loss


_LAUNCH = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE")


def _join_one_process_group(device: torch.device):
    """Join a world-size-1 group unless one exists; the launch variables it replaced (to put
    back), or None when a group existed already."""
    if dist.is_initialized():
        return None
    saved = {k: os.environ.get(k) for k in _LAUNCH}
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(mdist.free_port()), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    mdist.init_from_env(device.type, single=True)
    return saved


def _leave(saved) -> None:
    dist.destroy_process_group()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _nf4_gather(device: torch.device, shape) -> dict:
    torch.manual_seed(0)
    layer = NF4Linear.from_weight(torch.randn(*shape, device=device, dtype=torch.bfloat16))
    want = layer.dequantize(torch.bfloat16)
    holder = nn.Sequential(layer)
    shardable_nf4(holder)
    stored = holder[0].nf4_bytes.numel()
    fully_shard(holder, mesh=init_device_mesh(device.type, (1,)))
    holder.unshard()
    got = holder[0].dequantize(torch.bfloat16)
    holder.reshard()
    return {"shape": list(shape), "equal": bool(torch.equal(got, want)), "gathered_bytes": stored,
            "bf16_bytes": shape[0] * shape[1] * 2}


def part_fsdp(ctx) -> dict:
    """The NF4 all-gather check and one QLoRA step with and without FSDP on this device."""
    saved = _join_one_process_group(ctx.device)
    config, sizes = ModelConfig.from_name(ctx.sizes.preset), ctx.sizes
    tokens = sizes.batch * sizes.seq_len
    out = {"preset": sizes.preset, "batch": sizes.batch, "seq_len": sizes.seq_len, "lora_r": LORA_R,
           "loss_chunk_size": CHUNK, "optimizer": "adamw8bit", "world_size": 1}
    try:
        out["nf4_gather"] = _nf4_gather(ctx.device, sizes.nf4_shapes[0])
        budget = ctx.seconds
        for name in ("plain", "fsdp"):
            ctx.seconds = budget / 4  # half of each run for building, half for timing
            row, model = {}, None
            try:
                torch.manual_seed(0)  # the same random weights and batch in both runs
                model, params, opt = build(config, "qlora", "adamw8bit", ctx.device)
                if name == "fsdp":
                    mdist.apply_parallel(model, SimpleNamespace(parallel="fsdp", bf16=True), device=ctx.device)
                    params = [p for p in model.parameters() if p.requires_grad]
                    opt = type(opt)(params, lr=1e-5)
                batch = _batch(config, sizes, ctx.device)
                losses = []

                def step():
                    loss, _ = accumulate_gradients(model, [batch], ctx.device, bf16=True, loss_chunk_size=CHUNK)
                    losses.append(loss)
                    opt.step()
                    opt.zero_grad(set_to_none=True)

                row.update(measure_step(ctx, step, tokens, train_flops_per_token(config, sizes.seq_len, "qlora")))
                row["first_loss"] = float(losses[0])
            except Exception as e:  # noqa: BLE001 - an OOM of one run leaves the other to run
                row["error"] = f"{type(e).__name__}: {e}"
            finally:
                model = params = opt = None
                _free(ctx.device)
            out[name] = row
        # the traced step of one process: a 1-rank FSDP job holds the same (whole) shards; what
        # FSDP adds on top, its gathered copies, is the fsdp row's peak less this estimate
        out["estimate"] = _estimate(config, "qlora", sizes, "adamw8bit", ctx.device.type,
                                    loss_chunk_size=CHUNK, max_grad_norm=None)
    finally:
        if saved is not None:
            _leave(saved)
    return out
