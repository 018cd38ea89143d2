"""GradientClip: clip the gradients' total norm (or each value) before the optimizer step; log the norm."""
from __future__ import annotations

import math

import torch

from ..callback import Callback

__all__ = ["GradientClip"]


def _positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isnan(value):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def total_norm(grads: list[torch.Tensor], norm_type: float = 2.0) -> torch.Tensor:
    """The `norm_type`-norm of all gradients together (as `clip_grad_norm_` computes it), on the device."""
    norms = torch._foreach_norm(grads, norm_type)
    return torch.linalg.vector_norm(torch.stack([n.to(grads[0].device) for n in norms]), norm_type)


class GradientClip(Callback):
    """Scales the gradients down so their total `norm_type`-norm is at most `max_norm` (as `clip_grad_norm_`),
    or, with `clip_value`, clamps every gradient element to [-clip_value, clip_value] instead.

    Logs `grad_norm` (the total norm before clipping) every step. Runs in `before_step`, so with `MixedPrecision`
    (which unscales in `after_backward`) it clips the true, unscaled gradients, and with `GradientAccumulation`
    the accumulated ones. Gradients that are not finite (an overflowed float16 step, which MixedPrecision will
    skip) are left untouched: the check happens on the device, without a host sync.
    """
    order = 20  # before MixedPrecision (30) performs the step in its before_step

    def __init__(self, max_norm: float = 1.0, norm_type: float = 2.0, clip_value: float | None = None):
        self.max_norm = _positive("max_norm", max_norm)
        self.norm_type = _positive("norm_type", norm_type)  # math.inf allowed: the max-norm
        self.clip_value = None if clip_value is None else _positive("clip_value", clip_value)

    def before_fit(self):
        self._params = [p for group in self.learn.opt.param_groups for p in group["params"]]

    def before_step(self):
        grads = [p.grad for p in self._params if p.grad is not None]
        if not grads:
            return
        total = total_norm(grads, self.norm_type)
        self.learn.recorder.log("grad_norm", total)
        finite = torch.isfinite(total)
        if self.clip_value is None:
            # clip_grad_norm_'s coefficient, forced to exactly 1 when the norm is not finite (a skipped step)
            coef = torch.where(finite, (self.max_norm / (total + 1e-6)).clamp(max=1.0), 1.0)
            torch._foreach_mul_(grads, coef)
        else:
            bound = torch.where(finite, self.clip_value, math.inf)
            for g in grads:
                g.clamp_(min=-bound.to(g.device), max=bound.to(g.device))
