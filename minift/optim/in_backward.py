"""The optimizer step inside backward: each parameter is updated as soon as its gradient is ready.

Full fine-tuning normally holds every gradient until ``optimizer.step()``: for Llama-3.1-8B in
bf16 that is 16 GB. Here each trainable parameter gets a post-accumulate-grad hook that steps
the optimizer and sets ``p.grad = None`` at once, so at most one parameter's gradient (the
largest is the 128256 x 4096 embedding or head, 1 GB in bf16) is alive at a time.

One optimizer serves all parameters. When a hook runs, only that parameter has a gradient (every
earlier one was freed by its own hook), and ``step()`` updates exactly the parameters that have
a gradient, so the optimizer, its state dict and its checkpoints are the same objects as in the
normal path: resuming is exact, and with no clipping the weights are bit-identical.

What cannot work this way, and is refused by ``check_step_in_backward``:
* global-norm clipping: the norm needs every gradient before the first update;
* ``grad_accum > 1``: the gradients would have to be kept across micro-batches.
The global gradient norm is still reported (accumulated hook by hook, before each update).

No hook reads a device value: a read waits for the device to finish everything queued (one
host-device sync per parameter, ~580 per backward of a full 8B fine-tune, each stalling the GPU
while the host queues the next kernels). So a hook cannot see whether its gradient is finite
before the update: every parameter is stepped, and the squared norms are summed on the device.
``grad_norm()`` is a 0-d device tensor, NaN when any gradient held NaN/Inf, which the training
loop reads once, with the loss, and stops on (a non-finite step ends the run). Only then does
``nonfinite`` name the parameters whose gradients were not finite, in one more read.
"""
from __future__ import annotations

import torch


def check_step_in_backward(*, max_grad_norm, grad_accum: int) -> None:
    """Raise ValueError (naming the TrainConfig fields) for settings the hooks cannot honour."""
    if max_grad_norm is not None:
        raise ValueError(f"TrainConfig.optimizer_in_backward=True cannot clip the global gradient "
                         f"norm (each parameter is updated before the next gradient exists); set "
                         f"max_grad_norm=None (got {max_grad_norm!r})")
    if grad_accum != 1:
        raise ValueError(f"TrainConfig.optimizer_in_backward=True needs grad_accum=1 (gradients "
                         f"are freed right after each update, so they cannot accumulate over "
                         f"micro-batches); got grad_accum={grad_accum!r}")


class StepInBackward:
    """Steps ``optimizer`` for each of its parameters from that parameter's gradient hook.

    Args:
        optimizer: any ``torch.optim.Optimizer`` whose ``step()`` skips parameters without a
            gradient (torch's AdamW, minift's AdamW8bit / PagedAdamW8bit).

    Use as a context manager (hooks are removed on exit). After each backward, ``grad_norm()``
    is the global gradient norm of that backward, a 0-d float64 tensor on the gradients' device
    (NaN when a gradient held NaN/Inf), and ``nonfinite`` lists the parameters whose gradient had
    NaN/Inf. Every parameter is stepped, those too: deciding per parameter would read each
    gradient's norm on the host, a host-device sync per parameter. (An optimizer's own check,
    ``AdamW8bit(check_finite=True)``, still skips a non-finite gradient, at one sync per
    ``step()``, here one per parameter; the training loop builds it with ``check_finite=False``.)
    """

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.names = {id(p): f"param_groups[{gi}]['params'][{pi}] (shape {tuple(p.shape)})"
                      for gi, g in enumerate(optimizer.param_groups) for pi, p in enumerate(g["params"])}
        self._handles = []
        self.reset()

    def __enter__(self):
        self._handles = [p.register_post_accumulate_grad_hook(self._hook) for p in self.params]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []

    def reset(self) -> None:
        """Start a new backward's norm and non-finite record."""
        self._norm_sq = None  # float64 0-d on the device: squared norms summed in hook order
        self._norms: list = []  # (parameter, its gradient's float32 norm) in hook order

    def grad_norm(self) -> torch.Tensor:
        """The global gradient norm of the last backward as a 0-d float64 tensor on the
        gradients' device (not read: no sync); NaN when any gradient held NaN/Inf."""
        if self._norm_sq is None:
            return torch.zeros((), dtype=torch.float64)
        # summed over every gradient, a non-finite one makes the sum NaN or Inf (float64 holds
        # the square of any float32 norm): NaN then, as before the sum went on the device
        return torch.where(torch.isfinite(self._norm_sq), self._norm_sq.sqrt(), torch.nan)

    @property
    def nonfinite(self) -> list:
        """The parameters of the last backward whose gradient held NaN/Inf, by name (one read
        of all the norms together; ask only once the step is known not to be finite)."""
        if not self._norms:
            return []
        finite = torch.isfinite(torch.stack([n for _, n in self._norms])).tolist()
        return [self.names[id(p)] for (p, _), ok in zip(self._norms, finite) if not ok]

    @torch.no_grad()
    def _hook(self, p: torch.Tensor) -> None:
        # vector_norm with dtype=float32 reduces bf16 gradients in fp32 without an fp32 copy
        norm = torch.linalg.vector_norm(p.grad, dtype=torch.float32)
        self._norms.append((p, norm))
        square = norm.double().square()  # exact: float64 holds the square of a float32
        self._norm_sq = square if self._norm_sq is None else self._norm_sq + square
        self.optimizer.step()  # only p has a gradient now: every other one is freed
        p.grad = None
