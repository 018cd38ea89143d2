"""Training control from the recorded values: EarlyStopping, SaveBest, ReduceLROnPlateau; and TerminateOnNaN.

The monitored value is any key of the Recorder's history rows (`train_loss`, `valid_loss`, every metric), read
after the Recorder (order 50) has written a row: in `after_epoch`, or with `fit(..., valid_every=K)` in
`after_validate`, so `patience` counts validations. `mode="auto"` takes the direction a metric
object of that name declares (`higher_is_better`, as torchmetrics' have), else reads it from the name
(`name_direction`), else is a ValueError asking for `mode=`: resolved in `before_fit`, before any training.
Counters and best values are in each callback's `state_dict()`, so a resumed run continues them; a fresh fit
starts them afresh.
"""
from __future__ import annotations

import math
import re
import warnings

import torch

from ..callback import Callback, CancelFit
from ..checks import check_int, check_number
from ..metrics import metric_name
from ..util import is_main_process
from .order import Order

__all__ = ["EarlyStopping", "SaveBest", "ReduceLROnPlateau", "TerminateOnNaN", "resolve_mode", "name_direction"]

# Words of a monitored name that say which way is better (whole tokens, lower case; see `name_tokens`).
LOWER_IS_BETTER = frozenset({
    "loss", "losses", "error", "errors", "err", "mse", "mae", "rmse", "msle", "rmsle", "mape", "smape", "wape", "nll",
    "ce", "xent", "crossentropy", "perplexity", "ppl", "bpb", "bpc", "bpd", "wer", "cer", "ter", "kl", "kld",
    "divergence", "distance", "hamming", "brier", "hinge", "eer", "fpr", "fnr", "fid", "regret"})
HIGHER_IS_BETTER = frozenset({
    "accuracy", "acc", "f1", "f2", "fbeta", "auc", "auroc", "roc", "ap", "map", "precision", "prec", "recall",
    "sensitivity", "specificity", "iou", "miou", "jaccard", "dice", "bleu", "rouge", "meteor", "chrf", "r2", "psnr",
    "ssim", "mcc", "kappa", "ndcg", "mrr", "pearson", "spearman"})
# Words that turn a name's direction around or make it a difference ("neg_log_loss" is higher-is-better,
# "accuracy_drop" lower-is-better): a name holding one says nothing for sure, so mode="auto" asks for mode=.
INVERTING = frozenset({
    "neg", "negative", "minus", "inv", "inverse", "drop", "gap", "reduction", "improvement", "gain", "delta", "diff",
    "difference", "decrease", "increase", "change"})


def name_tokens(name: str) -> list[str]:
    """The lower-case words of a name: split at non-alphanumerics and camel-case humps ("MulticlassF1Score" ->
    multiclass, f1, score; "valid_loss" -> valid, loss; "BinaryAUROC" -> binary, auroc)."""
    return [w.lower() for part in re.split(r"[^A-Za-z0-9]+", name)
            for w in re.findall(r"[A-Z]+[0-9]*(?![a-z])|[A-Z]?[a-z]+[0-9]*|[0-9]+", part)]


def _direction_of(word: str) -> str | None:
    for w in (word, word.rstrip("0123456789")):  # "bleu4", "rouge1": the word without its number
        if w in LOWER_IS_BETTER:
            return "min"
        if w in HIGHER_IS_BETTER:
            return "max"
    return None


def name_direction(name: str) -> str | None:
    """"min" for loss- and error-like names, "max" for score-like ones, None if the name does not say.

    The whole name (lower-cased) is looked up first, then its words (`name_tokens`) and runs of up to three words
    joined ("MeanIoU" -> mean, io, u -> "iou"), from the last word back: of several telling words the last decides,
    as the head of an English compound does ("dice_loss" is a loss, "error_rate" an error). A name with a word
    that may turn the direction around (`INVERTING`: "neg_log_loss", "accuracy_drop") says nothing: None.
    """
    words = name_tokens(name)
    if any(w in INVERTING for w in words):
        return None
    candidates = [name.lower(), *("".join(words[start:end + 1]) for end in reversed(range(len(words)))
                                  for start in range(end, max(end - 3, -1), -1))]
    return next((d for d in map(_direction_of, candidates) if d is not None), None)


def resolve_mode(monitor: str, mode: str, higher_is_better: bool | None = None) -> str:
    """"min" or "max". "auto": as `higher_is_better` says when it is given (a metric object's declaration), else
    as the name says (`name_direction`); a name that does not say is a ValueError asking for `mode=`."""
    if mode not in ("auto", "min", "max"):
        raise ValueError(f"mode must be 'auto', 'min' or 'max', got {mode!r}")
    if mode != "auto":
        return mode
    if higher_is_better is not None:
        return "max" if higher_is_better else "min"
    direction = name_direction(monitor)
    if direction is None:
        raise ValueError(f"mode='auto' cannot tell whether {monitor!r} is better higher or lower: pass mode='min' or "
                         f"mode='max' (or give the metric a `higher_is_better` attribute)")
    return direction


def _declared_direction(metrics, monitor: str) -> bool | None:
    """The `higher_is_better` a metric named `monitor` declares, or None."""
    for m in metrics:
        declared = getattr(m, "higher_is_better", None)
        if declared is not None and metric_name(m) == monitor:
            return bool(declared)
    return None


def _check_number(name: str, value, low: float, strict: bool = False) -> None:
    check_number(name, value, low, low_open=strict)


class _Tracker(Callback):
    """Follows `monitor` row by row (a row per epoch, or per validation with `valid_every`): the best value (better
    by more than `min_delta`), the epoch and `train_iter` of its row, and the rows since it (`wait`).

    `_sync()` reads each new history row once, whoever asks first: the callback's own `after_epoch` /
    `after_validate`, or a Checkpoint calling `state_dict()` earlier, so a checkpoint always holds counters that
    include its row. A fit starts the counters afresh (Resume then loads saved ones).

    `mode` is "min" or "max" once known: at construction when the name says (or `mode=` does), else in
    `before_fit`, where `mode="auto"` is resolved against the Learner's metrics (see the module docstring).
    """
    order = Order.TRACKERS

    def __init__(self, monitor: str, mode: str, min_delta: float = 0.0):
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(f"monitor must be a recorded value's name, got {monitor!r}")
        _check_number("min_delta", min_delta, 0.0)
        if mode not in ("auto", "min", "max"):
            raise ValueError(f"mode must be 'auto', 'min' or 'max', got {mode!r}")
        self.monitor, self.requested_mode, self.min_delta = monitor, mode, float(min_delta)
        self.mode: str | None = mode if mode != "auto" else name_direction(monitor)
        self.before_fit()
        self.fitting = False  # rows are read during a fit only (a validate() after it adds none)

    def before_fit(self):
        if self.learn is not None and self.requested_mode == "auto":  # the metrics are known now
            declared = _declared_direction(self.learn.metrics, self.monitor)
            try:
                self.mode = resolve_mode(self.monitor, "auto", declared)
            except ValueError as e:
                raise ValueError(f"{self.name}: {e}") from None
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.best_iter: int | None = None  # the `train_iter` of the best row
        self.wait = 0  # rows (epochs, or validations) since the last improvement
        self.n_rows = 0  # history rows read
        self.fitting = True

    def after_fit(self):
        self.fitting = False

    def _sync(self) -> bool:
        """Read the history rows not read yet; True if the newest of them improved on the best."""
        history = self.learn.recorder.history if self.learn is not None and self.fitting else []
        better = False
        for row in history[self.n_rows:]:
            if self.monitor not in row:
                raise ValueError(f"{self.name} monitors {self.monitor!r}, which is not recorded; "
                                 f"available: {sorted(row)}")
            value = float(row[self.monitor])
            if self.best is None:
                better = not math.isnan(value)
            elif self.mode == "min":
                better = value < self.best - self.min_delta
            else:
                better = value > self.best + self.min_delta
            if better:
                self.best, self.best_epoch, self.best_iter = value, row.get("epoch"), row.get("train_iter")
                self.wait = 0
            else:
                self.wait += 1
        self.n_rows = max(self.n_rows, len(history))
        return better

    def state_dict(self) -> dict:
        self._sync()
        return {"best": self.best, "best_epoch": self.best_epoch, "best_iter": self.best_iter, "wait": self.wait,
                "n_rows": self.n_rows}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_epoch, self.wait = state["best"], state["best_epoch"], int(state["wait"])
        self.best_iter = state.get("best_iter")
        # files from before rows were counted hold the epoch of the last row read: the rows up to it
        self.n_rows = int(state["n_rows"]) if "n_rows" in state else (
            0 if state.get("last_epoch") is None else len(self.learn.recorder.history))


class EarlyStopping(_Tracker):
    """Stop the fit once `monitor` has not improved (by more than `min_delta`) for `patience` rows in a row: epochs,
    or validations with `fit(..., valid_every=K)`.

    Stops in `after_epoch` (or `after_validate`) with order 100, after progress, logging and checkpoint callbacks
    have seen the row (a checkpoint written then already counts it: see `_Tracker`). `stopped_epoch` and
    `stopped_iter` say where.
    """
    order = Order.EARLY_STOPPING
    during_lr_find = False

    def __init__(self, monitor: str = "valid_loss", mode: str = "auto", patience: int = 3, min_delta: float = 0.0):
        self.patience = check_int("patience", patience, 1)
        super().__init__(monitor, mode, min_delta)
        self.stopped_epoch: int | None = None
        self.stopped_iter: int | None = None
        self.in_train = False  # in an epoch's training phase (a validation then is mid-epoch)

    def before_epoch(self):
        if self.wait >= self.patience:  # resumed from the checkpoint of the row this run stopped after
            raise CancelFit(f"early stopping: {self.monitor} has not improved for {self.wait} validations")

    def before_train(self):
        self.in_train = True

    def after_train(self):
        self.in_train = False

    def after_validate(self):
        if self.in_train:  # mid-epoch (`valid_every`); a validation in the epoch's slot is decided in after_epoch,
            self.after_epoch()  # after the epoch's checkpoint

    def after_epoch(self):
        self._sync()
        if self.wait >= self.patience and self.fitting:
            learn = self.learn
            self.stopped_epoch, self.stopped_iter = learn.epoch, learn.train_iter
            if is_main_process():
                print(f"EarlyStopping: no improvement in {self.monitor} for {self.wait} "
                      f"{'epochs' if learn.valid_every is None else 'validations'} (best {self.best:.6g} at epoch "
                      f"{self.best_epoch}, step {self.best_iter}); stopped after epoch {learn.epoch}, step "
                      f"{learn.train_iter}")
            raise CancelFit(f"early stopping after epoch {learn.epoch}, step {learn.train_iter}")


class SaveBest(_Tracker):
    """Save the model and optimizer (as `learn.save`: atomic, loadable with `weights_only=True`) to `path` whenever
    `monitor` reaches a new best. Only the main process writes."""
    during_lr_find = False

    def __init__(self, path, monitor: str = "valid_loss", mode: str = "auto", min_delta: float = 0.0):
        super().__init__(monitor, mode, min_delta)
        self.path = path

    def after_epoch(self):
        if self._sync() and is_main_process():
            self.learn.save(self.path)

    after_validate = after_epoch  # a row per validation (`valid_every`)


class ReduceLROnPlateau(_Tracker):
    """Divide every group's lr by `factor` (not below `min_lr`) once `monitor` has not improved for `patience` rows
    (epochs, or validations with `valid_every`).

    Counting as EarlyStopping does (act on the `patience`-th epoch without improvement, then count afresh), so
    torch's `ReduceLROnPlateau(patience=p, factor=1/f, threshold_mode="abs")` is ours with `patience=p+1,
    factor=f`. It sets the optimizer's lr: use it with a constant lr, since a schedule would overwrite it.
    """
    during_lr_find = False

    def __init__(self, monitor: str = "valid_loss", patience: int = 2, factor: float = 10.0, min_lr: float = 0.0,
                 mode: str = "auto", min_delta: float = 0.0):
        check_int("patience", patience, 1)
        _check_number("factor", factor, 1.0, strict=True)
        _check_number("min_lr", min_lr, 0.0)
        super().__init__(monitor, mode, min_delta)
        self.patience, self.factor, self.min_lr = patience, float(factor), float(min_lr)

    def after_epoch(self):
        self._sync()
        if self.wait >= self.patience:
            for group in self.learn.opt.param_groups:
                group["lr"] = max(group["lr"] / self.factor, self.min_lr)
            self.wait = 0

    after_validate = after_epoch  # a row per validation (`valid_every`)


class TerminateOnNaN(Callback):
    """Stop the fit when a training loss is NaN or infinite, before its backward pass and step touch the weights.

    Checked in `after_loss` (after MixUp-style callbacks replaced the loss, order 45), it costs one host sync per
    training step (reading whether the loss is finite): the price of stopping before the step rather than after.
    """
    order = Order.TERMINATE_ON_NAN

    def __init__(self):
        self.stopped_at: int | None = None  # the train_iter of the non-finite loss

    def after_loss(self):
        learn = self.learn
        if learn.training and not bool(torch.isfinite(learn.loss.detach())):
            self.stopped_at = learn.train_iter
            msg = (f"TerminateOnNaN: the training loss is {learn.loss.item()} at step {learn.train_iter} "
                   f"(epoch {learn.epoch}, batch {learn.iter}); stopping before it reaches the weights")
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
            raise CancelFit(msg)

    def state_dict(self) -> dict:
        return {"stopped_at": self.stopped_at}

    def load_state_dict(self, state: dict) -> None:
        self.stopped_at = state["stopped_at"]
