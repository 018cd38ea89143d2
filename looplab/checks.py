"""Argument checks shared by every module: one place that says what a valid number is and how errors read.

Each returns the value (as an int or float) or raises a ValueError naming the argument and showing the value:
`check_int("n_steps", 0, low=1)` -> `ValueError: n_steps must be an int >= 1, got 0`. Bools are refused as
numbers; NaN and infinities are refused unless `finite=False`.
"""
from __future__ import annotations

import math
from typing import Any

__all__ = ["check_int", "check_number", "check_lr"]


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float))


def check_int(name: str, value: Any, low: int | None = None, none_ok: bool = False) -> int | None:
    """An int (not a bool) >= `low`; None passes when `none_ok`."""
    if value is None and none_ok:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low):
        what = "a positive int" if low == 1 else f"an int >= {low}" if low is not None else "an int"
        raise ValueError(f"{name} must be {what}{' or None' if none_ok else ''}, got {value!r}")
    return value


def check_number(name: str, value: Any, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False, finite: bool = True) -> float:
    """A real number (not a bool) in the interval given by `low` / `high` (closed unless `*_open`)."""
    ok = _is_number(value) and not math.isnan(value) and (not finite or math.isfinite(value))
    ok = ok and (low is None or (value > low if low_open else value >= low))
    ok = ok and (high is None or (value < high if high_open else value <= high))
    if not ok:
        if low == 0 and high is None:
            what = f"a {'positive' if low_open else 'non-negative'}{' finite' if finite else ''} number"
        elif high is None and low is not None:
            what = f"a number {'>' if low_open else '>='} {low}"
        elif low is None and high is None:
            what = f"a{' finite' if finite else ''} number"
        else:
            what = (f"in {'(' if low_open else '['}{'-inf' if low is None else low}, "
                    f"{'inf' if high is None else high}{')' if high_open else ']'}")
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return float(value)


def check_lr(lr: Any, name: str = "lr") -> float | slice:
    """A positive finite learning rate, or `slice(lo, hi)` of two (discriminative lrs)."""
    values = [lr.start, lr.stop] if isinstance(lr, slice) else [lr]
    if not all(_is_number(v) and math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"{name} must be a positive finite number (or a slice of two), got {lr!r}")
    return lr
