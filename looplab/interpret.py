"""Interpretation of a classifier's predictions: confusion matrix and the items it gets most wrong."""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch.nn import functional as F

from .checks import check_int

__all__ = ["Interpretation", "interpret", "item_losses"]


def item_losses(preds: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The loss of every item: cross-entropy for class scores `(N, C)`, binary cross-entropy with logits for one
    logit per item (what `cross_entropy(..., reduction="none")` gives, whatever loss the Learner trained with)."""
    preds = preds.detach().float()
    if preds.ndim == 2 and preds.shape[1] > 1:
        return F.cross_entropy(preds, targets.long(), reduction="none")
    return F.binary_cross_entropy_with_logits(preds.reshape(-1), targets.float().reshape(-1), reduction="none")


class Interpretation:
    """Predictions `preds` (class scores or one logit per item) and `targets` over a dataset, and what they show."""

    def __init__(self, preds: torch.Tensor, targets: torch.Tensor):
        if not isinstance(preds, torch.Tensor) or not isinstance(targets, torch.Tensor):
            raise TypeError(f"interpret needs tensor predictions and targets, got {type(preds).__name__} and "
                            f"{type(targets).__name__}")
        self.preds, self.targets = preds.detach().float().cpu(), targets.detach().cpu()
        self.losses = item_losses(self.preds, self.targets)
        multi = self.preds.ndim == 2 and self.preds.shape[1] > 1
        self.n_classes = self.preds.shape[1] if multi else 2
        self.predicted = self.preds.argmax(1) if multi else (self.preds.reshape(-1) > 0).long()

    def confusion_matrix(self) -> np.ndarray:
        """Counts, rows the actual class, columns the predicted class (as `sklearn.metrics.confusion_matrix`)."""
        n = max(self.n_classes, int(self.targets.max()) + 1 if self.targets.numel() else 0)
        index = self.targets.long().reshape(-1) * n + self.predicted
        return torch.bincount(index, minlength=n * n).reshape(n, n).numpy()

    def top_losses(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`(losses, indices)` of the `k` items with the largest loss, largest first."""
        check_int("k", k, 1)
        return self.losses.topk(min(k, len(self.losses)))

    def plot_confusion_matrix(self, labels: Iterable[str] | None = None):
        """The confusion matrix as a matplotlib Figure (counts written in the cells)."""
        import matplotlib.pyplot as plt
        cm = self.confusion_matrix()
        labels = [str(i) for i in range(len(cm))] if labels is None else list(labels)
        fig, ax = plt.subplots(figsize=(1 + 0.5 * len(cm), 1 + 0.5 * len(cm)))
        ax.imshow(cm, cmap="Blues")
        for (i, j), count in np.ndenumerate(cm):
            ax.text(j, i, str(count), ha="center", va="center",
                    color="white" if count > cm.max() / 2 else "black", fontsize="small")
        ax.set_xticks(range(len(cm)), labels)
        ax.set_yticks(range(len(cm)), labels)
        ax.set_xlabel("predicted")
        ax.set_ylabel("actual")
        plt.close(fig)
        return fig

    def plot_top_losses(self, k: int, inputs: torch.Tensor | None = None):
        """The `k` largest losses as bars labelled `index: actual → predicted`; with `inputs` (the items, e.g.
        images of shape (N, H, W) or (N, 1, H, W)), the items themselves with those titles."""
        import matplotlib.pyplot as plt
        losses, indices = self.top_losses(k)
        titles = [f"{int(i)}: {int(self.targets[i])}→{int(self.predicted[i])}\nloss {float(v):.2f}"
                  for v, i in zip(losses, indices)]
        if inputs is not None:
            fig, axes = plt.subplots(1, len(indices), figsize=(1.6 * len(indices), 2), squeeze=False)
            for ax, i, title in zip(axes[0], indices, titles):
                ax.imshow(inputs[int(i)].detach().cpu().float().squeeze().numpy(), cmap="gray")
                ax.set_title(title, fontsize="small")
                ax.axis("off")
        else:
            fig, ax = plt.subplots(figsize=(6, 0.4 * len(indices) + 1))
            ax.barh(range(len(indices))[::-1], losses.numpy())
            ax.set_yticks(range(len(indices))[::-1], [t.replace("\n", "  ") for t in titles])
            ax.set_xlabel("loss")
        fig.tight_layout()
        plt.close(fig)
        return fig


def interpret(learn, dl: Iterable | None = None) -> Interpretation:
    """Predict over `dl` (default: the validation data) and return an `Interpretation` of the predictions."""
    preds, targets = learn.get_preds(dl)
    return Interpretation(preds, targets)
