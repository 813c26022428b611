"""Where the bytes of a training step go: measured, estimated and planned.

* ``tracker``: `MemoryTracker`, which measures one step's peak by category.
* ``estimate``: `estimate_memory`, the same categories from first principles.
* ``dpo``: `estimate_dpo_memory`, a DPO step (2x sequences, reference forward and weights).
* ``formulas``: the byte formulas the estimate sums (stored tensors, tensors saved for backward).
* ``plan``: what fits on a GPU (``python -m minift plan``).
* ``allocator``: `CachingAllocator` and `replay`, the CUDA caching allocator simulated (reserved bytes).
"""
from minift.memory.dpo import estimate_dpo_memory
from minift.memory.estimate import MemoryEstimate, estimate_memory
from minift.memory.tracker import CATEGORIES, MemoryReport, MemoryTracker, breakdown_table
from minift.sizes import format_bytes

__all__ = ["CATEGORIES", "MemoryEstimate", "MemoryReport", "MemoryTracker", "breakdown_table",
           "estimate_dpo_memory", "estimate_memory", "format_bytes"]
