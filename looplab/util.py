"""Small helpers the core and callbacks share."""
from __future__ import annotations

import os

import torch
from torch import nn

__all__ = ["unwrap_model", "to_device", "is_main_process", "CopySafeHook"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module inside a DistributedDataParallel wrapper (or the module itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def to_device(b, device: torch.device):
    """Move a tensor, or the tensors in a tuple / list / dict, to `device`."""
    if isinstance(b, torch.Tensor):
        return b.to(device, non_blocking=True)
    if isinstance(b, (tuple, list)):  # a list of inputs becomes a tuple: the loop calls model(*xb) on tuples
        return tuple(to_device(t, device) for t in b)
    if isinstance(b, dict):
        return {k: to_device(v, device) for k, v in b.items()}
    return b


def is_main_process() -> bool:
    """True unless this is a non-zero rank: of the initialised process group, or else of torchrun's `RANK`.

    Only rank 0 shows progress and writes files; the `RANK` fallback keeps that true before and after a fit,
    when no process group exists.
    """
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


class CopySafeHook:
    """A module hook that stays with its module: a `deepcopy` of the module gets an inert hook, not a copy of it.

    A plain bound-method hook would be deep-copied with everything its object reaches (a callback, the Learner),
    and the model's copy (EMA, a snapshot) would then run the copied callback's code on every forward.
    """

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def __deepcopy__(self, memo):
        return _inert_hook


def _inert_hook(*args, **kwargs) -> None:
    return None
