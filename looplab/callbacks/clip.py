"""GradientClip: clip the gradients' total norm (or each value) before the optimizer step; log the norm."""
from __future__ import annotations

import math

import torch

from ..callback import Callback
from ..checks import check_number
from .order import Order

__all__ = ["GradientClip", "group_by_device", "total_norm", "scale_"]


def _positive(name: str, value) -> float:
    return check_number(name, value, 0, low_open=True, finite=False)  # norm_type may be math.inf


def group_by_device(tensors: list[torch.Tensor]) -> dict[tuple[torch.device, torch.dtype], list[torch.Tensor]]:
    """Tensors grouped by (device, dtype), groups and members in first-seen order: one foreach call per group."""
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    return groups


def total_norm(grads: list[torch.Tensor], norm_type: float = 2.0) -> torch.Tensor:
    """The `norm_type`-norm of all gradients together, on the first gradient's device, without a host sync.

    torch's own `get_total_norm` (what `clip_grad_norm_` computes) where torch has it (2.6+); before, the same
    computation: a foreach norm per device and dtype, then the norm of those norms on the first device.
    """
    get_total_norm = getattr(torch.nn.utils, "get_total_norm", None)
    if get_total_norm is not None:
        return get_total_norm(grads, norm_type)
    norms = [n for group in group_by_device(grads).values() for n in torch._foreach_norm(group, norm_type)]
    return torch.linalg.vector_norm(torch.stack([n.to(grads[0].device) for n in norms]), norm_type)


def scale_(grads_by_device: dict[tuple, list[torch.Tensor]], coef: torch.Tensor) -> None:
    """Multiply every gradient by the 0-dim tensor `coef`, moved once to each group's device (as torch's
    `clip_grads_with_norm_` does): a tensor on one accelerator cannot scale gradients on another."""
    for (device, _), grads in grads_by_device.items():
        torch._foreach_mul_(grads, coef.to(device))


def _local(grads: list[torch.Tensor], group):
    """FSDP's gradients are DTensors: their local shards (clipped in place), and the process group they are
    sharded over (`group` as it was when none is)."""
    from torch.distributed.tensor import DTensor  # imported only when gradients are not plain tensors
    local = []
    for g in grads:
        if isinstance(g, DTensor):
            if not all(placement.is_shard() for placement in g.placements):
                raise TypeError(f"GradientClip supports sharded DTensor gradients (FSDP), got placements "
                                f"{g.placements}")
            local.append(g.to_local())
            group = g.device_mesh.get_group()
        else:
            local.append(g)
    return local, group


def _sharded_norm(local_total: torch.Tensor, norm_type: float, group) -> torch.Tensor:
    """The total norm over every rank's shards, from this rank's: the max for the inf-norm, else the p-th root of
    the sum of the p-th powers (a collective on the shards' process group)."""
    import torch.distributed as dist
    # nccl reduces accelerator tensors only: CPU-offloaded shards' norm goes through this process's GPU
    comm = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else None
    if math.isinf(norm_type):
        total = local_total.to(comm, copy=True) if comm is not None else local_total.clone()
        dist.all_reduce(total, op=dist.ReduceOp.MAX, group=group)
        return total.to(local_total.device)
    total = local_total.float().to(comm) ** norm_type if comm is not None else local_total.float() ** norm_type
    dist.all_reduce(total, group=group)
    return (total ** (1.0 / norm_type)).to(local_total.device, local_total.dtype)


class GradientClip(Callback):
    """Scales the gradients down so their total `norm_type`-norm is at most `max_norm` (as `clip_grad_norm_`),
    or, with `clip_value`, clamps every gradient element to [-clip_value, clip_value] instead.

    Logs `grad_norm` (the total norm before clipping) every step. Runs in `before_step`, so with `MixedPrecision`
    (which unscales in `after_backward`) it clips the true, unscaled gradients, and with `GradientAccumulation`
    the accumulated ones. Gradients that are not finite (an overflowed float16 step, which MixedPrecision will
    skip) are left untouched: the check happens on the device, without a host sync. Parameters may live on several
    devices (a model split across accelerators): the norm is torch's `get_total_norm`, and the coefficient goes to
    each device once. Under FSDP the gradients are shards: the norm is that of all shards together (one scalar
    all-reduce per step), the norm one process would compute for the full gradients.
    """
    order = Order.CLIP

    def __init__(self, max_norm: float = 1.0, norm_type: float = 2.0, clip_value: float | None = None):
        self.max_norm = _positive("max_norm", max_norm)
        self.norm_type = _positive("norm_type", norm_type)  # math.inf allowed: the max-norm
        self.clip_value = None if clip_value is None else _positive("clip_value", clip_value)

    def before_fit(self):
        params = [p for group in self.learn.opt.param_groups for p in group["params"]]
        self._params_by_device = group_by_device(params)  # a gradient has its parameter's device and dtype

    def before_step(self):
        by_device, sharded = {}, None
        for key, params in self._params_by_device.items():
            grads = [p.grad for p in params if p.grad is not None]
            if grads:
                by_device[key], sharded = _local(grads, sharded)
        if not by_device:
            return
        total = total_norm([g for grads in by_device.values() for g in grads], self.norm_type)
        if sharded is not None:  # FSDP: this rank's shards only; the norm of all shards together
            total = _sharded_norm(total, self.norm_type, sharded)
        self.learn.recorder.log("grad_norm", total)
        finite = torch.isfinite(total)
        if self.clip_value is None:
            # clip_grad_norm_'s coefficient, forced to exactly 1 when the norm is not finite (a skipped step)
            scale_(by_device, torch.where(finite, (self.max_norm / (total + 1e-6)).clamp(max=1.0), 1.0))
        else:
            bound = torch.where(finite, self.clip_value, math.inf)
            for (device, _), grads in by_device.items():
                device_bound = bound.to(device)
                for g in grads:
                    g.clamp_(min=-device_bound, max=device_bound)
