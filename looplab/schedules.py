"""Pure schedule functions: a value as a function of the position in training (no state, no torch).

`pos` is the fraction of training done, in [0, 1]. `sched_*(start, end, pos)` go from `start` at `pos=0` to `end`
at `pos=1`; bind the ends with `functools.partial(sched_cos, 1e-3, 1e-5)` to get a schedule `f(pos)`, and chain
schedules with `combine_scheds`. `ParamScheduler` (looplab.callbacks.schedule) applies them to an optimizer.
"""
from __future__ import annotations

import bisect
import math
from functools import partial
from typing import Callable, Sequence

from .checks import check_int, check_number

__all__ = ["sched_lin", "sched_cos", "sched_exp", "sched_poly", "sched_const", "combine_scheds",
           "cyclic_triangular", "sched_sgdr", "sgdr_schedule", "scale_for_batch", "group_ratios"]

Schedule = Callable[[float], float]


def _check_positive(name: str, value, allow_zero: bool = False) -> None:
    check_number(name, value, 0, low_open=not allow_zero)


def sched_lin(start: float, end: float, pos: float) -> float:
    """Linear from `start` to `end`."""
    return start + pos * (end - start)


def sched_cos(start: float, end: float, pos: float) -> float:
    """Cosine from `start` to `end`: flat at both ends, steepest in the middle (SGDR, one-cycle)."""
    return start + (1 + math.cos(math.pi * (1 - pos))) * (end - start) / 2


def sched_exp(start: float, end: float, pos: float) -> float:
    """Geometric from `start` to `end` (both > 0): equal ratios in equal steps, as in the LR range test."""
    _check_positive("start", start)
    _check_positive("end", end)
    return start * (end / start) ** pos


def sched_poly(start: float, end: float, pos: float, power: float) -> float:
    """Polynomial decay (as in the large-batch papers, seed 003): `end + (start - end) * (1 - pos) ** power`.

    `power=1` is linear; `end=0` is torch's `PolynomialLR`.
    """
    _check_positive("power", power)
    return end + (start - end) * (1 - pos) ** power


def sched_const(start: float, end: float, pos: float) -> float:
    """Constant `start` (`end` is ignored): a flat phase for `combine_scheds`."""
    return start


# Positions within this of a phase boundary count as on it: i/N and a sum of fractions can differ in the last bit.
_BOUNDARY_TOL = 1e-12


def combine_scheds(pcts: Sequence[float], scheds: Sequence[Schedule]) -> Schedule:
    """Chain schedules: `scheds[k]` runs over the fraction `pcts[k]` of training, seeing its own position 0..1.

    `pcts` are non-negative and sum to 1; at a boundary the later schedule applies (at its position 0).
    """
    pcts, scheds = list(pcts), list(scheds)
    if not pcts or len(pcts) != len(scheds):
        raise ValueError(f"need as many pcts as scheds (at least one), got {len(pcts)} pcts and {len(scheds)} scheds")
    for p in pcts:
        _check_positive("every pct", p, allow_zero=True)
    if abs(math.fsum(pcts) - 1) > 1e-9:
        raise ValueError(f"pcts must sum to 1, got {pcts!r} (sum {math.fsum(pcts)!r})")
    for f in scheds:
        if not callable(f):
            raise TypeError(f"every sched must be a callable f(pos), got {f!r}")
    starts = [math.fsum(pcts[:k]) for k in range(len(pcts))]

    def combined(pos: float) -> float:
        k = max(bisect.bisect_right(starts, pos + _BOUNDARY_TOL) - 1, 0)
        width = pcts[k]
        local = (pos - starts[k]) / width if width > 0 else 0.0
        return scheds[k](min(max(local, 0.0), 1.0))

    return combined


def cyclic_triangular(lr_min: float, lr_max: float, iteration: int, step_size: int) -> float:
    """Smith's triangular cyclical lr (seed 001): up from `lr_min` to `lr_max` in `step_size` iterations, then down.

    `cycle = floor(1 + iteration / (2 * step_size))`, `x = |iteration / step_size - 2 * cycle + 1|`,
    `lr = lr_min + (lr_max - lr_min) * max(0, 1 - x)`. (Seed 001's transcription shows brackets where the paper
    has an absolute value; this is the paper's formula.) Use with `ParamScheduler` as
    `lambda pos: cyclic_triangular(lo, hi, round(pos * n_steps), step_size)`.
    """
    check_int("step_size", step_size, 1)
    cycle = math.floor(1 + iteration / (2 * step_size))
    x = abs(iteration / step_size - 2 * cycle + 1)
    return lr_min + (lr_max - lr_min) * max(0.0, 1 - x)


def sched_sgdr(start: float, end: float, pos: float, n_cycles: int, cycle_mult: float = 2.0) -> float:
    """Cosine annealing with warm restarts (SGDR): `n_cycles` cosines from `start` to `end`, each `cycle_mult`
    times longer than the one before, filling [0, 1]; at a restart the new cycle applies (value `start`)."""
    return sgdr_schedule(start, end, n_cycles, cycle_mult)(pos)


def sgdr_schedule(start: float, end: float, n_cycles: int, cycle_mult: float = 2.0) -> Schedule:
    """`sched_sgdr` as a schedule `f(pos)`, built once (cycle k takes a fraction of training ∝ cycle_mult ** k)."""
    check_int("n_cycles", n_cycles, 1)
    _check_positive("cycle_mult", cycle_mult)
    lengths = [float(cycle_mult) ** k for k in range(n_cycles)]
    total = math.fsum(lengths)
    return combine_scheds([length / total for length in lengths], [partial(sched_cos, start, end)] * n_cycles)


def scale_for_batch(lr: float, warmup: float, base_bs: int, bs: int, rule: str = "sqrt",
                    unit: str = "epochs") -> tuple[float, float]:
    """Scale an (lr, warmup) tuned at batch size `base_bs` to batch size `bs` (k = bs / base_bs).

    `rule="linear"`: lr × k, warmup (in epochs) unchanged (linear scaling rule with gradual warmup).
    `rule="sqrt"`: LEGW (You et al., seed 003) — lr × √k and the warmup, in epochs, × k.
    `unit="steps"`: `warmup` is in optimizer steps, and so is the result (an int). An epoch at batch ×k has 1/k the
    steps, so LEGW keeps the step count (k× the epochs at 1/k the steps each) and "linear" divides it by k.
    """
    if unit not in ("epochs", "steps"):
        raise ValueError(f"unit must be 'epochs' or 'steps', got {unit!r}")
    _check_positive("lr", lr)
    _check_positive("warmup", warmup, allow_zero=True)
    check_int("base_bs", base_bs, 1)
    check_int("bs", bs, 1)
    k = bs / base_bs
    if rule == "linear":
        return lr * k, (round(warmup / k) if unit == "steps" else warmup)
    if rule == "sqrt":
        return lr * math.sqrt(k), (round(warmup) if unit == "steps" else warmup * k)
    raise ValueError(f"rule must be 'sqrt' (LEGW) or 'linear', got {rule!r}")


def group_ratios(bases: list[float]) -> list[float]:
    """Each group's multiplier of the scheduled value: `base_g / base_ref`, `base_ref` being the last non-zero base.

    A group whose base is 0 (e.g. `weight_decay=0` for biases and norms) stays 0; if every base is 0, every group
    follows the schedule itself (there is no ratio to keep).
    """
    ref = next((b for b in reversed(bases) if b != 0), None)
    return [1.0] * len(bases) if ref is None else [b / ref for b in bases]
