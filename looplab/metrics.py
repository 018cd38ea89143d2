"""Metrics: plain functions averaged over samples, and objects that accumulate over the whole validation set.

Two kinds go in `Learner(metrics=...)`:

- a **function** `(pred, target) -> number or one-element tensor`. The Recorder weights each validation batch's
  value by its number of samples: the result is the per-sample mean over the set. That is exact for metrics that
  are means over samples (`accuracy`, `error_rate`, MSE, …) and wrong for F1, AUROC and the like.
- an **object** with `update(pred, target)`, `compute()` and `reset()` — the protocol of `torchmetrics.Metric`, so
  torchmetrics objects work unchanged. It is reset before each validation phase, updated with every batch and
  computed once at its end. `F1Score` and `AUROC` below keep their state on the predictions' device (no host
  sync per batch) and, like torchmetrics, combine every process's state in `compute()` when a process group of
  more than one process is initialised (so every process must validate).

A metric's name (its column in the history) is its `name` attribute, else its `__name__`, else its class name;
names must be unique (`check_metrics`). A metric may declare `higher_is_better`: monitors with `mode="auto"`
follow it.
"""
from __future__ import annotations

from typing import Any

import torch

__all__ = ["accuracy", "error_rate", "F1Score", "AUROC", "metric_name", "is_metric_object", "check_metrics",
           "f1_from_confusion", "binary_auroc"]

# the history row's own columns: a metric of one of these names would overwrite them
RESERVED_NAMES = frozenset({"epoch", "train_loss", "valid_loss", "time"})


def accuracy(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Fraction of samples whose arg-max class equals the target."""
    return (pred.argmax(dim=-1) == target).float().mean()


def error_rate(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - accuracy."""
    return 1 - accuracy(pred, target)


# ---- names and kinds ------------------------------------------------------------------------------------------
def metric_name(metric: Any) -> str:
    """The metric's column name: its `name` attribute (a non-empty string), else `__name__`, else its class name."""
    name = getattr(metric, "name", None)
    if isinstance(name, str) and name:
        return name
    name = getattr(metric, "__name__", None)
    return name if isinstance(name, str) and name else type(metric).__name__


def is_metric_object(metric: Any) -> bool:
    """True for an accumulating metric: an object with callable `update`, `compute` and `reset`."""
    return all(callable(getattr(metric, attr, None)) for attr in ("update", "compute", "reset"))


def check_metrics(metrics: Any) -> list:
    """`metrics` (one metric, or an iterable of them) as a list, after checking each is a function or a metric
    object and that their names are unique (two metrics of one name would share one column: one would be lost)."""
    metrics = [metrics] if callable(metrics) or is_metric_object(metrics) else list(metrics)
    for m in metrics:
        if not (callable(m) or is_metric_object(m)):
            raise TypeError(f"a metric must be a function (pred, target) -> value or an object with update/compute/"
                            f"reset, got {m!r}")
    names = [metric_name(m) for m in metrics]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ValueError(f"metric names must be unique; several metrics are named {', '.join(map(repr, duplicated))}: "
                         f"give them a `name` attribute (or distinct function names)")
    reserved = sorted(RESERVED_NAMES.intersection(names))
    if reserved:
        raise ValueError(f"a metric may not be named {', '.join(map(repr, reserved))}: the history row uses that "
                         f"name; give it another `name`")
    return metrics


# ---- data-parallel helpers ------------------------------------------------------------------------------------
def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _collective_device() -> torch.device:
    """Where a collective's tensors must live: the current GPU for nccl, else the CPU."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _agree_on_classes(n_classes: int | None) -> int:
    """The number of classes all processes saw (a process that saw no batch passes None)."""
    t = torch.tensor([n_classes or 0], dtype=torch.int64, device=_collective_device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t.item())


def _all_gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Every process's `rows` (the same trailing shape, any number of rows), concatenated in rank order."""
    dist = torch.distributed
    rows = rows.to(_collective_device())
    n = torch.tensor([rows.shape[0]], dtype=torch.int64, device=rows.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    padded = rows.new_zeros((max(sizes), *rows.shape[1:]))
    padded[:rows.shape[0]] = rows
    gathered = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:s] for g, s in zip(gathered, sizes)])


# ---- F1 -------------------------------------------------------------------------------------------------------
def f1_from_confusion(confusion: torch.Tensor, average: str) -> torch.Tensor:
    """F1 from a confusion matrix (rows: true class, columns: predicted class), as `sklearn.metrics.f1_score`.

    "micro": of the pooled counts; "macro": the mean over the classes that occur (as target or prediction);
    "weighted": the mean weighted by each class's number of targets; "binary": class 1's. 0 where undefined.
    """
    c = confusion.double()
    tp, n_pred, n_true = c.diagonal(), c.sum(0), c.sum(1)
    if average == "micro":
        tp, n_pred, n_true = tp.sum(), n_pred.sum(), n_true.sum()
    denominator = n_pred + n_true  # 2·tp + fp + fn
    f1 = torch.where(denominator > 0, 2 * tp / denominator.clamp(min=1), torch.zeros_like(denominator))
    if average == "micro":
        return f1
    if average == "binary":
        return f1[1]
    weights = n_true if average == "weighted" else (denominator > 0).double()
    return (f1 * weights).sum() / weights.sum().clamp(min=1)


class F1Score:
    """F1 over the whole validation set, from a confusion matrix accumulated on the device.

    `pred`: class scores `(N, C, …)` (logits or probabilities; the arg-max over dim 1 is the prediction) for targets
    `(N, …)`; or, for binary tasks, one score per target of the target's shape (a probability, or a logit when any
    value of the batch is outside [0, 1], as torchmetrics decides; the prediction is score > 0.5 after a sigmoid),
    or class labels (integers; then `num_classes` is needed unless `average="binary"`).
    `average`: "macro" (default), "micro", "weighted" or "binary" (class 1's F1); see `f1_from_confusion`.
    """
    higher_is_better = True
    AVERAGES = ("macro", "micro", "weighted", "binary")

    def __init__(self, num_classes: int | None = None, average: str = "macro", name: str | None = None):
        if average not in self.AVERAGES:
            raise ValueError(f"average must be one of {self.AVERAGES}, got {average!r}")
        if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                        or num_classes < 2):
            raise ValueError(f"num_classes must be an int >= 2 or None, got {num_classes!r}")
        if average == "binary" and num_classes not in (None, 2):
            raise ValueError(f"average='binary' is for two classes, got num_classes={num_classes}")
        self.num_classes, self.average = num_classes, average
        self.name = name or type(self).__name__
        self.reset()

    def reset(self) -> None:
        self.confusion: torch.Tensor | None = None  # (C·C,) int64 counts, true class major

    def _labels(self, pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(predicted labels, target labels, number of classes), read from shapes only (no host sync)."""
        if pred.ndim == target.ndim + 1 and pred.shape[1] > 1:  # class scores along dim 1
            n_classes, labels = pred.shape[1], pred.argmax(1)
        elif pred.shape == target.shape or (pred.ndim == target.ndim + 1 and pred.shape[1] == 1):
            pred = pred.reshape(target.shape)
            if pred.is_floating_point():  # one score per target: binary
                n_classes = 2
                logits = ((pred < 0) | (pred > 1)).any()  # a device tensor: where() decides without a sync
                labels = torch.where(logits, pred > 0, pred > 0.5).long()
            else:
                n_classes = 2 if self.average == "binary" else self.num_classes
                if n_classes is None:
                    raise ValueError(f"{self.name}: predictions are class labels; pass num_classes=")
                labels = pred.long()
        else:
            raise ValueError(f"{self.name}: pred of shape {tuple(pred.shape)} does not fit target of shape "
                             f"{tuple(target.shape)}: expected scores (N, C, ...) or one value per target")
        if self.num_classes is not None and n_classes != self.num_classes:
            raise ValueError(f"{self.name}: num_classes={self.num_classes}, but pred has {n_classes} classes")
        if self.average == "binary" and n_classes != 2:
            raise ValueError(f"{self.name}: average='binary' needs two classes, pred has {n_classes}")
        return labels.reshape(-1), target.reshape(-1).long(), n_classes

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        labels, targets, n_classes = self._labels(pred.detach(), target.detach())
        if self.confusion is None:
            self.confusion = torch.zeros(n_classes * n_classes, dtype=torch.int64, device=labels.device)
        elif self.confusion.numel() != n_classes * n_classes:
            raise ValueError(f"{self.name}: this batch has {n_classes} classes, earlier ones had "
                             f"{int(self.confusion.numel() ** 0.5)}")
        # index_add_, not bincount: bincount on CUDA reads the maximum back to the host
        self.confusion.index_add_(0, targets * n_classes + labels, torch.ones_like(targets))

    def compute(self) -> torch.Tensor:
        confusion = self.confusion
        if _world_size() > 1:
            n_classes = _agree_on_classes(None if confusion is None else round(confusion.numel() ** 0.5))
            mine = (torch.zeros(n_classes * n_classes, dtype=torch.int64) if confusion is None else confusion)
            confusion = mine.to(_collective_device(), copy=True)
            torch.distributed.all_reduce(confusion)
        if confusion is None:
            raise ValueError(f"{self.name}: compute() before any update()")
        n_classes = round(confusion.numel() ** 0.5)
        return f1_from_confusion(confusion.view(n_classes, n_classes), self.average).float()


# ---- AUROC ----------------------------------------------------------------------------------------------------
def binary_auroc(scores: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Area under the ROC curve: the probability that a positive scores above a negative (ties count half).

    The Mann-Whitney U statistic from average ranks, as `sklearn.metrics.roc_auc_score`. NaN when `positive` is
    all True or all False (the area is undefined).
    """
    scores, order = scores.double().sort()
    _, inverse, counts = torch.unique_consecutive(scores, return_inverse=True, return_counts=True)
    last_rank = counts.cumsum(0).double()  # 1-based rank of each run of tied scores' last element
    mean_rank = (last_rank - (counts - 1) / 2)[inverse]  # tied scores share their ranks' mean
    positive = positive[order]
    n_pos = positive.sum().double()
    n_neg = positive.numel() - n_pos
    u = mean_rank[positive].sum() - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)  # 0 / 0 = NaN when a class is missing


class AUROC:
    """Area under the ROC curve over the whole validation set (scores and targets are kept on the device).

    Binary: `pred` holds one score per target (probabilities or logits: the area depends only on their order),
    positives are targets equal to 1. Multiclass: `pred` holds class scores `(N, C, …)` for integer targets
    `(N, …)`; the result is the one-vs-rest macro average (sklearn's `multi_class="ovr"`), on softmax
    probabilities — the scores are taken as probabilities if they all lie in [0, 1], else as logits (torchmetrics'
    rule). A class absent from the targets (or the only one present) has no area and is left out of the mean;
    NaN if no class has one.
    """
    higher_is_better = True

    def __init__(self, name: str | None = None):
        self.name = name or type(self).__name__
        self.reset()

    def reset(self) -> None:
        self.scores: list[torch.Tensor] = []  # (M, C) per batch; C = 1 for binary scores
        self.targets: list[torch.Tensor] = []

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        pred, target = pred.detach(), target.detach()
        if pred.ndim == target.ndim + 1:  # class scores along dim 1
            scores = pred.movedim(1, -1).reshape(-1, pred.shape[1])
        elif pred.shape == target.shape:
            scores = pred.reshape(-1, 1)
        else:
            raise ValueError(f"{self.name}: pred of shape {tuple(pred.shape)} does not fit target of shape "
                             f"{tuple(target.shape)}: expected scores (N, C, ...) or one score per target")
        if self.scores and scores.shape[1] != self.scores[0].shape[1]:
            raise ValueError(f"{self.name}: this batch has {scores.shape[1]} score columns, earlier ones had "
                             f"{self.scores[0].shape[1]}")
        self.scores.append(scores)
        self.targets.append(target.reshape(-1))

    def compute(self) -> torch.Tensor:
        scores = torch.cat(self.scores).float() if self.scores else None
        targets = torch.cat(self.targets).long() if self.targets else None
        if _world_size() > 1:
            n_columns = _agree_on_classes(None if scores is None else scores.shape[1])
            if scores is None:
                scores, targets = torch.zeros(0, n_columns), torch.zeros(0, dtype=torch.int64)
            scores, targets = _all_gather_rows(scores), _all_gather_rows(targets)
        if scores is None:
            raise ValueError(f"{self.name}: compute() before any update()")
        if scores.shape[1] == 1:
            return binary_auroc(scores[:, 0], targets == 1).float()
        if not ((scores >= 0) & (scores <= 1)).all():
            scores = scores.softmax(1)
        areas = torch.stack([binary_auroc(scores[:, k], targets == k) for k in range(scores.shape[1])])
        return areas.nanmean().float()
