"""The pieces the training loop sets up before its first step: device, optimizer, seeds, input
checks, and the NEFTune context manager."""
from __future__ import annotations

import contextlib
import math
import random
import resource
from typing import Optional

import numpy as np
import torch

from minift.optim import AdamW8bit, PagedAdamW8bit
from minift.training.config import TrainConfig


def make_optimizer(model, config: TrainConfig) -> torch.optim.Optimizer:
    """The configured optimizer over the parameters that require grad.

    The 8-bit optimizers are built with ``check_finite=False``: the loop steps them only once it
    has read a finite gradient norm (a NaN/Inf in any gradient makes the norm NaN/Inf and stops
    the run), so their own check would only read every gradient again, with one more
    host-device sync per step (per parameter with ``optimizer_in_backward``).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no parameters with requires_grad=True; nothing to train")
    # Decay matrices only; biases and norm weights (1-D) keep their scale.
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.learning_rate)
    if config.optimizer == "adamw8bit":
        return AdamW8bit(groups, lr=config.learning_rate, check_finite=False)
    return PagedAdamW8bit(groups, lr=config.learning_rate, check_finite=False,
                          device_budget_bytes=config.paged_device_budget)


@contextlib.contextmanager
def neftune(model, alpha: Optional[float]):
    """NEFTune (Jain et al., 2023): uniform noise of scale alpha / sqrt(T * d) on the embeddings."""
    if alpha is None:
        yield
        return
    try:
        embed = model.get_submodule("model.embed_tokens")
    except AttributeError:
        raise ValueError("TrainConfig.neftune_alpha is set, but the model has no "
                         "'model.embed_tokens' module") from None

    def add_noise(module, inputs, output):  # output: (B, T, d)
        if not module.training:
            return output
        scale = alpha / math.sqrt(output.size(-2) * output.size(-1))
        return output + torch.empty_like(output).uniform_(-scale, scale)

    handle = embed.register_forward_hook(add_noise)
    try:
        yield
    finally:
        handle.remove()


def peak_memory(device) -> int:
    """The run's peak: CUDA's allocated high-water mark, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # ru_maxrss is KiB on Linux


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
