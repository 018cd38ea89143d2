"""Compile: `torch.compile` the model for a fit, and hand the plain module back after it."""
from __future__ import annotations

import torch

from ..callback import Callback
from .order import Order

__all__ = ["Compile"]


class Compile(Callback):
    """`learn.model = torch.compile(learn.model, **compile_kwargs)` for the fit (e.g. `backend="eager"`,
    `mode="max-autotune"`); `learn.model` is the module it was again after the fit, however the fit ends.

    The compiled wrapper shares the module's parameters, so the optimizer is untouched. Everything that saves or
    averages weights (`learn.save`, Checkpoint, EMA, SWA, `lr_find`) goes through `looplab.util.unwrap_model`
    and sees the plain module's `state_dict` keys (no `_orig_mod.`), whether a model was compiled by this
    callback or by the user before it was given to the Learner. Under DDP it compiles the DDP wrapper.
    """
    order = Order.COMPILE

    def __init__(self, **compile_kwargs):
        self.compile_kwargs = compile_kwargs
        self._original = self._compiled = None

    def before_fit(self):
        learn = self.learn
        self._original = learn.model
        self._compiled = learn.model = torch.compile(learn.model, **self.compile_kwargs)

    def after_fit(self):
        if self._compiled is not None and self.learn.model is self._compiled:  # not already unwrapped by DDP
            self.learn.model = self._original
        self._original = self._compiled = None
