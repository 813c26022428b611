"""Training on several processes with torch.distributed: FSDP2 or DDP under ``torchrun``.

A ``torchrun --nproc_per_node N`` launch sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT; ``init_from_env`` joins the process group from them (NCCL on CUDA, gloo on CPU).
Every rank builds the same step groups from the same seed, so the global batch is the batch of a
1-process run with the same flags; ``shard_group`` hands each rank its part of it, and
``accumulate_over_ranks`` normalizes the summed token loss by the trained tokens of ALL ranks
(one all-reduce) so that the averaged gradient equals the 1-process gradient. ``shard_batches``
deals out an evaluation's batches, and ``Shard`` is what an objective (minift.training.loop's token
loss, minift.objectives.dpo) is told of its rank: its part of a step or an evaluation and the sum over ranks.

``apply_parallel`` shards the model: FSDP2 ``fully_shard`` on every decoder layer and on the root
(NF4 bases first become ``ShardedNF4Linear``, so their 4-bit bytes are what is sharded and
gathered), or DDP. Only rank 0 writes files; ``is_main`` says which rank that is.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import socket
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from minift.checks import check_choice
from minift.data.preference import select_pairs
from minift.models.switches import decoder_layers
from minift.names import IGNORE_INDEX, PARALLEL
from minift.nf4.fsdp import shardable_nf4
from minift.tracing import host_read, known

_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


# ---- who am I ----------------------------------------------------------------------------
def env_world_size() -> int:
    """WORLD_SIZE as torchrun set it (1 when not launched by torchrun)."""
    raw = os.environ.get("WORLD_SIZE", "1")
    try:
        n = int(raw)
    except ValueError:
        raise ValueError(f"environment variable WORLD_SIZE must be an integer, got {raw!r}") from None
    if n < 1:
        raise ValueError(f"environment variable WORLD_SIZE must be >= 1, got {n}")
    return n


def world_size() -> int:
    """Processes in the job: the process group's size once joined, else WORLD_SIZE, else 1."""
    return dist.get_world_size() if dist.is_initialized() else env_world_size()


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """True on the rank that writes metrics, summaries, checkpoints' metadata and exports."""
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for a job started on this machine without torchrun."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launched() -> bool:
    """True inside a ``torchrun`` launch (its variables are all set), whatever the world size."""
    return all(v in os.environ for v in _LAUNCH_VARS)


def init_from_env(device: Optional[str] = None, *, single: bool = False, timeout_s: float = 1800.0) -> torch.device:
    """Join the process group a ``torchrun`` launch describes and return this rank's device.

    Nothing is joined on one process unless ``single`` (FSDP or DDP asked for on
    ``torchrun --nproc_per_node 1``). NCCL serves CUDA devices (this rank uses cuda:LOCAL_RANK),
    gloo the CPU.

    Args:
        device: "cuda", "cpu" or None (cuda when available).
        single: join a 1-process group too.
        timeout_s: how long a collective may wait for the other ranks.
    """
    kind = torch.device(device).type if device else ("cuda" if torch.cuda.is_available() else "cpu")
    world = env_world_size()
    if (world == 1 and not single) or dist.is_initialized():
        return _rank_device(kind)
    missing = [v for v in _LAUNCH_VARS if v not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={world}, but the launch variables {', '.join(missing)} are not set; "
                           "start the job with torchrun --nproc_per_node N")
    if kind == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if kind == "cuda" else "gloo",
                            timeout=datetime.timedelta(seconds=timeout_s))
    return _rank_device(kind)


def _rank_device(kind: str) -> torch.device:
    if kind == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(kind)


def resolve_parallel(parallel: Optional[str], world: int) -> Optional[str]:
    """The parallel mode to use: None on one process unless asked, "fsdp" by default on several."""
    if parallel is not None:
        check_choice("TrainConfig.parallel", parallel, PARALLEL)
    if world > 1 and parallel is None:
        return "fsdp"
    return parallel


# ---- sharding the model ------------------------------------------------------------------
def apply_parallel(model: nn.Module, config, *, device: Optional[torch.device] = None,
                   frozen: bool = False) -> nn.Module:
    """Shard (FSDP2) or replicate (DDP) ``model`` over all ranks, after ``init_from_env``.

    Reads ``config.parallel`` (None -> "fsdp" when world size > 1), ``config.bf16`` and
    ``config.fsdp_cpu_offload`` (False when absent).

    FSDP2: every decoder layer is one all-gather unit and the root holds the embedding, final
    norm and lm_head. A layer's parameters are resharded after its forward (gathered again for
    its backward), which keeps one layer unsharded at a time, plus the next one FSDP2 prefetches.
    The root is not resharded after forward: the chunked loss (``minift.objectives.loss``) runs lm_head
    after the model's forward, and the backward starts with the root's gradients anyway, so the
    root stays gathered from its forward to the end of the backward (one all-gather a
    micro-batch instead of two). A ``frozen`` model (a DPO reference copy: forward only, no
    backward to reshard it) keeps its root gathered after forward too, for its chunked log-probs;
    its user calls `reshard` after them. A forward under ``no_grad``
    (evaluation) also leaves the root gathered: ``reshard`` frees it.

    On CUDA with bf16 the parameters are gathered in bf16 and gradients reduced in fp32; uint8
    NF4 bytes are never cast. ``fsdp_cpu_offload`` keeps the sharded parameters, gradients and
    optimizer states in host memory (``CPUOffloadPolicy``).

    Returns:
        The same model (FSDP2 works in place) or a ``DistributedDataParallel`` wrapper; use
        ``unwrap`` for the plain module.
    """
    parallel = resolve_parallel(getattr(config, "parallel", None), world_size())
    if parallel is None:
        return model
    if not dist.is_initialized():
        raise RuntimeError(f"apply_parallel: parallel={parallel!r} needs a process group; call "
                           "minift.distributed.parallel.init_from_env() under torchrun first")
    device = torch.device(device or _rank_device("cuda" if torch.cuda.is_available() else "cpu"))
    if parallel == "ddp":
        if any(t.device != device for t in list(model.parameters()) + list(model.buffers())):
            model.to(device)  # (a planning trace's fake model is in place already: no swap)
        # NF4 buffers are identical on every rank (same checkpoint); broadcasting them each step
        # would send the whole 4-bit base for nothing.
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                       broadcast_buffers=False)
    shardable_nf4(model)
    bf16_gpu = device.type == "cuda" and bool(getattr(config, "bf16", False))
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16_gpu
          else MixedPrecisionPolicy())
    cpu_offload = bool(getattr(config, "fsdp_cpu_offload", False))
    # pinned host memory makes the host-to-GPU copies asynchronous; it needs an accelerator, so a
    # CPU-only job (gloo) offloads to plain memory, which runs the same code path
    offload = CPUOffloadPolicy(pin_memory=device.type == "cuda") if cpu_offload else OffloadPolicy()
    with unset_fake_temporarily():  # the mesh is a table of ranks, real in a planning trace too
        mesh = init_device_mesh(device.type, (world_size(),))
    for layer in decoder_layers(model, "apply_parallel shards one decoder layer at a time"):
        fully_shard(layer, mesh=mesh, mp_policy=mp, offload_policy=offload, reshard_after_forward=True)
    # the root stays gathered after its forward, a frozen copy's too: the chunked log-probs run its
    # lm_head after the forward (a resharded head would meet DTensor shards); a frozen copy's
    # user frees it with `reshard` once its log-probs are taken
    fully_shard(model, mesh=mesh, mp_policy=mp, offload_policy=offload, reshard_after_forward=False)
    return model


def reshard(model: nn.Module) -> None:
    """Free every FSDP unit left gathered (the root after a forward without backward); the
    module attributes are the sharded parameters again, as the optimizer and DCP know them."""
    for m in unwrap(model).modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (FSDP2 modules are their own module)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


# ---- sharding the data -------------------------------------------------------------------
def _size(batch: dict) -> int:
    """Rows of a micro-batch; pairs of a DPO pair batch (2B rows, chosen first)."""
    return batch["pair_index"].shape[0] if "pair_index" in batch else batch["input_ids"].shape[0]


def _rows(batch: dict, index) -> dict:
    """Rows ``index`` of a micro-batch; of a pair batch, pairs ``index`` (both their rows)."""
    if "pair_index" in batch:
        return select_pairs(batch, index)
    return {k: v[index] for k, v in batch.items()}


def blank_batch(batch: dict) -> dict:
    """One row (one pair) of ``batch`` that counts for nothing: every label -100, and a pair's
    ``pair_index`` -1, so it adds no loss, no tokens and no pair. A rank runs it when it has no
    real row, because the collectives inside FSDP's forward need every rank to run it."""
    blank = _rows(batch, slice(0, 1))
    blank["labels"] = torch.full_like(blank["labels"], IGNORE_INDEX)
    if "pair_index" in blank:
        blank["pair_index"] = torch.full_like(blank["pair_index"], -1)
    return blank


def shard_group(group: list, rank: int, world: int, size: Callable = None, take: Callable = None,
                blank: Callable = None) -> list:
    """This rank's part of one optimizer step's micro-batches (every rank passes the same group).

    When the micro-batches divide evenly, rank r takes micro-batches r, r + world, ...; otherwise
    each micro-batch is split by rows, rank r taking rows r, r + world, .... Either way the ranks
    together see exactly the 1-process step, and all of them run the same number of forwards (the
    collectives need that): a rank left without a row gets ``blank_batch``, which adds no loss
    and no tokens. A DPO pair batch is split by pairs, never between a pair's two rows.

    ``size`` (batch -> rows), ``take`` (batch, rows as a range -> the batch of those rows) and
    ``blank`` (batch -> a blank batch) replace the defaults for batches of another layout
    (GRPO's prompt batches).
    """
    if world == 1:
        return group
    if len(group) % world == 0:
        return group[rank::world]
    size, blank = size or _size, blank or blank_batch
    take = take or (lambda batch, rows: _rows(batch, slice(rows.start, rows.stop, rows.step)))
    out = []
    for batch in group:
        n = size(batch)
        out.append(take(batch, range(rank, n, world)) if rank < n else blank(batch))
    return out


def shard_batches(batches: list, rank: int, world: int, blank: Callable = None) -> list:
    """This rank's part of an evaluation: batches rank, rank + world, ..., then blank batches up
    to ceil(len(batches) / world), so that every rank runs the same number of forwards. ``blank``
    (batch -> a blank batch, default ``blank_batch``) serves batches of another layout."""
    if world == 1:
        return batches
    mine = batches[rank::world]
    missing = -(-len(batches) // world) - len(mine)
    return mine + [(blank or blank_batch)(batches[0]) for _ in range(missing)]


# ---- one step across ranks ---------------------------------------------------------------
def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum of ``value`` over ranks (``value`` itself on one process)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    out = value.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


@contextlib.contextmanager
def grad_sync(model: nn.Module, enabled: bool):
    """DDP: skip the gradient all-reduce unless ``enabled`` (the last micro-batch of a step).

    FSDP2 reduce-scatters after every micro-batch on purpose: skipping it would keep every
    layer's unsharded gradient until the step's last micro-batch, undoing the sharding.
    """
    if isinstance(model, DistributedDataParallel) and not enabled:
        with model.no_sync():
            yield
    else:
        yield


def accumulate_over_ranks(model: nn.Module, micro_batches: list, device, loss_sum: Callable, count: Callable,
                          n_total: Optional[int] = None):
    """Forward/backward over this rank's micro-batches of one optimizer step.

    Args:
        model: the prepared (possibly FSDP/DDP) model.
        micro_batches: this rank's part, from ``shard_group``.
        device: where the batches go.
        loss_sum: (model, batch, device) -> 0-dim summed token loss of the batch.
        count: batch -> trained tokens (label positions that count).
        n_total: ``count`` summed over the whole step (all ranks' micro-batches), when the
            caller has it: every rank holds the host batches of the whole step, so the
            objectives count them there, without a collective or a host-device sync. None:
            summed over ranks by an all-reduce and read back (one sync before the first forward).

    Each micro-batch's loss sum is divided by the trained tokens of all ranks together; DDP and
    FSDP average gradients over ranks, so the backward runs on ``world * loss`` to make the
    averaged gradient the 1-process gradient of the whole step.

    Returns:
        (loss, n_trained): the step's mean token loss over all ranks (0-dim tensor) and the
        global trained-token count.
    """
    device = torch.device(device)
    world = world_size() if dist.is_initialized() else 1
    if n_total is not None:
        n_trained = n_total
    else:
        mine = sum(count(b) for b in micro_batches)
        local = torch.tensor(float(mine), dtype=torch.float64, device=device)
        # counted before any forward; a planning trace's fake collective returns no value: every
        # rank is taken to hold as many as this one
        n_trained = int(known(all_reduce_sum(local), mine * world))
    total = torch.zeros((), device=device)
    for i, batch in enumerate(micro_batches):
        with grad_sync(model, i == len(micro_batches) - 1):
            loss = loss_sum(model, batch, device) / max(n_trained, 1)
            (loss * world if world > 1 else loss).backward()
        total += loss.detach().float()
    return all_reduce_sum(total), n_trained


class Shard:
    """One rank's place in a distributed run, as an objective's ``step`` and ``evaluate`` see it.

    ``step(group)`` is this rank's part of an optimizer step's micro-batches (``shard_group``),
    ``eval(batches)`` its part of an evaluation (``shard_batches``), ``sum(tensor)`` the tensor
    summed over all ranks, reduced on ``device`` (NCCL reduces on the rank's GPU) and returned
    where it was.
    """

    def __init__(self, rank: int, world: int, device):
        for name, value in (("world", world), ("rank", rank)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"Shard.{name} must be an int, got {type(value).__name__} {value!r}")
        if world < 1:
            raise ValueError(f"Shard.world must be >= 1, got {world}")
        if not 0 <= rank < world:
            raise ValueError(f"Shard.rank must be in [0, {world}) for world={world}, got {rank}")
        self.rank, self.world, self.device = rank, world, torch.device(device)

    def step(self, group: list) -> list:
        with host_read():  # rows of host batches: read on the host, no device memory
            return shard_group(group, self.rank, self.world)

    def eval(self, batches: list) -> list:
        with host_read():
            return shard_batches(batches, self.rank, self.world)

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(value.to(self.device)).to(value.device)

    def __repr__(self) -> str:
        return f"Shard(rank={self.rank}, world={self.world}, device={self.device})"


def clip_grad_norm_on_device(params: list, max_norm: float) -> torch.Tensor:
    """``clip_grad_norm_`` over plain or sharded (DTensor) gradients; the global norm as a 0-d
    tensor on the gradients' device, not read: the training step reads it together with the
    loss (``minift.training.loop.run_step``), one host-device sync for both."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()  # the sum over ranks, on the device
    return norm


def clip_grad_norm(params: list, max_norm: float) -> float:
    """``clip_grad_norm_on_device`` read as a float (a host-device sync on CUDA)."""
    norm = clip_grad_norm_on_device(params, max_norm)
    return float(known(norm, 0.0))  # a planning trace's norm has no value: assumed finite
