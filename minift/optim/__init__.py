"""The 8-bit AdamW optimizer and its parts.

* ``adamw8bit``: `AdamW8bit` / `PagedAdamW8bit`, the torch.optim.Optimizer classes.
* ``quant8``: the pure-torch reference math (block-wise 8-bit states, one AdamW step); the CPU
  path and the oracle of the Triton kernel in ``minift.kernels.adamw8bit``.
* ``paging``: the host <-> device pager behind ``paged=True``.
"""
from minift.optim.adamw8bit import VERSION_KEY, AdamW8bit, PagedAdamW8bit

__all__ = ["AdamW8bit", "PagedAdamW8bit", "VERSION_KEY"]
