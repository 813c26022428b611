"""Argument checks with one wording.

Each takes `name` (how the caller spells the argument, e.g. "TrainConfig.seed") and returns the
checked value. Bools are refused where a number is meant: True would silently act as 1.
"""
from __future__ import annotations

import math
import numbers
import operator
from typing import Any, Callable, Iterable, Optional


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


