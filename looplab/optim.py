"""Optimizers and their helpers: Lion; parameter groups from a splitter, slice (discriminative) lrs, freezing."""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import nn

from .checks import check_number

__all__ = ["Lion", "lion_update", "lion_update_foreach", "lrs_for_groups", "param_groups", "set_group_lrs", "freeze_to"]


def lrs_for_groups(lr: float | slice, n_groups: int) -> list[float]:
    """One lr per group: a float for all, or `slice(lo, hi)` spread geometrically from the first to the last."""
    if not isinstance(lr, slice):
        return [float(lr)] * n_groups
    lo, hi = float(lr.start), float(lr.stop)
    if n_groups == 1:
        return [hi]
    return [lo * (hi / lo) ** (i / (n_groups - 1)) for i in range(n_groups)]


def param_groups(model: nn.Module, splitter: Callable | None, lr: float | slice) -> list[dict[str, Any]]:
    """The optimizer's parameter groups: `splitter(model)` (a list of parameter lists) or one group, each with its
    lr."""
    groups = [list(model.parameters())] if splitter is None else [list(g) for g in splitter(model)]
    if not groups or not all(groups):
        raise ValueError(f"splitter must return non-empty parameter groups, got sizes {[len(g) for g in groups]}")
    return [{"params": g, "lr": l} for g, l in zip(groups, lrs_for_groups(lr, len(groups)))]


def set_group_lrs(opt: torch.optim.Optimizer, lr: float | slice) -> None:
    """Set every group's lr from `lr` (a float, or a slice spread over the groups)."""
    for group, l in zip(opt.param_groups, lrs_for_groups(lr, len(opt.param_groups))):
        group["lr"] = l


def freeze_to(learn, n: int) -> None:
    """Freeze parameter groups before `n` (no gradients), train groups `n` onwards; `n=0` unfreezes all.

    A negative `n` counts from the end (`-1`: train only the last group). Frozen parameters also lose any
    gradient they hold, so no optimizer (weight decay, momentum) moves them.
    """
    groups = learn.opt.param_groups
    if isinstance(n, bool) or not isinstance(n, int) or not -len(groups) <= n < len(groups):
        raise ValueError(f"n must be an int in [-{len(groups)}, {len(groups) - 1}] (this optimizer has "
                         f"{len(groups)} param groups; freezing all would leave nothing to train), got {n!r}")
    n = n % len(groups) if n < 0 else n
    for i, group in enumerate(groups):
        for p in group["params"]:
            p.requires_grad_(i >= n)
            if i < n:
                p.grad = None


@torch.no_grad()
def lion_update(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, lr: float, beta1: float,
                beta2: float, weight_decay: float) -> None:
    """One Lion step for one tensor, in place (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"):

    `c = β1·m + (1−β1)·g;  θ ← θ·(1 − lr·wd) − lr·sign(c);  m ← β2·m + (1−β2)·g`. Stateless: all state is `exp_avg`.
    The interpolations are `lerp`s (one kernel each); `Lion.step` runs the same ops over lists of tensors.
    """
    update = exp_avg.lerp(grad, 1 - beta1).sign_()
    param.mul_(1 - lr * weight_decay).add_(update, alpha=-lr)
    exp_avg.lerp_(grad, 1 - beta2)


@torch.no_grad()
def lion_update_foreach(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                        lr: float, beta1: float, beta2: float, weight_decay: float) -> None:
    """`lion_update` over lists of tensors with `torch._foreach_*` ops: the same ops, so the same numbers.

    Five kernels a list (one allocation: the updates); on an accelerator each is one fused launch per device and
    dtype, which is why `Lion.step` groups tensors that way.
    """
    updates = torch._foreach_lerp(exp_avgs, grads, 1 - beta1)
    torch._foreach_sign_(updates)
    if lr * weight_decay:  # multiplying by exactly 1 would change nothing
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_add_(params, updates, alpha=-lr)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta2)


def _check_unit(name: str, value: Any) -> None:
    check_number(name, value, 0, 1, high_open=True)


class Lion(torch.optim.Optimizer):
    """Lion: the sign of an interpolated momentum as the update, with decoupled weight decay; one state tensor.

    Memory-light (no second moment). Its updates have unit size per coordinate, so it wants a 3-10x smaller lr
    than AdamW and a correspondingly larger weight decay. `betas[0]` is what `ParamScheduler`'s `mom` sets.
    """

    def __init__(self, params: Iterable, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0):
        check_number("lr", lr, 0)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        _check_unit("betas[0]", betas[0])
        _check_unit("betas[1]", betas[1])
        check_number("weight_decay", weight_decay, 0)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            by_device_and_dtype: dict[tuple, tuple[list, list, list]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Lion does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                params, grads, exp_avgs = by_device_and_dtype.setdefault((p.device, p.dtype), ([], [], []))
                params.append(p)
                grads.append(p.grad)
                exp_avgs.append(state["exp_avg"])
            for params, grads, exp_avgs in by_device_and_dtype.values():
                lion_update_foreach(params, grads, exp_avgs, group["lr"], *group["betas"], group["weight_decay"])
        return loss
