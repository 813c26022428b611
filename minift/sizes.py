"""Byte sizes: the one grammar of sizes minift reads, and the units it prints them in."""
from __future__ import annotations

import numbers
import re
from typing import Callable

# The one grammar of sizes in minift (save_model's max_shard_size, plan's --gpu-memory, ...):
# a number, optional spaces, a unit, in any case. KB/MB/GB/TB are decimal (10^3 steps: "24GB" =
# "24gb" = 24e9 bytes); KiB/MiB/GiB/TiB and a bare K/M/G/T are binary (2^10 steps: "24G" = 24 GiB,
# as nvidia-smi and most command-line tools mean it); B is bytes. Nobody sizes GPU memory in
# bits, so "24gb" and "24Gb" mean bytes like "24GB" rather than being refused. A number without
# a unit is refused (bytes or GiB?).
_UNITS = {"": None, "b": 1}
for _i, _p in enumerate("kmgt", start=1):
    _UNITS[_p + "b"] = 1000 ** _i
    _UNITS[_p + "ib"] = 1024 ** _i
    _UNITS[_p] = 1024 ** _i
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)
SIZE_HINT = "write e.g. 24GB (10^9 bytes), 24GiB or 24G (2^30 bytes), 24000MB; any case"


def parse_bytes(text, name: str = "size", allow_zero: bool = False) -> int:
    """Bytes in a size such as "24GB", "24 gb", "24GiB", "24000MB" or "24G" (grammar above).

    An int (not bool) is taken as a byte count.

    Raises:
        ValueError: naming `name` and the text when it is not a size with a unit, or when it is
            0 and `allow_zero` is False.
    """
    if isinstance(text, numbers.Integral) and not isinstance(text, bool):
        value = int(text)
    else:
        match = _SIZE.match(str(text))
        if not match or match.group(2).lower() not in _UNITS:
            raise ValueError(f"{name}: cannot read {text!r} as a memory size; {SIZE_HINT}")
        unit = _UNITS[match.group(2).lower()]
        if unit is None:
            raise ValueError(f"{name}: {text!r} has no unit; {SIZE_HINT}")
        value = float(match.group(1)) * unit
    if value == 0 and allow_zero:
        return 0
    if value < 1:
        what = "a memory size >= 0" if allow_zero else "a positive memory size"
        raise ValueError(f"{name}: {text!r} must be {what}; {SIZE_HINT}")
    return int(value)


def unit_for(largest: float) -> tuple[str, int]:
    """(name, bytes) of the binary unit that shows `largest` with at least one whole unit."""
    for name, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(largest) >= size:
            return name, size
    return "B", 1


def fmt_in(unit: tuple[str, int]) -> Callable[[float], str]:
    """A formatter of byte counts in one fixed unit (one table reads in one unit)."""
    name, size = unit
    return lambda n: f"{n:.0f} B" if size == 1 else f"{n / size:.2f} {name}"


def format_bytes(n: float) -> str:
    """Bytes in the largest binary unit that holds a whole one: 512 B, 1.50 KiB, 14.96 GiB."""
    return fmt_in(unit_for(float(n)))(float(n))


