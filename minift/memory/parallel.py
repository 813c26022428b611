"""Per-GPU memory of a training step on N GPUs: FSDP2 (sharded) or DDP (replicated).

Built on the 1-GPU estimate of the same micro-batch (each rank runs a micro-batch of its own),
whose categories are F frozen weights, P trainable parameters, G gradients, S optimizer states,
A activations, with L the loss buffers and T the optimizer step's temporaries. With W GPUs:

FSDP2 (``minift.distributed.parallel.apply_parallel``: one all-gather unit per decoder layer + the root)
    sharded, per GPU:   (F + P + S + G) / W
    gathered buffers:   the root (embedding, final norm, lm_head) stays gathered from forward to
                        backward; two decoder layers are gathered at a time (the one computing and
                        the one prefetched): root + 2 x layer, at their stored sizes (NF4 bytes
                        for QLoRA's base, never upcast)
    unsharded grads:    one layer's gradients before its reduce-scatter
    peak = max(forward/backward: (F+P+S+G)/W + gathered + layer grads + A + L,
               optimizer step:   (F+P+S+G)/W + T/W)
    CPU offload moves the sharded part and the optimizer step to host memory:
    device = gathered + layer grads + A + L; host = (F + P + S + G) / W

Optimizer states on shards (``minift.optim.sharded``): minift.AdamW8bit keeps 8-bit moments
(2 + 8/256 bytes a value) only for tensors of >= 4096 values whose rows hold whole 256-value
blocks (projections, embedding, lm_head, LoRA A); the others keep float32 moments (8 bytes a
value: LoRA B with r < 256, norms, biases). The paged optimizer keeps its 8-bit pages in host
memory, up to ``paged_device_budget`` of them resident on each GPU.

DDP: everything replicated, plus the gradient buckets DDP all-reduces (a second copy of the
gradients, ``gradient_as_bucket_view=False``): peak = 1-GPU peak + G.

These are estimates from the formulas above, not measurements on GPUs.
"""
from __future__ import annotations

import math
from dataclasses import replace

from minift.memory.formulas import adam_state_bytes, layer_tensors
from minift.models.config import ModelConfig
from minift.names import LINEARS

PARALLEL = ("fsdp", "ddp")


def nf4_flat_bytes(n: int, blocksize: int = 64, nested_blocksize: int = 256) -> int:
    """Bytes of a ``ShardedNF4Linear``'s ``nf4_bytes`` for n values (double quantization): the
    packed nibbles, one uint8 absmax code per block and one float32 scale per 256 blocks. This is
    what FSDP shards and gathers; the code books stay replicated."""
    blocks = math.ceil(n / blocksize)
    return math.ceil(n / 2) + blocks + 4 * math.ceil(blocks / nested_blocksize)


def _layer_bytes(cfg: ModelConfig, method: str, targets, r: int, e: int, ae: int, blocksize: int) -> dict:
    """Stored bytes of one decoder layer: {"frozen", "trainable"} (trainable = its gradients too)."""
    shapes = cfg.linear_shapes()
    norms = 2 * cfg.hidden_size * e
    if method == "full":
        return {"frozen": 0, "trainable": sum(i * o for i, o in shapes.values()) * e + norms}
    if method == "qlora":
        frozen = sum(nf4_flat_bytes(i * o, blocksize) for i, o in shapes.values()) + norms
    else:
        frozen = sum(i * o for i, o in shapes.values()) * e + norms
    adapters = sum(r * (i + o) * ae for name, (i, o) in shapes.items() if name in targets)
    return {"frozen": frozen, "trainable": adapters}


def _root_bytes(cfg: ModelConfig, e: int) -> int:
    """Embedding, final norm and (untied) lm_head, never quantized: the root FSDP unit."""
    heads = 1 if cfg.tie_word_embeddings else 2
    return heads * cfg.vocab_size * cfg.hidden_size * e + cfg.hidden_size * e


def _trainable_rows(cfg: ModelConfig, method: str, targets, r: int, e: int, ae: int) -> list:
    """(values, bytes per value, values per row; 0 for 1-D) of every trainable tensor."""
    shapes = cfg.linear_shapes()
    if method == "full":
        return [(n, e, shapes[name][0] if linear else
                 (cfg.hidden_size if name in ("embed_tokens", "lm_head") else 0))
                for name, n, linear in layer_tensors(cfg)]
    out = []
    for _ in range(cfg.num_hidden_layers):
        for name in targets:
            i, o = shapes[name]
            out += [(r * i, ae, i), (o * r, ae, r)]  # lora_A (r, in), lora_B (out, r)
    return out


def sharded_state_bytes(cfg: ModelConfig, method: str, targets, r: int, e: int, ae: int, optimizer: str,
                        world_size: int, paged_device_budget) -> tuple[int, int]:
    """(device bytes, host bytes) of one GPU's optimizer states under FSDP."""
    device = paged = 0
    for n, elem, row in _trainable_rows(cfg, method, targets, r, e, ae):
        if optimizer != "adamw" and n >= 4096 and row and row % 256 == 0:
            b = adam_state_bytes(n, elem, optimizer)
            if optimizer == "paged_adamw8bit":
                paged += b
            else:
                device += b
        else:
            device += adam_state_bytes(n, elem, optimizer if optimizer == "adamw" else "adamw8bit",
                                       min_8bit_size=n + 1)  # float32 moments
    paged = math.ceil(paged / world_size)
    resident = paged if paged_device_budget is None else min(paged_device_budget, paged)
    return math.ceil(device / world_size) + resident, paged


def per_gpu(est, cfg: ModelConfig, *, world_size: int, parallel: str, r: int = 16,
            target_modules="all-linear", e: int = 2, ae: int = 4, blocksize: int = 64,
            cpu_offload: bool = False, paged_device_budget=None):
    """The per-GPU estimate on ``world_size`` GPUs from the 1-GPU estimate ``est``.

    Args:
        est: ``estimate_memory`` of the same model, method and per-rank micro-batch.
        cfg: the model's architecture.
        world_size: GPUs (>= 1).
        parallel: "fsdp" or "ddp".
        r, target_modules, blocksize: as given to ``estimate_memory``.
        e, ae: bytes per element of the weights and of the adapters.
        cpu_offload: FSDP's ``CPUOffloadPolicy``.
        paged_device_budget: resident bytes of a paged optimizer's pages per GPU (None: all).

    Returns:
        A ``MemoryEstimate`` of one GPU; ``terms`` adds "all_gather_buffers",
        "unsharded_layer_grads", "ddp_buckets" and "host_bytes" (CPU offload), ``settings`` adds
        world_size, parallel and cpu_offload.
    """
    if parallel not in PARALLEL:
        raise ValueError(f"parallel must be one of {', '.join(PARALLEL)}, got {parallel!r}")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
    if not isinstance(cpu_offload, bool):
        raise TypeError(f"cpu_offload must be True or False, got {type(cpu_offload).__name__} {cpu_offload!r}")
    if cpu_offload and parallel != "fsdp":
        raise ValueError("cpu_offload applies to parallel='fsdp' only")
    method = est.settings.get("method")
    settings = dict(est.settings, world_size=world_size, parallel=parallel, cpu_offload=cpu_offload)
    loss = est.terms.get("loss_buffers", 0)
    step_tmp = est.terms.get("step_temporaries", 0)
    if parallel == "ddp":
        buckets = est.gradients
        return replace(est, gradients=est.gradients + buckets, total=est.total + buckets, settings=settings,
                       terms=dict(est.terms, ddp_buckets=buckets, all_gather_buffers=0,
                                  unsharded_layer_grads=0, host_bytes=0))
    targets = LINEARS if target_modules == "all-linear" else tuple(target_modules)
    layer = _layer_bytes(cfg, method, targets, r, e, ae, blocksize)
    root = _root_bytes(cfg, e)
    full = method == "full"
    # gathered: the root unit (kept from forward to backward) and two decoder layers
    gathered_frozen = (0 if full else root) + 2 * layer["frozen"]
    gathered_trainable = (root if full else 0) + 2 * layer["trainable"]
    # unsharded gradients waiting for their reduce-scatter: one layer's, or the root's (full)
    layer_grads = max(layer["trainable"], root if full else 0)

    def shard(n: int) -> int:
        return math.ceil(n / world_size)

    optimizer = est.settings.get("optimizer", "adamw")
    states, paged_host = sharded_state_bytes(cfg, method, targets, r, e, ae, optimizer, world_size,
                                             paged_device_budget)
    parts = {"frozen_weights": shard(est.frozen_weights), "trainable_params": shard(est.trainable_params),
             "gradients": shard(est.gradients), "optimizer_states": states}
    host = (sum(parts.values()) if cpu_offload else 0) + paged_host
    device = {k: 0 for k in parts} if cpu_offload else dict(parts)
    fwd_bwd = dict(device, activations=est.activations, other=loss)
    fwd_bwd["frozen_weights"] += gathered_frozen
    fwd_bwd["trainable_params"] += gathered_trainable
    fwd_bwd["gradients"] += layer_grads
    # the optimizer step runs where the shards are: on the host with CPU offload
    step = dict(device, activations=0, other=0 if cpu_offload else shard(step_tmp))
    peak = max((fwd_bwd, step), key=lambda m: sum(m.values()))
    settings["peak_moment"] = "forward_backward" if peak is fwd_bwd else "optimizer_step"
    return replace(est, **peak, total=sum(peak.values()), settings=settings,
                   terms=dict(est.terms, all_gather_buffers=gathered_frozen + gathered_trainable,
                                     unsharded_layer_grads=layer_grads, ddp_buckets=0, host_bytes=host))
