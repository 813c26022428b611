"""Learning-rate schedules: linear warm-up, then cosine, linear or constant.

The schedule is a pure function of the optimizer step, so resuming a run needs nothing but the
step counter (no scheduler object with hidden state to save).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

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
