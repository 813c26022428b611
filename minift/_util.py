"""Helpers every part of minift shares: the names of methods, optimizers and linears; argument
checks with one wording; byte sizes; atomic file writes; JSON that names its file and line.

Nothing here imports another minift module, so any module may import this one.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import numbers
import operator
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

# ---- names defined once ------------------------------------------------------------------
METHODS = ("full", "lora", "qlora")
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit")
PARALLEL = ("fsdp", "ddp")  # TrainConfig.parallel under torchrun
# the decoder's linear layers, in the order of a layer's forward
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ---- argument checks ---------------------------------------------------------------------
# Each takes `name` (how the caller spells the argument, e.g. "TrainConfig.seed") and returns the
# checked value. Bools are refused where a number is meant: True would silently act as 1.
def check_int(name: str, value, *, minimum: int = 1, optional: bool = False,
              error: type = ValueError) -> Optional[int]:
    """`value` as an int >= `minimum` (any integral type: int, numpy ints; never bool or float)."""
    if optional and value is None:
        return None
    kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
    kind += " or None" if optional else ""
    if isinstance(value, bool):
        raise error(f"{name} must be {kind}, got bool {value!r}")
    try:
        n = operator.index(value)
    except TypeError:
        raise error(f"{name} must be {kind}, got {type(value).__name__} {value!r}") from None
    if n < minimum:
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    return n


def check_number(name: str, value, rule: str = "", ok: Callable[[float], bool] = lambda v: True,
                 *, optional: bool = False, error: type = ValueError) -> Optional[float]:
    """A real, finite number for which `ok` holds; `rule` says what `ok` checks (e.g. "> 0").

    Finiteness is its own test: inf passes every "> 0" and NaN fails comparisons silently in some
    spellings, and neither is ever a meant learning rate, alpha or norm.
    """
    if optional and value is None:
        return None
    what = f"a finite number {rule}".rstrip() + (" or None" if optional else "")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise error(f"{name} must be {what}, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or not ok(value):
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return value


def check_flag(name: str, value) -> bool:
    """True or False only: a string such as "no" is truthy, so nothing is guessed."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return value


def check_choice(name: str, value, allowed: Iterable) -> Any:
    """`value` if it is one of `allowed`."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(str, allowed))}; got {value!r}")
    return value


# ---- command lines -----------------------------------------------------------------------
class ShowDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """--help with every option's default, except where there is none to show (required options,
    None) or the help text already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.required or action.default is None or "default" in text:
            return text
        return super()._get_help_string(action)


# ---- byte sizes --------------------------------------------------------------------------
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


# ---- files -------------------------------------------------------------------------------
def fsync_path(path) -> None:
    """Flush a file's (or a directory's) contents to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: 0o666 less the process's umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path, write: Callable[[str], None], mode: Optional[int] = None) -> None:
    """Call ``write(tmp)`` on a temporary file beside `path`, then rename it over `path`.

    A reader never sees a half-written file: it sees the old one or the new one. The file is
    flushed to disk before the rename, and gets `mode`, by default `file_mode()` (temporary
    files are created owner-only; every file minift writes gets the same mode as a plain one).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        fsync_path(tmp)
        os.chmod(tmp, file_mode() if mode is None else mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(path, obj, *, indent: Optional[int] = 2, sort_keys: bool = False,
               ensure_ascii: bool = True, atomic: bool = True) -> None:
    """`obj` as UTF-8 JSON with a final newline; atomically unless `atomic` is False (a file
    inside a temporary directory that is renamed as a whole needs no second rename)."""
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, ensure_ascii=ensure_ascii) + "\n"
    if atomic:
        atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        return
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def decode_utf8(data: bytes, path, first_line: int = 1) -> str:
    """`data` as text; a byte that is not UTF-8 is a ValueError naming `path`:line and column.

    `first_line` is the line number of the first byte (for a line of a larger file).
    """
    try:
        return data.decode("utf-8-sig" if first_line == 1 else "utf-8")  # tolerate a BOM
    except UnicodeDecodeError as err:
        line = first_line + data.count(b"\n", 0, err.start)
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise ValueError(f"{path}:{line}: not valid UTF-8 (byte {data[err.start:err.start + 1]!r} "
                         f"at column {column}); save the file as UTF-8") from None


def parse_json(text: str, path, first_line: int = 1) -> Any:
    """JSON text; a syntax error is a ValueError naming `path`:line (and the column)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{first_line + err.lineno - 1}: invalid JSON ({err.msg} at "
                         f"column {err.colno})") from None


def read_json(path, *, expect: Optional[type] = None) -> Any:
    """The JSON document in `path`; every failure is a ValueError naming the file (and line).

    Args:
        expect: when given (e.g. dict), the top-level value must be of this type.
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ValueError(f"{path}: missing") from None
    except OSError as err:
        raise ValueError(f"{path}: cannot read ({err.strerror})") from None
    value = parse_json(decode_utf8(data, path), path)
    if expect is not None and not isinstance(value, expect):
        raise ValueError(f"{path}: expected a JSON {'object' if expect is dict else expect.__name__}, "
                         f"got {type(value).__name__}")
    return value


def read_jsonl(path) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSONL file; errors name file:line.

    Bytes are decoded a line at a time, so a byte that is not UTF-8 is reported with its line
    rather than as a bare codec error from deep inside the file iterator.
    """
    rows = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            line = decode_utf8(raw, path, first_line=lineno)
            if not line.strip():
                continue
            row = parse_json(line.rstrip("\r\n"), path, first_line=lineno)
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append((lineno, row))
    return rows


# ---- module flags --------------------------------------------------------------------------
@contextlib.contextmanager
def module_flag(model, attr: str, value, *, required: bool, missing: str):
    """Set `attr` to `value` on every submodule of `model` that has it, for the block, then put
    the old values back. `missing` is the ValueError when `required` and no module has `attr`."""
    holders = [m for m in model.modules() if hasattr(m, attr)]
    if required and not holders:
        raise ValueError(missing)
    previous = [getattr(m, attr) for m in holders]
    for m in holders:
        setattr(m, attr, value)
    try:
        yield
    finally:
        for m, old in zip(holders, previous):
            setattr(m, attr, old)
