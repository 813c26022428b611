"""What the memory parts report: the categories, a measured `MemoryReport`, an estimated
`MemoryEstimate`, and the markdown table both print."""
from __future__ import annotations

from dataclasses import dataclass, field

from minift.sizes import format_bytes

# State keys a paged optimizer (minift.optim.AdamW8bit(paged=True)) keeps in host pages.
PAGED_KEYS = ("exp_avg_codes", "exp_avg_absmax", "exp_avg_sq_codes", "exp_avg_sq_absmax")
CATEGORIES = ("frozen_weights", "trainable_params", "gradients", "optimizer_states",
              "activations", "other")


def breakdown_table(columns: dict, rows=CATEGORIES + ("total",), bytes_fmt=format_bytes) -> str:
    """A markdown table: one row per category, one column per breakdown (name -> {key: bytes})."""
    names = list(columns)
    lines = ["| category | " + " | ".join(names) + " |",
             "|---|" + "---:|" * len(names)]
    for row in rows:
        cells = []
        for name in names:
            value = columns[name].get(row)
            cells.append("" if value is None else bytes_fmt(value))
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@dataclass
class MemoryReport:
    """A measured breakdown (bytes per category) of one training step.

    Categories are each one's own high-water mark during the step (activations peak before
    backward, gradients at the optimizer step), so they need not add up to ``peak``, the
    high-water mark of all live bytes together. ``other`` is what was alive at the peak besides
    the categories.
    """

    frozen_weights: int = 0
    trainable_params: int = 0
    gradients: int = 0
    optimizer_states: int = 0
    activations: int = 0
    other: int = 0
    peak: int = 0
    host: int = 0  # host high-water mark: offloaded activations, paged optimizer states
    device: str = "cpu"
    reserved: int | None = None  # CUDA max_memory_reserved during the step (peak)
    notes: list = field(default_factory=list)
    moment: str | None = None  # where the step was at the peak (phase, module, operator)
    host_parts: dict = field(default_factory=dict)  # host bytes by category (optimizer_states, activations)

    def as_dict(self) -> dict:
        out = {c: int(getattr(self, c)) for c in CATEGORIES}
        out.update(peak=int(self.peak), host=int(self.host), device=self.device)
        out.update({f"host_{k}": int(v) for k, v in self.host_parts.items()})
        if self.reserved is not None:  # CUDA only
            out["reserved"] = int(self.reserved)
        if self.moment is not None:
            out["moment"] = self.moment
        return out

    def table(self) -> str:
        cols = {f"measured ({self.device})": dict(self.as_dict(), total=self.peak)}
        text = breakdown_table(cols, rows=CATEGORIES + ("total",))
        text = text.replace("| total |", "| peak |")
        text += f"\n| host (apart from the peak) | {format_bytes(self.host)} |"
        if self.reserved is not None:
            text += f"\npeak reserved by the CUDA allocator: {format_bytes(self.reserved)}"
        return "\n".join([text] + [f"note: {n}" for n in self.notes])


@dataclass
class MemoryEstimate:
    """Bytes per category of one training step, traced (`minift.estimate_memory`); ``total`` is the
    peak of allocated bytes, ``reserved`` the simulated CUDA caching allocator's peak."""

    frozen_weights: int
    trainable_params: int
    gradients: int
    optimizer_states: int
    activations: int
    other: int
    total: int
    settings: dict = field(default_factory=dict)
    host: int = 0  # host memory, apart from `total`: paged optimizer states, offloaded inputs
    moment: str | None = None  # where the step is at the peak (phase, module, operator)
    reserved: int | None = None  # the caching allocator's peak (minift.memory.allocator)
    reserved_expandable: int | None = None  # the same with expandable_segments:True
    host_parts: dict = field(default_factory=dict)  # host bytes by category

    def as_dict(self) -> dict:
        out = {c: int(getattr(self, c)) for c in CATEGORIES}
        out["total"] = int(self.total)
        out["host"] = int(self.host)
        out.update({f"host_{k}": int(v) for k, v in self.host_parts.items()})
        for key in ("reserved", "reserved_expandable"):
            if getattr(self, key) is not None:
                out[key] = int(getattr(self, key))
        if self.moment is not None:
            out["moment"] = self.moment
        return out

    def table(self) -> str:
        s = self.settings
        title = (f"{s.get('method')} | batch {s.get('batch_size')} x seq {s.get('seq_len')} | "
                 f"optimizer {s.get('optimizer')}")
        rows = CATEGORIES + ("total",) + (("reserved",) if self.reserved is not None else ())
        text = breakdown_table({title: self.as_dict()}, rows=rows)
        text += f"\n| host (apart from the peak) | {format_bytes(self.host)} |"
        if self.moment:
            text += f"\npeak: {self.moment}"
        return text
