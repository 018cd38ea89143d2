"""Small helpers the core and callbacks share."""
from __future__ import annotations

import dataclasses
import math
import os
import warnings
from collections.abc import Mapping
from typing import Any, Callable

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["unwrap_model", "run_teardown", "module_selector", "tree_map", "to_device", "batch_on", "output_loss",
           "cat_batches", "detached", "first_tensor", "rebuilt", "is_main_process", "CopySafeHook"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module inside DistributedDataParallel and `torch.compile` wrappers (or the module itself).

    So `state_dict` keys are always the plain module's (no `module.` or `_orig_mod.` prefixes).
    """
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod  # torch.compile's wrapper (checked by name: importing dynamo is slow)
        else:
            return model


def tree_map(fn: Callable[[torch.Tensor], Any], obj):
    """`obj` with `fn` applied to every tensor in it, through tuples (named ones too), lists, mappings and
    dataclasses, each rebuilt as its own type where it can be (a `ModelOutput` stays a `ModelOutput`)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        items = [tree_map(fn, o) for o in obj]
        if hasattr(obj, "_fields"):  # a named tuple
            return type(obj)(*items)
        return tuple(items) if type(obj) is tuple else type(obj)(items)
    if isinstance(obj, list):
        return [tree_map(fn, o) for o in obj]
    if isinstance(obj, Mapping):
        return rebuilt(obj, {k: tree_map(fn, v) for k, v in obj.items()})
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: tree_map(fn, getattr(obj, f.name))
                                           for f in dataclasses.fields(obj) if f.init})
    return obj


def rebuilt(mapping: Mapping, items: dict):
    """A mapping of `mapping`'s type holding `items` (a plain dict when the type cannot be rebuilt)."""
    cls = type(mapping)
    if cls is dict:
        return items
    try:  # dataclass mappings (transformers' ModelOutput) take fields as keywords; dict-likes take a mapping
        return cls(**items) if dataclasses.is_dataclass(cls) else cls(items)
    except TypeError:
        return items


def to_device(b, device: torch.device):
    """Move the tensors in `b` (a tensor, or nested tuples / lists / mappings / dataclasses) to `device`.

    Container types are kept; a list of inputs becomes a tuple: the loop calls `model(*xb)` on tuples.
    """
    if isinstance(b, torch.Tensor):
        return b.to(device, non_blocking=True)
    moved = tree_map(lambda t: t.to(device, non_blocking=True), b)
    return tuple(moved) if isinstance(moved, list) else moved


def batch_on(batch, device: torch.device) -> tuple[Any, Any]:
    """`(xb, yb)` of a loader's batch, on `device`: an `(x, y)` pair, or a mapping of model inputs whose
    `"labels"` entry (if any) is `yb`. Anything else is a TypeError naming what it got."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        xb, yb = batch
        # already there (the common case on CPU): skip `.to`, whose argument parsing costs ~1 µs a call
        return (xb if isinstance(xb, torch.Tensor) and xb.device == device else to_device(xb, device),
                yb if isinstance(yb, torch.Tensor) and yb.device == device else to_device(yb, device))
    if isinstance(batch, Mapping):
        xb = to_device(batch, device)
        return xb, xb.get("labels")
    what = f"a {type(batch).__name__} of length {len(batch)}" if isinstance(batch, (tuple, list)) else \
        f"a {type(batch).__name__}"
    raise TypeError(f"a batch must be an (x, y) pair (x a tensor or a tuple of tensors) or a mapping of model "
                    f"inputs (e.g. a dict with 'input_ids' and 'labels'), got {what}")


def output_loss(pred, training: bool = True) -> torch.Tensor:
    """The loss a model computed itself: its output's `loss` attribute or key (used when `loss_func=None`).

    Outside training an output without one (batches without labels, e.g. for `get_preds`) gives NaN.
    """
    loss = pred.get("loss") if isinstance(pred, Mapping) else getattr(pred, "loss", None)
    if loss is None and not training:
        return torch.tensor(math.nan)
    if loss is None:
        raise ValueError(f"loss_func=None needs a model that returns its loss (an output with a 'loss' attribute "
                         f"or key, e.g. a transformers model given labels); the model returned a "
                         f"{type(pred).__name__} without one")
    return loss


def cat_batches(parts: list, pad_value: float = -100):
    """Batches of predictions or targets joined along the batch dimension, keeping their structure: tensors give
    a tensor, tuples a tuple, mappings / dataclasses (`ModelOutput`) a dict of their non-scalar tensors.

    Tensors whose other dimensions differ from batch to batch (dynamic padding: sequences of varying length) are
    padded at the end with `pad_value` (-100, the label value losses ignore, as transformers' Trainer pads). Scalars
    (a per-batch loss in a tuple) are stacked into one value per batch.
    """
    first = parts[0]
    if first is None:
        return None
    if isinstance(first, torch.Tensor):
        if first.ndim == 0:
            return torch.stack(parts)
        shape = [max(sizes) for sizes in zip(*(p.shape[1:] for p in parts))]
        if any(list(p.shape[1:]) != shape for p in parts):
            parts = [F.pad(p, [x for size, have in zip(reversed(shape), reversed(p.shape[1:]))
                               for x in (0, size - have)], value=pad_value) for p in parts]
        return torch.cat(parts)
    if isinstance(first, (tuple, list)):
        joined = [cat_batches([p[i] for p in parts], pad_value) for i in range(len(first))]
        return type(first)(*joined) if hasattr(first, "_fields") else type(first)(joined)
    if dataclasses.is_dataclass(first) and not isinstance(first, Mapping):
        first, parts = vars(first), [vars(p) for p in parts]
    if isinstance(first, Mapping):
        return {k: cat_batches([p[k] for p in parts], pad_value) for k, v in first.items()
                if isinstance(v, torch.Tensor) and v.ndim > 0}
    raise TypeError(f"cannot join batches of {type(first).__name__}")


def first_tensor(obj) -> torch.Tensor | None:
    """The first tensor in `obj` (a tensor, or nested tuples / lists / mappings), or None."""
    if isinstance(obj, torch.Tensor):
        return obj
    values = obj.values() if isinstance(obj, Mapping) else obj if isinstance(obj, (tuple, list)) else ()
    return next((t for t in map(first_tensor, values) if t is not None), None)


def detached(obj):
    """`obj` with every tensor in it detached."""
    return obj.detach() if isinstance(obj, torch.Tensor) else tree_map(torch.Tensor.detach, obj)


def module_selector(modules) -> Callable[[str, nn.Module], bool]:
    """`(qualified name, module) -> bool` from module classes (a class, or a tuple / list of them) or such a
    predicate; anything else is a TypeError (what ActivationCheckpointing and FSDP take as `modules`)."""
    if isinstance(modules, type):
        modules = (modules,)
    if isinstance(modules, (tuple, list)):
        if not modules or not all(isinstance(t, type) and issubclass(t, nn.Module) for t in modules):
            raise TypeError(f"modules must be nn.Module classes or a predicate (name, module) -> bool, "
                            f"got {modules!r}")
        types = tuple(modules)
        return lambda name, module: isinstance(module, types)
    if callable(modules):
        return modules
    raise TypeError(f"modules must be nn.Module classes or a predicate (name, module) -> bool, got {modules!r}")


def run_teardown(handlers, exception: BaseException | None) -> None:
    """Call every handler (the `after_fit` ones), even when one raises: nothing is swallowed. With `exception` (the
    one ending the fit) their errors are warnings and `exception` propagates; else the first error is raised."""
    errors = []
    for handler in handlers:
        try:
            handler()
        except BaseException as e:  # every handler gets its turn
            errors.append(e)
    for e in errors[exception is None:]:  # the first one is raised when the fit itself ran out
        warnings.warn(f"after_fit raised {type(e).__name__}: {e} (tearing down a fit that "
                      f"{'raised ' + repr(exception) if exception else 'ended'})", RuntimeWarning)
    if errors and exception is None:
        raise errors[0]


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
