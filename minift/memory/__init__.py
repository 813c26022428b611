"""Where the bytes of a training step go: measured, and the pieces the traced estimate is made of.

* ``tracker``: `MemoryTracker`, which measures one step's peak by category (on real tensors, or
  on a planning trace's fake ones: `minift.planning.trace`).
* ``report``: `MemoryReport` (measured) and `MemoryEstimate` (traced), and their tables.
* ``allocator``: `CachingAllocator` and `replay`, the CUDA caching allocator simulated (reserved bytes).

`minift.estimate_memory` (``minift.planning.estimate``) traces the real step; ``python -m minift plan``
(``minift.planning.plan``) says what fits.
"""
from minift.memory.report import MemoryEstimate
from minift.memory.tracker import CATEGORIES, MemoryReport, MemoryTracker, breakdown_table
from minift.sizes import format_bytes

__all__ = ["CATEGORIES", "MemoryEstimate", "MemoryReport", "MemoryTracker", "breakdown_table",
           "format_bytes"]
