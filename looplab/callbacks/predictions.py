"""PredictionHistogram and SamplePredictions: what the model says about fixed validation items as training goes."""
from __future__ import annotations

import bisect
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..callback import Callback
from ..checks import check_int
from ..display import NotebookDisplay, html_table, in_notebook, text_table
from ..util import tree_map
from .order import Order

__all__ = ["PredictionHistogram", "PredictionTable", "SamplePredictions", "predicted_classes",
           "target_probabilities"]


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
        self._count, self._in_fit = 0, False

    @property
    def published_histograms(self) -> dict[str, list]:
        return {self.tag: self.history}

    def before_fit(self):
        self.history, self._in_fit = [], True

    def after_fit(self):
        self._in_fit = False  # validate() / get_preds() / interpret() after the fit add nothing to the history

    def before_validate(self):
        self._parts, self._count = [], 0 if self._in_fit else self.n_samples

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


def predicted_classes(pred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per item: `(class, probability of that class)`: the argmax of the softmax for class scores `(N, C)`, C > 1;
    for one logit per item, class 1 when its sigmoid is > 0.5, with the probability of the class chosen."""
    pred = pred.detach().float()
    if pred.ndim == 2 and pred.shape[1] > 1:
        probs, classes = pred.softmax(1).max(1)
        return classes, probs
    if pred.ndim == 1 or (pred.ndim == 2 and pred.shape[1] == 1):
        p1 = pred.reshape(-1).sigmoid()
        classes = (p1 > 0.5).long()
        return classes, torch.where(classes == 1, p1, 1 - p1)
    raise ValueError(f"SamplePredictions takes class scores (N, C) or one logit per item, got pred of shape "
                     f"{tuple(pred.shape)}")


class PredictionTable:
    """One validation's predictions for the chosen items: `step` (train_iter) and `rows` (dicts of index, [input],
    target, prediction, probability). Shown as an HTML table in a notebook, as text elsewhere."""

    def __init__(self, step: int, rows: list[dict]):
        self.step, self.rows = step, rows

    def _repr_html_(self) -> str:
        return html_table(self.rows, caption=f"predictions at step {self.step}")

    def __repr__(self) -> str:
        return f"predictions at step {self.step}\n{text_table(self.rows)}"


class SamplePredictions(Callback):
    """After each validation, a table of the validation items at positions `indices` (in the order the validation
    data yields them): index, target, predicted class, its probability (`predicted_classes`), and with
    `decode(x) -> str` (x: the item's input, on the CPU) a readable input.

    Each table is a `PredictionTable` kept in `history`; it is published as `published_tables[tag]` (the loggers'
    channel: TensorBoard writes it as text, MLflow as a table), and in a notebook (`html=None`: detected; True /
    False to force) it is shown as an HTML table below the cell, redrawn in place after every validation.
    Costs only the batches holding those items; their values stay on the device until the end of the phase."""
    order = Order.PREDICTIONS
    during_lr_find = False

    def __init__(self, indices, decode: Callable[[Any], str] | None = None, tag: str = "sample_predictions",
                 html: bool | None = None):
        indices = list(indices) if not isinstance(indices, int) else [indices]
        if not indices:
            raise ValueError("indices must name at least one validation item, got none")
        self.indices = [check_int("indices[i]", i, 0) for i in dict.fromkeys(indices)]  # duplicates once
        if decode is not None and not callable(decode):
            raise TypeError(f"decode must be a function (input) -> str or None, got {decode!r}")
        self.decode, self.tag, self.html = decode, tag, html
        self._sorted = sorted(self.indices)
        self.history: list[PredictionTable] = []
        self._display = NotebookDisplay()
        self._parts: list[tuple] = []
        self._in_fit = self._collect = False
        self._seen = 0

    @property
    def published_tables(self) -> dict[str, list]:
        return {self.tag: [(table.step, table.rows) for table in self.history]}

    def before_fit(self):
        self.history, self._in_fit = [], True
        self._display = NotebookDisplay()  # a new output area for every fit

    def after_fit(self):
        self._in_fit = False  # validate() / get_preds() / interpret() after the fit add nothing to the history

    def before_validate(self):
        self._parts, self._seen, self._collect = [], 0, self._in_fit

    def after_batch(self):
        learn = self.learn
        if learn.training or not self._collect or self._seen > self._sorted[-1]:
            return
        pred = learn.pred
        if not isinstance(pred, torch.Tensor):
            raise TypeError(f"SamplePredictions takes tensor predictions, got {type(pred).__name__}")
        n, start = len(pred), self._seen
        self._seen += n
        lo, hi = bisect.bisect_left(self._sorted, start), bisect.bisect_left(self._sorted, start + n)
        if lo == hi:
            return
        positions = self._sorted[lo:hi]
        at = torch.tensor([p - start for p in positions], device=pred.device)
        classes, probs = predicted_classes(pred[at])
        xs = tree_map(lambda t: t[at.to(t.device)].detach() if t.ndim else t, learn.xb) if self.decode else None
        self._parts.append((positions, learn.yb[at.to(learn.yb.device)].detach(), classes, probs, xs))

    def after_validate(self):
        if not self._parts:
            return
        found: dict[int, dict] = {}
        for positions, targets, classes, probs, xs in self._parts:
            targets, classes, probs = targets.cpu(), classes.cpu().tolist(), probs.cpu().tolist()
            xs = tree_map(lambda t: t.cpu(), xs)
            for k, position in enumerate(positions):
                row = {"index": position}
                if self.decode is not None:
                    row["input"] = str(self.decode(tree_map(lambda t, k=k: t[k] if t.ndim else t, xs)))
                target = targets[k]
                row["target"] = target.item() if target.numel() == 1 else target.tolist()
                row["prediction"], row["probability"] = classes[k], probs[k]
                found[position] = row
        self._parts = []
        missing = [i for i in self.indices if i not in found]
        if missing:
            raise ValueError(f"SamplePredictions: indices {missing} are beyond the {self._seen} validation items")
        table = PredictionTable(self.learn.train_iter, [found[i] for i in self.indices])
        self.history.append(table)
        show = in_notebook() if self.html is None else bool(self.html)
        if show:
            self._display.show(table)

    def state_dict(self) -> dict:
        return {"history": [[table.step, [dict(r) for r in table.rows]] for table in self.history]}

    def load_state_dict(self, state: dict) -> None:
        self.history = [PredictionTable(int(step), [dict(r) for r in rows]) for step, rows in state["history"]]
