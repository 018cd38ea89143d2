"""Argument checks shared by every module: one place that says what a valid number is and how errors read.

Each returns the value (as an int or float) or raises a ValueError naming the argument and showing the value:
`check_int("n_steps", 0, low=1)` -> `ValueError: n_steps must be an int >= 1, got 0`. Bools are refused as
numbers; NaN and infinities are refused unless `finite=False`.
"""
from __future__ import annotations

import math
import numbers
from typing import Any

from .callback import _EVENT_SET, EVENTS

__all__ = ["check_int", "check_number", "check_lr", "check_learner", "check_fit", "check_phase_loader",
           "no_batches", "bad_loss", "no_grad_loss", "check_callback"]


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float))


def check_int(name: str, value: Any, low: int | None = None, none_ok: bool = False) -> int | None:
    """An int (not a bool; a numpy integer is fine) >= `low`, returned as an int; None passes when `none_ok`."""
    if value is None and none_ok:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or (low is not None and value < low):
        what = "a positive int" if low == 1 else f"an int >= {low}" if low is not None else "an int"
        raise ValueError(f"{name} must be {what}{' or None' if none_ok else ''}, got {value!r}")
    return int(value)


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


def check_fit(n_epochs: Any, steps: Any, lr: Any, dls, model, valid_every: Any = None
              ) -> tuple[int | None, int | None]:
    """What `fit` needs before it starts: epochs or steps (exactly one), an lr (or None), non-empty loaders,
    something to train, a `valid_every` (None, or a positive int with validation data). Returns `(n_epochs,
    n_steps)`, each None where an unsized training loader leaves it open."""
    if (n_epochs is None) == (steps is None):
        raise ValueError(f"give exactly one of n_epochs and steps, got n_epochs={n_epochs!r}, steps={steps!r}")
    n_batches = len(dls.train) if hasattr(dls.train, "__len__") else None
    if steps is None:
        n_epochs = check_int("n_epochs", n_epochs, 0)
        n_steps = None if n_batches is None else n_epochs * n_batches
    else:
        n_steps = check_int("steps", steps, 1)
        n_epochs = None if not n_batches else -(-n_steps // n_batches)
    if lr is not None:
        check_lr(lr)
    check_int("valid_every", valid_every, 1, none_ok=True)
    if valid_every is not None and dls.valid is None:
        raise ValueError(f"valid_every={valid_every} needs validation data: this Learner's dls.valid is None")
    for name, dl in (("training", dls.train), ("validation", dls.valid)):
        if dl is not None and hasattr(dl, "__len__") and len(dl) == 0:
            raise ValueError(f"the {name} data is empty: it yields no batches")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("no parameter requires grad: the model is fully frozen (see unfreeze / freeze_to)")
    return n_epochs, n_steps


def bad_loss(loss) -> None:
    """The error for a `loss_func` whose result is not a scalar tensor."""
    raise ValueError(f"loss_func must return a scalar tensor, got "
                     f"{tuple(loss.shape) if hasattr(loss, 'shape') else loss!r}")


def no_grad_loss() -> None:
    """The error for a training loss that does not require grad."""
    raise ValueError("the loss does not require grad: it was computed from detached tensors (or under "
                     "torch.no_grad), so there is nothing to back-propagate")


def no_batches(dl, name: str, yielded_before: bool) -> None:
    """The error for a phase whose loader yielded nothing: empty, or a one-shot iterator already used up."""
    if yielded_before:
        raise ValueError(f"the {name} data ({type(dl).__name__}) yielded batches in an earlier epoch and none now: "
                         f"a single-pass iterator (e.g. a generator) was given; pass a list, a DataLoader, or an "
                         f"object whose __iter__ starts afresh")
    raise ValueError(f"the {name} data is empty: {type(dl).__name__} yielded no batches")


def check_learner(model, data, loss_func, lr):
    """The Learner's arguments; returns `data` as DataLoaders (a `(train, valid)` pair is wrapped)."""
    from torch import nn

    from .data import DataLoaders
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if loss_func is not None and not callable(loss_func):
        raise TypeError(f"loss_func must be callable or None (the model's own loss), got {loss_func!r}")
    check_lr(lr)
    if isinstance(data, DataLoaders):
        return data
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return DataLoaders(*data)
    raise TypeError(f"data must be a DataLoaders or a (train, valid) pair, got {type(data).__name__}")


def check_phase_loader(dl):
    """The loader of a `validate` / `get_preds` phase: there is one, and it is not empty."""
    if dl is None:
        raise ValueError("there is no validation data: pass dl=")
    if hasattr(dl, "__len__") and len(dl) == 0:
        raise ValueError(f"dl is empty: {type(dl).__name__} of length 0 yields no batches")
    return dl


def check_callback(cb: Any, attached: list = ()) -> None:
    """Reject a class, a callback already `attached`, or a method that looks like an event but is not one."""
    if isinstance(cb, type):
        raise TypeError(f"expected a callback instance, got the class {cb.__name__}; did you mean {cb.__name__}()?")
    if any(c is cb for c in attached):
        raise ValueError(f"{cb!r} is attached already (given twice: to the Learner and to fit?); a callback runs once")
    for attr in dir(type(cb)):
        if attr.startswith(("before_", "after_")) and attr not in _EVENT_SET and callable(getattr(cb, attr)):
            raise ValueError(f"{type(cb).__name__}.{attr} looks like an event handler but is not an event; "
                             f"known events: {', '.join(EVENTS)}")
