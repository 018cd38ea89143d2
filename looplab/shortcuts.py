"""Learner methods that are entry points into feature modules (`learn.fit_one_cycle`, `learn.lr_find`, …).

Each is the feature's own plain function, taking the learner first, so `help(learn.fit_one_cycle)` shows its
real signature and docstring and says where it lives. The Learner inherits them; nothing is patched onto it.
"""
from __future__ import annotations

from . import interpret as interpretation
from . import lr_finder, optim
from .callbacks import schedule

__all__ = ["FeatureMethods"]


class FeatureMethods:
    """Shortcuts the Learner inherits: plain functions of the learner, defined in their feature modules."""
    fit_one_cycle = schedule.fit_one_cycle
    fit_warmup_cos = schedule.fit_warmup_cos
    fit_flat_cos = schedule.fit_flat_cos
    fit_sgdr = schedule.fit_sgdr
    lr_find = lr_finder.lr_find
    freeze_to = optim.freeze_to
    interpret = interpretation.interpret

    def unfreeze(self) -> None:
        """Train every parameter group (`freeze_to(0)`)."""
        optim.freeze_to(self, 0)
