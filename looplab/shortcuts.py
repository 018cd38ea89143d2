"""Learner methods that are entry points into feature modules (`learn.fit_one_cycle`, `learn.lr_find`, …).

Each one imports its feature module when called, so the core imports no feature, and says where the feature
lives. The Learner inherits them; nothing is patched onto it.
"""
from __future__ import annotations

__all__ = ["FeatureMethods"]


class FeatureMethods:
    """Shortcuts the Learner inherits; each forwards to a plain function taking the learner first."""

    def fit_one_cycle(self, n_epochs: int, *args, **kwargs) -> None:
        """One-cycle policy (see `looplab.callbacks.schedule.fit_one_cycle`)."""
        from .callbacks.schedule import fit_one_cycle
        fit_one_cycle(self, n_epochs, *args, **kwargs)

    def fit_warmup_cos(self, n_epochs: int, *args, **kwargs) -> None:
        """Linear warmup then cosine decay (see `looplab.callbacks.schedule.fit_warmup_cos`)."""
        from .callbacks.schedule import fit_warmup_cos
        fit_warmup_cos(self, n_epochs, *args, **kwargs)

    def fit_flat_cos(self, n_epochs: int, *args, **kwargs) -> None:
        """Flat lr then cosine annealing (see `looplab.callbacks.schedule.fit_flat_cos`)."""
        from .callbacks.schedule import fit_flat_cos
        fit_flat_cos(self, n_epochs, *args, **kwargs)

    def fit_sgdr(self, n_cycles: int, *args, **kwargs) -> None:
        """Cosine annealing with warm restarts (see `looplab.callbacks.schedule.fit_sgdr`)."""
        from .callbacks.schedule import fit_sgdr
        fit_sgdr(self, n_cycles, *args, **kwargs)

    def lr_find(self, *args, **kwargs):
        """LR range test that leaves everything as it found it (see `looplab.lr_finder.lr_find`)."""
        from .lr_finder import lr_find
        return lr_find(self, *args, **kwargs)

    def freeze_to(self, n: int) -> None:
        """Train only parameter groups `n` onwards (see `looplab.optim.freeze_to`)."""
        from .optim import freeze_to
        freeze_to(self, n)

    def unfreeze(self) -> None:
        """Train every parameter group."""
        self.freeze_to(0)
