"""PredictionHistogram: how the probabilities the model gives fixed validation items evolve over training."""
from __future__ import annotations

import numpy as np
import torch

from ..callback import Callback
from ..checks import check_int
from .order import Order

__all__ = ["PredictionHistogram", "target_probabilities"]


def target_probabilities(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per item: the softmax probability of the target class for class scores `(N, C)`, C > 1; the sigmoid of a
    single logit `(N,)` or `(N, 1)` (binary: the probability of class 1)."""
    pred = pred.detach().float()
    if pred.ndim == 2 and pred.shape[1] > 1:
        return pred.softmax(1).gather(1, target.detach().long().reshape(-1, 1)).reshape(-1)
    if pred.ndim == 1 or (pred.ndim == 2 and pred.shape[1] == 1):
        return pred.reshape(-1).sigmoid()
    raise ValueError(f"PredictionHistogram takes class scores (N, C) or one logit per item, got pred of shape "
                     f"{tuple(pred.shape)}")


class PredictionHistogram(Callback):
    """After each validation, the probabilities (`target_probabilities`) the model gives the first `n_samples`
    validation items, kept in `history` as `(train_iter, numpy array)` and published as the histogram `tag`
    (`published_histograms`, the loggers' channel: TensorBoard and MLflow write it). `plot()` shows how the distribution
    evolves. Costs only the batches holding those items; their probabilities stay on the device until the end of
    the phase."""
    order = Order.PREDICTIONS
    during_lr_find = False

    def __init__(self, n_samples: int = 256, tag: str = "pred_prob"):
        self.n_samples, self.tag = check_int("n_samples", n_samples, 1), tag
        self.history: list[tuple[int, np.ndarray]] = []
        self._parts: list[torch.Tensor] = []
        self._count = 0

    @property
    def published_histograms(self) -> dict[str, list]:
        return {self.tag: self.history}

    def before_fit(self):
        self.history = []

    def before_validate(self):
        self._parts, self._count = [], 0

    def after_batch(self):
        learn = self.learn
        need = self.n_samples - self._count
        if learn.training or need <= 0:
            return
        probs = target_probabilities(learn.pred, learn.yb)[:need]
        self._parts.append(probs)
        self._count += len(probs)

    def after_validate(self):
        if self._parts:
            self.history.append((self.learn.train_iter, torch.cat(self._parts).cpu().numpy()))
        self._parts = []

    def plot(self):
        """One histogram curve per validation (darker: later), probability on x, as a matplotlib Figure."""
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 4))
        bins = np.linspace(0, 1, 21)
        for i, (step, values) in enumerate(self.history):
            counts, _ = np.histogram(values, bins=bins)
            shade = 0.25 + 0.75 * (i + 1) / len(self.history)
            ax.plot((bins[:-1] + bins[1:]) / 2, counts, color=plt.cm.viridis(1 - shade), label=f"step {step}")
        ax.set_xlabel(f"probability ({self.tag})")
        ax.set_ylabel("items")
        if len(self.history) <= 10:
            ax.legend(fontsize="small")
        plt.close(fig)
        return fig

    def state_dict(self) -> dict:
        return {"history": [[int(step), values.tolist()] for step, values in self.history]}

    def load_state_dict(self, state: dict) -> None:
        self.history = [(int(step), np.asarray(values, dtype=np.float32)) for step, values in state["history"]]
