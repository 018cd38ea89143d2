"""Metrics: functions `(pred, target) -> scalar tensor`, averaged over samples by the Recorder."""
from __future__ import annotations

import torch

__all__ = ["accuracy", "error_rate"]


def accuracy(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Fraction of samples whose arg-max class equals the target."""
    return (pred.argmax(dim=-1) == target).float().mean()


def error_rate(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - accuracy."""
    return 1 - accuracy(pred, target)
