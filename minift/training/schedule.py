"""What each optimizer step does: its learning rate and the micro-batches it takes.

Learning rate: linear warm-up, then cosine, linear or constant decay.

Both are pure functions: the learning rate of the step number, the micro-batches of (seed,
epoch, index). Resuming a run needs nothing but those counters (no scheduler or sampler object
with hidden state to save).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from minift.data.preference import pair_batches
from minift.data.sft import batch_examples
from minift.objectives.grpo import prompt_batches

SCHEDULES = ("cosine", "linear", "constant")


@dataclass(frozen=True)
class Schedule:
    """Learning rate as a function of the 0-based optimizer step.

    Args:
        base_lr: peak learning rate, reached at the end of warm-up.
        total_steps: optimizer steps in the whole run.
        warmup_steps: steps of linear warm-up; step i of warm-up uses base_lr * (i + 1) / warmup_steps,
            so the first step already moves the weights.
        kind: "cosine" (decay to 0), "linear" (decay to 0) or "constant" after warm-up.
    """

    base_lr: float
    total_steps: int
    warmup_steps: int = 0
    kind: str = "cosine"

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise ValueError(f"lr_scheduler must be one of {', '.join(SCHEDULES)}; got {self.kind!r}")
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {self.total_steps}")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"warmup_steps must be in [0, {self.total_steps}], got {self.warmup_steps}")

    @classmethod
    def from_ratio(cls, base_lr: float, total_steps: int, warmup_ratio: float, kind: str) -> "Schedule":
        """Warm-up over round(warmup_ratio * total_steps) steps."""
        return cls(base_lr, total_steps, min(total_steps, round(warmup_ratio * total_steps)), kind)

    def factor(self, step: int) -> float:
        """Multiplier of base_lr at 0-based step `step`."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        # progress runs 0 -> (n-1)/n over the decay steps, so the last step's lr is small but not 0.
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        progress = min(progress, 1.0)
        if self.kind == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    def lr(self, step: int) -> float:
        """Learning rate at 0-based step `step`."""
        return self.base_lr * self.factor(step)


# ---- which micro-batches make up each optimizer step --------------------------------------
def epoch_batches(train_data, config, epoch: int) -> list:
    """Epoch `epoch`'s micro-batches; the order is fixed by config.seed + epoch."""
    if getattr(config, "objective", "sft") == "grpo":  # left-padded prompts, rolled out in the step
        return prompt_batches(train_data, config.micro_batch_size, config.pad_id, config.seed + epoch)
    if getattr(config, "objective", "sft") == "dpo":  # (2B, T) batches of preference pairs
        return pair_batches(train_data, config.micro_batch_size, pad_id=config.pad_id,
                            seed=config.seed + epoch, by_length=_by_length(config))
    return batch_examples(train_data, config.micro_batch_size, pad_id=config.pad_id,
                          mode=config.batching, max_length=config.max_length, seed=config.seed + epoch,
                          by_length=_by_length(config))


def _by_length(config) -> bool:
    return getattr(config, "group_by_length", True)


def batch_rows(train_data, config, epoch: int, start: int, count: int) -> list[int]:
    """Indices into train_data of the examples (DPO: pairs) in micro-batches [start, start +
    count) of `epoch`: what a step trained on, for a message that names its rows."""
    if getattr(config, "objective", "sft") == "dpo":
        batches = epoch_batches(train_data, config, epoch)[start:start + count]
        return sorted(int(i) for b in batches for i in b["pair_index"])
    if getattr(config, "objective", "sft") == "grpo":
        return sorted(i for b in epoch_batches(train_data, config, epoch)[start:start + count] for i in b["row_index"])
    groups = batch_examples(train_data, config.micro_batch_size, pad_id=config.pad_id,
                            mode=config.batching, max_length=config.max_length,
                            seed=config.seed + epoch, indices=True, by_length=_by_length(config))
    return sorted(i for g in groups[start:start + count] for i in g)


def step_groups(train_data, config, epoch: int = 0, index: int = 0):
    """Yield one item per optimizer step, endlessly, starting at micro-batch `index` of `epoch`.

    Each item is ((epoch, index) after the step, epochs done after it, list of micro-batches).
    A step takes up to config.grad_accum micro-batches and never spans two epochs, so the last
    step of an epoch may take fewer.
    """
    while True:
        batches = epoch_batches(train_data, config, epoch)
        for start in range(index, len(batches), config.grad_accum):
            end = min(start + config.grad_accum, len(batches))
            after = (epoch, end) if end < len(batches) else (epoch + 1, 0)
            yield after, epoch + end / len(batches), batches[start:end]
        epoch, index = epoch + 1, 0


def total_steps(train_data, config) -> int:
    """config.max_steps, or the steps that config.epochs passes over train_data take."""
    if config.max_steps is not None:
        return config.max_steps
    return sum(math.ceil(len(epoch_batches(train_data, config, e)) / config.grad_accum)
               for e in range(config.epochs))
