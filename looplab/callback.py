"""Callbacks, the event names, the Cancel* exceptions and the dispatch table.

A callback's methods are named after events; the Learner runs, in `order`, those of the callbacks that define one.
`build_table` computes which, once per fit (and when the callbacks change): firing an event is a dict lookup."""
from __future__ import annotations

import inspect
from functools import partial
from typing import Any, Callable

__all__ = ["Callback", "EVENTS", "LEVEL_EVENTS", "CancelBatch", "CancelStep", "CancelTrain", "CancelValidate",
           "CancelEpoch", "CancelFit", "CancelBackward", "build_table"]


class CancelFit(Exception):
    """Raise to stop the fit: `after_cancel_fit`, then `after_fit` run."""


class CancelEpoch(Exception):
    """Raise to skip the rest of this epoch (training and validation)."""


class CancelTrain(Exception):
    """Raise to skip the rest of this epoch's training phase; validation still runs."""


class CancelValidate(Exception):
    """Raise to skip the rest of this epoch's validation phase."""


class CancelBatch(Exception):
    """Raise to skip the rest of this batch."""


class CancelBackward(Exception):
    """Raise (in `before_backward`) to skip the backward pass of this batch, and the step with it."""


class CancelStep(Exception):
    """Raise (in `before_step`) to skip only the optimizer step of this batch."""


# The levels the loop wraps with `before_X` / `after_cancel_X` / `after_X`, and their Cancel exceptions.
LEVEL_EVENTS = {"fit": CancelFit, "epoch": CancelEpoch, "train": CancelTrain, "validate": CancelValidate,
                "batch": CancelBatch, "backward": CancelBackward, "step": CancelStep}

# Every event a callback may implement, in the order the loop first fires them.
EVENTS = ("before_fit", "before_epoch", "before_train", "before_batch", "after_pred", "after_loss",
          "before_backward", "after_backward", "before_step", "after_step", "after_batch", "after_train",
          "before_validate", "after_validate", "after_epoch", "after_fit",
          *(f"after_cancel_{level}" for level in LEVEL_EVENTS))
_EVENT_SET = frozenset(EVENTS)


class Callback:
    """Base class for callbacks: define methods named after events; each receives nothing and reads `self.learn`.

    `order` (lower runs first; ties keep the order callbacks were given in). `self.learn` is set when the
    callback is added to a Learner. Override `state_dict` / `load_state_dict` for any state a checkpoint must carry.
    """
    order: int = 0
    learn: Any = None
    during_lr_find: bool = True  # False: left out of `lr_find`'s short trial fit (e.g. it writes files)

    def state_dict(self) -> dict:
        """The callback's training state as plain data (tensors, numbers, lists, dicts): what a checkpoint saves."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned."""

    @property
    def name(self) -> str:
        return type(self).__name__

    def __repr__(self) -> str:
        return self.name


def _handler(method, learn) -> Callable[[], Any]:
    """A zero-argument handler: the method itself, or the method given `learn` if it takes an argument."""
    params = [p for p in inspect.signature(method).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
    if len(params) > 1:
        raise TypeError(f"{method.__qualname__} must take no argument or one (the learner), takes {len(params)}")
    return partial(method, learn) if params else method


def build_table(cbs: list, learn: Any) -> dict[str, tuple]:
    """Map each event name to the handlers of the callbacks implementing it, sorted once by `order`.

    Built once per fit (and when the callback list changes), so firing an event never sorts or scans.
    A handler may be written `def after_batch(self)` (reading `self.learn`) or `def after_batch(self, learn)`.
    """
    ordered = sorted(cbs, key=lambda cb: cb.order)  # sorted() is stable: ties keep the given order
    return {event: tuple(_handler(getattr(cb, event), learn) for cb in ordered if callable(getattr(cb, event, None)))
            for event in EVENTS}
