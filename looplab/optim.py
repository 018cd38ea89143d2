"""Optimizer helpers: parameter groups from a splitter, slice (discriminative) learning rates, freezing."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

__all__ = ["lrs_for_groups", "param_groups", "set_group_lrs", "freeze_to"]


def lrs_for_groups(lr: float | slice, n_groups: int) -> list[float]:
    """One lr per group: a float for all, or `slice(lo, hi)` spread geometrically from the first to the last."""
    if not isinstance(lr, slice):
        return [float(lr)] * n_groups
    lo, hi = float(lr.start), float(lr.stop)
    if n_groups == 1:
        return [hi]
    return [lo * (hi / lo) ** (i / (n_groups - 1)) for i in range(n_groups)]


def param_groups(model: nn.Module, splitter: Callable | None, lr: float | slice) -> list[dict[str, Any]]:
    """The optimizer's parameter groups: `splitter(model)` (a list of parameter lists) or one group, each with its lr."""
    groups = [list(model.parameters())] if splitter is None else [list(g) for g in splitter(model)]
    if not groups or not all(groups):
        raise ValueError(f"splitter must return non-empty parameter groups, got sizes {[len(g) for g in groups]}")
    return [{"params": g, "lr": l} for g, l in zip(groups, lrs_for_groups(lr, len(groups)))]


def set_group_lrs(opt: torch.optim.Optimizer, lr: float | slice) -> None:
    """Set every group's lr from `lr` (a float, or a slice spread over the groups)."""
    for group, l in zip(opt.param_groups, lrs_for_groups(lr, len(opt.param_groups))):
        group["lr"] = l


def freeze_to(learn, n: int) -> None:
    """Freeze parameter groups before `n` (no gradients), train groups `n` onwards; `n=0` unfreezes all."""
    groups = learn.opt.param_groups
    if isinstance(n, bool) or not isinstance(n, int) or not -len(groups) <= n <= len(groups):
        raise ValueError(f"n must be an int in [-{len(groups)}, {len(groups)}], got {n!r}")
    n = n % len(groups) if n < 0 else n
    for i, group in enumerate(groups):
        for p in group["params"]:
            p.requires_grad_(i >= n)
